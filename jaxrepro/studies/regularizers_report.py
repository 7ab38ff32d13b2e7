"""The regulariser study's report: per depth a table of every arm with its paired test
against the baseline, computed findings, churn and eta per arm, and the paired differences."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxrepro import plots, randomness
from jaxrepro.studies.regularizers import BASELINE, arms, trial_name
from jaxrepro.studies.render import fmt, markdown_table, verdict, with_ci
from jaxrepro.studies.render import metric as value


def _paired(rec: Mapping[str, Any], metric: str) -> Mapping[str, Any] | None:
    p = rec.get("paired")
    return None if not p else p.get(metric)


def _verdict(p: Mapping[str, Any] | None) -> str:
    """lower / higher (the interval of the difference excludes 0) or n.s."""
    if p is None:
        return "-"
    return {"no difference": "n.s."}.get(verdict(p["ci"]), verdict(p["ci"]))


def _diff_cell(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "-"
    return f"{p['diff']:+.4f} {fmt(p['ci'], 4)}"


def _p_cell(p: Mapping[str, Any] | None) -> str:
    return "-" if p is None else fmt(p["p_value"], 3)


def render(config, analysis, workdir: Path) -> list[str]:
    records = analysis.records
    pct = int(round(config.level * 100))
    vary = ", ".join(randomness.check_sources(config.vary)) or "nothing (control)"
    n_test = next(iter(records.values()))["info"]["num_test"]
    lr = ", ".join(f"{o} {config.learning_rate_of(o):g}" for o in config.optimizers)
    lines = [
        f"Each trial trains {config.replicas} replicas of a relu MLP of width {config.width} "
        f"and depth d (hidden layers) on {config.dataset} for {config.epochs} epochs (batch "
        f"{config.batch_size}; learning rates: {lr}); replicas differ in {vary}. Arms: "
        f"'{BASELINE}' (no regulariser) and one regulariser at a time: weight_decay (L2 "
        f"{config.weight_decay} added to the gradient, as PyTorch's weight_decay), dropout "
        f"(rate {config.dropout_rate}), layernorm / batchnorm (after each hidden Dense), "
        f"residual (skip connections around hidden layers 2..d), label_smoothing (epsilon "
        f"{config.label_smoothing}). Replica r of every arm of a (depth, optimizer) cell uses "
        f"the same keys, and all arms predict the same {n_test} test examples, so arms are "
        "paired.",
        "",
        "Metrics: acc_mean (mean test accuracy), churn (fraction of test examples on which two "
        "replicas disagree: the prediction difference of the seed repository), eta "
        "(Effective Test Accuracy = acc_mean - churn), pd_abs (mean total-variation distance "
        f"of two replicas' probabilities). Brackets: {pct}% bootstrap intervals over replicas "
        f"({config.num_samples} samples). pd_abs compares probabilities, so a regulariser that "
        "changes the networks' confidence (label smoothing, weight decay) moves it even where "
        "top-1 predictions agree as often; churn counts top-1 disagreements only.",
        "",
        "Paired test: for each regulariser, the difference regularised - baseline (same depth, "
        "same optimizer) of pd_abs and churn, by a paired two-way bootstrap that resamples the "
        "replicas and the test examples with the same draws for both arms "
        f"({config.num_samples} samples); a difference is significant when its {pct}% "
        "interval excludes 0 ('lower' = more reproducible than the baseline). p is the "
        "two-sided bootstrap p-value. No correction for multiple comparisons: with K tests, "
        f"about {100 - pct}% of K would be flagged by chance alone if no regulariser had an "
        "effect.",
        "",
    ]
    lines += _findings(config, records)
    for depth in config.depths:
        rows = []
        for optimizer in config.optimizers:
            for arm in arms(config):
                rec = records[trial_name(depth, optimizer, arm)]
                m = rec.get("metrics")
                pd, ch = _paired(rec, "pd_abs"), _paired(rec, "churn")
                rows.append(
                    [
                        optimizer,
                        arm,
                        with_ci(m, "acc_mean"),
                        with_ci(m, "churn"),
                        with_ci(m, "eta"),
                        fmt(value(rec, "pd_abs")),
                        _diff_cell(pd),
                        _p_cell(pd),
                        _verdict(pd),
                        _diff_cell(ch),
                        _p_cell(ch),
                        _verdict(ch),
                    ]
                )
        header = [
            "optimizer",
            "regularizer",
            "acc_mean",
            "churn",
            "eta",
            "pd_abs",
            "d pd_abs [CI]",
            "p",
            "pd_abs vs base",
            "d churn [CI]",
            "p",
            "churn vs base",
        ]
        lines += [f"## Depth {depth}", "", markdown_table(header, rows), ""]
    _plot_metrics(workdir / "churn_eta.png", config, records)
    _plot_differences(workdir / "pd_difference.png", config, records)
    lines += [
        "![churn and eta per regulariser](churn_eta.png)",
        "",
        "churn_eta.png: churn (top) and Effective Test Accuracy (bottom) of every arm, one "
        f"panel per optimizer, bars per depth, with {pct}% bootstrap intervals.",
        "",
        "![paired differences of pd_abs](pd_difference.png)",
        "",
        "pd_difference.png: the paired difference of pd_abs (regularised - baseline) with its "
        f"{pct}% interval, one panel per optimizer, points per depth; filled markers are "
        "significant, hollow ones are not. Below 0: the regulariser made the replicas agree "
        "more.",
        "",
    ]
    return lines


def _tally(config, records, reg: str, metric: str, *, learned_only: bool = False):
    """Cells where ``reg`` makes ``metric`` significantly lower / higher than the baseline,
    the count of the others, and every cell's difference; ``learned_only``: only cells where
    both arms learned (mean accuracy above 1.5 times chance)."""
    lower, higher, ns, diffs = [], [], 0, []
    for depth in config.depths:
        for optimizer in config.optimizers:
            rec = records[trial_name(depth, optimizer, reg)]
            p = _paired(rec, metric)
            if p is None or (
                learned_only
                and not (
                    _learned(rec) and _learned(records[trial_name(depth, optimizer, BASELINE)])
                )
            ):
                continue
            diffs.append(p["diff"])
            if not p["significant"]:
                ns += 1
            else:
                (lower if p["diff"] < 0 else higher).append(f"d{depth}/{optimizer}")
    return lower, higher, ns, diffs


def _cells(cells: list[str]) -> str:
    return f" ({', '.join(cells)})" if cells else ""


def _findings(config, records) -> list[str]:
    out = [
        "- Per regulariser, against its baseline in each (depth, optimizer) cell: 'lower' "
        "and 'higher' count significant paired differences, n.s. the others."
    ]
    totals = {m: [0, 0, 0] for m in ("pd_abs", "churn")}  # lower, higher, tested
    for reg in config.regularizers:
        parts = []
        for metric in ("pd_abs", "churn"):
            lower, higher, ns, diffs = _tally(config, records, reg, metric)
            if not diffs:
                continue
            t = totals[metric]
            t[0], t[1], t[2] = t[0] + len(lower), t[1] + len(higher), t[2] + len(diffs)
            parts.append(
                f"{metric} lower in {len(lower)} of {len(diffs)} cells{_cells(lower)}"
                f", higher in {len(higher)}{_cells(higher)}, n.s. in {ns} (mean "
                f"difference {np.mean(diffs):+.4f})"
            )
        if not parts:
            out.append(f"- {reg}: no paired comparison (too many replicas diverged).")
            continue
        eta = _tally(config, records, reg, "eta")[3]
        out.append(
            f"- {reg}: "
            + "; ".join(parts)
            + (f"; mean change of eta {np.mean(eta):+.4f}" if eta else "")
            + "."
        )
    share = 1 - config.level
    for metric, (lower, higher, tested) in totals.items():
        if not tested:
            continue
        tallies = [
            _tally(config, records, r, metric, learned_only=True) for r in config.regularizers
        ]
        l_low, l_high, l_tested = (sum(len(t[i]) for t in tallies) for i in (0, 1, 3))
        chance = l_tested * share
        if l_low > chance and l_low >= 2 * max(l_high, 1):
            verdict = (
                "mostly lower: the regularisers tend to make predictions more "
                "reproducible, as the seed repository's hypothesis expects"
            )
        elif l_high > chance and l_high >= 2 * max(l_low, 1):
            verdict = "mostly higher: the regularisers tend to make predictions less reproducible"
        else:
            verdict = (
                "mixed: no consistent effect, against the hypothesis that regularisers "
                "make predictions more reproducible; the sign depends on the regulariser, "
                "the depth and the optimizer"
            )
        out.append(
            f"- Overall {metric}: {lower} of {tested} comparisons significantly lower, "
            f"{higher} significantly higher; of the {l_tested} where both arms learned, "
            f"{l_low} lower and {l_high} higher (chance alone would flag about "
            f"{chance:.1f} in total): {verdict}."
        )
    base = []
    for depth in config.depths:
        churns = [
            value(records[trial_name(depth, o, BASELINE)], "churn") for o in config.optimizers
        ]
        accs = [
            value(records[trial_name(depth, o, BASELINE)], "acc_mean") for o in config.optimizers
        ]
        pairs = zip(config.optimizers, churns, strict=True)
        base.append(
            f"depth {depth}: churn "
            + ", ".join(f"{o} {fmt(c)}" for o, c in pairs)
            + " (acc "
            + ", ".join(fmt(a) for a in accs)
            + ")"
        )
    out.append("- Baselines: " + "; ".join(base) + ".")
    stuck = [name for name, rec in records.items() if rec.get("metrics") and _near_chance(rec)]
    if stuck:
        out.append(
            "- Near chance accuracy (mean accuracy below 1.5 times chance: the replicas "
            "barely learned, so their churn measures untrained networks; comparisons "
            "with them are left out of the 'both arms learned' counts): " + ", ".join(stuck) + "."
        )
    return ["Findings:", ""] + out + [""]


def _near_chance(rec: Mapping[str, Any]) -> bool:
    return rec["metrics"]["acc_mean"] < 1.5 / rec["info"]["num_classes"]


def _learned(rec: Mapping[str, Any]) -> bool:
    return bool(rec.get("metrics")) and not _near_chance(rec)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily; Agg canvas; atomic writes).


def _plot_metrics(path: Path, config, records) -> Path:
    cols = arms(config)
    fig, axes = plots.figure(
        len(config.optimizers), nrows=2, width=max(4.5, 0.75 * len(cols) + 1.5), height=3.2
    )
    width = 0.8 / len(config.depths)
    for col, optimizer in enumerate(config.optimizers):
        for row, metric in enumerate(("churn", "eta")):
            ax = axes[row][col]
            for i, depth in enumerate(config.depths):
                for j, arm in enumerate(cols):
                    m = records[trial_name(depth, optimizer, arm)].get("metrics") or {}
                    v = m.get(metric)
                    if v is None:
                        continue
                    x = j + (i - (len(config.depths) - 1) / 2) * width
                    ax.bar(
                        [x],
                        [v],
                        width=width,
                        color=f"C{i}",
                        label=f"depth {depth}" if j == 0 else None,
                        yerr=plots.error_bar(v, m.get(metric + "_ci")),
                        capsize=2,
                    )
            ax.set_xticks(range(len(cols)), list(cols), rotation=35, ha="right")
            ax.set_title(f"{metric} ({optimizer})")
            ax.axhline(0, color="gray", linewidth=0.8)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel(metric)
            if row == 0 and col == 0 and len(config.depths) > 1:
                ax.legend(fontsize="small")
    fig.suptitle(
        f"Churn and Effective Test Accuracy per regulariser\n({config.dataset}, "
        f"width {config.width}, R={config.replicas})",
        fontsize="medium",
    )
    return plots.save(fig, path)


def _plot_differences(path: Path, config, records) -> Path:
    regs = list(config.regularizers)
    fig, axes = plots.figure(
        len(config.optimizers), nrows=1, width=max(4.5, 0.75 * len(regs) + 1.5), height=3.6
    )
    width = 0.8 / len(config.depths)
    for col, optimizer in enumerate(config.optimizers):
        ax = axes[col]
        for i, depth in enumerate(config.depths):
            for j, reg in enumerate(regs):
                p = _paired(records[trial_name(depth, optimizer, reg)], "pd_abs")
                if p is None:
                    continue
                x = j + (i - (len(config.depths) - 1) / 2) * width
                ax.errorbar(
                    [x],
                    [p["diff"]],
                    yerr=plots.error_bar(p["diff"], p["ci"]),
                    fmt="o",
                    color=f"C{i}",
                    mfc=f"C{i}" if p["significant"] else "white",
                    capsize=2,
                    label=f"depth {depth}" if j == 0 else None,
                )
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(regs)), regs, rotation=35, ha="right")
        ax.set_title(optimizer)
        ax.grid(axis="y", alpha=0.3)
        if col == 0:
            ax.set_ylabel("pd_abs: regularised - baseline")
            if len(config.depths) > 1:
                ax.legend(fontsize="small")
    fig.suptitle(
        "Paired difference of pd_abs against the baseline\n(filled: significant, "
        f"{int(round(config.level * 100))}% intervals)",
        fontsize="medium",
    )
    return plots.save(fig, path)
