"""The test-set variance study's report: per dataset, a table of the observed variance of
accuracy against the independent-errors prediction with intervals and verdicts; histograms of
phat and a scatter of observed against predicted std."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxrepro import plots
from jaxrepro.studies.render import fmt, markdown_table, metric, with_ci
from jaxrepro.studies.test_set_variance import PHAT_BINS


def _independence(ratio: float, ci) -> str:
    """Whether var_obs / var_ind says the replicas' errors are independent."""
    if not math.isfinite(ratio):
        return "undefined"
    if ci is not None and None not in ci and ci[0] <= 1.0 <= ci[1]:
        return "independent (CI holds 1)"
    if 0.5 <= ratio <= 2.0:
        return "mildly correlated" if ratio > 1 else "mildly anti-correlated"
    return "correlated" if ratio > 2 else "anti-correlated"


def _tsv_summary(records: Mapping[str, dict]) -> str:
    ratios = [(name, metric(r, "var_ratio")) for name, r in records.items()]
    ratios = [(n, v) for n, v in ratios if math.isfinite(v)]
    if not ratios:
        return "No trial has a defined variance ratio."
    low, high = min(ratios, key=lambda p: p[1]), max(ratios, key=lambda p: p[1])
    near = sum(0.5 <= v <= 2.0 for _, v in ratios)
    text = (
        f"Summary: var_obs / var_ind lies between {fmt(low[1], 2)} ({low[0]}) and "
        f"{fmt(high[1], 2)} ({high[0]}); {near} of {len(ratios)} trials are within a "
        "factor of 2 of 1"
    )
    if near == len(ratios):
        return text + (
            ", so the replicas' errors look approximately independent, as Jordan "
            "(2023) reports: the spread of test accuracy across runs is about what "
            "independent per-example errors give."
        )
    return text + "; the others show correlated (ratio > 2) or anti-correlated errors."


def render(config, analysis, workdir: Path) -> list[str]:
    records = analysis.records
    pct = int(round(config.level * 100))
    lines = [
        f"Each trial trains {config.replicas} replicas of a relu MLP "
        f"{list(config.widths)}"
        + (
            " (on cifar10: an AirbenchNet of those block widths, with random crops and flips)"
            if "cifar10" in config.datasets
            else ""
        )
        + f" for {config.epochs} epochs, differing only in the named "
        "source. var_obs is the variance of test accuracy across replicas; var_ind the "
        "variance that independent per-example errors would give (from the per-example "
        "accuracies phat); their ratio near 1 means the replicas' errors look independent "
        f"(Jordan 2023). Brackets: {pct}% bootstrap intervals ({config.num_samples} "
        f"samples over {config.bootstrap_over}). 'share' is var_obs relative to the "
        "'all' row of the same dataset: how much of the variance one source alone gives.",
        "",
        _tsv_summary(records),
        "",
    ]
    if config.replicas < 64:
        lines += [
            f"Note: {config.replicas} replicas per trial; the study is meant for at least "
            "64 (default 128), and with fewer the intervals are wide.",
            "",
        ]
    hist, points = {}, []
    for dataset in config.datasets:
        recs = {s: records[f"{dataset}/{s}"] for s in config.sources}
        binary = dataset == "mnist1d_binary"
        base = metric(recs["all"], "var_obs") if "all" in recs else math.nan
        header = ["source", "acc_mean", "acc_std", "var_obs", "var_ind", "var_ratio"]
        header += ["var_cal"] if binary else []
        header += ["share", "errors"]
        rows = []
        for source, rec in recs.items():
            m = rec.get("metrics") or {}
            row = [source, fmt(m.get("acc_mean")), fmt(m.get("acc_std"))]
            row += [with_ci(m, k) for k in ("var_obs", "var_ind", "var_ratio")]
            if binary:
                row.append(with_ci(m, "var_cal"))
            share = metric(rec, "var_obs") / base if base and math.isfinite(base) else math.nan
            row += [fmt(share, 2), _independence(metric(rec, "var_ratio"), m.get("var_ratio_ci"))]
            rows.append(row)
            if rec.get("phat_hist") is not None:
                hist.setdefault(dataset, {})[source] = rec["phat_hist"]
            if m:
                points.append(_std_point(dataset, source, m))
        n_test = next(iter(recs.values()))["info"]["num_test"]
        lines += [
            f"## {dataset} ({n_test} test examples)",
            "",
            _tsv_sentence(dataset, recs, binary),
            "",
            markdown_table(header, rows),
            "",
        ]
    edges = np.linspace(0.0, 1.0, PHAT_BINS + 1).tolist()
    plots.histograms(
        workdir / "phat_hist.png",
        edges,
        hist,
        xlabel="per-example accuracy phat",
        title="How many replicas get each test example right",
    )
    plots.scatter_intervals(
        workdir / "std_observed_vs_predicted.png",
        points,
        xlabel="predicted std of accuracy, sqrt(var_ind)",
        ylabel="observed std of accuracy, sqrt(var_obs)",
        title="Observed against independent-errors prediction",
    )
    lines += [
        "![phat histograms](phat_hist.png)",
        "",
        "The histograms show, per dataset and source, how many test examples each "
        "fraction of replicas gets right: mass at 0 and 1 is examples every replica "
        "agrees on; the middle is where runs differ.",
        "",
        "![observed against predicted std](std_observed_vs_predicted.png)",
        "",
        "The scatter plot compares the observed standard deviation of test accuracy with "
        "the one independent errors predict; points on the diagonal are independent.",
        "",
    ]
    return lines


def _std_point(group: str, series: str, m: Mapping[str, Any]) -> dict:
    def sqrt_ci(key):
        ci = m.get(key + "_ci")
        if ci is None or None in ci:
            return None
        return [math.sqrt(max(v, 0.0)) for v in ci]

    return {
        "group": group,
        "series": series,
        "x": math.sqrt(max(m.get("var_ind") or 0.0, 0.0)),
        "y": math.sqrt(max(m.get("var_obs") or 0.0, 0.0)),
        "x_ci": sqrt_ci("var_ind"),
        "y_ci": sqrt_ci("var_obs"),
    }


def _tsv_sentence(dataset: str, recs: Mapping[str, dict], binary: bool) -> str:
    parts = []
    for source, rec in recs.items():
        ratio = metric(rec, "var_ratio")
        verdict = _independence(ratio, (rec.get("metrics") or {}).get("var_ratio_ci"))
        parts.append(f"{source}: ratio {fmt(ratio, 2)} ({verdict})")
    text = f"Errors across replicas on {dataset} -- " + "; ".join(parts) + "."
    if "all" in recs:
        base = metric(recs["all"], "var_obs")
        shares = [
            f"{s} {fmt(metric(r, 'var_obs') / base, 2)}"
            for s, r in recs.items()
            if s != "all" and base > 0
        ]
        if shares:
            text += (
                " Variance of accuracy from one source alone, as a share of all sources "
                "together: " + ", ".join(shares) + "."
            )
    if binary and "all" in recs:
        m = recs["all"].get("metrics") or {}
        if m.get("var_cal") and m.get("var_obs") is not None:
            text += (
                f" The calibration prediction var_cal = err/(2N) gives "
                f"{fmt(m['var_cal'])} against var_obs {fmt(m['var_obs'])} "
                f"(ratio {fmt(m['var_obs'] / m['var_cal'], 2)})."
            )
    return text
