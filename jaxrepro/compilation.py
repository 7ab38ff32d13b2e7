"""Compile once: equal optimizers share compiled programs, a cache on disk, compile time measured.

Compilation is most of what a user of jaxrepro waits for: a notebook cell that builds a fresh
``optax.adam(1e-3)`` and calls ``fit`` again, a study that trains a grid of loss weights, a batch
job run a second time. Three mechanisms, each at its own depth:

- **Within a process, before tracing.** The engine's compiled functions are cached by the
  static description of the run (``engine.Task``). Flax modules and jaxrepro's losses and
  augmentations are frozen dataclasses (equal fields, equal objects); an optax transformation is
  a pair of closures, new with every ``optax.adam(...)`` call. ``canonical_optimizer`` maps it
  to the first transformation of this process with the same *fingerprint*: the jaxprs of its
  ``init`` and ``update`` traced alone on the parameters' shapes (constants included, with the
  state's tree structure); a few milliseconds against the seconds of tracing, lowering and
  compiling a training step. Equal optimizers then give equal tasks and one compilation. An
  optimizer whose jaxpr holds a Python object that cannot be compared by value (a host
  callback, say: a callable in an equation's parameters) keeps its identity: it compiles once
  per object, as before.
- **Loss weights are traced**, not static (``losses.with_weights``): a task's loss is cached
  with its weights zeroed (``losses.canonical``) and the engine feeds each replica's weights as
  arguments, so a sweep of a weight, within one run (``hparams``) or across runs, compiles once.
- **Across processes**: JAX's persistent compilation cache, on disk (``enable_cache``). It
  saves the XLA compilation of every program, not the tracing and lowering before it. The
  study binaries switch it on by default (``--compilation_cache``); in a notebook call
  ``jaxrepro.compilation.enable_cache()`` once. The directory has one subdirectory per machine
  kind (architecture, CPU model and features), because JAX's cache key does not name the CPU
  and a host-mode program compiled for one CPU may not run on another.

``compile_seconds()`` is the process's running total of time spent tracing, lowering and
compiling (JAX's monitoring events); ``Run.compile_seconds`` and the studies' ``timings.json``
report the share of each fit.

Synopsis::

    >>> import optax
    >>> from jaxrepro import compilation
    >>> import jax
    >>> p = {"w": jax.ShapeDtypeStruct((3,), "float32")}
    >>> a = compilation.canonical_optimizer(optax.adam(1e-3), p)
    >>> compilation.canonical_optimizer(optax.adam(1e-3), p) is a     # a fresh, equal optimizer
    True
    >>> compilation.canonical_optimizer(optax.adam(2e-3), p) is a     # another learning rate
    False
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import jax.extend.core as jax_core
import numpy as np

PyTree = Any

CACHE_ENV = "JAXREPRO_COMPILATION_CACHE"
"""Environment variable naming the cache directory (before the user cache directory)."""

# ---------------------------------------------------------------------------------------------
# Equal optimizers, one compiled program.

_ADDRESS = re.compile(r" at 0x[0-9a-fA-FX]+")
_MAX_FINGERPRINTS = 256
_fingerprints: OrderedDict = OrderedDict()  # (tx, params signature) -> fingerprint
_canonical: dict[str, Any] = {}  # fingerprint -> the first optimizer that had it
_lock = threading.Lock()


def _signature(params: PyTree) -> tuple:
    leaves, treedef = jax.tree.flatten(params)
    return (treedef, tuple((tuple(np.shape(a)), str(np.dtype(a.dtype))) for a in leaves))


def _abstract(params: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)


def update_digest(h, a: np.ndarray) -> None:
    """Feeds an array's dtype, shape and bytes to the hash ``h`` (equal arrays, equal feed)."""
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())


def _const_digest(h, const) -> bool:
    try:
        a = np.asarray(const)
    except Exception:  # noqa: BLE001 - a constant that is not an array
        return False
    if a.dtype == object:
        return False
    update_digest(h, a)
    return True


