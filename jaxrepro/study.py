"""Studies: resumable batch jobs that train grids of replica sets and report how they disagree.

Synopsis::

    from jaxrepro import study
    config = study.IrreproducibilityConfig(replicas=8, epochs=5)   # or ...Config.quick()
    out = study.run(config, "runs/irr")      # resumes when runs/irr holds the same config
    out["results"]["relu/init"]["metrics"]["churn"]

A study is a list of *trials* (one set of R replicas each: a model, an optimizer, a dataset and
an ``engine.FitConfig``) and a report over their metrics. ``run`` trains the trials one after
the other in a *workdir*::

    config.json          the study and its config; a rerun in the same workdir must match it
    progress.log         one line per epoch: trial k of K, epoch, elapsed and remaining time
    checkpoints/<trial>/ orbax checkpoints of the stacked TrainState, every few epochs
    results.json         every finished trial's metrics (``metrics.compare``), the config and
                         the library versions; rewritten after each trial
    timings.json         wall time per trial (kept out of results.json, which is deterministic)
    report.md, *.png     tables with a sentence each, and plots

results.json holds ``study``, ``config``, ``versions`` (python, jax, jaxlib, flax, optax,
orbax-checkpoint, numpy, jaxrepro), ``complete`` and ``results``: per trial, in trial order,
``{"info": its grid coordinates, "diverged": [replica ids excluded], "train_loss",
"train_accuracy", "metrics": metrics.compare(...) of the kept replicas, or null with an
"error" when fewer than 2 are left}``; the test-set variance study adds ``*_ci`` intervals,
``phat_hist`` (``PHAT_BINS`` counts over [0, 1]) and ``acc_replicas``. Strict JSON: an
undefined number (the control's ``var_ratio``, 0/0) is ``null``.

Interrupt a study at any point and run the same command again: finished trials are read back
from results.json, an unfinished one continues from its latest checkpoint (every draw a replica
makes derives from (seed, source, replica, step), so the continued run is bitwise the
uninterrupted one) and the final results.json is byte for byte the same. Files are written to a
temporary name and renamed, so an interruption never leaves a truncated file.

The three studies (the configs below; the binaries in ``experiments/`` are flags over them):

- ``IrreproducibilityConfig``: which source of randomness makes replicas disagree, per
  activation (the main job).
- ``SyntheticConfig``: PD on synthetic data against activation, source, shuffling window and
  model size (Snapp & Shamir).
- ``TestSetVarianceConfig``: the variance of test accuracy across runs against what
  independent errors predict (Jordan).

References:
  Snapp & Shamir, arXiv 2102.10696; Jordan, arXiv 2304.01910; methods.md sections 4-8.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import sys
import time
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from jaxrepro import activations, data, engine, metrics, models, randomness, synthetic

# ---------------------------------------------------------------------------------------------
# Errors and config objects.


class ConfigError(ValueError):
    """A bad study config: ``fields`` names the offending config fields (which are the flags)."""

    def __init__(self, fields: str | Sequence[str], message: str):
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.problem = message
        super().__init__(f"{', '.join(self.fields)}: {message}")

    def as_flags(self) -> str:
        """The message with each field written as its command-line flag."""
        return f"{', '.join('--' + f for f in self.fields)}: {self.problem}"


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(field, message)


def _field(default, help_text: str):
    """A config field: its default and the help text of its flag."""
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata={"help": help_text})


class StudyConfig:
    """Shared behaviour of the study configs (frozen dataclasses whose fields are the flags)."""

    STUDY: ClassVar[str] = ""
    QUICK: ClassVar[Mapping[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """The config from ``to_dict`` output (lists become tuples); unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(unknown, f"unknown field(s) of {cls.__name__}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def quick(cls, **overrides):
        """The config shrunk to a run of seconds (tests, smoke runs), with ``overrides``."""
        return cls(**{**cls.QUICK, **overrides})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def _check_common(self) -> None:
        for name in ("replicas", "epochs", "batch_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, f"must be an int >= 1, got {value!r}")
        _require(self.replicas >= 2, "replicas",
                 f"must be >= 2 (the metrics compare pairs of replicas), got {self.replicas}")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate",
                 f"must be a positive number, got {self.learning_rate!r}")
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, name,
                     f"must be an int >= 0 (0: the whole split), got {value!r}")
        _require(_is_int(self.seed) and 0 <= self.seed < 2**32, "seed",
                 f"must be an int in [0, 2**32), got {self.seed!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_activation(field: str, spec: str) -> None:
    try:
        activations.get(spec)
    except ValueError as e:
        raise ConfigError(field, str(e)) from None


def _check_widths(field: str, widths) -> None:
    _require(len(widths) > 0 and all(_is_int(w) and w >= 1 for w in widths), field,
             f"must be a non-empty list of positive ints, got {list(widths)!r}")


def _check_unique(field: str, values) -> None:
    _require(len(values) > 0, field, "must not be empty")
    _require(len(set(values)) == len(values), field, f"has duplicates: {list(values)!r}")


# The randomness settings of the studies: name -> the sources varied per replica.
SETTINGS: dict[str, tuple[str, ...]] = {
    "nothing": (),
    "init": ("init",),
    "order": ("order",),
    "dropout": ("dropout",),
    "augment": ("augment",),
    "perturb": ("perturb",),
    "both": ("init", "order"),
    "all": randomness.SOURCES,
}
"""Setting names accepted by the studies: ``nothing`` is the control (all replicas identical),
``both`` is init and order, ``all`` every source."""


def _check_settings(field: str, names) -> None:
    _check_unique(field, names)
    for name in names:
        _require(name in SETTINGS, field,
                 f"unknown randomness setting {name!r}; choose from {', '.join(SETTINGS)}")


@dataclasses.dataclass(frozen=True)
class IrreproducibilityConfig(StudyConfig):
    """The main job: which source of randomness makes replicas disagree, per activation.

    Each (activation, setting) trains ``replicas`` replicas of the MLP that differ only in the
    sources the setting varies, then compares their test predictions.
    """

    STUDY: ClassVar[str] = "irreproducibility"
    QUICK: ClassVar[Mapping[str, Any]] = dict(
        activations=("relu",), settings=("nothing", "all"), replicas=4, epochs=2, widths=(32,),
        num_train=512, num_test=256)

    dataset: str = _field("mnist1d", "dataset: mnist1d or digits")
    activations: tuple[str, ...] = _field(("relu", "smelu"), "activation specs to compare")
    settings: tuple[str, ...] = _field(
        ("nothing", "init", "order", "dropout", "perturb", "all"),
        "randomness settings (nothing = control, or a source, both, all)")
    replicas: int = _field(16, "replicas per trial (>= 2)")
    epochs: int = _field(20, "training epochs")
    widths: tuple[int, ...] = _field((128, 128), "hidden widths of the MLP")
    dropout_rate: float = _field(0.1, "dropout rate (so the dropout source has an effect)")
    batch_size: int = _field(128, "batch size")
    learning_rate: float = _field(3e-3, "Adam learning rate")
    perturb_scale: float = _field(engine.DEFAULT_PERTURB_SCALE,
                                  "relative size of the initial-weight perturbation")
    num_train: int = _field(0, "training examples to use (0: all)")
    num_test: int = _field(0, "test examples to use (0: all)")
    seed: int = _field(0, "root seed of the replicas")

    def __post_init__(self):
        self._check_common()
        _require(self.dataset in ("mnist1d", "digits"), "dataset",
                 f"must be mnist1d or digits, got {self.dataset!r}")
        _check_unique("activations", self.activations)
        for spec in self.activations:
            _check_activation("activations", spec)
        _check_settings("settings", self.settings)
        _check_widths("widths", self.widths)
        _require(0.0 <= self.dropout_rate < 1.0, "dropout_rate",
                 f"must be in [0, 1), got {self.dropout_rate!r}")
        _require(math.isfinite(self.perturb_scale) and self.perturb_scale >= 0, "perturb_scale",
                 f"must be finite and >= 0, got {self.perturb_scale!r}")


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
        grid_activations=("relu", "tanh"), grid_sources=("both",), grid_windows=(1, 0),
        window_vary=("init", "order"), grid_widths=(16,), grid_depths=(1,), width=16,
        depth_width=16, replicas=4, epochs=2, num_train=256, num_test=128)

    dim: int = _field(10, "input dimension of the synthetic data")
    num_train: int = _field(8000, "training examples")
    num_test: int = _field(1000, "test examples")
    teacher: str = _field("single", "teacher: linear, single (one nonlinearity) or mlp")
    teacher_hidden: int = _field(8, "hidden width of the teacher")
    teacher_depth: int = _field(2, "hidden layers of an mlp teacher")
    teacher_activation: str = _field("tanh", "activation of the teacher")
    temperature: float = _field(0.25, "label temperature (0: deterministic labels)")
    label_noise: float = _field(0.0, "probability of a uniformly drawn label")
    data_seed: int = _field(0, "seed of the data (independent of the replicas' seed)")
    activation: str = _field("relu", "activation of the base student")
    width: int = _field(64, "hidden width of the base student (one hidden layer)")
    vary: tuple[str, ...] = _field(("init", "order"), "sources varied in the base trial")
    grid_activations: tuple[str, ...] = _field(
        ("relu", "smelu(0.1)", "smelu(0.5)", "smelu(1)", "smelu(2)", "gelu", "silu",
         "softplus", "tanh"), "activation grid")
    grid_sources: tuple[str, ...] = _field(("init", "order", "both"),
                                           "randomness-source grid (settings)")
    grid_windows: tuple[int, ...] = _field((1, 10, 100, 1000, 0),
                                           "shuffling-window grid (0: N, a full shuffle)")
    window_vary: tuple[str, ...] = _field(("order",), "sources varied in the window grid")
    grid_widths: tuple[int, ...] = _field((4, 16, 64, 256, 1024),
                                          "hidden-width grid (one hidden layer)")
    grid_depths: tuple[int, ...] = _field((1, 2, 3, 4), "depth grid (layers of depth_width)")
    depth_width: int = _field(64, "width of each hidden layer in the depth grid")
    replicas: int = _field(128, "replicas per trial (>= 2)")
    epochs: int = _field(40, "training epochs")
    batch_size: int = _field(32, "batch size")
    learning_rate: float = _field(3e-3, "Adam learning rate")
    seed: int = _field(0, "root seed of the replicas")

    def __post_init__(self):
        self._check_common()
        _require(self.num_train >= 1 and self.num_test >= 1, "num_train",
                 "the synthetic study needs num_train >= 1 and num_test >= 1")
        _check_activation("teacher_activation", self.teacher_activation)
        try:
            self.data_spec()
        except ValueError as e:  # "synthetic <knob>: <problem>"
            knob = str(e).split(":")[0].replace("synthetic ", "")
            renamed = {"hidden": "teacher_hidden", "depth": "teacher_depth", "seed": "data_seed"}
            raise ConfigError(renamed.get(knob, knob), str(e)) from None
        _check_activation("activation", self.activation)
        _check_widths("width", (self.width,))
        _check_widths("depth_width", (self.depth_width,))
        for spec in self.grid_activations:
            _check_activation("grid_activations", spec)
        _check_unique("grid_activations", self.grid_activations)
        _check_settings("grid_sources", self.grid_sources)
        for name in ("vary", "window_vary"):
            try:
                randomness.check_sources(getattr(self, name), what=name)
            except ValueError as e:
                raise ConfigError(name, str(e)) from None
        _check_unique("grid_windows", self.grid_windows)
        _require(all(_is_int(w) and w >= 0 for w in self.grid_windows), "grid_windows",
                 f"must be ints >= 1 (or 0 for N), got {list(self.grid_windows)!r}")
        _check_unique("grid_widths", self.grid_widths)
        _check_widths("grid_widths", self.grid_widths)
        _check_unique("grid_depths", self.grid_depths)
        _check_widths("grid_depths", self.grid_depths)
        _require(self.batch_size <= self.num_train, "batch_size",
                 f"{self.batch_size} is larger than num_train={self.num_train}")

    def data_spec(self) -> synthetic.Synthetic:
        """The generator spec of this study's data."""
        return synthetic.Synthetic(
            dim=self.dim, num_train=self.num_train, num_test=self.num_test, teacher=self.teacher,
            hidden=self.teacher_hidden, depth=self.teacher_depth,
            activation=self.teacher_activation,
            temperature=self.temperature, label_noise=self.label_noise, seed=self.data_seed)


