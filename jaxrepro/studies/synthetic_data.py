"""The synthetic study (Snapp & Shamir): PD against activation, source, window, size.

Defines ``SyntheticConfig``, the study's trials and its report, and registers them with
``jaxrepro.study.run``. The binary ``experiments/synthetic.py`` is flags
over the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from jaxrepro import randomness, synthetic
from jaxrepro.study import (
    SETTINGS,
    ConfigError,
    StudyConfig,
    Trial,
    check_activation,
    check_settings,
    check_unique,
    check_widths,
    fit_config,
    flag_field,
    fmt,
    is_int,
    markdown_table,
    mlp_task,
    record_metric,
    register,
    require,
)


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
        window_vary=("init", "order"),
        grid_widths=(16,),
        grid_depths=(1,),
        width=16,
        depth_width=16,
        replicas=4,
        epochs=2,
        num_train=256,
        num_test=128,
    )

    dim: int = flag_field(10, "input dimension of the synthetic data")
    num_train: int = flag_field(8000, "training examples")
    num_test: int = flag_field(1000, "test examples")
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
    replicas: int = flag_field(128, "replicas per trial (>= 2)")
    epochs: int = flag_field(40, "training epochs")
    batch_size: int = flag_field(32, "batch size")
    learning_rate: float = flag_field(3e-3, "Adam learning rate")
    seed: int = flag_field(0, "root seed of the replicas")

    def __post_init__(self):
        self._check_common()
        require(
            self.num_train >= 1 and self.num_test >= 1,
            "num_train",
            "the synthetic study needs num_train >= 1 and num_test >= 1",
        )
        check_activation("teacher_activation", self.teacher_activation)
        try:
            self.data_spec()
        except ValueError as e:  # "synthetic <knob>: <problem>"
            knob = str(e).split(":")[0].replace("synthetic ", "")
            renamed = {"hidden": "teacher_hidden", "depth": "teacher_depth", "seed": "data_seed"}
            raise ConfigError(renamed.get(knob, knob), str(e)) from None
        check_activation("activation", self.activation)
        check_widths("width", (self.width,))
        check_widths("depth_width", (self.depth_width,))
        for spec in self.grid_activations:
            check_activation("grid_activations", spec)
        check_unique("grid_activations", self.grid_activations)
        check_settings("grid_sources", self.grid_sources)
        for name in ("vary", "window_vary"):
            try:
                randomness.check_sources(getattr(self, name), what=name)
            except ValueError as e:
                raise ConfigError(name, str(e)) from None
        check_unique("grid_windows", self.grid_windows)
        require(
            all(is_int(w) and w >= 0 for w in self.grid_windows),
            "grid_windows",
            f"must be ints >= 1 (or 0 for N), got {list(self.grid_windows)!r}",
        )
        check_unique("grid_widths", self.grid_widths)
        check_widths("grid_widths", self.grid_widths)
        check_unique("grid_depths", self.grid_depths)
        check_widths("grid_depths", self.grid_depths)
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


# ---------------------------------------------------------------------------------------------
# Study 2: synthetic data (Snapp & Shamir).


def _window_label(window: int, num_train: int) -> str:
    return f"N={num_train}" if window in (0, None) or window >= num_train else str(window)


def _synthetic_grids(config: SyntheticConfig) -> dict[str, list[tuple[str, dict]]]:
    """grid -> [(label, trial spec)]; a spec is (activation, widths, vary, window)."""
    base = dict(
        activation=config.activation, widths=(config.width,), vary=tuple(config.vary), window=0
    )

    def spec(**changes):
        s = {**base, **changes}
        s["vary"] = randomness.check_sources(s["vary"])
        return s

    n = config.num_train
    return {
        "activation": [(a, spec(activation=a)) for a in config.grid_activations],
        "source": [(s, spec(vary=SETTINGS[s])) for s in config.grid_sources],
        "window": [
            (_window_label(w, n), spec(window=w, vary=tuple(config.window_vary)))
            for w in config.grid_windows
        ],
        "width": [(str(w), spec(widths=(w,))) for w in config.grid_widths],
        "depth": [(str(d), spec(widths=(config.depth_width,) * d)) for d in config.grid_depths],
    }


def _synthetic_name(spec: Mapping[str, Any], num_train: int) -> str:
    widths = "x".join(str(w) for w in spec["widths"])
    vary = "+".join(spec["vary"]) or "nothing"
    return (
        f"{spec['activation']} [{widths}] vary={vary} "
        f"window={_window_label(spec['window'], num_train)}"
    )


def trials(config: SyntheticConfig) -> list[Trial]:
    ds = config.data_spec().dataset()
    trials, seen = [], set()
    for grid in _synthetic_grids(config).values():
        for _, spec in grid:
            name = _synthetic_name(spec, config.num_train)
            if name in seen:
                continue
            seen.add(name)
            window = spec["window"] or None
            trials.append(
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
    return trials


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


def report(config: SyntheticConfig, records, workdir: Path):
    from jaxrepro import plots

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
    for grid, entries in _synthetic_grids(config).items():
        xlabel, sentence = _SYNTHETIC_TITLES[grid]
        sentence = sentence.format(vary="+".join(config.window_vary), width=config.depth_width)
        recs = [records[_synthetic_name(spec, config.num_train)] for _, spec in entries]
        labels = [label for label, _ in entries]
        rows = [
            [label] + [fmt(record_metric(r, c)) for c in cols]
            for label, r in zip(labels, recs, strict=True)
        ]
        png = f"synthetic_{grid}.png"
        plots.metric_panels(
            workdir / png,
            labels,
            {c: [record_metric(r, c) for r in recs] for c in cols[:3]},
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
    values = [record_metric(r, "pd_abs") for r in recs]
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


register(SyntheticConfig, "Irreproducibility on synthetic data", trials, report)
