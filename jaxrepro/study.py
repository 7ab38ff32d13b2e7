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

results.json holds ``study``, ``config``, ``deterministic`` (XLA's GPU deterministic ops,
``--deterministic``), ``versions`` (python, jax, jaxlib, flax, optax, orbax-checkpoint, numpy,
jaxrepro), ``complete`` and ``results``: per trial, in trial order,
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

A study runs the same as several processes (``jaxrepro.distributed``; the binaries' flags
``--coordinator_address``, ``--num_processes``, ``--process_id``): every process trains its
block of each trial's replicas and computes the same results; process 0 alone writes the
workdir, orbax writes the checkpoints from every process, and results.json is byte for byte
the one a single process writes.

The five studies, one module each in ``jaxrepro/studies/`` (each registers its config, trials
and report with ``register``; the binaries in ``experiments/`` are flags over the configs):

- ``IrreproducibilityConfig``: which source of randomness makes replicas disagree, per
  activation (the main job).
- ``SyntheticConfig``: PD on synthetic data against activation, source, shuffling window and
  model size (Snapp & Shamir).
- ``TestSetVarianceConfig``: the variance of test accuracy across runs against what
  independent errors predict (Jordan).
- ``AntiDistillationConfig``: ensembles inside a replica, plain, anti-distilled and
  codistilled, against ensembles of independent replicas (Shamir & Coviello).
- ``RegularizersConfig``: do weight decay, dropout, LayerNorm, BatchNorm, residual connections
  or label smoothing make MLPs more reproducible, per depth and optimizer (paired tests)?

References:
  Snapp & Shamir, arXiv 2102.10696; Jordan, arXiv 2304.01910; Shamir & Coviello, arXiv
  2010.09923; apurvakokate/Reproducibility; methods.md sections 4-8.
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

from jaxrepro import activations, data, distributed, engine, metrics, models, randomness

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


def require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(field, message)


def flag_field(default, help_text: str):
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
            require(is_int(value) and value >= 1, name, f"must be an int >= 1, got {value!r}")
        require(self.replicas >= 2, "replicas",
                 f"must be >= 2 (the metrics compare pairs of replicas), got {self.replicas}")
        if hasattr(self, "learning_rate"):  # studies with one rate per optimizer check their own
            require(math.isfinite(self.learning_rate) and self.learning_rate > 0,
                    "learning_rate", f"must be a positive number, got {self.learning_rate!r}")
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            require(is_int(value) and value >= 0, name,
                     f"must be an int >= 0 (0: the whole split), got {value!r}")
        require(is_int(self.seed) and 0 <= self.seed < 2**32, "seed",
                 f"must be an int in [0, 2**32), got {self.seed!r}")


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_activation(field: str, spec: str) -> None:
    try:
        activations.get(spec)
    except ValueError as e:
        raise ConfigError(field, str(e)) from None


def check_widths(field: str, widths) -> None:
    require(len(widths) > 0 and all(is_int(w) and w >= 1 for w in widths), field,
             f"must be a non-empty list of positive ints, got {list(widths)!r}")


def check_unique(field: str, values) -> None:
    require(len(values) > 0, field, "must not be empty")
    require(len(set(values)) == len(values), field, f"has duplicates: {list(values)!r}")


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


def check_settings(field: str, names) -> None:
    check_unique(field, names)
    for name in names:
        require(name in SETTINGS, field,
                 f"unknown randomness setting {name!r}; choose from {', '.join(SETTINGS)}")


# ---------------------------------------------------------------------------------------------
# Flags (absl), so a binary is `define_flags(Config)` plus `app.run(lambda argv: main(...))`.


