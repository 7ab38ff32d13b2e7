"""The synthetic study's report: one table, sentence and plot per grid."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxrepro import plots
from jaxrepro.studies.render import fmt, markdown_table, metric
from jaxrepro.studies.synthetic import grids, trial_name

_SYNTHETIC_TITLES = {
    "activation": (
        "activation",
        "PD against the student's activation (relu against smooth "
        "activations; smelu(beta) widens its smooth region with beta).",
    ),
    "source": (
        "randomness source",
        "PD against which source differs between replicas "
        "(init: initial weights; order: data order; both).",
    ),
    "window": (
        "shuffling window w",
        "PD against the shuffling window: only the data order "
        "differs between replicas (sources {vary}), shuffled within windows of w "
        "examples (w = 1: one fixed order, N: a full shuffle).",
    ),
    "width": ("hidden width", "PD against the width of the single hidden layer."),
    "depth": ("hidden layers", "PD against the depth (hidden layers of width {width})."),
}


def render(config, analysis, workdir: Path) -> list[str]:
    records = analysis.records
    cols = ["pd_abs", "pd_rel", "churn", "acc_mean"]
    lines = [
        f"Data: {config.num_train} training and {config.num_test} test examples in "
        f"{config.dim} dimensions, binary labels from a fixed '{config.teacher}' teacher "
        f"(hidden width {config.teacher_hidden}, {config.teacher_activation}) at "
        f"temperature {config.temperature}. Students: MLPs trained with Adam "
        f"({config.learning_rate}), {config.replicas} replicas per row, "
        f"{config.epochs} epochs; base student: one hidden layer of {config.width} "
        f"{config.activation} units, varying {'+'.join(config.vary)}. PD metrics are "
        "averaged over replica pairs and test examples: pd_abs = mean |p_r - p_s|, "
        "pd_rel = the same relative to the mean prediction, churn = disagreement of the "
        "thresholded predictions.",
        "",
    ]
    for grid, entries in grids(config).items():
        xlabel, sentence = _SYNTHETIC_TITLES[grid]
        sentence = sentence.format(vary="+".join(config.window_vary), width=config.depth_width)
        recs = [records[trial_name(spec, config.num_train)] for _, spec in entries]
        labels = [label for label, _ in entries]
        rows = [
            [label] + [fmt(metric(r, c)) for c in cols]
            for label, r in zip(labels, recs, strict=True)
        ]
        png = f"synthetic_{grid}.png"
        plots.metric_panels(
            workdir / png,
            labels,
            {c: [metric(r, c) for r in recs] for c in cols[:3]},
            xlabel=xlabel,
            kind="bar" if grid in ("activation", "source") else "line",
            title=f"PD against {xlabel}",
        )
        lines += [
            f"## PD against {xlabel}",
            "",
            sentence + " " + _trend(grid, labels, recs),
            "",
            markdown_table([xlabel] + cols, rows),
            "",
            f"![{grid}]({png})",
            "",
        ]
    return lines


def _trend(grid: str, labels: Sequence[str], recs: Sequence[Mapping[str, Any]]) -> str:
    """One computed sentence on a grid: extremes (unordered grids) or first -> last."""
    values = [metric(r, "pd_abs") for r in recs]
    pairs = [(lab, v) for lab, v in zip(labels, values, strict=True) if math.isfinite(v)]
    if len(pairs) < 2:
        return ""
    if grid in ("activation", "source"):
        low, high = min(pairs, key=lambda p: p[1]), max(pairs, key=lambda p: p[1])
        return (
            f"Here the lowest pd_abs is {low[0]} ({fmt(low[1])}) and the highest "
            f"{high[0]} ({fmt(high[1])})."
        )
    ups = sum(b[1] > a[1] for a, b in zip(pairs[:-1], pairs[1:], strict=True))
    shape = (
        "rises at every step"
        if ups == len(pairs) - 1
        else "falls at every step"
        if ups == 0
        else "is not monotonic"
    )
    name = {"window": "w = ", "width": "width ", "depth": "depth "}.get(grid, "")
    at = lambda label: name + label.split("=")[0]  # noqa: E731 - "N=4000" -> "w = N"
    return (
        f"Here pd_abs goes from {fmt(pairs[0][1])} at {at(pairs[0][0])} to "
        f"{fmt(pairs[-1][1])} at {at(pairs[-1][0])} and {shape}."
    )
