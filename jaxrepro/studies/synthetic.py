"""The synthetic study (Snapp & Shamir): binary PD against activation, source, shuffling window
and model size, on data from a fixed random teacher (``jaxrepro.synthetic``).

The base trial is a one-hidden-layer MLP student; each grid changes one thing from the base,
and trials that coincide across grids are trained once. The binary ``experiments/synthetic.py``
is flags over ``SyntheticConfig``; the report is ``synthetic_report.render``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxrepro import synthetic
from jaxrepro.studies.base import (
    SETTINGS,
    StudyConfig,
    check_activation,
    check_settings,
    check_sources,
    check_synthetic,
    check_unique,
    check_widths,
    fit_config,
    flag_field,
    is_int,
    mlp_task,
    require,
)
from jaxrepro.studies.runner import Analysis, Trial, record
from jaxrepro.studies.workdir import Predictions

TITLE = "Irreproducibility on synthetic data"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(StudyConfig):
    """Synthetic study (Snapp & Shamir): binary PD against activation, source, window, size.

    The base trial is a one-hidden-layer MLP student of width ``width`` with ``activation``,
    varying ``vary`` (init and order), trained on data from a fixed random teacher
    (``jaxrepro.synthetic``). Each grid changes one thing from the base; trials that coincide
    across grids are trained once.
    """

    STUDY: ClassVar[str] = "synthetic"
    QUICK: ClassVar[Mapping[str, Any]] = dict(
        grid_activations=("relu", "tanh"),
        grid_sources=("both",),
        grid_windows=(1, 0),
        window_vary=("order",),  # as the default: the w = 1 row is exactly 0
        grid_widths=(16,),
        grid_depths=(1,),
        width=16,
        depth_width=16,
        replicas=4,
        epochs=2,
        num_train=256,
        num_test=128,
    )

    replicas: int = flag_field(128, "replicas per trial (>= 2)")
    epochs: int = flag_field(40, "training epochs")
    batch_size: int = flag_field(32, "batch size")
    num_train: int = flag_field(8000, "training examples")
    num_test: int = flag_field(1000, "test examples")
    dim: int = flag_field(10, "input dimension of the synthetic data")
    teacher: str = flag_field("single", "teacher: linear, single (one nonlinearity) or mlp")
    teacher_hidden: int = flag_field(8, "hidden width of the teacher")
    teacher_depth: int = flag_field(2, "hidden layers of an mlp teacher")
    teacher_activation: str = flag_field("tanh", "activation of the teacher")
    temperature: float = flag_field(0.25, "label temperature (0: deterministic labels)")
    label_noise: float = flag_field(0.0, "probability of a uniformly drawn label")
    data_seed: int = flag_field(0, "seed of the data (independent of the replicas' seed)")
    activation: str = flag_field("relu", "activation of the base student")
    width: int = flag_field(64, "hidden width of the base student (one hidden layer)")
    vary: tuple[str, ...] = flag_field(("init", "order"), "sources varied in the base trial")
    grid_activations: tuple[str, ...] = flag_field(
        (
            "relu",
            "smelu(0.1)",
            "smelu(0.5)",
            "smelu(1)",
            "smelu(2)",
            "gelu",
            "silu",
            "softplus",
            "tanh",
        ),
        "activation grid",
    )
    grid_sources: tuple[str, ...] = flag_field(
        ("init", "order", "both"), "randomness-source grid (settings)"
    )
    grid_windows: tuple[int, ...] = flag_field(
        (1, 10, 100, 1000, 0), "shuffling-window grid (0: N, a full shuffle)"
    )
    window_vary: tuple[str, ...] = flag_field(("order",), "sources varied in the window grid")
    grid_widths: tuple[int, ...] = flag_field(
        (4, 16, 64, 256, 1024), "hidden-width grid (one hidden layer)"
    )
    grid_depths: tuple[int, ...] = flag_field((1, 2, 3, 4), "depth grid (layers of depth_width)")
    depth_width: int = flag_field(64, "width of each hidden layer in the depth grid")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")

    def check(self):
        require(
            self.num_train >= 1 and self.num_test >= 1,
            "num_train",
            "the synthetic study needs num_train >= 1 and num_test >= 1",
        )
        check_activation("teacher_activation", self.teacher_activation)
        check_synthetic(
            self.data_spec,
            {"hidden": "teacher_hidden", "depth": "teacher_depth", "seed": "data_seed"},
        )
        check_activation("activation", self.activation)
        check_widths("width", (self.width,))
        check_widths("depth_width", (self.depth_width,))
        for spec in self.grid_activations:
            check_activation("grid_activations", spec)
        check_unique("grid_activations", self.grid_activations)
        check_settings("grid_sources", self.grid_sources)
        check_sources("vary", self.vary)
        check_sources("window_vary", self.window_vary)
        check_unique("grid_windows", self.grid_windows)
        require(
            all(is_int(w) and w >= 0 for w in self.grid_windows),
            "grid_windows",
            f"must be ints >= 1 (or 0 for N), got {list(self.grid_windows)!r}",
        )
        for name in ("grid_widths", "grid_depths"):
            check_unique(name, getattr(self, name))
            check_widths(name, getattr(self, name))
        require(
            self.batch_size <= self.num_train,
            "batch_size",
            f"{self.batch_size} is larger than num_train={self.num_train}",
        )

    def data_spec(self) -> synthetic.Synthetic:
        """The generator spec of this study's data."""
        return synthetic.Synthetic(
            dim=self.dim,
            num_train=self.num_train,
            num_test=self.num_test,
            teacher=self.teacher,
            hidden=self.teacher_hidden,
            depth=self.teacher_depth,
            activation=self.teacher_activation,
            temperature=self.temperature,
            label_noise=self.label_noise,
            seed=self.data_seed,
        )


