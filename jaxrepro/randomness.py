"""Sources of randomness, key derivation, and the per-replica data order.

Synopsis::

    >>> keys = replica_keys(seed=0, source="init", replica_ids=jnp.arange(4), varied=True)
    >>> keys.shape
    (4,)
    >>> base_N = base_order(seed=0, num_examples=4000)
    >>> order_key = replica_key(0, "order", 1, varied=True)
    >>> order_N = epoch_order(order_key, epoch=3, base_N=base_N, window=100)
    >>> sorted(order_N.tolist()) == list(range(4000))     # a permutation of the training set
    True

Every draw a replica makes is a pure function of (root seed, source, replica index, step). The
number of replicas R and the devices they sit on never enter, so replica ``r`` trained among R
replicas draws exactly what replica ``r`` trained alone draws, and a resumed run draws what an
uninterrupted one would.

Derivation (the project's own; any fixed scheme would do as long as it keeps that property)::

    root            = key(seed)                       # threefry2x32, explicitly
    source_root     = fold_in(root, SOURCE_IDS[source])
    replica space   = fold_in(source_root, 0)
    key(source, r)  = fold_in(replica space, r if varied else 0)
    key(source, r, step) = fold_in(key(source, r), step)
    base order key  = fold_in(fold_in(root, SOURCE_IDS["order"]), 1)
    bootstrap key   = fold_in(root, 1), then fold_in(., i) for each index i given

A bootstrap (``metrics.compare(key=...)``, ``metrics.difference``) draws sample s from
``fold_in(bootstrap key, s)``. The bootstrap key's value equals the order source's root (the
studies have always used ``fold_in(key(seed), 1)``, and their recorded intervals are kept); no
training draw uses that key unfolded, so the two never share a stream.

A *fixed* source gives every replica the key of replica 0, so a fixed-source run reproduces
replica 0 of the run that varies that source.

References:
  Threefry is required: with ``rbg``/``unsafe_rbg``, ``vmap`` over keys is not equivalent to a
  loop over them (jax pull request #20094).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro import checks

SOURCES: tuple[str, ...] = ("init", "order", "dropout", "augment", "perturb")
"""Names of the sources of randomness, in the order of their ids."""

SOURCE_IDS: dict[str, int] = {name: i for i, name in enumerate(SOURCES)}

PRNG_IMPL = "threefry2x32"

_REPLICA_SPACE = 0
_BASE_ORDER = 1


def varied_mask(vary: Iterable[str]) -> jax.Array:
    """bool ``[len(SOURCES)]``: which sources are varied, as an array (a traced jit argument)."""
    vary = set(check_sources(vary))
    return jnp.asarray([s in vary for s in SOURCES])


def check_sources(names: Iterable[str], *, what: str = "vary") -> tuple[str, ...]:
    """Validates source names and returns them as a sorted tuple without duplicates.

    Raises:
      ValueError: naming the unknown source and the known ones.
    """
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Iterable) or isinstance(names, (bytes, dict)):
        raise checks.BadType(
            f"{what} must be a source name or a sequence of them ({', '.join(SOURCES)} or "
            f"'all'; () for none), got {names!r}"
        )
    out = []
    for name in names:
        if name == "all":
            out.extend(SOURCES)
            continue
        if name not in SOURCE_IDS:
            raise ValueError(
                f"unknown source of randomness {name!r} in {what}; "
                f"known sources: {', '.join(SOURCES)} (or 'all')"
            )
        out.append(name)
    return tuple(s for s in SOURCES if s in set(out))


SEED_LIMIT = 2**32
"""Seeds are integers in ``[0, 2**32)``: the root key's data is ``(0, seed)``."""


def check_seed(seed) -> int:
    """``seed`` as a Python int, after checking that it is an integer in ``[0, 2**32)``.

    NumPy integers are accepted; bool, float and str are refused (``1.5`` would otherwise be
    truncated to 1 and ``True`` taken as 1).

    Raises:
      ValueError: naming the seed and the range (``checks.BadType``, also a TypeError, for a
        value that is not an integer).
    """
    if not checks.is_integer(seed):
        raise checks.BadType(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed}")
    return int(seed)


