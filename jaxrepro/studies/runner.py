"""The study runner: trains a study's trials into its workdir, then analyses and renders.

A study is a module of ``jaxrepro.studies`` that defines:

- a config (a ``StudyConfig`` dataclass; its ``STUDY`` is the module's name),
- ``TITLE`` (the report's title),
- ``trials(config) -> list[Trial]``: the replica sets to train,
- ``analyse(config, predictions) -> Analysis``: pure, from every trial's ``Predictions`` (in
  trial order) to the results (``Analysis.records``: one JSON-ready record per trial),

and its report module ``jaxrepro.studies.<name>_report`` defines ``render(config, analysis,
workdir) -> list[str]``: the report's Markdown lines (it writes the plots into the workdir).

``run(config, workdir)`` trains every trial that has no saved predictions yet (resuming an
unfinished one from its checkpoint), saves its predictions, then analyses all trials and writes
results.json, report.md and the plots. Nothing passes between trials but their saved
predictions, so a rerun of a finished study repeats only the analysis and the report.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrepro import checks, compilation, data, distributed, engine, files, losses, metrics
from jaxrepro import portable as portable_mode
from jaxrepro.studies import workdir as wd
from jaxrepro.studies.base import ConfigError, StudyConfig
from jaxrepro.studies.render import diverged_note, head, versions_note


@dataclasses.dataclass(frozen=True)
class Part:
    """A named block of a sweep trial's replicas, recorded as a trial of its own.

    Attributes:
      name: the key of its record in results.json (unique within the study).
      start, stop: the block is the sweep's replicas ``start .. stop - 1``, in stack order.
      info: its coordinates in the study's grids (JSON-ready).
    """

    name: str
    start: int
    stop: int
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One replica set of a study: one fit.

    A *sweep* trial trains several arms in one fit, and so in one compilation: ``hparams``
    gives each replica its own optimizer hyperparameters or loss weights (``engine.fit``), and
    ``parts`` cut its replicas into blocks, each saved and recorded as a trial of its own (an
    arm). The arms' replicas may repeat ids, so that replica r of every arm shares its keys.

    Attributes:
      name: unique within the study; the key of its record in results.json (for a sweep: the
        name of its checkpoints and timings; its parts have the records).
      task: model, optimizer and loss (reuse the same objects across trials: compiled
        functions are cached by them).
      data: the dataset.
      fit: how the replicas are trained.
      info: the trial's coordinates in the study's grids (JSON-ready), stored with its record.
      measure: optional ``(run, data, keep) -> dict`` of JSON-ready values measured on the
        trained replicas beyond their test predictions (``keep``: bool ``[R]``, the replicas
        that stayed finite; saved with the predictions), e.g. statistics of an ensemble's
        components on the training set. For a sweep it is called once per part, ``keep``
        holding that part's replicas only.
      hparams: per-replica values for ``engine.Engine`` (``{name: [R] values}``).
      parts: the arms of a sweep (empty: the trial is recorded whole).
    """

    name: str
    task: engine.Task
    data: data.Dataset
    fit: engine.FitConfig
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    measure: Callable[[engine.Run, data.Dataset, np.ndarray], dict] | None = None
    hparams: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    parts: tuple[Part, ...] = ()

    def __post_init__(self):
        if self.parts:
            num = len(self.fit.replica_ids)
            blocks = sorted((p.start, p.stop, p.name) for p in self.parts)
            if len({p.name for p in self.parts}) != len(self.parts):
                raise ValueError(f"trial {self.name!r}: its parts' names repeat")
            for (start, stop, name), nxt in zip(blocks, blocks[1:] + [(num, num, "")], strict=True):
                if not 0 <= start < stop <= nxt[0]:
                    raise ValueError(
                        f"trial {self.name!r}: part {name!r} covers replicas {start}..{stop - 1}"
                        f"; parts must be non-empty, non-overlapping blocks of its {num} replicas"
                    )

    @property
    def record_names(self) -> list[str]:
        """The names its predictions and records are saved under."""
        return [p.name for p in self.parts] if self.parts else [self.name]


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What a study's ``analyse`` returns: ``records`` (trial name -> JSON-ready record, in
    trial order) go to results.json; a study's subclass adds the fields its report needs."""

    records: Mapping[str, dict]


