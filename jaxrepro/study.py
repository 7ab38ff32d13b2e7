"""Studies: resumable batch jobs that train grids of replica sets and report how they disagree.

Synopsis (the smoke-sized main job; ``IrreproducibilityConfig()`` is the full one)::

    >>> import tempfile
    >>> from jaxrepro import study
    >>> config = study.IrreproducibilityConfig.quick()      # relu; settings nothing and all
    >>> workdir = tempfile.mkdtemp()
    >>> out = study.run(config, workdir, progress=False)    # resumes when rerun in workdir
    >>> out["results"]["relu/nothing"]["metrics"]["churn"]  # the control: identical replicas
    0.0
    >>> out["results"]["relu/all"]["metrics"]["churn"] > 0
    True

This module is the notebook-facing face of ``jaxrepro.studies`` (see its docstring for which
module holds what); the study configs are imported on first use.

A study is a config, the list of its *trials* (one set of R replicas each: a model, an
optimizer, a dataset and an ``engine.FitConfig``), a pure ``analyse`` over the trials' saved
test predictions, and a rendered report. ``run`` trains the trials one after the other in a
*workdir* (layout: ``jaxrepro.studies.workdir``), saving each finished trial's predictions,
then analyses them all and writes results.json, report.md and the plots.

results.json holds ``study``, ``config``, ``deterministic`` (XLA's GPU deterministic ops,
``--deterministic``), ``versions`` (python, jax, jaxlib, flax, optax, orbax-checkpoint, numpy,
jaxrepro), ``complete`` and ``results``: per trial, in trial order,
``{"info": its grid coordinates, "diverged": [replica ids excluded], "diverged_epochs": [the
epoch, from 0, after which each was frozen in training, or -1], "train_loss",
"train_accuracy", "metrics": metrics.compare(...) of the kept replicas, or null with an
"error" when fewer than 2 are left}`` plus what the study adds (intervals, paired
differences, histograms). Strict JSON: an undefined number (the control's ``var_ratio``, 0/0)
is ``null``.

Interrupt a study at any point and run the same command again: finished trials are read back
from their saved predictions, an unfinished one continues from its latest checkpoint (every
draw a replica makes derives from (seed, source, replica, step), so the continued run is
bitwise the uninterrupted one) and the final results.json is byte for byte the same. Files are
written to a temporary name and renamed, so an interruption never leaves a truncated file.

A study runs the same as several processes (``jaxrepro.distributed``; the binaries' flags
``--coordinator_address``, ``--num_processes``, ``--process_id``): every process trains its
block of each trial's replicas and computes the same results; process 0 alone writes the
workdir, orbax writes the checkpoints from every process, and results.json is byte for byte
the one a single process writes.

The six studies (``jaxrepro.studies.<name>``; the binaries in ``experiments/`` are flags over
the configs):

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
- ``ChaosConfig``: when in training a tiny perturbation of the weights stops changing the
  model: churn against the perturbation step t and size eps, per activation (Kwok et al.
  2025; Jordan).

References:
  Snapp & Shamir, arXiv 2102.10696; Jordan, arXiv 2304.01910; Shamir & Coviello, arXiv
  2010.09923; apurvakokate/Reproducibility; methods.md sections 4-8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxrepro import studies as _studies
from jaxrepro.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    to_json,
    versions,
)
from jaxrepro.studies.base import SETTINGS, ConfigError, StudyConfig, flag_field, require
from jaxrepro.studies.flags import config_from_flags, define_flags, main
from jaxrepro.studies.render import fmt, markdown_table
from jaxrepro.studies.runner import (
    Analysis,
    Part,
    Trial,
    predict,
    predict_parts,
    record,
    record_infos,
    run,
    train_trial,
    train_trials,
)
from jaxrepro.studies.workdir import (
    Predictions,
    Progress,
    load_predictions,
    predictions_path,
    prepare_workdir,
    restore_checkpoint,
    save_checkpoint,
    save_predictions,
    slug,
)

if TYPE_CHECKING:  # imported lazily by __getattr__ below
    from jaxrepro.studies.anti_distillation import AntiDistillationConfig
    from jaxrepro.studies.chaos import ChaosConfig
    from jaxrepro.studies.irreproducibility import IrreproducibilityConfig
    from jaxrepro.studies.regularizers import RegularizersConfig
    from jaxrepro.studies.synthetic import SyntheticConfig
    from jaxrepro.studies.test_set_variance import TestSetVarianceConfig

__all__ = [
    "CONFIGS",
    "SETTINGS",
    "Analysis",
    "AntiDistillationConfig",
    "ChaosConfig",
    "ConfigError",
    "IrreproducibilityConfig",
    "Predictions",
    "Progress",
    "RegularizersConfig",
    "StudyConfig",
    "SyntheticConfig",
    "TestSetVarianceConfig",
    "Part",
    "Trial",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "config_from_flags",
    "define_flags",
    "flag_field",
    "fmt",
    "load_predictions",
    "main",
    "markdown_table",
    "predict",
    "predict_parts",
    "predictions_path",
    "prepare_workdir",
    "read_json",
    "record",
    "record_infos",
    "require",
    "restore_checkpoint",
    "run",
    "save_checkpoint",
    "save_predictions",
    "slug",
    "to_json",
    "train_trial",
    "train_trials",
    "versions",
]

CONFIGS: dict[str, type[StudyConfig]]  # every study's config class by name (lazy, below)

_CONFIG_NAMES = {cls: name for name, cls in _studies.CONFIG_CLASSES.items()}


def __getattr__(name: str):
    """The study configs (and ``CONFIGS``, every study's config by name), imported lazily."""
    if name in _CONFIG_NAMES:
        return _studies.config_class(_CONFIG_NAMES[name])
    if name == "CONFIGS":
        return {n: _studies.config_class(n) for n in _studies.NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
