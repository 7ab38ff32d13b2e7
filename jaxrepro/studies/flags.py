"""absl flags from study configs, and the whole body of an experiment binary.

A binary is ``define_flags(Config)`` plus ``app.run(lambda argv: main(Config, argv))``: one
flag per config field (its default and help text), plus the run's own flags (``--workdir``,
``--quick``, checkpoints, devices, multi-process).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any

from jaxrepro import compilation, distributed, engine, portable
from jaxrepro.studies import runner
from jaxrepro.studies.base import ConfigError, StudyConfig, field_help


def _field_types(config_cls) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def define_flags(
    config_cls: type[StudyConfig], flag_values=None, module_name: str | None = None
) -> None:
    """Defines one absl flag per config field, plus ``--workdir``, ``--quick``,
    ``--checkpoint_every``, ``--keep_checkpoints``, ``--deterministic``, ``--portable``,
    ``--compilation_cache``, ``--cpu_devices`` and
    the multi-process flags (``--coordinator_address``, ``--num_processes``, ``--process_id``,
    ``--distributed``). Field defaults are the flag defaults;
    list fields take commas. The flags are registered as the main module's (``module_name``,
    default ``sys.argv[0]``), so ``--help`` and usage errors list them."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    kw = {"flag_values": fv, "module_name": module_name or sys.argv[0]}
    defaults, types = config_cls(), _field_types(config_cls)
    for f in dataclasses.fields(config_cls):
        default, help_ = getattr(defaults, f.name), field_help(config_cls, f.name)
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
    flags.DEFINE_string(
        "workdir",
        f"runs/{config_cls.STUDY}",
        "directory of the run: config, checkpoints, results, report",
        **kw,
    )
    flags.DEFINE_bool(
        "quick",
        False,
        "shrink the study to a run of seconds (smoke test); flags given explicitly still apply",
        **kw,
    )
    flags.DEFINE_integer("checkpoint_every", 5, "epochs between checkpoints", **kw)
    flags.DEFINE_bool(
        "keep_checkpoints",
        True,
        "keep each trial's final checkpoint (its trained replicas) once its results are recorded",
        **kw,
    )
    flags.DEFINE_bool(
        "deterministic",
        False,
        "compile with XLA's GPU deterministic ops (the same "
        "command twice gives bitwise the same results on a GPU; CPU and TPU are "
        "deterministic without it); recorded in results.json",
        **kw,
    )
    flags.DEFINE_bool(
        "portable",
        True,
        "compute in portable mode (jaxrepro.portable: XLA's CPU instruction set capped at AVX, "
        "no fused multiply-add, no run-time kernel dispatch), so the results are bitwise the "
        "same on any x86-64 CPU; --noportable uses everything the host has (faster or not, "
        "see BUILD_NOTES.md); recorded in results.json with the machine",
        **kw,
    )
    flags.DEFINE_string(
        "compilation_cache",
        "default",
        "JAX's persistent compilation cache, so a rerun skips XLA compilation: a directory, "
        "'default' ($JAXREPRO_COMPILATION_CACHE, else ~/.cache/jaxrepro/xla; one subdirectory "
        "per machine kind) or 'off'; the results do not depend on it",
        **kw,
    )
    flags.DEFINE_integer(
        "cpu_devices",
        0,
        "split each process's CPU into this many JAX devices "
        "(0: one per core); the results do not depend on it",
        **kw,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "multi-process run: host:port of process 0 "
        "(or $JAX_COORDINATOR_ADDRESS); see jaxrepro.distributed",
        **kw,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "multi-process run: number of processes (or $JAX_NUM_PROCESSES)",
        **kw,
    )
    flags.DEFINE_integer(
        "process_id", None, "multi-process run: this process's index (or $JAX_PROCESS_ID)", **kw
    )
    flags.DEFINE_bool(
        "distributed",
        None,
        "join a multi-process run found by JAX's cluster "
        "auto-detection (Slurm, Open MPI, Kubernetes, Cloud TPU); unset: detect, "
        "--nodistributed: never",
        **kw,
    )


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
                raise ConfigError(
                    f.name,
                    f"expected a comma-separated list of {item.__name__}, got {','.join(value)!r}",
                ) from None
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
    want_portable = bool(fv["portable"].value)
    if want_portable and not portable.is_x86_64():
        if fv["portable"].present:
            raise app.UsageError("--portable: defined for x86-64 CPUs only; pass --noportable")
        want_portable = False  # the default, where it has no meaning: the host's own mode
    if want_portable:
        try:
            portable.require()  # before JAX starts (use_cpu_devices below does not start it)
        except RuntimeError as e:
            raise app.UsageError(f"--portable: {e}; or pass --noportable") from None
    try:
        engine.use_cpu_devices(fv["cpu_devices"].value or None)  # 0: one per core
    except RuntimeError:
        if fv["cpu_devices"].present:
            raise
        # JAX already started in this process (a Python caller chose its devices): they stand.
    cache = fv["compilation_cache"].value
    try:
        compilation.configure_cache(cache)
    except ValueError as e:
        raise app.UsageError(f"--compilation_cache: {e}") from None
    except OSError as e:
        raise app.UsageError(
            f"--compilation_cache: cannot use {cache!r} ({e}); give another directory or 'off'"
        ) from None
    try:
        distributed.initialize(
            fv["coordinator_address"].value,
            fv["num_processes"].value,
            fv["process_id"].value,
            auto=fv["distributed"].value,
        )
    except ValueError as e:
        raise app.UsageError(f"--coordinator_address, --num_processes, --process_id: {e}") from None
    try:
        out = runner.run(
            config,
            fv["workdir"].value,
            checkpoint_every=fv["checkpoint_every"].value,
            keep_checkpoints=fv["keep_checkpoints"].value,
            deterministic=fv["deterministic"].value,
            portable=want_portable,
        )
    except ConfigError as e:
        raise app.UsageError(e.as_flags()) from None
    if distributed.is_writer():
        print(out["report_markdown"])
    return out
