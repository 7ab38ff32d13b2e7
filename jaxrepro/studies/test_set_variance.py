"""The test-set variance study (Jordan): is the spread of test accuracy across runs what
independent errors predict?

Defines ``TestSetVarianceConfig``, the study's trials and its report, and registers them with
``jaxrepro.study.run``. The binary ``experiments/test_set_variance.py`` is flags
over the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from jaxrepro import data, engine, metrics
from jaxrepro.study import (
    SETTINGS,
    StudyConfig,
    Trial,
    binary_subset,
    check_settings,
    check_unique,
    check_widths,
    evaluate_predictions,
    fit_config,
    flag_field,
    fmt,
    is_int,
    markdown_table,
    mlp_task,
    predict_finite,
    record_metric,
    register,
    require,
    subset,
)

TSV_DATASETS = ("mnist1d", "digits", "mnist1d_binary")


@dataclasses.dataclass(frozen=True)
class TestSetVarianceConfig(StudyConfig):
    """Test-set variance study (Jordan): is the spread of test accuracy what independent errors
    predict, and how much does each source of randomness contribute?"""

    __test__: ClassVar[bool] = False  # not a pytest test class despite its name

    STUDY: ClassVar[str] = "test_set_variance"
    QUICK: ClassVar[Mapping[str, Any]] = dict(
        datasets=("digits", "mnist1d_binary"),
        sources=("all",),
        replicas=4,
        epochs=2,
        widths=(16,),
        num_train=256,
        num_test=128,
        num_samples=50,
    )

    datasets: tuple[str, ...] = flag_field(TSV_DATASETS, "datasets (mnist1d_binary: two classes)")
    sources: tuple[str, ...] = flag_field(
        ("all", "init", "order", "perturb"), "randomness settings to compare"
    )
    replicas: int = flag_field(128, "replicas per trial (the study needs >= 64; >= 2 allowed)")
    epochs: int = flag_field(20, "training epochs")
    widths: tuple[int, ...] = flag_field((128, 128), "hidden widths of the MLP")
    dropout_rate: float = flag_field(0.0, "dropout rate")
    batch_size: int = flag_field(128, "batch size")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    binary_classes: tuple[int, ...] = flag_field(
        (2, 7), "the two MNIST-1D classes of the binary task"
    )
    num_samples: int = flag_field(1000, "bootstrap samples for the intervals")
    bootstrap_over: str = flag_field("replicas", "bootstrap resamples replicas or examples")
    level: float = flag_field(0.95, "confidence level of the intervals")
    num_train: int = flag_field(0, "training examples to use (0: all)")
    num_test: int = flag_field(0, "test examples to use (0: all)")
    seed: int = flag_field(0, "root seed of the replicas (and of the bootstrap)")

    def __post_init__(self):
        self._check_common()
        check_unique("datasets", self.datasets)
        for name in self.datasets:
            require(
                name in TSV_DATASETS,
                "datasets",
                f"unknown dataset {name!r}; choose from {', '.join(TSV_DATASETS)}",
            )
        check_settings("sources", self.sources)
        check_widths("widths", self.widths)
        require(
            0.0 <= self.dropout_rate < 1.0,
            "dropout_rate",
            f"must be in [0, 1), got {self.dropout_rate!r}",
        )
        c = self.binary_classes
        require(
            len(c) == 2 and all(is_int(v) and 0 <= v < 10 for v in c) and c[0] != c[1],
            "binary_classes",
            f"must be two different classes in 0..9, got {list(c)!r}",
        )
        require(
            is_int(self.num_samples) and self.num_samples >= 1,
            "num_samples",
            f"must be an int >= 1, got {self.num_samples!r}",
        )
        require(
            self.bootstrap_over in ("replicas", "examples"),
            "bootstrap_over",
            f"must be replicas or examples, got {self.bootstrap_over!r}",
        )
        require(0.0 < self.level < 1.0, "level", f"must be in (0, 1), got {self.level!r}")


# ---------------------------------------------------------------------------------------------
# Study 3: test-set variance (Jordan).


PHAT_BINS = 20
"""Bins of the per-example accuracy histograms (equal width over [0, 1])."""


def _tsv_datasets(config: TestSetVarianceConfig) -> dict[str, data.Dataset]:
    out = {}
    for name in config.datasets:
        if name == "mnist1d_binary":
            ds = binary_subset(data.mnist1d(), config.binary_classes)
        else:
            ds = data.load(name)
        out[name] = subset(ds, config.num_train, config.num_test)
    return out


def _tsv_evaluate(config: TestSetVarianceConfig):
    def evaluate_fn(run: engine.Run, ds: data.Dataset) -> dict:

        probs_RxNxC, keep = predict_finite(run, ds)
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        out = evaluate_predictions(
            run,
            ds,
            probs_RxNxC,
            keep,
            key=key,
            num_samples=config.num_samples,
            level=config.level,
            over=config.bootstrap_over,
        )
        if out["metrics"] is not None:
            phat_N = np.asarray(metrics.phat(probs_RxNxC[keep], ds.y_test))
            counts, _ = np.histogram(phat_N, bins=PHAT_BINS, range=(0.0, 1.0))
            out["phat_hist"] = counts.tolist()
            out["acc_replicas"] = np.asarray(
                metrics.accuracy(probs_RxNxC[keep], ds.y_test)
            ).tolist()
        return out

    return evaluate_fn


def trials(config: TestSetVarianceConfig) -> list[Trial]:
    trials = []
    evaluate_fn = _tsv_evaluate(config)
    for name, ds in _tsv_datasets(config).items():
        task = mlp_task(
            config.widths, ds.num_classes, "relu", config.dropout_rate, config.learning_rate
        )
        for source in config.sources:
            trials.append(
                Trial(
                    name=f"{name}/{source}",
                    task=task,
                    data=ds,
                    fit=fit_config(config, SETTINGS[source]),
                    info={
                        "dataset": name,
                        "source": source,
                        "vary": list(SETTINGS[source]),
                        "num_test": ds.num_test,
                    },
                    evaluate=evaluate_fn,
                )
            )
    return trials


def _verdict(ratio: float, ci) -> str:
    """Whether var_obs / var_ind says the replicas' errors are independent."""
    if not math.isfinite(ratio):
        return "undefined"
    if ci is not None and None not in ci and ci[0] <= 1.0 <= ci[1]:
        return "independent (CI holds 1)"
    if 0.5 <= ratio <= 2.0:
        return "mildly correlated" if ratio > 1 else "mildly anti-correlated"
    return "correlated" if ratio > 2 else "anti-correlated"