def _field_types(config_cls) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def define_flags(config_cls: type[StudyConfig], flag_values=None,
                 module_name: str | None = None) -> None:
    """Defines one absl flag per config field, plus ``--workdir``, ``--quick``,
    ``--checkpoint_every``, ``--keep_checkpoints``, ``--deterministic``, ``--cpu_devices`` and
    the multi-process flags (``--coordinator_address``, ``--num_processes``, ``--process_id``,
    ``--distributed``). Field defaults are the flag defaults;
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
    flags.DEFINE_bool("deterministic", False, "compile with XLA's GPU deterministic ops (the same "
                      "command twice gives bitwise the same results on a GPU; CPU and TPU are "
                      "deterministic without it); recorded in results.json", **kw)
    flags.DEFINE_integer("cpu_devices", 0, "split each process's CPU into this many JAX devices "
                         "(0: one per core); the results do not depend on it", **kw)
    flags.DEFINE_string("coordinator_address", None, "multi-process run: host:port of process 0 "
                        "(or $JAX_COORDINATOR_ADDRESS); see jaxrepro.distributed", **kw)
    flags.DEFINE_integer("num_processes", None, "multi-process run: number of processes (or "
                         "$JAX_NUM_PROCESSES)", **kw)
    flags.DEFINE_integer("process_id", None, "multi-process run: this process's index (or "
                         "$JAX_PROCESS_ID)", **kw)
    flags.DEFINE_bool("distributed", None, "join a multi-process run found by JAX's cluster "
                      "auto-detection (Slurm, Open MPI, Kubernetes, Cloud TPU); unset: detect, "
                      "--nodistributed: never", **kw)


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
    if fv["cpu_devices"].value < 0:
        raise app.UsageError("--cpu_devices: must be >= 0 (0: one per core)")
    try:
        config = config_from_flags(config_cls, fv)
    except ConfigError as e:
        raise app.UsageError(e.as_flags()) from None
    try:
        engine.use_cpu_devices(fv["cpu_devices"].value or None)  # 0: one per core
    except RuntimeError:
        if fv["cpu_devices"].present:
            raise
        # JAX already started in this process (a Python caller chose its devices): they stand.
    try:
        distributed.initialize(fv["coordinator_address"].value, fv["num_processes"].value,
                               fv["process_id"].value, auto=fv["distributed"].value)
    except ValueError as e:
        raise app.UsageError(f"--coordinator_address, --num_processes, --process_id: {e}"
                             ) from None
    try:
        out = run(config, fv["workdir"].value, checkpoint_every=fv["checkpoint_every"].value,
                  keep_checkpoints=fv["keep_checkpoints"].value,
                  deterministic=fv["deterministic"].value)
    except ConfigError as e:
        raise app.UsageError(e.as_flags()) from None
    if distributed.is_writer():
        print(out["report_markdown"])
    return out


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, JSON, versions.


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Writes ``payload`` to a temporary file beside ``path``, then renames it over ``path``.

    In a run of several processes only process 0 writes (``distributed.is_writer``): every
    process computes the same results, and one copy of each file is wanted on shared storage.
    """
    path = Path(path)
    if not distributed.is_writer():
        return path
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


def prepare_workdir(workdir: str | os.PathLike, config: StudyConfig, *,
                    deterministic: bool = False) -> Path:
    """Creates ``workdir`` and its ``config.json``, or checks the one it holds.

    Raises:
      ConfigError: the workdir holds another study or a config that differs (or was run with
        another ``deterministic`` setting); ``fields`` names the differing fields, so nothing
        is trained into a mismatched run.
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    wanted = {"study": config.STUDY, "config": to_json(config.to_dict()),
              "deterministic": bool(deterministic)}
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
        if bool(held.get("deterministic", False)) != wanted["deterministic"]:
            raise ConfigError("deterministic", f"workdir {workdir} holds a run with "
                              f"deterministic={held.get('deterministic', False)}; use another "
                              "workdir or the same flags")
        return workdir
    if distributed.is_writer():
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
        if not distributed.is_writer():  # one copy of the progress, from process 0
            return
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


def restore_checkpoint(directory: str | os.PathLike,
                       like: engine.TrainState | Callable[[], engine.TrainState]):
    """The latest checkpoint as ``(state, epoch, history)``, or None when there is none.

    ``like`` (e.g. ``Engine.abstract_state()`` or a fresh ``Engine.init()``, or a function
    returning one, called only when a checkpoint exists) gives the tree structure, dtypes and
    shardings, so the restored state is bitwise the saved one, ``[R, ...]`` as ``Engine.run``
    takes it (which lays it out for training).
    """
    import jax
    import orbax.checkpoint as ocp

    directory = Path(directory)
    # Process 0 decides whether there is a checkpoint, so every process takes the same path.
    if not distributed.from_writer(directory.exists()):
        return None
    with _manager(directory) as mngr:
        step = distributed.from_writer(mngr.latest_step())
        if step is None:
            return None
        if callable(like):
            like = like()
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
    return evaluate_predictions(run, dataset, *predict_finite(run, dataset), **compare_kwargs)


def evaluate_predictions(run, dataset, probs_RxNxC, keep, **compare_kwargs) -> dict[str, Any]:
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
    """Work per epoch (replica-component steps) and epochs: the progress lines' time estimate."""
    steps = trial.data.num_train // trial.fit.batch_size
    components = trial.task.num_components or 1
    return float(len(trial.fit.replica_ids) * components * steps), trial.fit.epochs


