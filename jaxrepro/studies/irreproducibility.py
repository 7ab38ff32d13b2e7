"""The main job: which source of randomness makes replicas disagree, per activation.

Each (activation, setting) trains ``replicas`` replicas of an MLP that differ only in the
sources the setting varies, then compares their test predictions (``metrics.compare``). The
binary ``experiments/irreproducibility.py`` is flags over ``IrreproducibilityConfig``; the
report is ``irreproducibility_report.render``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxrepro import engine
from jaxrepro.studies.base import (
    SETTINGS,
    StudyConfig,
    check_activation,
    check_choice,
    check_number,
    check_settings,
    check_unique,
    check_widths,
    fit_config,
    flag_field,
    load_dataset,
    mlp_task,
)
from jaxrepro.studies.runner import Analysis, Trial, record
from jaxrepro.studies.workdir import Predictions

TITLE = "Irreproducibility by source of randomness"


@dataclasses.dataclass(frozen=True)
class IrreproducibilityConfig(StudyConfig):
    """The main job: which source of randomness makes replicas disagree, per activation.

    Each (activation, setting) trains ``replicas`` replicas of the MLP that differ only in the
    sources the setting varies, then compares their test predictions.
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
    )

    dataset: str = flag_field("mnist1d", "dataset: mnist1d or digits")
    activations: tuple[str, ...] = flag_field(("relu", "smelu"), "activation specs to compare")
    settings: tuple[str, ...] = flag_field(
        ("nothing", "init", "order", "dropout", "perturb", "all"),
        "randomness settings (nothing = control, or a source, both, all)",
    )
    widths: tuple[int, ...] = flag_field((128, 128), "hidden widths of the MLP")
    dropout_rate: float = flag_field(0.1, "dropout rate (so the dropout source has an effect)")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    perturb_scale: float = flag_field(
        engine.DEFAULT_PERTURB_SCALE, "relative size of the initial-weight perturbation"
    )

    def check(self):
        check_choice("dataset", self.dataset, ("mnist1d", "digits"))
        check_unique("activations", self.activations)
        for spec in self.activations:
            check_activation("activations", spec)
        check_settings("settings", self.settings)
        check_widths("widths", self.widths)
        check_number("dropout_rate", self.dropout_rate, below=1.0)
        check_number("perturb_scale", self.perturb_scale)


def trials(config: IrreproducibilityConfig) -> list[Trial]:
    ds = load_dataset(config.dataset, config.num_train, config.num_test)
    out = []
    for act in config.activations:
        task = mlp_task(
            config.widths, ds.num_classes, act, config.dropout_rate, config.learning_rate
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


def analyse(config: IrreproducibilityConfig, predictions: Mapping[str, Predictions]) -> Analysis:
    """Every trial's ``metrics.compare`` of its kept replicas."""
    return Analysis(records={name: record(pred) for name, pred in predictions.items()})