def _tsv_summary(records: Mapping[str, dict]) -> str:
    ratios = [(name, record_metric(r, "var_ratio")) for name, r in records.items()]
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


def report(config: TestSetVarianceConfig, records, workdir: Path):
    from jaxrepro import plots

    pct = int(round(config.level * 100))
    lines = [
        f"Each trial trains {config.replicas} replicas of a relu MLP "
        f"{list(config.widths)} for {config.epochs} epochs, differing only in the named "
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
        base = record_metric(recs["all"], "var_obs") if "all" in recs else math.nan
        header = ["source", "acc_mean", "acc_std", "var_obs", "var_ind", "var_ratio"]
        header += ["var_cal"] if binary else []
        header += ["share", "errors"]
        rows = []
        for source, rec in recs.items():
            m = rec.get("metrics") or {}
            row = [source, fmt(m.get("acc_mean")), fmt(m.get("acc_std"))]
            row += [_with_ci(m, k) for k in ("var_obs", "var_ind", "var_ratio")]
            if binary:
                row.append(_with_ci(m, "var_cal"))
            share = (
                record_metric(rec, "var_obs") / base if base and math.isfinite(base) else math.nan
            )
            row += [fmt(share, 2), _verdict(record_metric(rec, "var_ratio"), m.get("var_ratio_ci"))]
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


def _with_ci(m: Mapping[str, Any], key: str) -> str:
    ci = m.get(key + "_ci")
    return fmt(m.get(key)) + ("" if ci is None else " " + fmt(ci))


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
        ratio = record_metric(rec, "var_ratio")
        verdict = _verdict(ratio, (rec.get("metrics") or {}).get("var_ratio_ci"))
        parts.append(f"{source}: ratio {fmt(ratio, 2)} ({verdict})")
    text = f"Errors across replicas on {dataset} -- " + "; ".join(parts) + "."
    if "all" in recs:
        base = record_metric(recs["all"], "var_obs")
        shares = [
            f"{s} {fmt(record_metric(r, 'var_obs') / base, 2)}"
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


register(TestSetVarianceConfig, "Test-set variance across runs", trials, report)