def window_label(window: int, num_train: int) -> str:
    return f"N={num_train}" if window in (0, None) or window >= num_train else str(window)


def grids(config: SyntheticConfig) -> dict[str, list[tuple[str, dict]]]:
    """grid -> [(label, trial spec)]; a spec is (activation, widths, vary, window)."""
    base = dict(
        activation=config.activation, widths=(config.width,), vary=tuple(config.vary), window=0
    )

    def spec(**changes):
        s = {**base, **changes}
        s["vary"] = check_sources("vary", s["vary"])
        return s

    n = config.num_train
    return {
        "activation": [(a, spec(activation=a)) for a in config.grid_activations],
        "source": [(s, spec(vary=SETTINGS[s])) for s in config.grid_sources],
        "window": [
            (window_label(w, n), spec(window=w, vary=tuple(config.window_vary)))
            for w in config.grid_windows
        ],
        "width": [(str(w), spec(widths=(w,))) for w in config.grid_widths],
        "depth": [(str(d), spec(widths=(config.depth_width,) * d)) for d in config.grid_depths],
    }


def trial_name(spec: Mapping[str, Any], num_train: int) -> str:
    widths = "x".join(str(w) for w in spec["widths"])
    vary = "+".join(spec["vary"]) or "nothing"
    return (
        f"{spec['activation']} [{widths}] vary={vary} "
        f"window={window_label(spec['window'], num_train)}"
    )


def trials(config: SyntheticConfig) -> list[Trial]:
    ds = config.data_spec().dataset()
    out, seen = [], set()
    for grid in grids(config).values():
        for _, spec in grid:
            name = trial_name(spec, config.num_train)
            if name in seen:
                continue
            seen.add(name)
            window = spec["window"] or None
            out.append(
                Trial(
                    name=name,
                    task=mlp_task(spec["widths"], 2, spec["activation"], 0.0, config.learning_rate),
                    data=ds,
                    fit=fit_config(config, spec["vary"], window=window),
                    info={
                        "activation": spec["activation"],
                        "widths": list(spec["widths"]),
                        "vary": list(spec["vary"]),
                        "window": window if window is not None else config.num_train,
                    },
                )
            )
    return out


def analyse(config: SyntheticConfig, predictions: Mapping[str, Predictions]) -> Analysis:
    """Every trial's ``metrics.compare`` of its kept replicas."""
    return Analysis(records={name: record(pred) for name, pred in predictions.items()})