TSV_DATASETS = ("mnist1d", "digits", "mnist1d_binary")


@dataclasses.dataclass(frozen=True)
class TestSetVarianceConfig(StudyConfig):
    """Test-set variance study (Jordan): is the spread of test accuracy what independent errors
    predict, and how much does each source of randomness contribute?"""

    __test__: ClassVar[bool] = False  # not a pytest test class despite its name

    STUDY: ClassVar[str] = "test_set_variance"
    QUICK: ClassVar[Mapping[str, Any]] = dict(
        datasets=("digits", "mnist1d_binary"), sources=("all",), replicas=4, epochs=2,
        widths=(16,), num_train=256, num_test=128, num_samples=50)

    datasets: tuple[str, ...] = _field(TSV_DATASETS, "datasets (mnist1d_binary: two classes)")
    sources: tuple[str, ...] = _field(("all", "init", "order", "perturb"),
                                      "randomness settings to compare")
    replicas: int = _field(128, "replicas per trial (the study needs >= 64; >= 2 allowed)")
    epochs: int = _field(20, "training epochs")
    widths: tuple[int, ...] = _field((128, 128), "hidden widths of the MLP")
    dropout_rate: float = _field(0.0, "dropout rate")
    batch_size: int = _field(128, "batch size")
    learning_rate: float = _field(3e-3, "Adam learning rate")
    binary_classes: tuple[int, ...] = _field((2, 7), "the two MNIST-1D classes of the binary task")
    num_samples: int = _field(1000, "bootstrap samples for the intervals")
    bootstrap_over: str = _field("replicas", "bootstrap resamples replicas or examples")
    level: float = _field(0.95, "confidence level of the intervals")
    num_train: int = _field(0, "training examples to use (0: all)")
    num_test: int = _field(0, "test examples to use (0: all)")
    seed: int = _field(0, "root seed of the replicas (and of the bootstrap)")

    def __post_init__(self):
        self._check_common()
        _check_unique("datasets", self.datasets)
        for name in self.datasets:
            _require(name in TSV_DATASETS, "datasets",
                     f"unknown dataset {name!r}; choose from {', '.join(TSV_DATASETS)}")
        _check_settings("sources", self.sources)
        _check_widths("widths", self.widths)
        _require(0.0 <= self.dropout_rate < 1.0, "dropout_rate",
                 f"must be in [0, 1), got {self.dropout_rate!r}")
        c = self.binary_classes
        _require(len(c) == 2 and all(_is_int(v) and 0 <= v < 10 for v in c) and c[0] != c[1],
                 "binary_classes", f"must be two different classes in 0..9, got {list(c)!r}")
        _require(_is_int(self.num_samples) and self.num_samples >= 1, "num_samples",
                 f"must be an int >= 1, got {self.num_samples!r}")
        _require(self.bootstrap_over in ("replicas", "examples"), "bootstrap_over",
                 f"must be replicas or examples, got {self.bootstrap_over!r}")
        _require(0.0 < self.level < 1.0, "level", f"must be in (0, 1), got {self.level!r}")


