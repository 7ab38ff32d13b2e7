"""The workdir of a study: its config check, progress lines, orbax checkpoints and the saved
test predictions of every finished trial.

Layout::

    config.json            the study and its config; a rerun in the same workdir must match it
    progress.log           one line per epoch: trial k of K, epoch, elapsed and remaining time
    checkpoints/<trial>/   orbax checkpoints of the stacked TrainState, every few epochs (the
                           last two, each with a checksum of its state; a damaged one is
                           moved to checkpoints/<trial>.skipped/ on resume)
    predictions/<trial>.npz  a finished trial's test predictions ``[R, N, C]`` (float32, as
                           the model gave them), labels, replica ids, kept replicas, the epoch
                           each diverged replica was frozen at, last-epoch training loss and
                           accuracy, and the trial's JSON measures
    results.json           the analysis of all trials (written once every trial is finished)
    timings.json           wall time per trial and its compilation part (kept out of
                           results.json, which is deterministic)
    report.md, *.png       the rendered report
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxrepro import distributed, engine, files
from jaxrepro.studies.base import ConfigError, StudyConfig
from jaxrepro.studies.render import fmt_seconds


def prepare_workdir(
    workdir: str | os.PathLike,
    config: StudyConfig,
    *,
    deterministic: bool = False,
    portable: bool = False,
) -> Path:
    """Creates ``workdir`` and its ``config.json``, or checks the one it holds.

    Process 0 checks and writes; in a run of several processes the others take its verdict
    (``distributed.from_writer``), so they all stop or all go on.

    Raises:
      ConfigError: the workdir holds another study or a config that differs (or was run with
        another ``deterministic`` or ``portable`` setting); ``fields`` names the differing
        fields, so nothing is trained into a mismatched run. Also: a path that is empty, a
        file or under a file, a directory where ``config.json`` cannot be written, and a
        directory holding a run's files (``RUN_FILES``, ``RUN_DIRS``) without ``config.json``.
    """
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise ConfigError("workdir", f"must name a directory, got {workdir!r}")
    problem = None
    if distributed.is_writer():
        try:
            _prepare(Path(workdir), config, deterministic, portable)
        except ConfigError as e:
            problem = {"fields": list(e.fields), "problem": e.problem}
    problem = distributed.from_writer(problem)
    if problem is not None:
        raise ConfigError(problem["fields"], problem["problem"])
    return Path(workdir)


def _prepare(workdir: Path, config: StudyConfig, deterministic: bool, portable: bool) -> None:
    """``prepare_workdir``'s checks and writes (process 0)."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError("workdir", f"{workdir} exists and is not a directory; use another path")
    for parent in workdir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    "workdir", f"{workdir} lies under {parent}, which is a file, not a directory"
                )
            break
    path = workdir / "config.json"
    wanted = {
        "study": config.STUDY,
        "config": files.to_json(config.to_dict()),
        "deterministic": bool(deterministic),
        "portable": bool(portable),
    }
    if path.exists():
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(
                "workdir", f"{path} is unreadable ({e}); use another workdir"
            ) from None
        if held.get("study") != config.STUDY:
            raise ConfigError(
                "workdir",
                f"{workdir} holds a {held.get('study')!r} study, not "
                f"{config.STUDY!r}; use another workdir",
            )
        old = held.get("config", {})
        # A field added to the study after this workdir was written (absent from its
        # config.json) matches when it is asked for at its default: the run it holds is the
        # one that default describes, so an upgrade does not orphan a workdir.
        defaults = type(config)().to_dict()
        diff = sorted(
            k
            for k in set(old) | set(wanted["config"])
            if old.get(k, defaults.get(k)) != wanted["config"].get(k)
        )
        if diff:
            detail = "; ".join(
                f"{k}={json.dumps(old.get(k))} there, "
                f"{json.dumps(wanted['config'].get(k))} requested"
                for k in diff
            )
            raise ConfigError(
                diff,
                f"workdir {workdir} holds a run with a different config "
                f"({detail}); use another workdir or the same flags",
            )
        for key in ("deterministic", "portable"):
            if bool(held.get(key, False)) != wanted[key]:
                raise ConfigError(
                    key,
                    f"workdir {workdir} holds a run with {key}={bool(held.get(key, False))}; "
                    "use another workdir or the same flags",
                )
        return
    stale = _run_files(workdir)
    if stale:
        raise ConfigError(
            "workdir",
            f"{workdir} holds files of a run ({', '.join(stale)}) but no config.json, so what "
            "config they belong to is unknown; reusing them could mix two configs. Use another "
            "workdir, or delete them",
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(path, wanted)
    except OSError as e:
        raise ConfigError(
            "workdir", f"cannot create {path} ({e.strerror or e}); use a writable directory"
        ) from None


RUN_FILES = ("results.json", "timings.json", "report.md", "progress.log")
RUN_DIRS = ("checkpoints", "predictions")


def _run_files(workdir: Path) -> list[str]:
    """The files and directories of a run that ``workdir`` holds (none when it is new)."""
    if not workdir.is_dir():
        return []
    found = [name for name in RUN_FILES if (workdir / name).exists()]
    found += [f"{name}/" for name in RUN_DIRS if (workdir / name).exists()]
    return found


def slug(name: str) -> str:
    """A file name for a trial name: its safe characters and a hash of the whole."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60] + "-" + digest


# ---------------------------------------------------------------------------------------------
# Progress.


class Progress:
    """Prints ``config k/K <name> epoch e/E elapsed ... eta ...`` lines and logs them.

    The remaining time is the work left (replica-steps) at the rate of this session's work so
    far. ``clock`` is injectable so tests are exact and instant.
    """

    def __init__(
        self,
        total_units: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        stream=None,
        log_path: str | os.PathLike | None = None,
        echo: bool = True,
    ):
        self.total, self.done, self.skipped = float(total_units), 0.0, 0.0
        self.clock, self.start = clock, clock()
        self.stream = sys.stderr if stream is None else stream
        self.log_path, self.echo = log_path, echo
        self.lines: list[str] = []
        isatty = getattr(self.stream, "isatty", None)
        self.bar = bool(echo and callable(isatty) and isatty())
        """Whether training shows a progress bar too (``Engine.run(progress=...)``): on a
        terminal only, so logs and captured output keep the plain lines alone."""

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
        line = (
            f"config {k}/{num} {name} epoch {epoch}/{epochs} "
            f"elapsed {fmt_seconds(elapsed)} eta {fmt_seconds(self.eta())}"
        )
        self.write(line)
        return line

    def write(self, line: str) -> None:
        self.lines.append(line)
        if not distributed.is_writer():  # one copy of the progress, from process 0
            return
        if self.echo and self.bar:  # above the bar, which is redrawn below the line
            from tqdm.auto import tqdm

            tqdm.write(line, file=self.stream)
        elif self.echo:
            print(line, file=self.stream, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")


# ---------------------------------------------------------------------------------------------
# Checkpoints (orbax).


KEEP_CHECKPOINTS = 2
"""Checkpoints kept per trial: the latest and the one before it, to fall back on when the
latest fails its checksum."""


def _manager(directory: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP_CHECKPOINTS, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def state_digest(state) -> str:
    """SHA-256 of a state's tree structure and every array's dtype, shape and bytes: what a
    checkpoint stores beside the state and checks on restore."""
    import jax

    from jaxrepro import compilation

    leaves, treedef = jax.tree.flatten(state)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        compilation.update_digest(h, np.asarray(leaf))
    return h.hexdigest()


def save_checkpoint(
    directory: str | os.PathLike,
    epoch: int,
    state: engine.TrainState,
    history: Mapping[str, np.ndarray],
) -> None:
    """Saves the stacked state after ``epoch`` epochs, the per-epoch history and the state's
    checksum (``state_digest``) with orbax; the last ``KEEP_CHECKPOINTS`` are kept. Orbax
    commits a checkpoint by renaming it into place."""
    import orbax.checkpoint as ocp

    meta = {
        "epoch": int(epoch),
        "history": {k: np.asarray(v).tolist() for k, v in history.items()},
        "checksum": state_digest(state),
    }
    with _manager(Path(directory)) as mngr:
        mngr.save(
            int(epoch),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        mngr.wait_until_finished()


def _steps(directory: Path) -> list[int]:
    """The committed checkpoint steps in ``directory`` (orbax's step directories), latest first;
    orbax's uncommitted temporary directories are not steps."""
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)


def _restore_step(directory: Path, step: int, like):
    """One checkpoint, verified: ``(state, epoch, history)``; raises on anything wrong."""
    import jax
    import orbax.checkpoint as ocp

    with _manager(directory) as mngr:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    meta = out.meta
    if not isinstance(meta, Mapping) or int(meta.get("epoch", -1)) != step:
        raise ValueError(f"its metadata does not describe epoch {step}")
    if "checksum" not in meta:
        raise ValueError("it has no checksum (written by an older version)")
    digest = state_digest(out.state)
    if digest != meta["checksum"]:
        raise ValueError("its state fails its checksum (the files were changed or damaged)")
    history = {k: np.asarray(v, np.float32).reshape(len(v), -1) for k, v in meta["history"].items()}
    if any(v.shape[1] != step for v in history.values()):
        raise ValueError(f"its history does not hold {step} epochs")
    return out.state, step, history


def restore_checkpoint(
    directory: str | os.PathLike,
    like: engine.TrainState | Callable[[], engine.TrainState],
    *,
    on_skip: Callable[[int, str], None] | None = None,
):
    """The latest good checkpoint as ``(state, epoch, history)``, or None when there is none.

    ``like`` (e.g. ``Engine.abstract_state()`` or a fresh ``Engine.init()``, or a function
    returning one, called only when a checkpoint exists) gives the tree structure, dtypes and
    shardings, so the restored state is bitwise the saved one, ``[R, ...]`` as ``Engine.run``
    takes it (which lays it out for training).

    A checkpoint that cannot be read (truncated, partly deleted, unreadable metadata), whose
    state fails its checksum, or that does not fit ``like`` is skipped: ``on_skip(epoch,
    why)`` is called, it is moved aside to ``<directory>.skipped/`` (kept for inspection, and out
    of the way so training can write that epoch again), and the one before it is tried; with
    none left the trial trains from the start. The result is then the one an uninterrupted run
    gives.
    """
    import jax

    directory = Path(directory)
    # Process 0 decides what there is and what is good, so every process takes the same path.
    steps = distributed.from_writer(_steps(directory))
    if not steps:
        return None
    if callable(like):
        like = like()
    for step in steps:
        try:
            restored, why = _restore_step(directory, step, like), ""
        except Exception as e:  # noqa: BLE001 - any failure of one checkpoint: try the next
            restored, why = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        why = distributed.from_writer(why)
        if not why:
            if restored is None:
                raise RuntimeError(
                    f"process {jax.process_index()} cannot read the checkpoint at "
                    f"epoch {step} in {directory}, which process 0 reads: the workdir must be "
                    "on storage every process reads"
                )
            return restored
        if on_skip is not None:
            on_skip(step, why)
        if distributed.is_writer():  # kept for inspection, out of orbax's way
            aside = (
                directory.parent / f"{directory.name}.skipped" / f"{step}-{uuid.uuid4().hex[:8]}"
            )
            try:
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(directory / str(step), aside)
            except OSError:
                shutil.rmtree(directory / str(step), ignore_errors=True)
        distributed.barrier(f"jaxrepro-checkpoint-skip-{step}")
    return None


# ---------------------------------------------------------------------------------------------
# Predictions: what a finished trial leaves for the analysis.


@dataclasses.dataclass(frozen=True)
class Predictions:
    """A finished trial, as the analysis sees it (shape letters: R replicas, N test examples,
    C classes).

    Attributes:
      info: the trial's coordinates in the study's grids (JSON-ready).
      probs: ``[R, N, C]`` float32 test probabilities, exactly as the model gave them (a
        diverged replica's may hold NaN).
      labels: ``[N]`` int32 test labels.
      replica_ids: ``[R]`` the replicas' ids (their keys derive from them).
      keep: ``[R]`` bool, the replicas that stayed finite in training and in their predictions.
      train_loss, train_accuracy: ``[R]`` the last epoch's training means per replica.
      measures: JSON-ready values the trial measured on its trained replicas beyond the test
        predictions (``Trial.measure``), e.g. the correlation of an ensemble's components.
      diverged_epoch: ``[R]`` int, the epoch (0-based) after which each replica was found
        diverged in training and frozen (``engine.Run.diverged_epoch``), or -1.
    """

    info: Mapping[str, Any]
    probs: np.ndarray
    labels: np.ndarray
    replica_ids: np.ndarray
    keep: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    measures: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    diverged_epoch: np.ndarray | None = None

    def __post_init__(self):
        if self.diverged_epoch is None:
            object.__setattr__(self, "diverged_epoch", np.full(len(self.replica_ids), -1, np.int32))

    @property
    def diverged(self) -> list[int]:
        """Ids of the replicas left out of the metrics."""
        return [int(r) for r in self.replica_ids[~self.keep]]

    @property
    def diverged_epochs(self) -> list[int]:
        """For each of ``diverged``: the epoch (0-based) after which it was frozen in training,
        or -1 (its predictions were not finite, or it was not caught in training)."""
        return [int(e) for e in np.asarray(self.diverged_epoch)[~self.keep]]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = json.dumps(
            {"info": files.to_json(self.info), "measures": files.to_json(self.measures)},
            allow_nan=False,
        )
        np.savez(
            buf,
            probs=self.probs,
            labels=self.labels,
            replica_ids=self.replica_ids,
            keep=self.keep,
            train_loss=self.train_loss,
            train_accuracy=self.train_accuracy,
            diverged_epoch=np.asarray(self.diverged_epoch, np.int32),
            meta=np.frombuffer(meta.encode(), np.uint8),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes) -> Predictions:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        return cls(info=meta["info"], measures=meta["measures"], **arrays)


def predictions_path(workdir: str | os.PathLike, name: str) -> Path:
    return Path(workdir) / "predictions" / f"{slug(name)}.npz"


def save_predictions(workdir: str | os.PathLike, name: str, pred: Predictions) -> Path:
    """Writes a trial's predictions atomically (process 0)."""
    return files.atomic_write_bytes(predictions_path(workdir, name), pred.to_bytes())


def load_predictions(workdir: str | os.PathLike, name: str) -> Predictions | None:
    """A trial's saved predictions, or None when it has none (or they are unreadable)."""
    path = predictions_path(workdir, name)
    try:
        return Predictions.from_bytes(path.read_bytes())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
