"""Flax NNX models in the engine: ``FromNNX`` wraps an NNX model as the linen module it trains.

NNX is Flax's recommended API: a model is a Python object that holds its own parameters,
built from an ``nnx.Rngs``. The engine trains pure functions of a replica's state, stacked
over replicas; ``FromNNX`` is the bridge. It holds a *factory*, the model's class and its
arguments (``FromNNX.of(MLP, 64, 10)`` builds ``MLP(64, 10, rngs=rngs)``), splits the model
into its graph definition and state once per shape (``nnx.eval_shape``, no arrays made),
and inside every call merges the replica's arrays back into a fresh model, so the per-replica
function stays pure:

- **parameters** (``nnx.Param``) are the linen ``params`` collection, one array per path
  (``"l1.kernel"``), drawn by ``make(..., rngs=nnx.Rngs(...))`` whose streams all derive from
  the replica's ``init`` key (``params`` is the key itself, others fold in their name):
  varying ``init`` varies them, fixing it fixes them, exactly as for a linen model;
- **BatchNorm statistics** (``nnx.BatchStat``) are the ``batch_stats`` collection, kept per
  replica and updated by training steps, read by evaluation;
- **random streams** (``nnx.RngStream``, e.g. the one ``nnx.Dropout(rate, rngs=rngs)`` keeps)
  are reseeded at every step from the replica's ``dropout`` key (each stream folding in its
  name), so dropout masks vary with the ``dropout`` source and with nothing else; a dropout
  layer built without ``rngs`` is refused by name;
- **train and evaluation mode** is ``nnx.view(model, deterministic=not train,
  use_running_average=not train)``: dropout on and batch statistics used while training,
  running averages and no dropout in evaluation, whatever the layers were built with. The
  model is called as ``model(x)`` and returns logits ``[B, C]``.

Any other NNX state (a custom ``nnx.Variable``, a cache) is refused by name: the engine would
have nowhere to keep it per replica (the project's choice, over silently resetting it).

An ``nnx.Module`` *instance* passed to ``fit`` is accepted too (``from_nnx``): a copy of its
parameters, taken when the ``Task`` is made, starts every replica, so ``init`` cannot be varied
(pass ``vary`` without it: the default varies it); an instance carries one draw; give the
factory for per-replica draws. Everything downstream
(``Ensemble``, ``predict``, checkpoints, the studies) sees a linen module and works as with any
other model. Equal factories (the same class and arguments) give equal modules, so a refit
does not compile again.

Synopsis::

    >>> import optax
    >>> from flax import nnx
    >>> from jaxrepro import data, engine, nnx_models
    >>> class MLP(nnx.Module):
    ...     def __init__(self, din, c, *, rngs):
    ...         self.l1 = nnx.Linear(din, 16, rngs=rngs)
    ...         self.l2 = nnx.Linear(16, c, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.l2(nnx.relu(self.l1(x)))
    >>> ds = data.digits()
    >>> model = nnx_models.FromNNX.of(MLP, 64, 10)
    >>> run = engine.fit(model, optax.adam(1e-2), ds, replicas=2, epochs=2, batch_size=64)
    >>> run.predict(ds.x_test).shape
    (2, 360, 10)
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrepro import checks

Array = jax.Array

SEPARATOR = "."
"""Joins an NNX state path into one parameter name (``("l1", "kernel")`` -> ``"l1.kernel"``):
flat string names are what checkpoints store and what a reader recognises."""


def _name(path: tuple) -> str:
    return SEPARATOR.join(str(p) for p in path)


def _build(make: Callable, args: tuple, kwargs: tuple, rngs: nnx.Rngs) -> nnx.Module:
    module = make(*args, rngs=rngs, **dict(kwargs))
    if not isinstance(module, nnx.Module):
        raise checks.BadType(
            f"FromNNX's make(*args, rngs=rngs, **kwargs) must return an nnx.Module, got "
            f"{type(module).__name__}"
        )
    return module


@functools.lru_cache(maxsize=64)
def _structure(make: Callable, args: tuple, kwargs: tuple, x_shape: tuple, x_dtype) -> tuple:
    """The model's graph definition and the abstract ``(path, Variable)`` of its parameters,
    batch statistics and random streams, from ``make`` traced without arrays."""
    del x_shape, x_dtype  # part of the key only: the structure may depend on the input
    abstract = nnx.eval_shape(lambda: _build(make, args, kwargs, _rngs(jax.random.key(0))))
    graphdef, params, stats, rngs, rest = nnx.split(
        abstract, nnx.Param, nnx.BatchStat, nnx.RngState, ...
    )
    other = list(nnx.to_flat_state(rest))
    if other:
        path, var = other[0]
        raise ValueError(
            f"the NNX model holds state at {_name(path)!r} of type {type(var).__name__}; "
            f"jaxrepro trains nnx.Param, keeps nnx.BatchStat per replica and reseeds random "
            f"streams, and has nowhere to keep other state per replica"
        )
    return (
        graphdef,
        tuple(nnx.to_flat_state(params)),
        tuple(nnx.to_flat_state(stats)),
        tuple(nnx.to_flat_state(rngs)),
    )


def _stream_key(key: Array, tag: str) -> Array:
    """Stream ``tag``'s key from ``key``: ``params`` is ``key`` itself, any other stream folds
    in a stable hash of its name (crc32), so two streams never draw the same numbers."""
    return key if tag == "params" else jax.random.fold_in(key, zlib.crc32(tag.encode()))


def _rngs(key: Array) -> nnx.Rngs:
    """The ``Rngs`` a factory is called with: the ``params``, ``dropout`` and ``default``
    streams from the replica's ``init`` key, each its own (``_stream_key``); streams kept by
    the model are reseeded from the ``dropout`` key at every step."""
    return nnx.Rngs(**{t: _stream_key(key, t) for t in ("default", "params", "dropout")})


def _flat(state: nnx.State) -> dict[str, Array]:
    return {_name(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def _state(template: tuple, values: dict[str, Array]) -> nnx.State:
    return nnx.from_flat_state([(p, v.replace(values[_name(p)])) for p, v in template])


def _zeros(var: nnx.Variable) -> Array:
    abstract = var.get_value()
    return jnp.zeros(abstract.shape, abstract.dtype)


def _streams(template: tuple, key: Array) -> nnx.State:
    """Concrete random-stream state for a merge (keys reseeded right after)."""
    out = []
    for path, var in template:
        if isinstance(var, nnx.RngKey):
            value = jnp.broadcast_to(key, var.get_value().shape)
        else:
            value = jnp.zeros(var.get_value().shape, var.get_value().dtype)
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


class FromNNX(nn.Module):
    """A Flax NNX model, as the engine trains it (module docstring).

    Attributes:
      make: the model's class (or any function) called as ``make(*args, rngs=rngs,
        **kwargs)`` to build one replica's model, with every stream of ``rngs`` drawn from
        the replica's ``init`` key; ``FromNNX.of(MLP, 64, 10)`` is
        ``FromNNX(MLP, args=(64, 10))``.
      args: positional arguments of ``make`` (hashable values).
      kwargs: keyword arguments of ``make`` as ``((name, value), ...)`` (``of`` sorts them).
      fixed_init: True when ``make`` ignores its ``rngs`` (``from_nnx`` of an instance): the
        engine refuses to vary ``init``.

    Equal ``make``, ``args`` and ``kwargs`` give equal modules, so a refit with a freshly
    written ``FromNNX.of(MLP, 64, 10)`` does not compile again (a new lambda or
    ``functools.partial`` object is a new factory each time, and compiles once per object).
    """

    make: Callable[..., nnx.Module]
    args: tuple = ()
    kwargs: tuple = ()
    fixed_init: bool = False

    @classmethod
    def of(cls, make: Callable[..., nnx.Module], *args, **kwargs) -> FromNNX:
        """``FromNNX(make, args, sorted kwargs)``: the model ``make(*args, rngs=..., **kwargs)``.
        Lists become tuples; other unhashable arguments are refused (the module is a static,
        hashed part of the compiled step)."""

        def frozen(name, v):
            v = tuple(frozen(name, x) for x in v) if isinstance(v, list) else v
            try:
                hash(v)
            except TypeError:
                raise checks.BadType(
                    f"FromNNX.of's argument {name} must be hashable (a number, string, tuple...), "
                    f"got {type(v).__name__}"
                ) from None
            return v

        args = tuple(frozen(f"#{i}", a) for i, a in enumerate(args))
        kwargs = tuple(sorted((k, frozen(k, v)) for k, v in kwargs.items()))
        return cls(make, args, kwargs)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        graphdef, params_t, stats_t, rngs_t = _structure(
            self.make, self.args, self.kwargs, tuple(x.shape[1:]), x.dtype
        )
        if self.is_initializing():
            module = _build(self.make, self.args, self.kwargs, _rngs(self.make_rng("params")))
            _, p0, s0, _ = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
            init = {**_flat(p0), **_flat(s0)}
        else:  # linen checks a held variable's shape against its initialiser's: zeros of it
            init = {_name(p): _zeros(v) for p, v in (*params_t, *stats_t)}
        params, stats = {}, {}
        for path, _ in params_t:
            n = _name(path)
            params[n] = self.param(n, lambda _, n=n: init[n])
        for path, _ in stats_t:
            n = _name(path)
            stats[n] = self.variable("batch_stats", n, lambda n=n: init[n])
        key = self.make_rng("dropout") if train and self.has_rng("dropout") else None
        streams = _streams(rngs_t, key if key is not None else jax.random.key(0))
        module = nnx.merge(
            graphdef,
            _state(params_t, params),
            _state(stats_t, {n: v.value for n, v in stats.items()}),
            streams,
        )
        if key is not None and rngs_t:
            tags = sorted({var.tag for _, var in rngs_t})
            nnx.reseed(module, **{t: _stream_key(key, t) for t in tags})
        if train:
            _check_dropout(module)
        module = nnx.view(
            module, deterministic=not train, use_running_average=not train, raise_if_not_found=False
        )
        logits = module(x)
        if (
            train
            and stats
            and not self.is_initializing()
            and self.is_mutable_collection("batch_stats")
        ):
            _, new_stats, _ = nnx.split(module, nnx.BatchStat, ...)
            for name, value in _flat(new_stats).items():
                stats[name].value = value
        return logits


def _check_dropout(module: nnx.Module) -> None:
    """A dropout layer built without ``rngs`` has no stream for the engine to reseed."""
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Dropout) and node.rate > 0 and node.rngs is None:
            raise ValueError(
                f"the NNX model's dropout layer at {_name(path)!r} was built without rngs: build "
                f"it as nnx.Dropout(rate, rngs=rngs) with the factory's rngs, so the engine can "
                f"draw its masks from the replica's dropout key (the model is called as "
                f"model(x), with train and evaluation mode set by nnx.view)"
            )


def _instance_factory(graphdef, state) -> Callable[[nnx.Rngs], nnx.Module]:
    def make(*, rngs: nnx.Rngs) -> nnx.Module:
        del rngs  # one draw: the instance's
        return nnx.merge(graphdef, state)

    return make


def from_nnx(model: Any) -> FromNNX:
    """The engine's module for ``model``: ``FromNNX`` as it is, an ``nnx.Module`` instance
    with its parameters as every replica's initial parameters (``fixed_init``).

    Raises:
      checks.BadType: anything else.
    """
    if isinstance(model, FromNNX):
        return model
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a: a, state)  # new Variables: later changes are not seen
        return FromNNX(_instance_factory(graphdef, state), fixed_init=True)
    raise checks.BadType(f"expected an nnx.Module or FromNNX, got {type(model).__name__}")
