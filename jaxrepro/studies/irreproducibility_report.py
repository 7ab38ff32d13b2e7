"""The main job's report: tables of metrics with bootstrap intervals per (activation,
setting), the multiplicity measures and var_dist, the paired differences between activations,
findings, and churn.png (bars with interval error bars)."""

from __future__ import annotations

import math
from pathlib import Path

from jaxrepro import plots
from jaxrepro.studies.render import diff_text, fmt, markdown_table, metric, verdict, with_ci

COLUMNS = ("acc_mean", "acc_std", "churn", "pd_abs", "pd_rel", "eta", "var_ratio")
CI_COLUMNS = ("churn", "pd_abs", "eta", "var_ratio")
"""Columns of the main table shown with their bootstrap intervals."""
MULTIPLICITY_COLUMNS = (
    "ambiguity",
    "discrepancy",
    "churn_max",
    "pred_range",
    "var_obs",
    "var_ind",
    "var_dist",
)
DIFF_COLUMNS = ("churn", "pd_abs", "acc_mean", "var_dist")


def _cell(rec, key) -> str:
    return with_ci(rec.get("metrics"), key) if key in CI_COLUMNS else fmt(metric(rec, key))


def render(config, analysis, workdir: Path) -> list[str]:
    records = analysis.records
    pct = int(round(config.level * 100))
    rows = [
        [rec["info"]["activation"], rec["info"]["setting"]] + [_cell(rec, c) for c in COLUMNS]
        for rec in records.values()
    ]
    lines = [
        "## Replicas by source of randomness",
        "",
        f"Each row trains {config.replicas} replicas of "
        + (
            f"an AirbenchNet {list(config.widths)} with random crops and flips"
            if config.dataset == "cifar10"
            else f"an MLP {list(config.widths)}"
        )
        + f" (dropout {config.dropout_rate}) for {config.epochs} epochs on {config.dataset} "
        "that differ only in the sources the setting varies ('nothing' is the control: "
        "identical replicas, every PD exactly 0); churn is the fraction of test examples "
        "on which two replicas disagree, pd_abs the mean total-variation distance of their "
        "probabilities, eta the mean accuracy minus churn, var_ratio the observed variance "
        "of accuracy over the variance independent errors would give. Brackets: "
        f"{pct}% bootstrap intervals ({config.num_samples} samples over "
        f"{config.bootstrap_over}).",
        "",
        markdown_table(["activation", "setting", *COLUMNS], rows),
        "",
    ]
    lines += _findings(config, records)
    lines += _differences(config, records, pct)
    lines += _multiplicity(config, records)
    churn = {
        act: [metric(records[f"{act}/{s}"], "churn") for s in config.settings]
        for act in config.activations
    }
    errors = {
        act: [(records[f"{act}/{s}"].get("metrics") or {}).get("churn_ci") for s in config.settings]
        for act in config.activations
    }
    plots.grouped_bars(
        workdir / "churn.png",
        list(config.settings),
        churn,
        ylabel="churn (top-1 disagreement)",
        xlabel="randomness setting",
        title=f"Churn between replicas ({config.dataset}, R={config.replicas})",
        errors=errors,
    )
    return lines + [
        "![churn by setting and activation](churn.png)",
        "",
        f"The plot shows churn for each setting (x) and activation (bars), with {pct}% "
        "bootstrap intervals as error bars.",
        "",
    ]


def _differences(config, records, pct) -> list[str]:
    """Each activation after the first against the first, setting by setting (paired)."""
    rows = []
    for rec in records.values():
        d = rec.get("difference")
        if not d:
            continue
        name = f"{rec['info']['activation']} - {d['against']}"
        rows.append(
            [name, rec["info"]["setting"]]
            + [f"{diff_text(d, k)}: {verdict((d.get(k) or {}).get('ci'))}" for k in DIFF_COLUMNS]
        )
    if not rows:
        return []
    return [
        "## Activations compared",
        "",
        "Paired differences (replica r of both activations shares every key; the replicas "
        f"kept in both arms), with {pct}% bootstrap intervals over "
        f"{config.bootstrap_over}: 'lower' or 'higher' when the interval excludes 0, "
        "'no difference' when it holds 0 (the difference is within the noise of "
        + (
            "the finite set of replicas)."
            if config.bootstrap_over == "replicas"
            else "the finite test set)."
        ),
        "",
        markdown_table(["difference", "setting", *DIFF_COLUMNS], rows),
        "",
    ]


def _multiplicity(config, records) -> list[str]:
    rows = [
        [rec["info"]["activation"], rec["info"]["setting"]]
        + [with_ci(rec.get("metrics"), k) for k in MULTIPLICITY_COLUMNS]
        for rec in records.values()
    ]
    return [
        "## Multiplicity and the variance of accuracy",
        "",
        f"The replicas read as a set of equally good models (R = {config.replicas}; these "
        "measures grow with R): ambiguity is the share of test examples on which they do not "
        "all agree, discrepancy the most any one replica departs from their plurality vote, "
        "churn_max the churn of the most different pair, pred_range the mean spread of the "
        "label's probability (their intervals resample test examples). var_dist = N/(N-1) "
        "(var_obs - var_ind) is the variance of accuracy on the test distribution, what is "
        "left once independent per-example errors are accounted for (Jordan; may be "
        "negative by sampling error).",
        "",
        markdown_table(["activation", "setting", *MULTIPLICITY_COLUMNS], rows),
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
        if len(single) == 1:
            ((only, value),) = single.items()
            parts.append(f"the single source '{only}' gives churn {fmt(value)}")
        elif single and len(set(single.values())) == 1:
            parts.append(f"every single source gives churn {fmt(next(iter(single.values())))}")
        elif single:
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
                least = [a for a, v in values.items() if v == min(values.values())]
                lead = (
                    "the same churn with every activation"
                    if len(least) == len(values)
                    else f"the least churn with {' and '.join(least)}"
                )
                out.append(
                    f"- '{setting}': {lead} ("
                    + ", ".join(f"{a} {fmt(v)}" for a, v in values.items())
                    + ")"
                    + _noise_note(config, records, setting)
                    + "."
                )
    return (["Findings:", ""] + out + [""]) if out else []


def _noise_note(config, records, setting) -> str:
    """Whether each activation's churn differs from the first's beyond the bootstrap noise."""
    notes = []
    for act in config.activations[1:]:
        d = records[f"{act}/{setting}"].get("difference") or {}
        churn = d.get("churn")
        if not churn:
            continue
        v = verdict(churn.get("ci"))
        what = {
            "lower": "lower, beyond the noise",
            "higher": "higher, beyond the noise",
            "no difference": "within the noise",
        }.get(v, "undefined")
        notes.append(
            f"{act} - {d['against']} = {fmt(churn['diff'], 4)} {fmt(churn['ci'], 4)}: {what}"
        )
    return "; " + "; ".join(notes) if notes else ""
