"""The test-set variance study (Jordan): is the spread of test accuracy across runs what
independent errors predict, and how much does each source of randomness contribute?

Each (dataset, source) trains ``replicas`` replicas of a relu MLP (on CIFAR-10, of
``models.AirbenchNet`` with the standard crop-and-flip augmentation; ``base.model_task``)
differing only in that source; the analysis records ``metrics.compare`` with bootstrap
intervals, the histogram of the per-example accuracy phat and every replica's accuracy. The
binary ``experiments/test_set_variance.py`` is flags over ``TestSetVarianceConfig``; the report
is ``test_set_variance_report.render``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from jaxrepro import metrics
from jaxrepro.studies.base import (
    SETTINGS,
    StudyConfig,
    bootstrap_kwargs,
    check_bootstrap,
    check_choices,
    check_data_dir,
    check_number,
    check_settings,
    check_widths,
    fit_config,
    flag_field,
    is_int,
    load_dataset,
    model_task,
    require,
)
from jaxrepro.studies.runner import Analysis, Trial, record
from jaxrepro.studies.workdir import Predictions

TITLE = "Test-set variance across runs"

TSV_DATASETS = ("mnist1d", "digits", "mnist1d_binary")
"""The datasets of a default run."""
TSV_CHOICES = (*TSV_DATASETS, "cifar10")
"""Every dataset the study accepts (``cifar10`` from the user's own copy, ``--data_dir``)."""

PHAT_BINS = 20
"""Bins of the per-example accuracy histograms (equal width over [0, 1])."""


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

    replicas: int = flag_field(128, "replicas per trial (the study needs >= 64; >= 2 allowed)")
    datasets: tuple[str, ...] = flag_field(
        TSV_DATASETS,
        "datasets (mnist1d_binary: two classes; cifar10: your own copy, see --data_dir)",
    )
    data_dir: str = flag_field(
        "", "cifar10 only: the cifar-10-batches-py directory of the official Python version"
    )
    sources: tuple[str, ...] = flag_field(
        ("all", "init", "order", "perturb"), "randomness settings to compare"
    )
    widths: tuple[int, ...] = flag_field(
        (128, 128), "hidden widths of the MLP (cifar10: the AirbenchNet blocks' widths)"
    )
    dropout_rate: float = flag_field(0.0, "dropout rate")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    binary_classes: tuple[int, ...] = flag_field(
        (2, 7), "the two MNIST-1D classes of the binary task"
    )
    num_samples: int = flag_field(1000, "bootstrap samples for the intervals")
    bootstrap_over: str = flag_field("replicas", "bootstrap resamples replicas or examples")
    level: float = flag_field(0.95, "confidence level of the intervals")

    def check(self):
        check_choices("datasets", self.datasets, TSV_CHOICES, "dataset")
        check_data_dir(self, self.datasets)
        check_settings("sources", self.sources)
        check_widths("widths", self.widths)
        check_number("dropout_rate", self.dropout_rate, below=1.0)
        c = self.binary_classes
        require(
            len(c) == 2 and all(is_int(v) and 0 <= v < 10 for v in c) and c[0] != c[1],
            "binary_classes",
            f"must be two different classes in 0..9, got {list(c)!r}",
        )
        check_bootstrap(self)


def trials(config: TestSetVarianceConfig) -> list[Trial]:
    out = []
    for name in config.datasets:
        ds = load_dataset(
            name,
            config.num_train,
            config.num_test,
            binary_classes=config.binary_classes,
            data_dir=config.data_dir,
        )
        task = model_task(
            name, config.widths, ds.num_classes, "relu", config.dropout_rate, config.learning_rate
        )
        for source in config.sources:
            out.append(
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
                )
            )
    return out


def trial_record(config: TestSetVarianceConfig, pred: Predictions) -> dict[str, Any]:
    """A trial's record: ``metrics.compare`` with intervals, ``phat_hist`` (``PHAT_BINS``
    counts of the per-example accuracy over [0, 1]) and ``acc_replicas``."""
    out = record(pred, **bootstrap_kwargs(config, over=config.bootstrap_over))
    if out["metrics"] is not None:
        kept = pred.probs[pred.keep]
        counts, _ = np.histogram(
            np.asarray(metrics.phat(kept, pred.labels)), bins=PHAT_BINS, range=(0.0, 1.0)
        )
        out["phat_hist"] = counts.tolist()
        out["acc_replicas"] = np.asarray(metrics.accuracy(kept, pred.labels)).tolist()
    return out


def analyse(config: TestSetVarianceConfig, predictions: Mapping[str, Predictions]) -> Analysis:
    return Analysis(
        records={name: trial_record(config, pred) for name, pred in predictions.items()}
    )
