"""The main job's report: a table of metrics per (activation, setting), findings, churn.png."""

from __future__ import annotations

import math
from pathlib import Path

from jaxrepro import plots
from jaxrepro.studies.render import fmt, markdown_table, metric

COLUMNS = ("acc_mean", "acc_std", "churn", "pd_abs", "pd_rel", "eta", "var_ratio")


def render(config, analysis, workdir: Path) -> list[str]:
    records = analysis.records
    rows = [
        [rec["info"]["activation"], rec["info"]["setting"]] + [fmt(metric(rec, c)) for c in COLUMNS]
        for rec in records.values()
    ]
    lines = [
        "## Replicas by source of randomness",
        "",
        f"Each row trains {config.replicas} replicas of an MLP {list(config.widths)} "
        f"(dropout {config.dropout_rate}) for {config.epochs} epochs on {config.dataset} "
        "that differ only in the sources the setting varies ('nothing' is the control: "
        "identical replicas, every PD exactly 0); churn is the fraction of test examples "
        "on which two replicas disagree, pd_abs the mean total-variation distance of their "
        "probabilities, eta the mean accuracy minus churn, var_ratio the observed variance "
        "of accuracy over the variance independent errors would give.",
        "",
        markdown_table(["activation", "setting", *COLUMNS], rows),
        "",
    ]
    lines += _findings(config, records)
    churn = {
        act: [metric(records[f"{act}/{s}"], "churn") for s in config.settings]
        for act in config.activations
    }
    plots.grouped_bars(
        workdir / "churn.png",
        list(config.settings),
        churn,
        ylabel="churn (top-1 disagreement)",
        xlabel="randomness setting",
        title=f"Churn between replicas ({config.dataset}, R={config.replicas})",
    )
    return lines + [
        "![churn by setting and activation](churn.png)",
        "",
        "The plot shows churn for each setting (x) and activation (bars).",
        "",
    ]


def _findings(config, records) -> list[str]:
    out = []
    for act in config.activations:
        churn = {s: metric(records[f"{act}/{s}"], "churn") for s in config.settings}
        single = {
            s: c
            for s, c in churn.items()
            if s not in ("nothing", "all", "both") and math.isfinite(c)
        }
        parts = []
        if single:
            top, low = max(single, key=single.get), min(single, key=single.get)
            parts.append(
                f"of the single sources, '{top}' gives the most churn "
                f"({fmt(single[top])}) and '{low}' the least ({fmt(single[low])})"
            )
        if "all" in churn:
            parts.append(f"all sources together {fmt(churn['all'])}")
        if "nothing" in churn:
            parts.append(f"the control {fmt(churn['nothing'])}")
        if parts:
            out.append(f"- {act}: " + "; ".join(parts) + ".")
    if len(config.activations) > 1:
        for setting in (s for s in config.settings if s != "nothing"):
            values = {a: metric(records[f"{a}/{setting}"], "churn") for a in config.activations}
            values = {a: v for a, v in values.items() if math.isfinite(v)}
            if len(values) > 1:
                best = min(values, key=values.get)
                out.append(
                    f"- '{setting}': the least churn with {best} ("
                    + ", ".join(f"{a} {fmt(v)}" for a, v in values.items())
                    + ")."
                )
    return (["Findings:", ""] + out + [""]) if out else []