def record_infos(trials: Sequence[Trial]) -> dict[str, Mapping[str, Any]]:
    """Record name -> info of every record ``trials`` produce, in order (a sweep's parts in
    place of the sweep): the keys of ``analyse``'s predictions and of results.json."""
    out: dict[str, Mapping[str, Any]] = {}
    for t in trials:
        out.update({p.name: p.info for p in t.parts} if t.parts else {t.name: t.info})
    return out


# ---------------------------------------------------------------------------------------------
# One trial: train (resumably), predict, record.


def _units(trial: Trial) -> tuple[float, int]:
    """Work per epoch (replica-component steps) and epochs: the progress lines' time estimate."""
    steps = trial.data.num_train // trial.fit.batch_size
    components = trial.task.num_components or 1
    return float(len(trial.fit.replica_ids) * components * steps), trial.fit.epochs


def train_trial(
    trial: Trial,
    checkpoint_dir: str | os.PathLike,
    *,
    checkpoint_every: int = 5,
    progress: wd.Progress | None = None,
    index: tuple[int, int] = (1, 1),
    on_checkpoint: Callable[[str, int], None] | None = None,
    on_skip: Callable[[str, int, str], None] | None = None,
) -> engine.Run:
    """Trains one trial with ``Engine.run``, resuming from its latest good checkpoint and saving
    whenever a multiple of ``checkpoint_every`` epochs is reached, and after the last epoch.
    Where the checkpoints fall never changes the result. A damaged checkpoint is skipped
    (``workdir.restore_checkpoint``), reported as a progress line (a warning without
    ``progress``) and to ``on_skip(trial_name, epoch, why)``."""
    eng = engine.Engine(trial.task, trial.data, trial.fit, hparams=trial.hparams or None)
    epochs = trial.fit.epochs
    per_epoch, _ = _units(trial)
    state, first, history = None, 0, None

    def skipped(epoch: int, why: str) -> None:
        line = (
            f"config {index[0]}/{index[1]} {trial.name} checkpoint at epoch {epoch} skipped "
            f"({why}); falling back to the one before it, or to the start"
        )
        if progress is not None:
            progress.write(line)
        else:
            warnings.warn(line, stacklevel=2)
        if on_skip is not None:
            on_skip(trial.name, epoch, why)

    restored = wd.restore_checkpoint(checkpoint_dir, eng.abstract_state, on_skip=skipped)
    if restored is not None:
        state, first, history = restored
        if progress is not None:
            progress.skip(per_epoch * first)
            progress.write(
                f"config {index[0]}/{index[1]} {trial.name} resumed at epoch {first}/{epochs}"
            )
    last = [first]

    def checkpoints_now(done: int) -> bool:  # also: the callback needs the state only then
        return done // checkpoint_every > last[0] // checkpoint_every or done == epochs

    def after_dispatch(done: int, state: engine.TrainState | None, hist: dict[str, np.ndarray]):
        if progress is not None:
            progress.step(
                index[0], index[1], trial.name, done, epochs, per_epoch * (done - last[0])
            )
        if checkpoints_now(done):
            wd.save_checkpoint(checkpoint_dir, done, state, hist)
            if on_checkpoint is not None:
                on_checkpoint(trial.name, done)
        last[0] = done

    return eng.run(
        state,
        first_epoch=first,
        history=history,
        callback=after_dispatch,
        callback_state=checkpoints_now,
        progress=f"{index[0]}/{index[1]} {trial.name}" if progress and progress.bar else False,
    )


def predict(trial: Trial, run: engine.Run) -> wd.Predictions:
    """A trained trial's ``Predictions``: test probabilities, the replicas that stayed finite
    (in training and in their predictions), the last epoch's training means and the trial's
    measures. All of its replicas, a sweep's too (``predict_parts`` cuts a sweep into its
    arms)."""
    whole = Part(trial.name, 0, len(run.replica_ids), trial.info)
    return predict_parts(dataclasses.replace(trial, parts=(whole,)), run)[trial.name]