def train_trial(trial: Trial, checkpoint_dir: str | os.PathLike, *, checkpoint_every: int = 5,
                progress: Progress | None = None, index: tuple[int, int] = (1, 1),
                on_checkpoint: Callable[[str, int], None] | None = None) -> engine.Run:
    """Trains one trial with ``Engine.run``, resuming from its latest checkpoint and saving
    whenever a multiple of ``checkpoint_every`` epochs is reached, and after the last epoch.
    Where the checkpoints fall never changes the result."""
    eng = engine.Engine(trial.task, trial.data, trial.fit)
    epochs = trial.fit.epochs
    per_epoch, _ = _units(trial)
    state, first, history = None, 0, None
    restored = restore_checkpoint(checkpoint_dir, eng.abstract_state)  # shapes only
    if restored is not None:
        state, first, history = restored
        if progress is not None:
            progress.skip(per_epoch * first)
            progress.write(f"config {index[0]}/{index[1]} {trial.name} resumed at epoch "
                           f"{first}/{epochs}")
    last = [first]

    def checkpoints_now(done: int) -> bool:  # also: the callback needs the state only then
        return done // checkpoint_every > last[0] // checkpoint_every or done == epochs

    def after_dispatch(done: int, state: engine.TrainState | None,
                       hist: dict[str, np.ndarray]):
        if progress is not None:
            progress.step(index[0], index[1], trial.name, done, epochs,
                          per_epoch * (done - last[0]))
        if checkpoints_now(done):
            save_checkpoint(checkpoint_dir, done, state, hist)
            if on_checkpoint is not None:
                on_checkpoint(trial.name, done)
        last[0] = done

    return eng.run(state, first_epoch=first, history=history, callback=after_dispatch,
                   callback_state=checkpoints_now)


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
    # Process 0's view of what is finished, on every process (they must train the same trials).
    held = distributed.from_writer(_read_json(workdir / "results.json") or {})
    records = {k: v for k, v in held.get("results", {}).items() if k in names}
    timings = distributed.from_writer(
        (_read_json(workdir / "timings.json") or {}).get("seconds", {}))
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
        if not keep_checkpoints and distributed.is_writer():
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
def mlp_task(widths: tuple[int, ...], num_classes: int, activation: str, dropout_rate: float,
          learning_rate: float) -> engine.Task:
    model = models.MLP(widths=tuple(widths), num_classes=num_classes, activation=activation,
                       dropout_rate=dropout_rate)
    return engine.Task(model=model, tx=_adam(learning_rate))


def subset(ds: data.Dataset, num_train: int, num_test: int) -> data.Dataset:
    """The first ``num_train`` / ``num_test`` examples of each split (0: all of it)."""
    if not num_train and not num_test:
        return ds
    n_tr, n_te = num_train or ds.num_train, num_test or ds.num_test
    return data.Dataset(ds.x_train[:n_tr], ds.y_train[:n_tr], ds.x_test[:n_te],
                        ds.y_test[:n_te], num_classes=ds.num_classes, name=ds.name)


def binary_subset(ds: data.Dataset, classes: Sequence[int]) -> data.Dataset:
    a, b = (int(c) for c in classes)

    def pick(x, y):
        keep = (y == a) | (y == b)
        return x[keep], (y[keep] == b).astype(np.int32)

    x_tr, y_tr = pick(ds.x_train, ds.y_train)
    x_te, y_te = pick(ds.x_test, ds.y_test)
    return data.Dataset(x_tr, y_tr, x_te, y_te, num_classes=2, name=f"{ds.name}_{a}v{b}")


def fit_config(config, vary, **kwargs) -> engine.FitConfig:
    vary = tuple(vary)
    perturb = kwargs.pop("perturb_scale", None)
    return engine.FitConfig(
        replicas=config.replicas, seed=config.seed, vary=vary, batch_size=config.batch_size,
        epochs=config.epochs, perturb_scale=perturb if "perturb" in vary else None, **kwargs)