def optimizer_fingerprint(tx, params: PyTree) -> str | None:
    """A digest of what ``tx`` computes on parameters shaped like ``params``: the jaxprs of
    ``tx.init`` and ``tx.update`` (with their constants and the tree structures of their inputs
    and outputs) and the transformation's type. Equal digests, equal computations. None when the
    jaxpr holds an object that cannot be compared by value (its printed form has a memory
    address: a host callback, say), or the optimizer cannot be traced on its own."""
    abstract = _abstract(params)
    try:
        init = jax.make_jaxpr(tx.init, return_shape=True)(abstract)
        init_jaxpr, state = init
        update_jaxpr, out = jax.make_jaxpr(tx.update, return_shape=True)(abstract, state, abstract)
    except Exception:  # noqa: BLE001 - an optimizer that needs more than (grads, state, params)
        return None
    h = hashlib.sha256()
    h.update(f"{type(tx).__module__}.{type(tx).__qualname__}".encode())
    for closed, shapes in ((init_jaxpr, state), (update_jaxpr, out)):
        consts = list(closed.consts)
        if not _by_value(closed.jaxpr, consts):
            return None
        text = str(closed.jaxpr)
        # A masked address (a callable) or an elided array literal ("[...]", JAX's
        # simplified-constants mode inlines array constants and does not print them): the text
        # would not tell two optimizers apart.
        if _ADDRESS.search(text) or "[...]" in text:
            return None
        h.update(text.encode())
        h.update(str(jax.tree.structure(shapes)).encode())
        for c in consts:
            if not _const_digest(h, c):
                return None
    return h.hexdigest()


# Parameters of custom_jvp/custom_vjp calls that hold their differentiation rules: the engine
# never differentiates the optimizer, so they do not change what it computes.
_RULE_PARAMS = frozenset(
    {"jvp_jaxpr_fun", "jvp_jaxpr_thunk", "jvp", "fwd_jaxpr_thunk", "bwd", "fwd", "out_trees"}
)


def _by_value(jaxpr, consts: list) -> bool:
    """Whether every equation's parameters are plain values (numbers, strings, dtypes, shapes,
    shardings, nested jaxprs, whose constants are appended to ``consts``): no callable such as
    a host callback, whose printed form would not tell two of them apart."""
    for eqn in jaxpr.eqns:
        custom = eqn.primitive.name.startswith("custom_")
        for name, value in eqn.params.items():
            if custom and name in _RULE_PARAMS:
                continue
            if not _plain(value, consts):
                return False
    return True


