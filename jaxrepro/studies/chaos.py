"""The chaos study: when in training is irreproducibility born?

Replicas that share every source of randomness (initialisation, data order, dropout) and differ
only in a tiny perturbation of their weights, ``w <- w + eps * rms(w) * N(0, 1)`` per parameter
array, applied after global step t (``FitConfig.perturb_step``; t = 0: the initial weights),
each replica with its own draw. For each activation, each t of a log-spaced grid from 0 to the
last step and each eps, churn, the prediction differences and the multiplicity measures
(``metrics.compare``, with bootstrap intervals) say how far apart the perturbation drove the
replicas; a reference trial per activation varies every source at the same R. The report says
at which step a perturbation stops mattering (methods.md section 1, "Perturbation during
training"; Kwok et al. 2025 find that early perturbations give a different model and late ones
do not).

Each (activation, t, eps) is one trial; every trial of an activation shares one compiled
training function (t and eps are traced). The binary ``experiments/chaos.py`` is flags over
``ChaosConfig``; the report is ``chaos_report.render``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from jaxrepro.studies.base import (
    SETTINGS,
    ConfigError,
    StudyConfig,
    bootstrap_kwargs,
    check_activation,
    check_bootstrap,
    check_choice,
    check_int,
    check_number,
    check_unique,
    check_widths,
    fit_config,
    flag_field,
    is_int,
    is_number,
    load_dataset,
    mlp_task,
    require,
)
from jaxrepro.studies.runner import Analysis, Trial, record
from jaxrepro.studies.workdir import Predictions

TITLE = "Chaos: when a tiny perturbation changes the model"

REFERENCE = "all"
"""The reference trial of each activation: every source varied (``SETTINGS["all"]``)."""


@dataclasses.dataclass(frozen=True)
class ChaosConfig(StudyConfig):
    """The chaos study: churn between replicas that differ only in a perturbation of size eps
    applied after step t, against t and eps, per activation."""

    STUDY: ClassVar[str] = "chaos"
    QUICK: ClassVar[Mapping[str, Any]] = dict(
        activations=("relu",),
        scales=(1e-6, 1e-2),
        grid_points=3,
        replicas=4,
        epochs=2,
        widths=(32,),
        num_train=512,
        num_test=256,
        num_samples=100,
    )

    replicas: int = flag_field(16, "replicas per trial (>= 2)")
    epochs: int = flag_field(20, "training epochs")
    dataset: str = flag_field("mnist1d", "dataset: mnist1d or digits")
    activations: tuple[str, ...] = flag_field(("relu", "smelu"), "activation specs to compare")
    scales: tuple[float, ...] = flag_field(
        (1e-8, 1e-6, 1e-4, 1e-2), "perturbation sizes eps (relative to each array's rms)"
    )
    steps: tuple[int, ...] = flag_field(
        (),
        "global steps t after which the perturbation is applied (0: the initial weights); "
        "empty: 0 and grid_points - 1 log-spaced steps from 1 to the last step",
    )
    grid_points: int = flag_field(
        9, "points of the automatic step grid, 0 and the last step included (with steps empty)"
    )
    widths: tuple[int, ...] = flag_field((128, 128), "hidden widths of the MLP")
    dropout_rate: float = flag_field(0.1, "dropout rate (the dropout key is shared)")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    num_samples: int = flag_field(1000, "bootstrap samples for the intervals")
    bootstrap_over: str = flag_field("replicas", "bootstrap resamples replicas or examples")
    level: float = flag_field(0.95, "confidence level of the intervals")

    def check(self):
        check_choice("dataset", self.dataset, ("mnist1d", "digits"))
        check_unique("activations", self.activations)
        for spec in self.activations:
            check_activation("activations", spec)
        check_unique("scales", self.scales)
        require(
            len({f"{eps:g}" for eps in self.scales if is_number(eps)}) == len(self.scales),
            "scales",
            f"must differ in their first 6 significant digits (they name the trials), got "
            f"{list(self.scales)!r}",
        )
        for eps in self.scales:
            require(
                is_number(eps) and 0 < eps <= 1,
                "scales",
                f"each eps must be a number in (0, 1], got {eps!r}",
            )
        if self.steps:
            check_unique("steps", self.steps)
            for t in self.steps:
                require(is_int(t) and t >= 0, "steps", f"each step must be an int >= 0, got {t!r}")
        check_int("grid_points", self.grid_points, minimum=3)
        check_widths("widths", self.widths)
        check_number("dropout_rate", self.dropout_rate, below=1.0)
        check_bootstrap(self)


def step_grid(total_steps: int, points: int) -> list[int]:
    """0 and ``points - 1`` steps log-spaced from 1 to ``total_steps`` (rounded, duplicates
    dropped, so a short run may give fewer): the automatic grid of perturbation steps.

    Example:
      >>> step_grid(620, 7)
      [0, 1, 4, 13, 47, 171, 620]
    """
    if total_steps < 1:
        return [0]
    grid = np.rint(np.geomspace(1, total_steps, points - 1)).astype(int).tolist()
    return [0] + sorted(set(grid))


def steps_of(config: ChaosConfig, steps_per_epoch: int) -> list[int]:
    """The perturbation steps of a config (``config.steps``, else ``step_grid``), checked
    against the run's last step."""
    total = config.epochs * steps_per_epoch
    if not config.steps:
        return step_grid(total, config.grid_points)
    late = [t for t in config.steps if t > total]
    if late:
        raise ConfigError(
            "steps",
            f"{late} after the last step: {config.epochs} epochs of {steps_per_epoch} steps "
            f"make {total} (step {total} perturbs the final weights)",
        )
    return sorted(config.steps)


