"""The chaos study's report: churn against the perturbation step t and size eps, with
intervals, the step at which a perturbation stops mattering per activation, and two plots
(churn_vs_step.png, churn_vs_eps.png)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxrepro import plots
from jaxrepro.studies.chaos import REFERENCE, measurable, steps_of, summarise, trial_name
from jaxrepro.studies.render import fmt, markdown_table, with_ci

TABLE_METRICS = ("churn", "pd_abs", "ambiguity", "discrepancy", "churn_max", "pred_range")


def _epoch_text(step, epoch) -> str:
    return f"step {step} (epoch {fmt(epoch, 2)})"


def _steps_text(steps) -> str:
    return ", ".join(str(t) for t in steps)


def _finding(eps_text: str, entry: Mapping[str, Any]) -> str:
    matters, stops = entry["matters"], entry["stops_at"]
    rest = []
    if entry["zero"]:
        rest.append(f"churn exactly 0 at steps {_steps_text(entry['zero'])}")
    if entry["noise"]:
        rest.append(f"above 0 but within the noise at {_steps_text(entry['noise'])}")
    if entry["undefined"]:
        rest.append(f"undefined at {_steps_text(entry['undefined'])} (replicas diverged)")
    tail = f" ({'; '.join(rest)})" if rest else ""
    if entry["never"]:
        return f"  - eps {eps_text}: no measurable churn at any step{tail}."
    if not matters:
        return f"  - eps {eps_text}: no measurable churn at any defined step{tail}."
    last = max(matters)
    if stops is None:
        if entry["undefined"]:
            return f"  - eps {eps_text}: measurable up to step {last}{tail}."
        return (
            f"  - eps {eps_text}: still changes the predictions measurably when applied at "
            f"the last step ({last})."
        )
    return (
        f"  - eps {eps_text}: changes the predictions measurably up to step {last}; from "
        f"{_epoch_text(stops, entry['stops_at_epoch'])} on, no measurable churn{tail}."
    )


def render(config, analysis, workdir: Path) -> list[str]:
    records = analysis.records
    per_epoch = next(
        r["info"]["steps_per_epoch"] for r in records.values() if "steps_per_epoch" in r["info"]
    )
    steps = steps_of(config, per_epoch)
    summary = summarise(config, records)
    pct = int(round(config.level * 100))
    lines = [
        f"Each trial trains {config.replicas} replicas of an MLP {list(config.widths)} "
        f"(dropout {config.dropout_rate}) for {config.epochs} epochs ({per_epoch} steps each) on "
        f"{config.dataset}. The replicas share every source of randomness (initialisation, data "
        "order, dropout) and differ only in a perturbation w <- w + eps * rms(w) * N(0, 1) of "
        "every parameter array, applied after global step t (t = 0: the initial weights), each "
        "replica with its own draw. Churn is the fraction of test examples on which two "
        "replicas' top-1 predictions differ (mean over pairs); the reference trial varies every "
        f"source at the same R. Brackets: {pct}% bootstrap intervals ({config.num_samples} "
        f"samples over {config.bootstrap_over}; the multiplicity measures resample examples). A "
        "perturbation *matters* at t when churn's interval lies above 0. At the last step it "
        "acts on the final weights with no training after it: churn there is the "
        "perturbation's direct effect on the predictions, not its amplification by training.",
        "",
    ]
    lines += ["## When a perturbation stops mattering", ""]
    for act in config.activations:
        s = summary[act]
        lines.append(
            f"- {act} (reference, every source varied: churn "
            f"{fmt(s['reference_churn'])} {fmt(s['reference_churn_ci'])}):"
        )
        for eps_text, entry in s["scales"].items():
            lines.append(_finding(eps_text, entry))
    lines.append("")
    lines += _comparison(config, summary)
    lines += ["## Churn against the perturbation step", ""]
    for act in config.activations:
        header = ["t", "epoch"] + [f"eps {eps:g}" for eps in config.scales]
        rows = []
        for t in steps:
            cells = [str(t), fmt(t / per_epoch, 2)]
            for eps in config.scales:
                rec = records.get(trial_name(act, t, eps), {})
                mark = " *" if measurable(rec) else ""
                cells.append(with_ci(rec.get("metrics"), "churn") + mark)
            rows.append(cells)
        lines += [f"{act} (* the interval lies above 0):", "", markdown_table(header, rows), ""]
    lines += ["## Every trial", ""]
    rows = []
    for name, rec in records.items():
        m = rec.get("metrics") or {}
        rows.append([name] + [fmt(m.get(k)) for k in TABLE_METRICS] + [fmt(m.get("acc_mean"))])
    lines += [
        f"The multiplicity measures grow with the number of replicas (R = {config.replicas} "
        "here): ambiguity is the share of test examples on which the replicas do not all "
        "agree, discrepancy the most any replica departs from their plurality vote, churn_max "
        "the churn of the most different pair, pred_range the mean spread of the label's "
        "probability across replicas.",
        "",
        markdown_table(["trial", *TABLE_METRICS, "acc_mean"], rows),
        "",
    ]
    _plots(config, records, steps, workdir)
    return lines + [
        "![churn against the perturbation step](churn_vs_step.png)",
        "",
        "Churn against the step t after which the perturbation is applied (symmetric log "
        "axis: t = 0 is the initial weights), one line per eps with its interval as a band; "
        "the dashed line and grey band are the reference (every source varied).",
        "",
        "![churn against the perturbation size](churn_vs_eps.png)",
        "",
        "Churn against eps, one line per step t.",
        "",
    ]


def _comparison(config, summary) -> list[str]:
    """relu against smelu (or whichever activations): where each stops mattering."""
    if len(config.activations) < 2:
        return []
    out = ["Activations compared:", ""]
    for eps in config.scales:
        parts = []
        for act in config.activations:
            entry = summary[act]["scales"].get(f"{eps:g}")
            if entry is None:
                continue
            if entry["never"]:
                parts.append(f"{act} never measurable")
            elif entry["stops_at"] is not None:
                parts.append(f"{act} stops at step {entry['stops_at']}")
            elif entry["matters"] and not entry["undefined"]:
                parts.append(f"{act} matters to the end")
            else:
                parts.append(f"{act} undefined (replicas diverged)")
        out.append(f"- eps {eps:g}: " + "; ".join(parts) + ".")
    return out + [""]


def _plots(config, records, steps, workdir: Path) -> None:
    def point(rec, x):
        m = rec.get("metrics") or {}
        ci = m.get("churn_ci") or (None, None)
        return (x, m.get("churn"), ci[0], ci[1])

    by_step, by_eps, refs = {}, {}, {}
    for act in config.activations:
        by_step[act] = {
            f"eps {eps:g}": [point(records.get(trial_name(act, t, eps), {}), t) for t in steps]
            for eps in config.scales
        }
        by_eps[act] = {
            f"t {t}": [
                point(records.get(trial_name(act, t, eps), {}), eps) for eps in config.scales
            ]
            for t in steps
        }
        ref = records.get(trial_name(act, None), {}).get("metrics") or {}
        ci = ref.get("churn_ci") or (None, None)
        refs[act] = (f"{REFERENCE} sources", ref.get("churn"), ci[0], ci[1])
    plots.band_panels(
        workdir / "churn_vs_step.png",
        by_step,
        xlabel="perturbation step t (global step)",
        ylabel="churn",
        xscale="symlog",
        references=refs,
        title=f"Churn after a perturbation at step t ({config.dataset}, R={config.replicas})",
    )
    plots.band_panels(
        workdir / "churn_vs_eps.png",
        by_eps,
        xlabel="perturbation size eps",
        ylabel="churn",
        xscale="log",
        references=refs,
        title=f"Churn against the perturbation size ({config.dataset}, R={config.replicas})",
    )