def predict_parts(trial: Trial, run: engine.Run) -> dict[str, wd.Predictions]:
    """``predict`` by record name: a sweep's ``Predictions`` per part (each measured on its own
    replicas), or the trial's alone."""
    probs_RxNxC = np.asarray(run.predict(trial.data.x_test), np.float32)
    keep = ~np.asarray(run.diverged) & np.asarray(metrics.finite_replicas(probs_RxNxC))
    parts = trial.parts or (Part(trial.name, 0, len(keep), trial.info),)
    out = {}
    for part in parts:
        block = slice(part.start, part.stop)
        keep_part = np.zeros_like(keep)
        keep_part[block] = keep[block]
        measures = trial.measure(run, trial.data, keep_part) if trial.measure else {}
        out[part.name] = wd.Predictions(
            info=dict(part.info),
            probs=probs_RxNxC[block],
            labels=np.asarray(trial.data.y_test, np.int32),
            replica_ids=np.asarray(run.replica_ids)[block],
            keep=keep[block],
            train_loss=np.asarray(run.history["loss"][block, -1]),
            train_accuracy=np.asarray(run.history["accuracy"][block, -1]),
            measures=files.to_json(measures),
            diverged_epoch=np.asarray(run.diverged_epoch, np.int32)[block],
        )
    return out


