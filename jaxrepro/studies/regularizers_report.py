"""The regulariser study's report: findings whose verdicts follow from pooled differences and
their intervals (``regularizers.summarise``), then per depth a table of every arm with its
paired tests against the baseline (Holm-adjusted), churn and eta per arm, and the paired
differences."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxrepro import plots, randomness
from jaxrepro.studies.regularizers import (
    BASELINE,
    arms,
    learned,
    summarise,
    trial_name,
)
from jaxrepro.studies.render import fmt, markdown_table, pooled_text, verdict, with_ci
from jaxrepro.studies.render import metric as value
from jaxrepro.studies.stats import holm_verdict


def _paired(rec: Mapping[str, Any], metric: str) -> Mapping[str, Any] | None:
    p = rec.get("paired")
    return None if not p else p.get(metric)


def _verdict(p: Mapping[str, Any] | None, alpha: float) -> str:
    """lower / higher (significant after Holm) or n.s."""
    if p is None:
        return "-"
    return {"no difference": "n.s."}.get(holm_verdict(p, alpha), holm_verdict(p, alpha))


def _diff_cell(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "-"
    return f"{p['diff']:+.4f} {fmt(p['ci'], 4)}"


def _p_cell(p: Mapping[str, Any] | None) -> str:
    """``raw / Holm-adjusted`` p-value."""
    return "-" if p is None else f"{fmt(p['p_value'], 3)} / {fmt(p.get('p_holm'), 3)}"


def _wilcoxon_cell(rec: Mapping[str, Any], metric: str) -> str:
    """``W, p raw / Holm`` of the per-example Wilcoxon test."""
    w = (rec.get("wilcoxon") or {}).get(metric)
    if not w:
        return "-"
    return f"{w['statistic']:g}, {fmt(w['p_value'], 3)} / {fmt(w.get('p_holm'), 3)}"


def render(config, analysis, workdir: Path) -> list[str]:
    records = analysis.records
    summary = summarise(config, records)
    alpha = summary["alpha"]
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
        f"({config.num_samples} samples), with its {pct}% interval and two-sided bootstrap "
        "p-value ('lower' = more reproducible than the baseline). p: raw / Holm-adjusted over "
        f"all {summary['family']} comparisons of a metric; a cell is 'lower' or 'higher' when "
        f"its Holm-adjusted p is at most {fmt(summary['alpha'], 2)}."
        + _floor_note(summary)
        + " Wilcoxon: the signed-rank test (W, p raw / Holm) of the per-example pd_abs or "
        "churn (mean over replica pairs), regularised against baseline, paired by test "
        "example; it conditions on the trained replicas (only the test examples are "
        "random), so it understates the run-to-run uncertainty and does not decide verdicts.",
        "",
    ]
    lines += _findings(config, records, summary)
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
                        _verdict(pd, alpha),
                        _wilcoxon_cell(rec, "pd_abs"),
                        _diff_cell(ch),
                        _p_cell(ch),
                        _verdict(ch, alpha),
                        _wilcoxon_cell(rec, "churn"),
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
            "p / p Holm",
            "pd_abs vs base",
            "Wilcoxon pd_abs: W, p / p Holm",
            "d churn [CI]",
            "p / p Holm",
            "churn vs base",
            "Wilcoxon churn: W, p / p Holm",
        ]
        lines += [f"## Depth {depth}", "", markdown_table(header, rows), ""]
    _plot_metrics(workdir / "churn_eta.png", config, records)
    _plot_differences(workdir / "pd_difference.png", config, records, alpha)
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
        "significant after Holm's correction, hollow ones are not. Below 0: the regulariser "
        "made the replicas agree more.",
        "",
    ]
    return lines


def _floor_note(summary: Mapping[str, Any]) -> str:
    """A sentence when no cell can be significant after Holm: the smallest bootstrap p-value
    times the family size exceeds alpha."""
    k, alpha, min_p = summary["family"], summary["alpha"], summary["min_p"]
    if k == 0 or min_p * k <= alpha:
        return ""
    need = int(np.ceil(2 * k / alpha - 1))
    return (
        f" With these bootstrap samples the smallest p-value is {fmt(min_p, 4)}, so over {k} "
        f"comparisons no cell can be significant after Holm (it needs p <= "
        f"{fmt(alpha / k, 5)}; num_samples >= {need} would allow it)."
    )


def _holm_cells(entry: Mapping[str, Any]) -> str:
    """``; Holm: lower in a, b; higher in c``: the cells significant after Holm."""
    parts = [f"{side} in {', '.join(entry[side])}" for side in ("lower", "higher") if entry[side]]
    return "; Holm: " + "; ".join(parts) if parts else ""


_OVERALL = {
    "lower": " (the regularisers tend to make predictions more reproducible, as the seed "
    "repository's hypothesis expects)",
    "higher": " (the regularisers tend to make predictions less reproducible, against the "
    "seed repository's hypothesis)",
    "no difference": " (not the more reproducible predictions the seed repository's "
    "hypothesis expects)",
    "undefined": "",
}


def _findings(config, records, summary) -> list[str]:
    pct = int(round(config.level * 100))
    out = [
        "- Verdicts: per regulariser, the pooled difference (regularised - baseline, mean over "
        f"the (depth, optimizer) cells where both arms learned) with its {pct}% "
        f"cluster-bootstrap interval over cells ({config.num_samples} samples, expanded "
        "percentile interval): 'lower' / 'higher' when the interval excludes 0, 'no "
        "consistent effect' when it holds 0, no verdict with fewer than "
        f"{summary['min_clusters']} cells. 'Holm:' names the cells whose paired test is "
        "significant after Holm's correction; they do not decide the verdict."
    ]
    for reg in config.regularizers:
        pooled = summary["regularizers"][reg]
        if not pooled["pd_abs"]["num_comparisons"]:
            out.append(f"- {reg}: no comparison where both arms learned.")
            continue
        parts = [
            f"{metric} {pooled_text(pooled[metric], unit='cells')}{_holm_cells(pooled[metric])}"
            for metric in ("pd_abs", "churn")
        ]
        eta = pooled["eta"]
        eta_ci = "" if verdict(eta["ci"]) == "undefined" else " " + fmt(eta["ci"], 4)
        out.append(
            f"- {reg} (cells where both arms learned: {pooled['pd_abs']['num_comparisons']}): "
            + "; ".join(parts)
            + f"; pooled eta difference {fmt(eta['diff'], 4)}{eta_ci}."
        )
    for metric in ("pd_abs", "churn"):
        pooled = summary["overall"][metric]
        if not pooled["num_comparisons"]:
            continue
        out.append(
            f"- Overall {metric}, all regularisers ({pooled['num_comparisons']} comparisons "
            f"in {pooled['num_clusters']} cells, cells resampled whole): "
            f"{pooled_text(pooled, unit='cells')}{_OVERALL[verdict(pooled['ci'])]}."
        )
    out += _source_lines(config, records, summary)
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
    stuck = [name for name, rec in records.items() if rec.get("metrics") and not learned(rec)]
    if stuck:
        out.append(
            "- Near chance accuracy (mean accuracy below 1.5 times chance: the replicas "
            "barely learned, so their churn measures untrained networks; comparisons "
            "with them are left out of the pooled differences): " + ", ".join(stuck) + "."
        )
    return ["Findings:", ""] + out + [""]


def _source_lines(config, records, summary) -> list[str]:
    """The source repository's own test, summarised over the arms."""
    tests = [r["source_wilcoxon"] for r in records.values() if r.get("source_wilcoxon")]
    if not tests:
        return []
    alpha = summary["alpha"]
    below = sum(t.get("p_holm") is not None and t["p_holm"] <= alpha for t in tests)
    worst = max((t["p_value"] for t in tests if t["p_value"] is not None), default=None)
    return [
        "- The source repository's own test (ex_mlp.py: Wilcoxon signed-rank of the R(R-1)/2 "
        "pairwise churns of an arm's R finite replicas against median 0): Holm-adjusted p <= "
        f"{fmt(alpha, 2)} in {below} of {len(tests)} arms (largest raw p {fmt(worst, 4)}). "
        "It shows that replicas disagree, not whether a regulariser changes how much; its "
        "pairs share replicas, so its p-values are optimistic."
    ]


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


def _plot_differences(path: Path, config, records, alpha: float) -> Path:
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
                    mfc=f"C{i}" if holm_verdict(p, alpha) in ("lower", "higher") else "white",
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
        "Paired difference of pd_abs against the baseline\n(filled: significant after Holm, "
        f"{int(round(config.level * 100))}% intervals)",
        fontsize="medium",
    )
    return plots.save(fig, path)