def _plain(value, consts: list) -> bool:
    if isinstance(value, jax_core.ClosedJaxpr):
        consts.extend(value.consts)
        return _by_value(value.jaxpr, consts)
    if isinstance(value, jax_core.Jaxpr):
        return _by_value(value, consts)
    if isinstance(value, (tuple, list, frozenset)):
        return all(_plain(v, consts) for v in value)
    if isinstance(value, dict):
        return all(_plain(v, consts) for v in value.values())
    if isinstance(value, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        return True
    return not callable(value)


def canonical_optimizer(tx, params: PyTree):
    """The first optimizer of this process that computes what ``tx`` computes on parameters
    shaped like ``params`` (``optimizer_fingerprint``), else ``tx`` itself, which becomes the
    canonical one. Substituting it changes no result: the two compute the same updates."""
    try:
        key = (tx, _signature(params))
        hash(key)
    except TypeError:  # an unhashable transformation: nothing to share
        return tx
    with _lock:
        digest = _fingerprints.get(key)
        if digest is not None:
            _fingerprints.move_to_end(key)
    if digest is None:
        digest = optimizer_fingerprint(tx, params) or ""
        with _lock:
            _fingerprints[key] = digest
            while len(_fingerprints) > _MAX_FINGERPRINTS:
                _fingerprints.popitem(last=False)
    if not digest:
        return tx
    with _lock:
        return _canonical.setdefault(f"{digest}:{_signature(params)}", tx)


# ---------------------------------------------------------------------------------------------
# Time spent compiling.

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_total = [0.0]


def _on_duration(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_total[0] += float(duration)


@functools.cache
def _listen() -> None:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling JAX programs since
    jaxrepro was imported (reading compiled programs from the persistent cache included): take
    the difference of two calls around a computation. An upper bound: a jitted function traced
    inside another's trace counts in both."""
    _listen()
    return _compile_total[0]


_listen()


# ---------------------------------------------------------------------------------------------
# The persistent cache.


def machine_tag() -> str:
    """A short name of this machine kind: architecture, CPU model and the CPU features that
    decide code generation (``portable.cpu_model_and_features``)."""
    from jaxrepro import portable

    model, features = portable.cpu_model_and_features()
    text = f"{platform.machine()}|{model}|{','.join(features or [])}"
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def default_cache_dir() -> Path:
    """``$JAXREPRO_COMPILATION_CACHE`` if set (the value ``off`` makes the study binaries'
    default no cache), else ``$XDG_CACHE_HOME/jaxrepro/xla`` (default
    ``~/.cache/jaxrepro/xla``); ``enable_cache`` adds the machine's subdirectory."""
    if os.environ.get(CACHE_ENV, "").strip() not in ("", "off"):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxrepro" / "xla"


def enable_cache(path: str | os.PathLike | None = None, *, min_compile_seconds: float = 0.0):
    """Switches on JAX's persistent compilation cache: compiled programs are written to disk
    and read back by later processes (the second run of a study skips XLA compilation).

    Args:
      path: the cache directory (default ``default_cache_dir()``); programs go to its
        subdirectory ``machine_tag()``. Created if missing.
      min_compile_seconds: programs that compiled faster than this are not written (JAX's
        default is 1 s; 0 keeps every program, the small ones included).

    Returns:
      The directory programs are written to.

    May be called at any time (also after JAX has compiled something); a cache entry that
    cannot be read (corrupt, truncated, from another jaxlib) is compiled again with a warning,
    never an error. ``disable_cache()`` switches it off.
    """
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    directory = directory / machine_tag()
    directory.mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"compilation cache directory {directory} is not writable")
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()  # take the new directory even if JAX has compiled before
    return directory


def disable_cache() -> None:
    """Switches the persistent compilation cache off (in-process caching is unaffected)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()


def cache_dir() -> Path | None:
    """The directory compiled programs are written to (JAX's setting), or None when the cache
    is off."""
    directory = jax.config.jax_compilation_cache_dir
    return Path(directory) if directory and jax.config.jax_enable_compilation_cache else None


def configure_cache(setting: str) -> Path | None:
    """The cache as a study binary's ``--compilation_cache`` asks: ``"default"``
    (``default_cache_dir()``, or off when ``$JAXREPRO_COMPILATION_CACHE`` is ``off``), ``"off"``
    or a directory. Returns the directory in use, or None.

    Raises:
      ValueError: an empty setting. OSError: a directory that cannot be created or written.
    """
    setting = str(setting).strip()
    if not setting:
        raise ValueError("give a directory, 'default' or 'off'")
    if setting == "default" and os.environ.get(CACHE_ENV, "").strip() == "off":
        setting = "off"
    if setting == "off":
        return None
    return enable_cache(None if setting == "default" else setting)


# ---------------------------------------------------------------------------------------------
# Compiled programs held in memory, against the kernel's limit on memory mappings.

MAP_FRACTION = 0.5
"""``release_near_map_limit`` drops the compiled programs past this fraction of the limit."""


def mapped_regions() -> int | None:
    """How many memory mappings this process holds (the lines of ``/proc/self/maps``), or None
    where the system does not say (not Linux)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def map_limit() -> int | None:
    """The kernel's limit on one process's memory mappings (``vm.max_map_count``), or None where
    the system does not say."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def release_near_map_limit(fraction: float = MAP_FRACTION) -> bool:
    """Drops JAX's in-memory compiled programs (``jax.clear_caches``) when this process holds
    more than ``fraction`` of the kernel's limit on memory mappings; True when it did.

    Why: XLA loads every program it compiles for the CPU as JIT code, in memory mappings of its
    own (code, read-only data and data, for each of a program's kernels: about a dozen for a
    tiny jitted function, hundreds for a training step), held for as long as JAX caches the
    program. A process that compiles thousands of programs (a long study, a long notebook
    session, the test suite) reaches Linux's default limit of 65,530 mappings, and the next
    compilation then fails inside XLA: the process aborts or segfaults, with no Python error.
    The engine calls this before every run (``Engine.run``), where reading the mappings costs
    milliseconds against a fit's seconds. Programs needed again are compiled again, or read
    from the persistent cache; no result changes. Elsewhere (Windows, macOS) the count is
    unknown and nothing is dropped.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    limit, held = map_limit(), mapped_regions()
    if not limit or held is None or held <= fraction * limit:
        return False
    jax.clear_caches()
    return True