def trial_name(activation: str, step: int | None, eps: float | None = None) -> str:
    """``relu/t=13/eps=1e-06``, or ``relu/all`` for the reference (``step`` None)."""
    if step is None:
        return f"{activation}/{REFERENCE}"
    return f"{activation}/t={step}/eps={eps:g}"


def trials(config: ChaosConfig) -> list[Trial]:
    ds = load_dataset(config.dataset, config.num_train, config.num_test)
    steps_per_epoch = ds.num_train // config.batch_size
    steps = steps_of(config, steps_per_epoch)
    out = []
    for act in config.activations:
        task = mlp_task(
            config.widths, ds.num_classes, act, config.dropout_rate, config.learning_rate
        )
        out.append(
            Trial(
                name=trial_name(act, None),
                task=task,
                data=ds,
                fit=fit_config(config, SETTINGS[REFERENCE]),
                info={"activation": act, "setting": REFERENCE, "vary": list(SETTINGS[REFERENCE])},
            )
        )
        for t in steps:
            for eps in config.scales:
                out.append(
                    Trial(
                        name=trial_name(act, t, eps),
                        task=task,
                        data=ds,
                        fit=fit_config(config, ("perturb",), perturb_scale=eps, perturb_step=t),
                        info={
                            "activation": act,
                            "setting": "perturb",
                            "step": t,
                            "epoch": t / steps_per_epoch,
                            "eps": eps,
                            "steps_per_epoch": steps_per_epoch,
                        },
                    )
                )
    return out


def analyse(config: ChaosConfig, predictions: Mapping[str, Predictions]) -> Analysis:
    """Every trial's ``metrics.compare`` of its kept replicas, with bootstrap intervals."""
    kw = bootstrap_kwargs(config, over=config.bootstrap_over)
    return Analysis(records={name: record(pred, **kw) for name, pred in predictions.items()})


def churn_state(rec: Mapping[str, Any]) -> str:
    """What a trial's churn says (the project's rule): ``"measurable"`` when its bootstrap
    interval lies above 0; ``"zero"`` when it is exactly 0 (every replica's top-1 prediction
    unchanged); ``"noise"`` when it is above 0 but its interval holds 0 (a few replicas' changes,
    not distinguishable from none at this R); ``"undefined"`` without metrics (fewer than 2
    replicas kept) or a finite interval."""
    m = rec.get("metrics") or {}
    churn, ci = m.get("churn"), m.get("churn_ci")
    if churn is None or not math.isfinite(churn):
        return "undefined"
    if churn == 0:
        return "zero"
    if not ci or ci[0] is None or not math.isfinite(ci[0]):
        return "undefined"
    return "measurable" if ci[0] > 0 else "noise"


def measurable(rec: Mapping[str, Any]) -> bool:
    """Whether a trial's churn is measurably above 0 (``churn_state`` is "measurable")."""
    return churn_state(rec) == "measurable"


def summarise(config: ChaosConfig, records: Mapping[str, Mapping[str, Any]]) -> dict:
    """When a perturbation stops mattering, per activation and eps, from the records alone.

    A perturbation *matters* at step t when churn's bootstrap interval lies above 0
    (``churn_state``). Per eps: ``matters`` (the grid steps where it does), ``zero``, ``noise``
    and ``undefined`` (the others, by ``churn_state``); ``stops_at``: the first grid step after
    the last one that matters, provided every step from there on is defined (else None), with
    ``stops_at_epoch`` (t / steps per epoch); ``never``: no step matters and none is undefined
    (then ``stops_at`` is None too); ``churn_at_first_step`` (and ``_ci``) at ``first_step``,
    the grid's first step (0: the initial weights). Per activation also the reference's (every
    source varied) churn with its interval. The rule is the project's.
    """
    out: dict[str, Any] = {}
    for act in config.activations:
        ref = records.get(trial_name(act, None), {}).get("metrics") or {}
        per_eps = {}
        for eps in config.scales:
            rows = [
                rec
                for rec in records.values()
                if rec["info"].get("activation") == act and rec["info"].get("eps") == eps
            ]
            rows.sort(key=lambda r: r["info"]["step"])
            if not rows:
                continue
            states = [(r["info"], churn_state(r)) for r in rows]
            by_state = {
                k: [i["step"] for i, st in states if st == k]
                for k in ("measurable", "zero", "noise", "undefined")
            }
            matters = by_state["measurable"]
            last = max(matters) if matters else None
            after = [(i, st) for i, st in states if last is not None and i["step"] > last]
            stops = None
            if after and all(st != "undefined" for _, st in after):
                stops = after[0][0]
            first = rows[0]["metrics"] or {}
            per_eps[f"{eps:g}"] = {
                "eps": eps,
                "matters": matters,
                "zero": by_state["zero"],
                "noise": by_state["noise"],
                "undefined": by_state["undefined"],
                "never": not matters and not by_state["undefined"],
                "stops_at": None if stops is None else stops["step"],
                "stops_at_epoch": None if stops is None else stops["epoch"],
                "first_step": rows[0]["info"]["step"],
                "churn_at_first_step": first.get("churn"),
                "churn_at_first_step_ci": first.get("churn_ci"),
            }
        out[act] = {
            "reference_churn": ref.get("churn"),
            "reference_churn_ci": ref.get("churn_ci"),
            "scales": per_eps,
        }
    return out