def record(pred: wd.Predictions, **compare_kwargs) -> dict[str, Any]:
    """The record every trial has in results.json: ``{"info", "diverged": [replica ids left
    out], "diverged_epochs"`` (for each of them, the epoch after which it was frozen in
    training, 0-based, or -1)``, "train_loss", "train_accuracy"`` (last-epoch means over the
    kept replicas),
    ``"metrics": metrics.compare(...)`` of the kept replicas' test predictions
    (``compare_kwargs`` passed on)``}``; ``metrics`` is None, with an ``error``, when fewer
    than 2 replicas are left."""
    keep = pred.keep
    out: dict[str, Any] = {"info": dict(pred.info), "diverged": pred.diverged}
    out["diverged_epochs"] = pred.diverged_epochs
    out["train_loss"] = float(np.mean(pred.train_loss[keep])) if keep.any() else np.nan
    out["train_accuracy"] = float(np.mean(pred.train_accuracy[keep])) if keep.any() else np.nan
    if keep.sum() < 2:
        out["metrics"] = None
        out["error"] = (
            f"only {int(keep.sum())} of {len(keep)} replicas stayed finite; metrics need 2"
        )
        return out
    out["metrics"] = metrics.compare(pred.probs, pred.labels, mask=keep, **compare_kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# All trials.


def train_trials(
    trials: Sequence[Trial],
    workdir: str | os.PathLike,
    *,
    checkpoint_every: int = 5,
    keep_checkpoints: bool = True,
    progress: wd.Progress | None = None,
    on_checkpoint: Callable[[str, int], None] | None = None,
    timings: dict[str, dict[str, float]] | None = None,
) -> dict[str, wd.Predictions]:
    """Trains every trial without saved predictions in ``workdir`` and saves them.

    ``timings`` (``{"seconds": {trial: s}, "compile_seconds": {trial: s}}``, default:
    workdir/timings.json as process 0 reads it) gets each trained trial's wall time and the
    part of it spent tracing, lowering and compiling, and is written back to timings.json.

    Returns:
      ``{trial name: Predictions}`` in trial order (loaded for trials finished earlier).
    """
    names = [t.name for t in trials] + [n for t in trials if t.parts for n in t.record_names]
    if len(set(names)) != len(names):
        raise ValueError(f"trial names must be unique, got {names}")
    workdir = Path(workdir)
    # Process 0's view of what is finished, on every process (they must train the same trials).
    finished = distributed.from_writer(
        [
            t.name
            for t in trials
            if all(wd.predictions_path(workdir, n).exists() for n in t.record_names)
        ]
    )
    if timings is None:
        timings = read_timings(workdir)
    done_tasks: list[engine.Task] = []
    out: dict[str, wd.Predictions] = {}
    for k, trial in enumerate(trials, start=1):
        infos = record_infos([trial])
        preds = None
        if trial.name in finished:
            preds = {n: wd.load_predictions(workdir, n) for n in trial.record_names}
            preds = None if any(p is None for p in preds.values()) else preds
        # Process 0 decides (an unreadable file is trained again, by every process alike).
        if distributed.from_writer(preds is not None):
            if preds is None:
                raise RuntimeError(
                    f"process {jax.process_index()} cannot read the predictions of "
                    f"{trial.name} in {workdir}, which process 0 reads: the workdir must be on "
                    "storage every process reads (as orbax requires)"
                )
            for n, pred in preds.items():
                out[n] = dataclasses.replace(pred, info=dict(infos[n]))
            if progress is not None:
                units, epochs = _units(trial)
                progress.skip(units * epochs)
            continue
        checkpoint_dir = workdir / "checkpoints" / wd.slug(trial.name)
        run = train_trial(
            trial,
            checkpoint_dir,
            checkpoint_every=checkpoint_every,
            progress=progress,
            index=(k, len(trials)),
            on_checkpoint=on_checkpoint,
        )
        start, compile_start = time.perf_counter(), compilation.compile_seconds()
        preds = predict_parts(trial, run)
        for n, pred in preds.items():
            wd.save_predictions(workdir, n, pred)
        out.update(preds)
        timings["seconds"][trial.name] = run.seconds + time.perf_counter() - start
        timings["compile_seconds"][trial.name] = (
            run.compile_seconds + compilation.compile_seconds() - compile_start
        )
        files.atomic_write_json(workdir / "timings.json", timings)
        if not keep_checkpoints and distributed.is_writer():
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if not any(_program(t.task) == _program(trial.task) for t in trials[k:]):
            done_tasks.append(trial.task)
            if len(done_tasks) >= KEEP_PROGRAMS:
                jax.clear_caches()  # what later trials need is compiled again (or read from disk)
                done_tasks.clear()
    return out


def check_trials(config: StudyConfig, trials: Sequence[Trial]) -> None:
    """What no trial's ``Engine`` may find wrong later, checked before anything is written:
    every batch fits in its training set.

    Raises:
      ConfigError: naming ``batch_size`` and ``num_train``.
    """
    for t in trials:
        if t.fit.batch_size > t.data.num_train:
            raise ConfigError(
                ("batch_size", "num_train"),
                f"batch_size {t.fit.batch_size} is larger than trial {t.name!r}'s training set "
                f"({t.data.num_train} examples); lower the batch size or use more examples",
            )


def _program(task: engine.Task) -> engine.Task:
    """What the engine compiles a task as, up to the optimizer's identity: its loss's weights
    are run-time values (``losses.canonical``)."""
    return dataclasses.replace(task, loss_fn=losses.canonical(task.loss_fn))


KEEP_PROGRAMS = 8
"""A study holds the compiled programs of at most this many finished tasks (a task no later
trial uses): past it, ``train_trials`` drops JAX's in-memory compiled programs
(``jax.clear_caches``), so a study of many tasks (the regulariser study: 63) does not keep every
one for the life of the process. Programs later trials need are compiled again, or read from
the persistent cache (``jaxrepro.compilation``); results do not change."""


def read_timings(workdir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """``{"seconds": {trial: s}, "compile_seconds": {trial: s}}`` from workdir/timings.json, as
    process 0 reads it (empty where the file or a part of it is missing)."""
    held = files.read_json(Path(workdir) / "timings.json") or {}
    held = held if isinstance(held, dict) else {}
    out = {k: dict(held.get(k) or {}) for k in ("seconds", "compile_seconds")}
    return distributed.from_writer(out)


def study_module(config_or_name: StudyConfig | str):
    """The module of a study, imported on first use: by config or by name. Its report module
    is ``report_module``."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.STUDY
    if not name or not isinstance(name, str):
        raise TypeError(f"not a study config: {type(config_or_name).__name__}")
    try:
        module = importlib.import_module(f"jaxrepro.studies.{name}")
    except ModuleNotFoundError:
        module = None
    if module is None or not all(hasattr(module, a) for a in ("TITLE", "trials", "analyse")):
        raise TypeError(f"{name!r} is not a study of jaxrepro.studies")
    return module


def report_module(config_or_name: StudyConfig | str):
    """The report module of a study (``jaxrepro.studies.<name>_report``), imported on use."""
    name = study_module(config_or_name).__name__
    return importlib.import_module(f"{name}_report")


def run(
    config: StudyConfig,
    workdir: str | os.PathLike,
    *,
    checkpoint_every: int = 5,
    keep_checkpoints: bool = True,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
    stream=None,
    on_checkpoint: Callable[[str, int], None] | None = None,
    deterministic: bool = False,
    portable: bool = False,
) -> dict[str, Any]:
    """Runs (or resumes) a study in ``workdir``: trains its trials, analyses their predictions,
    writes results.json, report.md and the plots.

    Args:
      config: a study config (``IrreproducibilityConfig``, ``SyntheticConfig``,
        ``TestSetVarianceConfig``, ``AntiDistillationConfig``, ``RegularizersConfig``).
      workdir: the run's directory; created, or checked to hold the same config.
      checkpoint_every: epochs between checkpoints (each trial is also saved at its end).
      keep_checkpoints: keep each trial's last checkpoints (its trained replicas, and the one
        before) after its predictions are saved; False deletes them then.
      progress: print progress lines to ``stream`` (default stderr); they are always
        appended to ``workdir/progress.log``.
      clock: time source of the progress lines.
      on_checkpoint: called as ``on_checkpoint(trial_name, epoch)`` after each checkpoint
        (tests use it to interrupt a run).
      deterministic: train every trial with ``FitConfig(deterministic=True)`` (XLA's GPU
        deterministic ops); recorded in config.json and results.json.
      portable: train and analyse in portable mode (``jaxrepro.portable``: bitwise the same
        results on any x86-64 CPU); switched on here if JAX has not started yet, else it must
        be on already (RuntimeError). Recorded in config.json and results.json, which also
        records the ``machine`` (``portable.machine()``: CPU, features, XLA flags) either way.

    In a run of several processes (``jaxrepro.distributed``) every process calls ``run`` with
    the same arguments; each trains its block of replicas, all compute the same results, and
    process 0 alone writes the workdir (orbax checkpoints: every process takes part). The
    workdir must be on storage every process reads, as orbax requires.

    Returns:
      The content of results.json (``study``, ``config``, ``deterministic``, ``portable``,
      ``machine``, ``versions``, ``complete``, ``summary`` where the study has a
      ``summarise(config, records)``, ``results``: ``{trial: record}``) plus
      ``report_markdown``, the text of report.md, and ``analysis``, the study's ``Analysis``.

    Raises:
      ConfigError: the workdir holds another config (nothing is trained).
    """
    if not checks.is_integer(checkpoint_every) or checkpoint_every < 1:
        raise ConfigError("checkpoint_every", f"must be an integer >= 1, got {checkpoint_every!r}")
    if portable:
        portable_mode.require()  # before anything below starts JAX
    study = study_module(config)
    trials = study.trials(config)  # before the workdir: a config they refuse leaves no trace
    check_trials(config, trials)
    workdir = wd.prepare_workdir(workdir, config, deterministic=deterministic, portable=portable)
    distributed.barrier("jaxrepro-workdir-ready")
    if deterministic or portable:
        trials = [
            dataclasses.replace(
                t,
                fit=dataclasses.replace(
                    t.fit,
                    deterministic=t.fit.deterministic or deterministic,
                    portable=t.fit.portable or portable,
                ),
            )
            for t in trials
        ]
    total = sum(units * epochs for units, epochs in map(_units, trials))
    prog = wd.Progress(
        total, clock=clock, stream=stream, log_path=workdir / "progress.log", echo=progress
    )
    timings = read_timings(workdir)
    predictions = train_trials(
        trials,
        workdir,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        progress=prog,
        on_checkpoint=on_checkpoint,
        timings=timings,
    )
    analysis = study.analyse(config, predictions)
    records = files.to_json(dict(analysis.records))
    # A study's verdict numbers across trials (``summarise(config, records)``, pooled effects
    # with intervals), where it has them: in results.json beside the records they come from.
    summarise = getattr(study, "summarise", None)
    summary = {} if summarise is None else {"summary": files.to_json(summarise(config, records))}
    seconds = sum(timings["seconds"].get(t.name, 0.0) for t in trials)
    compiling = sum(timings["compile_seconds"].get(t.name, 0.0) for t in trials)
    body = report_module(config).render(config, analysis, workdir)
    machine = portable_mode.machine()
    markdown = "\n".join(
        head(study.TITLE, config, seconds, compiling)
        + body
        + diverged_note(records)
        + versions_note()
        + [portable_mode.describe(machine), ""]
    )
    files.atomic_write_text(workdir / "report.md", markdown)
    results = files.to_json(
        {
            "study": config.STUDY,
            "config": config.to_dict(),
            "deterministic": bool(deterministic),
            "portable": bool(portable),
            "machine": machine,
            "versions": files.versions(),
            "complete": True,
            **summary,
            "results": records,
        }
    )
    files.atomic_write_json(workdir / "results.json", results)
    prog.write(f"done: {len(trials)} configs, results in {workdir / 'results.json'}")
    return {**results, "report_markdown": markdown, "analysis": analysis}
