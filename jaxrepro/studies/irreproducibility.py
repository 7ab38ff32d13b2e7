"""The main job: which source of randomness makes replicas disagree, per activation.

Defines ``IrreproducibilityConfig``, the study's trials and its report, and registers them with
``jaxrepro.study.run``. The binary ``experiments/irreproducibility.py`` is flags
over the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from jaxrepro import data, engine
from jaxrepro.study import (
    SETTINGS,
    StudyConfig,
    Trial,
    check_activation,
    check_settings,
    check_unique,
    check_widths,
    fit_config,
    flag_field,
    fmt,
    markdown_table,
    mlp_task,
    record_metric,
    register,
    require,
    subset,
)


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
    replicas: int = flag_field(16, "replicas per trial (>= 2)")
    epochs: int = flag_field(20, "training epochs")
    widths: tuple[int, ...] = flag_field((128, 128), "hidden widths of the MLP")
    dropout_rate: float = flag_field(0.1, "dropout rate (so the dropout source has an effect)")
    batch_size: int = flag_field(128, "batch size")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    perturb_scale: float = flag_field(
        engine.DEFAULT_PERTURB_SCALE, "relative size of the initial-weight perturbation"
    )
    num_train: int = flag_field(0, "training examples to use (0: all)")
    num_test: int = flag_field(0, "test examples to use (0: all)")
    seed: int = flag_field(0, "root seed of the replicas")

    def __post_init__(self):
        self._check_common()
        require(
            self.dataset in ("mnist1d", "digits"),
            "dataset",
            f"must be mnist1d or digits, got {self.dataset!r}",
        )
        check_unique("activations", self.activations)
        for spec in self.activations:
            check_activation("activations", spec)
        check_settings("settings", self.settings)
        check_widths("widths", self.widths)
        require(
            0.0 <= self.dropout_rate < 1.0,
            "dropout_rate",
            f"must be in [0, 1), got {self.dropout_rate!r}",
        )
        require(
            math.isfinite(self.perturb_scale) and self.perturb_scale >= 0,
            "perturb_scale",
            f"must be finite and >= 0, got {self.perturb_scale!r}",
        )


# ---------------------------------------------------------------------------------------------
# Study 1: irreproducibility (the main job).


def trials(config: IrreproducibilityConfig) -> list[Trial]:
    ds = subset(data.load(config.dataset), config.num_train, config.num_test)
    trials = []
    for act in config.activations:
        task = mlp_task(
            config.widths, ds.num_classes, act, config.dropout_rate, config.learning_rate
        )
        for setting in config.settings:
            vary = SETTINGS[setting]
            trials.append(
                Trial(
                    name=f"{act}/{setting}",
                    task=task,
                    data=ds,
                    fit=fit_config(config, vary, perturb_scale=config.perturb_scale),
                    info={"activation": act, "setting": setting, "vary": list(vary)},
                )
            )
    return trials


def report(config: IrreproducibilityConfig, records, workdir: Path):
    from jaxrepro import plots

    cols = ["acc_mean", "acc_std", "churn", "pd_abs", "pd_rel", "eta", "var_ratio"]
    rows = []
    for rec in records.values():
        info = rec["info"]
        rows.append(
            [info["activation"], info["setting"]] + [fmt(record_metric(rec, c)) for c in cols]
        )
    table = markdown_table(["activation", "setting"] + cols, rows)
    lines = [
        "## Replicas by source of randomness",
        "",
        f"Each row trains {config.replicas} replicas of an MLP {list(config.widths)} "
        f"(dropout {config.dropout_rate}) for {config.epochs} epochs on {config.dataset} "
        "that differ only in the sources the setting varies ('nothing' is the control: "
        "identical replicas, every PD exactly 0); churn is the fraction of test examples "
        "on which two replicas disagree, pd_abs the mean total-variation distance of their "
        "probabilities, eta the mean accuracy minus churn, var_ratio the observed variance "
        "of accuracy over the variance independent errors would give.",
        "",
        table,
        "",
    ]
    lines += _findings(config, records)
    churn = {
        act: [record_metric(records[f"{act}/{s}"], "churn") for s in config.settings]
        for act in config.activations
    }
    plots.grouped_bars(
        workdir / "churn.png",
        list(config.settings),
        churn,
        ylabel="churn (top-1 disagreement)",
        xlabel="randomness setting",
        title=f"Churn between replicas ({config.dataset}, R={config.replicas})",
    )
    lines += [
        "![churn by setting and activation](churn.png)",
        "",
        "The plot shows churn for each setting (x) and activation (bars).",
        "",
    ]
    return lines


def _findings(config, records) -> list[str]:
    out = []
    for act in config.activations:
        churn = {s: record_metric(records[f"{act}/{s}"], "churn") for s in config.settings}
        single = {
            s: c
            for s, c in churn.items()
            if s not in ("nothing", "all", "both") and math.isfinite(c)
        }
        parts = []
        if single:
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
            values = {
                a: record_metric(records[f"{a}/{setting}"], "churn") for a in config.activations
            }
            values = {a: v for a, v in values.items() if math.isfinite(v)}
            if len(values) > 1:
                best = min(values, key=values.get)
                out.append(
                    f"- '{setting}': the least churn with {best} ("
                    + ", ".join(f"{a} {fmt(v)}" for a, v in values.items())
                    + ")."
                )
    return (["Findings:", ""] + out + [""]) if out else []


register(IrreproducibilityConfig, "Irreproducibility by source of randomness", trials, report)