def root_key(seed) -> jax.Array:
    """The root key of a run: threefry2x32 regardless of the global default.

    ``seed``: an integer in ``[0, 2**32)`` (checked, unless traced), taken as ``uint32``; the
    key's data is ``(0, seed)``."""
    if not isinstance(seed, jax.Array):  # a traced or device seed is the caller's uint32
        seed = np.uint32(check_seed(seed))
    return jax.random.key(seed, impl=PRNG_IMPL)


def source_root(seed, source: str) -> jax.Array:
    """The key from which every draw of ``source`` derives."""
    return jax.random.fold_in(root_key(seed), SOURCE_IDS[source])


def replica_key(seed, source: str, replica, *, varied) -> jax.Array:
    """Key of one replica for one source; ``replica`` and ``varied`` may be traced.

    A varied source folds in the replica index; a fixed one folds in 0 for every replica.
    ``varied`` may be a traced boolean, so one compiled function serves every choice of varied
    sources.
    """
    space = jax.random.fold_in(source_root(seed, source), _REPLICA_SPACE)
    return jax.random.fold_in(space, jnp.where(varied, replica, 0))


def replica_keys(seed, source: str, replica_ids: jax.Array, *, varied) -> jax.Array:
    """Keys ``[R]`` of the replicas ``replica_ids`` (int ``[R]``) for one source."""
    return jax.vmap(lambda r: replica_key(seed, source, r, varied=varied))(replica_ids)


def bootstrap_key(seed, *indices: int) -> jax.Array:
    """The key of a study's bootstrap intervals: ``fold_in(root_key(seed), 1)``, then folded
    with each of ``indices`` (e.g. a comparison's coordinates), so every comparison of a study
    has its own, reproducible draws."""
    key = jax.random.fold_in(root_key(seed), 1)
    for i in indices:
        key = jax.random.fold_in(key, int(i))
    return key


def step_key(key: jax.Array, step) -> jax.Array:
    """Key of one replica's source at one global step (or epoch, for the data order)."""
    return jax.random.fold_in(key, step)


def base_order(seed, num_examples: int) -> jax.Array:
    """The fixed permutation ``[N]`` of the training set shared by all replicas.

    The shuffling window acts on this order: with window 1 every replica, every epoch, visits
    the examples in exactly this order.
    """
    key = jax.random.fold_in(source_root(seed, "order"), _BASE_ORDER)
    return jax.random.permutation(key, num_examples).astype(jnp.int32)


def epoch_order(key: jax.Array, epoch, base_N: jax.Array, window) -> jax.Array:
    """One replica's order of the training set in one epoch, with a shuffling window.

    The base order is cut into consecutive windows of ``window`` examples (the last one may be
    short); each window is permuted independently, with a draw that depends on the replica's
    order key and the epoch. ``window == 1`` leaves the base order as it is (every replica sees
    the same fixed order); ``window >= N`` is a full shuffle. Examples never leave their window.

    The permutation of a window is a sort by 32 random bits per example (``lax.sort`` with the
    window index as the first key, stable): uniform up to ties in the bits, which keep the base
    order and are rare (about N * window / 2**33 pairs).

    Args:
      key: the replica's ``order`` key.
      epoch: epoch index (may be traced).
      base_N: the base order, int ``[N]``.
      window: window size w >= 1 (may be traced).

    Returns:
      int32 ``[N]``, a permutation of ``0..N-1``.

    References:
      Snapp & Shamir, "Synthesizing Irreproducibility in Deep Networks", arXiv 2102.10696
      (shuffling window). The exact window semantics are the project's own.
    """
    n = base_N.shape[0]
    bits_N = jax.random.bits(step_key(key, epoch), (n,), jnp.uint32)
    window_N = jnp.arange(n, dtype=jnp.int32) // jnp.asarray(window, jnp.int32)
    _, _, order_N = lax.sort((window_N, bits_N, base_N), num_keys=2, is_stable=True)
    return order_N