CONFIGS: dict[str, type[StudyConfig]] = {
    c.STUDY: c for c in (IrreproducibilityConfig, SyntheticConfig, TestSetVarianceConfig)
}


# ---------------------------------------------------------------------------------------------
# Flags (absl), so a binary is `define_flags(Config)` plus `app.run(lambda argv: main(...))`.


def _field_types(config_cls) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def define_flags(config_cls: type[StudyConfig], flag_values=None,
                 module_name: str | None = None) -> None:
    """Defines one absl flag per config field, plus ``--workdir``, ``--quick``,
    ``--checkpoint_every`` and ``--keep_checkpoints``. Field defaults are the flag defaults;
    list fields take commas. The flags are registered as the main module's (``module_name``,
    default ``sys.argv[0]``), so ``--help`` and usage errors list them."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    kw = {"flag_values": fv, "module_name": module_name or sys.argv[0]}
    defaults, types = config_cls(), _field_types(config_cls)
    for f in dataclasses.fields(config_cls):
        default, help_ = getattr(defaults, f.name), f.metadata.get("help", f.name)
        t = types[f.name]
        if t is bool:
            flags.DEFINE_bool(f.name, default, help_, **kw)
        elif t is int:
            flags.DEFINE_integer(f.name, default, help_, **kw)
        elif t is float:
            flags.DEFINE_float(f.name, default, help_, **kw)
        elif t is str:
            flags.DEFINE_string(f.name, default, help_, **kw)
        else:
            flags.DEFINE_list(f.name, [str(v) for v in default], help_, **kw)
    flags.DEFINE_string("workdir", f"runs/{config_cls.STUDY}",
                        "directory of the run: config, checkpoints, results, report", **kw)
    flags.DEFINE_bool("quick", False, "shrink the study to a run of seconds (smoke test); "
                      "flags given explicitly still apply", **kw)
    flags.DEFINE_integer("checkpoint_every", 5, "epochs between checkpoints", **kw)
    flags.DEFINE_bool("keep_checkpoints", True, "keep each trial's final checkpoint (its trained "
                      "replicas) once its results are recorded", **kw)


def config_from_flags(config_cls: type[StudyConfig], flag_values=None) -> StudyConfig:
    """The config the parsed flags ask for: the defaults (or ``quick()`` with ``--quick``) with
    every explicitly given flag applied.

    Raises:
      ConfigError: naming the flag whose value is bad.
    """
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    values = (config_cls.quick() if fv["quick"].value else config_cls()).to_dict()
    types = _field_types(config_cls)
    for f in dataclasses.fields(config_cls):
        if not fv[f.name].present:
            continue
        value, t = fv[f.name].value, types[f.name]
        if typing.get_origin(t) is tuple:
            item = typing.get_args(t)[0]
            try:
                value = tuple(item(v.strip()) for v in value)
            except ValueError:
                raise ConfigError(f.name, f"expected a comma-separated list of "
                                          f"{item.__name__}, got {','.join(value)!r}") from None
        values[f.name] = value
    return config_cls.from_dict(values)


def main(config_cls: type[StudyConfig], argv: Sequence[str], flag_values=None) -> dict:
    """The whole body of an experiment binary: flags -> config -> ``run`` -> printed report.

    A bad flag (or a workdir holding another config) raises ``absl.app.UsageError`` naming the
    flag, before any training.
    """
    from absl import app, flags, logging

    fv = flags.FLAGS if flag_values is None else flag_values
    if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}; flags start with --")
    if fv["checkpoint_every"].value < 1:
        raise app.UsageError("--checkpoint_every: must be >= 1")
    try:
        config = config_from_flags(config_cls, fv)
        out = run(config, fv["workdir"].value, checkpoint_every=fv["checkpoint_every"].value,
                  keep_checkpoints=fv["keep_checkpoints"].value)
    except ConfigError as e:
        raise app.UsageError(e.as_flags()) from None
    print(out["report_markdown"])
    return out


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, JSON, versions.


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Writes ``payload`` to a temporary file beside ``path``, then renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_json(value):
    """``value`` with NumPy scalars/arrays made Python, tuples made lists and NaN/inf made
    ``None`` (strict JSON: an undefined metric, e.g. the control's ``var_ratio``, is null)."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(to_json(obj), indent=1, allow_nan=False) + "\n")


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    out = {"python": sys.version.split()[0]}
    for name in ("jaxrepro", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def prepare_workdir(workdir: str | os.PathLike, config: StudyConfig) -> Path:
    """Creates ``workdir`` and its ``config.json``, or checks the one it holds.

    Raises:
      ConfigError: the workdir holds another study or a config that differs; ``fields`` names
        the differing fields, so nothing is trained into a mismatched run.
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    wanted = {"study": config.STUDY, "config": to_json(config.to_dict())}
    if path.exists():
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError("workdir",
                              f"{path} is unreadable ({e}); use another workdir") from None
        if held.get("study") != config.STUDY:
            raise ConfigError("workdir", f"{workdir} holds a {held.get('study')!r} study, not "
                                         f"{config.STUDY!r}; use another workdir")
        old = held.get("config", {})
        diff = sorted(k for k in set(old) | set(wanted["config"])
                      if old.get(k) != wanted["config"].get(k))
        if diff:
            detail = "; ".join(f"{k}={json.dumps(old.get(k))} there, "
                               f"{json.dumps(wanted['config'].get(k))} requested" for k in diff)
            raise ConfigError(diff, f"workdir {workdir} holds a run with a different config "
                                    f"({detail}); use another workdir or the same flags")
        return workdir
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, wanted)
    return workdir


# ---------------------------------------------------------------------------------------------
# Progress.


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Prints ``config k/K <name> epoch e/E elapsed ... eta ...`` lines and logs them.

    The remaining time is the work left (replica-steps) at the rate of this session's work so
    far. ``clock`` is injectable so tests are exact and instant.
    """

    def __init__(self, total_units: float, *, clock: Callable[[], float] = time.monotonic,
                 stream=None, log_path: str | os.PathLike | None = None, echo: bool = True):
        self.total, self.done, self.skipped = float(total_units), 0.0, 0.0
        self.clock, self.start = clock, clock()
        self.stream = sys.stderr if stream is None else stream
        self.log_path, self.echo = log_path, echo
        self.lines: list[str] = []

    def skip(self, units: float) -> None:
        """Work that needs no doing this session (finished earlier, or restored)."""
        self.skipped += units

    def eta(self) -> float:
        elapsed = self.clock() - self.start
        left = self.total - self.done - self.skipped
        if left <= 0:
            return 0.0
        return elapsed / self.done * left if self.done > 0 else math.inf

    def step(self, k: int, num: int, name: str, epoch: int, epochs: int, units: float) -> str:
        self.done += units
        elapsed = self.clock() - self.start
        line = (f"config {k}/{num} {name} epoch {epoch}/{epochs} "
                f"elapsed {_fmt_seconds(elapsed)} eta {_fmt_seconds(self.eta())}")
        self.write(line)
        return line

    def write(self, line: str) -> None:
        self.lines.append(line)
        if self.echo:
            print(line, file=self.stream, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")


# ---------------------------------------------------------------------------------------------
# Checkpoints (orbax).


def _manager(directory: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False,
                                           create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save_checkpoint(directory: str | os.PathLike, epoch: int, state: engine.TrainState,
                    history: Mapping[str, np.ndarray]) -> None:
    """Saves the stacked state after ``epoch`` epochs (and the per-epoch history) with orbax;
    only the latest checkpoint is kept. Orbax commits a checkpoint by renaming it into place."""
    import orbax.checkpoint as ocp

    meta = {"epoch": int(epoch), "history": {k: np.asarray(v).tolist() for k, v in
                                             history.items()}}
    with _manager(Path(directory)) as mngr:
        mngr.save(int(epoch), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()


def restore_checkpoint(directory: str | os.PathLike, like: engine.TrainState):
    """The latest checkpoint as ``(state, epoch, history)``, or None when there is none.

    ``like`` (e.g. a fresh ``Engine.init()``) gives the tree structure, dtypes and shardings,
    so the restored state is bitwise the saved one, laid out as training expects.
    """
    import jax
    import orbax.checkpoint as ocp

    directory = Path(directory)
    if not directory.exists():
        return None
    with _manager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    history = {k: np.asarray(v, np.float32).reshape(len(v), -1)
               for k, v in out.meta["history"].items()}
    return out.state, int(out.meta["epoch"]), history


# ---------------------------------------------------------------------------------------------
# Trials.


@dataclasses.dataclass(frozen=True)
class Trial:
    """One replica set of a study.

    Attributes:
      name: unique within the study; the key of its record in results.json.
      task: model, optimizer and loss (reuse the same objects across trials: compiled
        functions are cached by them).
      data: the dataset.
      fit: how the replicas are trained.
      info: the trial's coordinates in the study's grids (JSON-ready), stored with its record.
      evaluate: ``(run, data) -> dict`` of JSON-ready results (default: ``evaluate``).
    """

    name: str
    task: engine.Task
    data: data.Dataset
    fit: engine.FitConfig
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    evaluate: Callable[[engine.Run, data.Dataset], dict] | None = None


def predict_finite(run: engine.Run, dataset: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Test predictions ``[R, N, C]`` and the replicas to keep, bool ``[R]``: those whose
    training stayed finite and whose predictions are finite."""
    probs_RxNxC = run.predict(dataset.x_test)
    keep = ~run.diverged & np.asarray(metrics.finite_replicas(probs_RxNxC))
    return probs_RxNxC, keep


def evaluate(run: engine.Run, dataset: data.Dataset, **compare_kwargs) -> dict[str, Any]:
    """Test predictions compared across replicas; diverged replicas are reported and excluded.

    Returns:
      ``{"diverged": [replica ids], "train_loss", "train_accuracy", "metrics"}``: training
      means of the last epoch over the kept replicas, and ``metrics.compare(...)`` of the kept
      replicas' test predictions (``compare_kwargs`` passed on); ``metrics`` is None, with an
      ``error``, when fewer than 2 replicas are left.
    """
    return _evaluate(run, dataset, *predict_finite(run, dataset), **compare_kwargs)


def _evaluate(run, dataset, probs_RxNxC, keep, **compare_kwargs) -> dict[str, Any]:
    out: dict[str, Any] = {"diverged": [int(r) for r in run.replica_ids[~keep]]}
    last = {k: v[:, -1] for k, v in run.history.items()}
    out["train_loss"] = float(np.mean(last["loss"][keep])) if keep.any() else math.nan
    out["train_accuracy"] = float(np.mean(last["accuracy"][keep])) if keep.any() else math.nan
    if keep.sum() < 2:
        out["metrics"] = None
        out["error"] = (f"only {int(keep.sum())} of {len(keep)} replicas stayed finite; "
                        "metrics need 2")
        return out
    out["metrics"] = metrics.compare(probs_RxNxC, dataset.y_test, mask=keep, **compare_kwargs)
    return out


def _slug(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60] + "-" + digest


def _units(trial: Trial) -> tuple[float, int]:
    steps = trial.data.num_train // trial.fit.batch_size
    return float(len(trial.fit.replica_ids) * steps), trial.fit.epochs


def train_trial(trial: Trial, checkpoint_dir: str | os.PathLike, *, checkpoint_every: int = 5,
                progress: Progress | None = None, index: tuple[int, int] = (1, 1),
                on_checkpoint: Callable[[str, int], None] | None = None) -> engine.Run:
    """Trains one trial, resuming from its latest checkpoint, saving every
    ``checkpoint_every`` epochs and after the last. One epoch per dispatch, so the result does
    not depend on where the checkpoints fall."""
    eng = engine.Engine(trial.task, trial.data, trial.fit)
    epochs = trial.fit.epochs
    per_epoch, _ = _units(trial)
    start_time = time.perf_counter()
    state = eng.init()
    first, history = 0, {"loss": [], "accuracy": []}
    restored = restore_checkpoint(checkpoint_dir, state)
    if restored is not None:
        state, first, old = restored
        history = {k: [old[k]] for k in history}
        if progress is not None:
            progress.skip(per_epoch * first)
            progress.write(f"config {index[0]}/{index[1]} {trial.name} resumed at epoch "
                           f"{first}/{epochs}")
    for epoch in range(first, epochs):
        state, m = eng.train(state, epoch, 1)
        for k in history:
            history[k].append(m[k])
        done = epoch + 1
        if progress is not None:
            progress.step(index[0], index[1], trial.name, done, epochs, per_epoch)
        if done % checkpoint_every == 0 or done == epochs:
            hist = {k: np.concatenate(v, axis=1) for k, v in history.items()}
            save_checkpoint(checkpoint_dir, done, state, hist)
            if on_checkpoint is not None:
                on_checkpoint(trial.name, done)
    hist = {k: np.concatenate(v, axis=1) if v else np.zeros((eng.num_replicas, 0), np.float32)
            for k, v in history.items()}
    return engine.Run(task=trial.task, config=trial.fit, state=state,
                      replica_ids=eng.replica_ids, history=hist,
                      seconds=time.perf_counter() - start_time)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_trials(trials: Sequence[Trial], workdir: str | os.PathLike, *, header: Mapping[str, Any],
               checkpoint_every: int = 5, keep_checkpoints: bool = True,
               progress: Progress | None = None,
               on_checkpoint: Callable[[str, int], None] | None = None) -> dict[str, dict]:
    """Trains every trial not yet in ``workdir/results.json`` and records it there.

    After each trial, results.json (``header`` plus ``results``: the records in trial order and
    ``complete: false``) is rewritten atomically; finished trials are never trained again. With
    ``keep_checkpoints=False`` a trial's checkpoints are deleted once its record is written.

    Returns:
      ``{trial name: record}`` in trial order; a record is ``{"info": ..., **evaluate(...)}``.
    """
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        raise ValueError(f"trial names must be unique, got {names}")
    workdir = Path(workdir)
    held = _read_json(workdir / "results.json") or {}
    records = {k: v for k, v in held.get("results", {}).items() if k in names}
    timings = (_read_json(workdir / "timings.json") or {}).get("seconds", {})
    if progress is not None:
        for t in trials:
            if t.name in records:
                units, epochs = _units(t)
                progress.skip(units * epochs)
    for k, trial in enumerate(trials, start=1):
        if trial.name in records:
            continue
        checkpoint_dir = workdir / "checkpoints" / _slug(trial.name)
        run = train_trial(trial, checkpoint_dir, checkpoint_every=checkpoint_every,
                          progress=progress,
                          index=(k, len(trials)), on_checkpoint=on_checkpoint)
        evaluate_fn = trial.evaluate or evaluate
        start = time.perf_counter()
        record = {"info": dict(trial.info), **evaluate_fn(run, trial.data)}
        timings[trial.name] = run.seconds + time.perf_counter() - start
        records[trial.name] = to_json(record)
        ordered = {n: records[n] for n in names if n in records}
        atomic_write_json(workdir / "results.json",
                          {**header, "complete": False, "results": ordered})
        atomic_write_json(workdir / "timings.json", {"seconds": timings})
        if not keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {n: records[n] for n in names}


# ---------------------------------------------------------------------------------------------
# Shared building blocks of the studies.


@functools.cache
def _adam(learning_rate: float):
    """One optax object per learning rate for the whole process: compiled functions are cached
    by the optimizer's identity, so every trial (and study) with this rate shares them."""
    import optax

    return optax.adam(learning_rate)


@functools.cache
def _task(widths: tuple[int, ...], num_classes: int, activation: str, dropout_rate: float,
          learning_rate: float) -> engine.Task:
    model = models.MLP(widths=tuple(widths), num_classes=num_classes, activation=activation,
                       dropout_rate=dropout_rate)
    return engine.Task(model=model, tx=_adam(learning_rate))


def _subset(ds: data.Dataset, num_train: int, num_test: int) -> data.Dataset:
    """The first ``num_train`` / ``num_test`` examples of each split (0: all of it)."""
    if not num_train and not num_test:
        return ds
    n_tr, n_te = num_train or ds.num_train, num_test or ds.num_test
    return data.Dataset(ds.x_train[:n_tr], ds.y_train[:n_tr], ds.x_test[:n_te],
                        ds.y_test[:n_te], num_classes=ds.num_classes, name=ds.name)


def _binary(ds: data.Dataset, classes: Sequence[int]) -> data.Dataset:
    a, b = (int(c) for c in classes)

    def pick(x, y):
        keep = (y == a) | (y == b)
        return x[keep], (y[keep] == b).astype(np.int32)

    x_tr, y_tr = pick(ds.x_train, ds.y_train)
    x_te, y_te = pick(ds.x_test, ds.y_test)
    return data.Dataset(x_tr, y_tr, x_te, y_te, num_classes=2, name=f"{ds.name}_{a}v{b}")


def _fit_config(config, vary, **kwargs) -> engine.FitConfig:
    vary = tuple(vary)
    perturb = kwargs.pop("perturb_scale", None)
    return engine.FitConfig(
        replicas=config.replicas, seed=config.seed, vary=vary, batch_size=config.batch_size,
        epochs=config.epochs, perturb_scale=perturb if "perturb" in vary else None, **kwargs)


def _metric(record: Mapping[str, Any], key: str) -> float:
    m = record.get("metrics") or {}
    v = m.get(key)
    return math.nan if v is None else float(v)


def fmt(value, digits: int = 3) -> str:
    """A table cell: fixed-point for ordinary numbers, scientific for tiny ones, '-' for
    undefined (None / NaN)."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    value = float(value)
    if not math.isfinite(value):
        return "-"
    if value == 0 or 10 ** -digits <= abs(value) < 10**5:
        return f"{value:.{digits}f}"
    return f"{value:.{digits - 1}e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells are converted with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _report_head(title: str, config: StudyConfig, seconds: float) -> list[str]:
    return [f"# {title}", "",
            f"Config: `{json.dumps(to_json(config.to_dict()), separators=(',', ':'))}`", "",
            f"Training and evaluation time of the trials: {_fmt_seconds(seconds)} (timings.json; "
            "a resumed trial counts its last session only).", ""]


def _diverged_note(records: Mapping[str, dict]) -> list[str]:
    lines = []
    for name, rec in records.items():
        if rec.get("diverged"):
            lines.append(f"- {name}: replicas {rec['diverged']} diverged and are excluded"
                         + (f" ({rec['error']})" if rec.get("error") else "") + ".")
    return (["## Diverged replicas", ""] + lines + [""]) if lines else []


# ---------------------------------------------------------------------------------------------
# Study 1: irreproducibility (the main job).


def _irreproducibility_trials(config: IrreproducibilityConfig) -> list[Trial]:
    ds = _subset(data.load(config.dataset), config.num_train, config.num_test)
    trials = []
    for act in config.activations:
        task = _task(config.widths, ds.num_classes, act, config.dropout_rate,
                     config.learning_rate)
        for setting in config.settings:
            vary = SETTINGS[setting]
            trials.append(Trial(
                name=f"{act}/{setting}", task=task, data=ds,
                fit=_fit_config(config, vary, perturb_scale=config.perturb_scale),
                info={"activation": act, "setting": setting, "vary": list(vary)}))
    return trials


def _irreproducibility_report(config: IrreproducibilityConfig, records, workdir: Path):
    from jaxrepro import plots

    cols = ["acc_mean", "acc_std", "churn", "pd_abs", "pd_rel", "eta", "var_ratio"]
    rows = []
    for rec in records.values():
        info = rec["info"]
        rows.append([info["activation"], info["setting"]] + [fmt(_metric(rec, c)) for c in cols])
    table = markdown_table(["activation", "setting"] + cols, rows)
    lines = ["## Replicas by source of randomness", "",
             f"Each row trains {config.replicas} replicas of an MLP {list(config.widths)} "
             f"(dropout {config.dropout_rate}) for {config.epochs} epochs on {config.dataset} "
             "that differ only in the sources the setting varies ('nothing' is the control: "
             "identical replicas, every PD exactly 0); churn is the fraction of test examples "
             "on which two replicas disagree, pd_abs the mean total-variation distance of their "
             "probabilities, eta the mean accuracy minus churn, var_ratio the observed variance "
             "of accuracy over the variance independent errors would give.", "", table, ""]
    lines += _irreproducibility_findings(config, records)
    churn = {act: [_metric(records[f"{act}/{s}"], "churn") for s in config.settings]
             for act in config.activations}
    plots.grouped_bars(workdir / "churn.png", list(config.settings), churn,
                       ylabel="churn (top-1 disagreement)", xlabel="randomness setting",
                       title=f"Churn between replicas ({config.dataset}, R={config.replicas})")
    lines += ["![churn by setting and activation](churn.png)", "",
              "The plot shows churn for each setting (x) and activation (bars).", ""]
    return lines


def _irreproducibility_findings(config, records) -> list[str]:
    out = []
    for act in config.activations:
        churn = {s: _metric(records[f"{act}/{s}"], "churn") for s in config.settings}
        single = {s: c for s, c in churn.items() if s not in ("nothing", "all", "both")
                  and math.isfinite(c)}
        parts = []
        if single:
            top, low = max(single, key=single.get), min(single, key=single.get)
            parts.append(f"of the single sources, '{top}' gives the most churn "
                         f"({fmt(single[top])}) and '{low}' the least ({fmt(single[low])})")
        if "all" in churn:
            parts.append(f"all sources together {fmt(churn['all'])}")
        if "nothing" in churn:
            parts.append(f"the control {fmt(churn['nothing'])}")
        if parts:
            out.append(f"- {act}: " + "; ".join(parts) + ".")
    if len(config.activations) > 1:
        for setting in (s for s in config.settings if s != "nothing"):
            values = {a: _metric(records[f"{a}/{setting}"], "churn") for a in config.activations}
            values = {a: v for a, v in values.items() if math.isfinite(v)}
            if len(values) > 1:
                best = min(values, key=values.get)
                out.append(f"- '{setting}': the least churn with {best} (" + ", ".join(
                    f"{a} {fmt(v)}" for a, v in values.items()) + ").")
    return (["Findings:", ""] + out + [""]) if out else []


# ---------------------------------------------------------------------------------------------
# Study 2: synthetic data (Snapp & Shamir).


def _window_label(window: int, num_train: int) -> str:
    return f"N={num_train}" if window in (0, None) or window >= num_train else str(window)


def _synthetic_grids(config: SyntheticConfig) -> dict[str, list[tuple[str, dict]]]:
    """grid -> [(label, trial spec)]; a spec is (activation, widths, vary, window)."""
    base = dict(activation=config.activation, widths=(config.width,), vary=tuple(config.vary),
                window=0)

    def spec(**changes):
        s = {**base, **changes}
        s["vary"] = randomness.check_sources(s["vary"])
        return s

    n = config.num_train
    return {
        "activation": [(a, spec(activation=a)) for a in config.grid_activations],
        "source": [(s, spec(vary=SETTINGS[s])) for s in config.grid_sources],
        "window": [(_window_label(w, n), spec(window=w, vary=tuple(config.window_vary)))
                   for w in config.grid_windows],
        "width": [(str(w), spec(widths=(w,))) for w in config.grid_widths],
        "depth": [(str(d), spec(widths=(config.depth_width,) * d)) for d in config.grid_depths],
    }


def _synthetic_name(spec: Mapping[str, Any], num_train: int) -> str:
    widths = "x".join(str(w) for w in spec["widths"])
    vary = "+".join(spec["vary"]) or "nothing"
    return (f"{spec['activation']} [{widths}] vary={vary} "
            f"window={_window_label(spec['window'], num_train)}")


def _synthetic_trials(config: SyntheticConfig) -> list[Trial]:
    ds = config.data_spec().dataset()
    trials, seen = [], set()
    for grid in _synthetic_grids(config).values():
        for _, spec in grid:
            name = _synthetic_name(spec, config.num_train)
            if name in seen:
                continue
            seen.add(name)
            window = spec["window"] or None
            trials.append(Trial(
                name=name, task=_task(spec["widths"], 2, spec["activation"], 0.0,
                                      config.learning_rate),
                data=ds, fit=_fit_config(config, spec["vary"], window=window),
                info={"activation": spec["activation"], "widths": list(spec["widths"]),
                      "vary": list(spec["vary"]),
                      "window": window if window is not None else config.num_train}))
    return trials


_SYNTHETIC_TITLES = {
    "activation": ("activation", "PD against the student's activation (relu against smooth "
                   "activations; smelu(beta) widens its smooth region with beta)."),
    "source": ("randomness source", "PD against which source differs between replicas "
               "(init: initial weights; order: data order; both)."),
    "window": ("shuffling window w", "PD against the shuffling window: only the data order "
               "differs between replicas (sources {vary}), shuffled within windows of w "
               "examples (w = 1: one fixed order, N: a full shuffle)."),
    "width": ("hidden width", "PD against the width of the single hidden layer."),
    "depth": ("hidden layers", "PD against the depth (hidden layers of width {width})."),
}


def _synthetic_report(config: SyntheticConfig, records, workdir: Path):
    from jaxrepro import plots

    cols = ["pd_abs", "pd_rel", "churn", "acc_mean"]
    lines = [f"Data: {config.num_train} training and {config.num_test} test examples in "
             f"{config.dim} dimensions, binary labels from a fixed '{config.teacher}' teacher "
             f"(hidden width {config.teacher_hidden}, {config.teacher_activation}) at "
             f"temperature {config.temperature}. Students: MLPs trained with Adam "
             f"({config.learning_rate}), {config.replicas} replicas per row, "
             f"{config.epochs} epochs; base student: one hidden layer of {config.width} "
             f"{config.activation} units, varying {'+'.join(config.vary)}. PD metrics are "
             "averaged over replica pairs and test examples: pd_abs = mean |p_r - p_s|, "
             "pd_rel = the same relative to the mean prediction, churn = disagreement of the "
             "thresholded predictions.", ""]
    for grid, entries in _synthetic_grids(config).items():
        xlabel, sentence = _SYNTHETIC_TITLES[grid]
        sentence = sentence.format(vary="+".join(config.window_vary), width=config.depth_width)
        recs = [records[_synthetic_name(spec, config.num_train)] for _, spec in entries]
        labels = [label for label, _ in entries]
        rows = [[label] + [fmt(_metric(r, c)) for c in cols]
                for label, r in zip(labels, recs, strict=True)]
        png = f"synthetic_{grid}.png"
        plots.metric_panels(workdir / png, labels,
                            {c: [_metric(r, c) for r in recs] for c in cols[:3]},
                            xlabel=xlabel, kind="bar" if grid in ("activation", "source")
                            else "line", title=f"PD against {xlabel}")
        lines += [f"## PD against {xlabel}", "", sentence + " " + _trend(grid, labels, recs), "",
                  markdown_table([xlabel] + cols, rows), "", f"![{grid}]({png})", ""]
    return lines


def _trend(grid: str, labels: Sequence[str], recs: Sequence[Mapping[str, Any]]) -> str:
    """One computed sentence on a grid: extremes (unordered grids) or first -> last."""
    values = [_metric(r, "pd_abs") for r in recs]
    pairs = [(lab, v) for lab, v in zip(labels, values, strict=True) if math.isfinite(v)]
    if len(pairs) < 2:
        return ""
    if grid in ("activation", "source"):
        low, high = min(pairs, key=lambda p: p[1]), max(pairs, key=lambda p: p[1])
        return (f"Here the lowest pd_abs is {low[0]} ({fmt(low[1])}) and the highest "
                f"{high[0]} ({fmt(high[1])}).")
    ups = sum(b[1] > a[1] for a, b in zip(pairs[:-1], pairs[1:], strict=True))
    shape = ("rises at every step" if ups == len(pairs) - 1 else
             "falls at every step" if ups == 0 else "is not monotonic")
    name = {"window": "w = ", "width": "width ", "depth": "depth "}.get(grid, "")
    at = lambda label: name + label.split("=")[0]  # noqa: E731 - "N=4000" -> "w = N"
    return (f"Here pd_abs goes from {fmt(pairs[0][1])} at {at(pairs[0][0])} to "
            f"{fmt(pairs[-1][1])} at {at(pairs[-1][0])} and {shape}.")


# ---------------------------------------------------------------------------------------------
# Study 3: test-set variance (Jordan).


PHAT_BINS = 20
"""Bins of the per-example accuracy histograms (equal width over [0, 1])."""


def _tsv_datasets(config: TestSetVarianceConfig) -> dict[str, data.Dataset]:
    out = {}
    for name in config.datasets:
        if name == "mnist1d_binary":
            ds = _binary(data.mnist1d(), config.binary_classes)
        else:
            ds = data.load(name)
        out[name] = _subset(ds, config.num_train, config.num_test)
    return out


def _tsv_evaluate(config: TestSetVarianceConfig):
    def evaluate_fn(run: engine.Run, ds: data.Dataset) -> dict:
        import jax

        probs_RxNxC, keep = predict_finite(run, ds)
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        out = _evaluate(run, ds, probs_RxNxC, keep, key=key, num_samples=config.num_samples,
                        level=config.level, over=config.bootstrap_over)
        if out["metrics"] is not None:
            phat_N = np.asarray(metrics.phat(probs_RxNxC[keep], ds.y_test))
            counts, _ = np.histogram(phat_N, bins=PHAT_BINS, range=(0.0, 1.0))
            out["phat_hist"] = counts.tolist()
            out["acc_replicas"] = np.asarray(
                metrics.accuracy(probs_RxNxC[keep], ds.y_test)).tolist()
        return out

    return evaluate_fn


def _tsv_trials(config: TestSetVarianceConfig) -> list[Trial]:
    trials = []
    evaluate_fn = _tsv_evaluate(config)
    for name, ds in _tsv_datasets(config).items():
        task = _task(config.widths, ds.num_classes, "relu", config.dropout_rate,
                     config.learning_rate)
        for source in config.sources:
            trials.append(Trial(
                name=f"{name}/{source}", task=task, data=ds,
                fit=_fit_config(config, SETTINGS[source]),
                info={"dataset": name, "source": source, "vary": list(SETTINGS[source]),
                      "num_test": ds.num_test}, evaluate=evaluate_fn))
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
    ratios = [(name, _metric(r, "var_ratio")) for name, r in records.items()]
    ratios = [(n, v) for n, v in ratios if math.isfinite(v)]
    if not ratios:
        return "No trial has a defined variance ratio."
    low, high = min(ratios, key=lambda p: p[1]), max(ratios, key=lambda p: p[1])
    near = sum(0.5 <= v <= 2.0 for _, v in ratios)
    text = (f"Summary: var_obs / var_ind lies between {fmt(low[1], 2)} ({low[0]}) and "
            f"{fmt(high[1], 2)} ({high[0]}); {near} of {len(ratios)} trials are within a "
            "factor of 2 of 1")
    if near == len(ratios):
        return text + (", so the replicas' errors look approximately independent, as Jordan "
                       "(2023) reports: the spread of test accuracy across runs is about what "
                       "independent per-example errors give.")
    return text + "; the others show correlated (ratio > 2) or anti-correlated errors."


def _tsv_report(config: TestSetVarianceConfig, records, workdir: Path):
    from jaxrepro import plots

    pct = int(round(config.level * 100))
    lines = [f"Each trial trains {config.replicas} replicas of a relu MLP "
             f"{list(config.widths)} for {config.epochs} epochs, differing only in the named "
             "source. var_obs is the variance of test accuracy across replicas; var_ind the "
             "variance that independent per-example errors would give (from the per-example "
             "accuracies phat); their ratio near 1 means the replicas' errors look independent "
             f"(Jordan 2023). Brackets: {pct}% bootstrap intervals ({config.num_samples} "
             f"samples over {config.bootstrap_over}). 'share' is var_obs relative to the "
             "'all' row of the same dataset: how much of the variance one source alone gives.",
             "", _tsv_summary(records), ""]
    if config.replicas < 64:
        lines += [f"Note: {config.replicas} replicas per trial; the study is meant for at least "
                  "64 (default 128), and with fewer the intervals are wide.", ""]
    hist, points = {}, []
    for dataset in config.datasets:
        recs = {s: records[f"{dataset}/{s}"] for s in config.sources}
        binary = dataset == "mnist1d_binary"
        base = _metric(recs["all"], "var_obs") if "all" in recs else math.nan
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
            share = _metric(rec, "var_obs") / base if base and math.isfinite(base) else math.nan
            row += [fmt(share, 2), _verdict(_metric(rec, "var_ratio"), m.get("var_ratio_ci"))]
            rows.append(row)
            if rec.get("phat_hist") is not None:
                hist.setdefault(dataset, {})[source] = rec["phat_hist"]
            if m:
                points.append(_std_point(dataset, source, m))
        n_test = next(iter(recs.values()))["info"]["num_test"]
        lines += [f"## {dataset} ({n_test} test examples)", "",
                  _tsv_sentence(dataset, recs, binary), "",
                  markdown_table(header, rows), ""]
    edges = np.linspace(0.0, 1.0, PHAT_BINS + 1).tolist()
    plots.histograms(workdir / "phat_hist.png", edges, hist, xlabel="per-example accuracy phat",
                     title="How many replicas get each test example right")
    plots.scatter_intervals(workdir / "std_observed_vs_predicted.png", points,
                            xlabel="predicted std of accuracy, sqrt(var_ind)",
                            ylabel="observed std of accuracy, sqrt(var_obs)",
                            title="Observed against independent-errors prediction")
    lines += ["![phat histograms](phat_hist.png)", "",
              "The histograms show, per dataset and source, how many test examples each "
              "fraction of replicas gets right: mass at 0 and 1 is examples every replica "
              "agrees on; the middle is where runs differ.", "",
              "![observed against predicted std](std_observed_vs_predicted.png)", "",
              "The scatter plot compares the observed standard deviation of test accuracy with "
              "the one independent errors predict; points on the diagonal are independent.", ""]
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

    return {"group": group, "series": series,
            "x": math.sqrt(max(m.get("var_ind") or 0.0, 0.0)),
            "y": math.sqrt(max(m.get("var_obs") or 0.0, 0.0)),
            "x_ci": sqrt_ci("var_ind"), "y_ci": sqrt_ci("var_obs")}


def _tsv_sentence(dataset: str, recs: Mapping[str, dict], binary: bool) -> str:
    parts = []
    for source, rec in recs.items():
        ratio = _metric(rec, "var_ratio")
        verdict = _verdict(ratio, (rec.get("metrics") or {}).get("var_ratio_ci"))
        parts.append(f"{source}: ratio {fmt(ratio, 2)} ({verdict})")
    text = f"Errors across replicas on {dataset} -- " + "; ".join(parts) + "."
    if "all" in recs:
        base = _metric(recs["all"], "var_obs")
        shares = [f"{s} {fmt(_metric(r, 'var_obs') / base, 2)}" for s, r in recs.items()
                  if s != "all" and base > 0]
        if shares:
            text += (" Variance of accuracy from one source alone, as a share of all sources "
                     "together: " + ", ".join(shares) + ".")
    if binary and "all" in recs:
        m = recs["all"].get("metrics") or {}
        if m.get("var_cal") and m.get("var_obs") is not None:
            text += (f" The calibration prediction var_cal = err/(2N) gives "
                     f"{fmt(m['var_cal'])} against var_obs {fmt(m['var_obs'])} "
                     f"(ratio {fmt(m['var_obs'] / m['var_cal'], 2)}).")
    return text


# ---------------------------------------------------------------------------------------------
# The entry point.


_STUDIES = {
    "irreproducibility": ("Irreproducibility by source of randomness",
                          _irreproducibility_trials, _irreproducibility_report),
    "synthetic": ("Irreproducibility on synthetic data", _synthetic_trials, _synthetic_report),
    "test_set_variance": ("Test-set variance across runs", _tsv_trials, _tsv_report),
}


def run(config: StudyConfig, workdir: str | os.PathLike, *, checkpoint_every: int = 5,
        keep_checkpoints: bool = True, progress: bool = True,
        clock: Callable[[], float] = time.monotonic, stream=None,
        on_checkpoint: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Runs (or resumes) a study in ``workdir``: trains its trials, writes results.json,
    report.md and the plots.

    Args:
      config: one of ``IrreproducibilityConfig``, ``SyntheticConfig``,
        ``TestSetVarianceConfig``.
      workdir: the run's directory; created, or checked to hold the same config.
      checkpoint_every: epochs between checkpoints (each trial is also saved at its end).
      keep_checkpoints: keep each trial's last checkpoint (its trained replicas) after the
        trial is recorded; False deletes it then.
      progress: print progress lines to ``stream`` (default stderr); they are always
        appended to ``workdir/progress.log``.
      clock: time source of the progress lines.
      on_checkpoint: called as ``on_checkpoint(trial_name, epoch)`` after each checkpoint
        (tests use it to interrupt a run).

    Returns:
      The content of results.json (``study``, ``config``, ``versions``, ``complete``,
      ``results``: ``{trial: {"info", "metrics", "diverged", ...}}``) plus
      ``report_markdown``, the text of report.md.

    Raises:
      ConfigError: the workdir holds another config (nothing is trained).
    """
    if checkpoint_every < 1:
        raise ConfigError("checkpoint_every", f"must be >= 1, got {checkpoint_every}")
    if config.STUDY not in _STUDIES:
        raise TypeError(f"not a study config: {type(config).__name__}")
    title, make_trials, make_report = _STUDIES[config.STUDY]
    workdir = prepare_workdir(workdir, config)
    trials = make_trials(config)
    total = sum(units * epochs for units, epochs in map(_units, trials))
    prog = Progress(total, clock=clock, stream=stream, log_path=workdir / "progress.log",
                    echo=progress)
    header = {"study": config.STUDY, "config": config.to_dict(), "versions": versions()}
    records = run_trials(trials, workdir, header=header, checkpoint_every=checkpoint_every,
                         keep_checkpoints=keep_checkpoints, progress=prog,
                         on_checkpoint=on_checkpoint)
    timings = (_read_json(workdir / "timings.json") or {}).get("seconds", {})
    seconds = sum(timings.get(t.name, 0.0) for t in trials)
    body = make_report(config, records, workdir)
    markdown = "\n".join(_report_head(title, config, seconds) + body
                         + _diverged_note(records) + _versions_note())
    atomic_write_text(workdir / "report.md", markdown)
    results = to_json({**header, "complete": True, "results": records})
    atomic_write_json(workdir / "results.json", results)
    prog.write(f"done: {len(trials)} configs, results in {workdir / 'results.json'}")
    return {**results, "report_markdown": markdown}


def _versions_note() -> list[str]:
    return ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), ""]