def record_metric(record: Mapping[str, Any], key: str) -> float:
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
# The entry point.


_STUDIES: dict[str, tuple[str, Callable, Callable]] = {}
CONFIGS: dict[str, type[StudyConfig]] = {}
"""The registered studies by name (``StudyConfig.STUDY``)."""


def register(config_cls: type[StudyConfig], title: str,
             make_trials: Callable[[Any], Sequence[Trial]],
             make_report: Callable[[Any, Mapping[str, dict], Path], list[str]]) -> None:
    """Adds a study to ``run``: its config class, report title, trials and report lines.

    ``make_trials(config)`` lists the trials; ``make_report(config, records, workdir)`` returns
    the report's markdown lines (and writes its plots into ``workdir``).
    """
    _STUDIES[config_cls.STUDY] = (title, make_trials, make_report)
    CONFIGS[config_cls.STUDY] = config_cls



def run(config: StudyConfig, workdir: str | os.PathLike, *, checkpoint_every: int = 5,
        keep_checkpoints: bool = True, progress: bool = True,
        clock: Callable[[], float] = time.monotonic, stream=None,
        on_checkpoint: Callable[[str, int], None] | None = None,
        deterministic: bool = False) -> dict[str, Any]:
    """Runs (or resumes) a study in ``workdir``: trains its trials, writes results.json,
    report.md and the plots.

    Args:
      config: a registered study config (``CONFIGS``): ``IrreproducibilityConfig``,
        ``SyntheticConfig``, ``TestSetVarianceConfig``, ``AntiDistillationConfig``,
        ``RegularizersConfig``.
      workdir: the run's directory; created, or checked to hold the same config.
      checkpoint_every: epochs between checkpoints (each trial is also saved at its end).
      keep_checkpoints: keep each trial's last checkpoint (its trained replicas) after the
        trial is recorded; False deletes it then.
      progress: print progress lines to ``stream`` (default stderr); they are always
        appended to ``workdir/progress.log``.
      clock: time source of the progress lines.
      on_checkpoint: called as ``on_checkpoint(trial_name, epoch)`` after each checkpoint
        (tests use it to interrupt a run).
      deterministic: train every trial with ``FitConfig(deterministic=True)`` (XLA's GPU
        deterministic ops); recorded in config.json and results.json.

    In a run of several processes (``jaxrepro.distributed``) every process calls ``run`` with
    the same arguments; each trains its block of replicas, all compute the same results, and
    process 0 alone writes the workdir (orbax checkpoints: every process takes part; each
    array is written once).

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
    workdir = prepare_workdir(workdir, config, deterministic=deterministic)
    distributed.barrier("jaxrepro-workdir-ready")
    trials = make_trials(config)
    if deterministic:
        trials = [dataclasses.replace(t, fit=dataclasses.replace(t.fit, deterministic=True))
                  for t in trials]
    total = sum(units * epochs for units, epochs in map(_units, trials))
    prog = Progress(total, clock=clock, stream=stream, log_path=workdir / "progress.log",
                    echo=progress)
    header = {"study": config.STUDY, "config": config.to_dict(),
              "deterministic": bool(deterministic), "versions": versions()}
    records = run_trials(trials, workdir, header=header, checkpoint_every=checkpoint_every,
                         keep_checkpoints=keep_checkpoints, progress=prog,
                         on_checkpoint=on_checkpoint)
    timings = distributed.from_writer(
        (_read_json(workdir / "timings.json") or {}).get("seconds", {}))
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


# The studies register themselves when imported; their configs are re-exported here.
from jaxrepro.studies.anti_distillation import (  # noqa: E402
    AntiDistillationConfig as AntiDistillationConfig,
)
from jaxrepro.studies.irreproducibility import (  # noqa: E402
    IrreproducibilityConfig as IrreproducibilityConfig,
)
from jaxrepro.studies.regularizers import RegularizersConfig as RegularizersConfig  # noqa: E402
from jaxrepro.studies.synthetic_data import SyntheticConfig as SyntheticConfig  # noqa: E402
from jaxrepro.studies.test_set_variance import PHAT_BINS as PHAT_BINS  # noqa: E402
from jaxrepro.studies.test_set_variance import TSV_DATASETS as TSV_DATASETS  # noqa: E402
from jaxrepro.studies.test_set_variance import (  # noqa: E402
    TestSetVarianceConfig as TestSetVarianceConfig,
)
