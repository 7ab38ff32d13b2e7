"""The main job: which source of randomness makes replicas disagree, per activation.

Each (activation, setting) trains ``replicas`` replicas of an MLP (on CIFAR-10, of
``models.AirbenchNet`` with the standard crop-and-flip augmentation; ``base.model_task``) that
differ only in the sources the setting varies, then compares their test predictions
(``metrics.compare``, with bootstrap intervals); each activation after the first is compared
with the first, setting by setting, with a paired bootstrap (``metrics.difference``: replica r
of both shares its keys). The binary ``experiments/irreproducibility.py`` is flags over
``IrreproducibilityConfig``; the report is ``irreproducibility_report.render``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from jaxrepro import engine, metrics, randomness
from jaxrepro.studies.base import (
    SETTINGS,
    StudyConfig,
    bootstrap_kwargs,
    check_activation,
    check_bootstrap,
    check_choice,
    check_data_dir,
    check_number,
    check_settings,
    check_unique,
    check_widths,
    fit_config,
    flag_field,
    load_dataset,
    model_task,
)
from jaxrepro.studies.runner import Analysis, Trial, record
from jaxrepro.studies.workdir import Predictions

TITLE = "Irreproducibility by source of randomness"


@dataclasses.dataclass(frozen=True)
class IrreproducibilityConfig(StudyConfig):
    """The main job: which source of randomness makes replicas disagree, per activation.

    Each (activation, setting) trains ``replicas`` replicas of the MLP (``cifar10``:
    ``models.AirbenchNet`` with blocks of ``widths`` and ``augment.RandomCropFlip(pad=4)``)
    that differ only in the sources the setting varies, then compares their test predictions.
    ``--dataset cifar10`` reads the user's copy in ``--data_dir`` (nothing is downloaded).
    """

    STUDY: ClassVar[str] = "irreproducibility"
    QUICK: ClassVar[Mapping[str, Any]] = dict(
        activations=("relu",),
        settings=("nothing", "all"),
        replicas=4,
        epochs=2,
        widths=(32,),
        num_train=512,
        num_test=256,
        num_samples=100,
    )

    dataset: str = flag_field(
        "mnist1d", "dataset: mnist1d, digits or cifar10 (your own copy, see --data_dir)"
    )
    data_dir: str = flag_field(
        "", "cifar10 only: the cifar-10-batches-py directory of the official Python version"
    )
    activations: tuple[str, ...] = flag_field(("relu", "smelu"), "activation specs to compare")
    settings: tuple[str, ...] = flag_field(
        ("nothing", "init", "order", "dropout", "perturb", "all"),
        "randomness settings (nothing = control, or a source, both, all)",
    )
    widths: tuple[int, ...] = flag_field(
        (128, 128),
        "hidden widths of the MLP (cifar10: the AirbenchNet blocks' widths; 64,256,256 is "
        "airbench94)",
    )
    dropout_rate: float = flag_field(0.1, "dropout rate (so the dropout source has an effect)")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    perturb_scale: float = flag_field(
        engine.DEFAULT_PERTURB_SCALE, "relative size of the initial-weight perturbation"
    )
    num_samples: int = flag_field(1000, "bootstrap samples for the intervals")
    bootstrap_over: str = flag_field("replicas", "bootstrap resamples replicas or examples")
    level: float = flag_field(0.95, "confidence level of the intervals")

    def check(self):
        check_choice("dataset", self.dataset, ("mnist1d", "digits", "cifar10"))
        check_data_dir(self, (self.dataset,))
        check_unique("activations", self.activations)
        for spec in self.activations:
            check_activation("activations", spec)
        check_settings("settings", self.settings)
        check_widths("widths", self.widths)
        check_number("dropout_rate", self.dropout_rate, below=1.0)
        check_number("perturb_scale", self.perturb_scale)
        check_bootstrap(self)


def trials(config: IrreproducibilityConfig) -> list[Trial]:
    ds = load_dataset(config.dataset, config.num_train, config.num_test, data_dir=config.data_dir)
    out = []
    for act in config.activations:
        task = model_task(
            config.dataset,
            config.widths,
            ds.num_classes,
            act,
            config.dropout_rate,
            config.learning_rate,
        )
        for setting in config.settings:
            vary = SETTINGS[setting]
            out.append(
                Trial(
                    name=f"{act}/{setting}",
                    task=task,
                    data=ds,
                    fit=fit_config(config, vary, perturb_scale=config.perturb_scale),
                    info={"activation": act, "setting": setting, "vary": list(vary)},
                )
            )
    return out


DIFFERENCE_STREAM = 0x8000_0020
"""``randomness.bootstrap_key(seed, DIFFERENCE_STREAM, i)`` draws the paired bootstrap of the
i-th trial's comparison with the first activation; a trial's own intervals use
``bootstrap_key(seed)``, whose sample s is ``fold_in(., s)`` with s below 2^31, so the two never
share a stream (as ``stats.POOLED_STREAM``)."""


def analyse(config: IrreproducibilityConfig, predictions: Mapping[str, Predictions]) -> Analysis:
    """Every trial's ``metrics.compare`` of its kept replicas, with bootstrap intervals; and
    for each activation after the first, in each setting, ``difference``: ``{"against": the
    first activation, **metrics.difference(this, first, paired=True)}`` over the replicas
    kept in both (this minus the first, e.g. smelu - relu), or None when fewer than 2 are."""
    records = {
        name: record(pred, **bootstrap_kwargs(config, over=config.bootstrap_over))
        for name, pred in predictions.items()
    }
    base = config.activations[0]
    for i, (name, pred) in enumerate(predictions.items()):
        act, setting = pred.info["activation"], pred.info["setting"]
        if act == base or setting == "nothing":
            continue
        other = predictions[f"{base}/{setting}"]
        keep = pred.keep & other.keep
        diff = None
        if keep.sum() >= 2:
            diff = metrics.difference(
                pred.probs,
                other.probs,
                pred.labels,
                randomness.bootstrap_key(config.seed, DIFFERENCE_STREAM, i),
                paired=True,
                over=config.bootstrap_over,
                num_samples=config.num_samples,
                level=config.level,
                mask=np.asarray(keep),
            )
        records[name]["difference"] = None if diff is None else {"against": base, **diff}
    return Analysis(records=records)
