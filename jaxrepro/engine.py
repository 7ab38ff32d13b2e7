"""The replica engine: train R replicas of a Flax model at once, each source of randomness its key.

Synopsis::

    >>> from jaxrepro import data, models, optim
    >>> ds = data.load("digits")                      # or data.mnist1d()
    >>> model = models.MLP(widths=(32,), num_classes=10, activation="smelu")
    >>> tx = optim.optimizer("adam", 1e-3)            # or any optax transformation
    >>> run = fit(model, tx, ds, replicas=4, seed=0, vary=("init", "order"), batch_size=128,
    ...           epochs=2)
    >>> probs_RxNxC = run.predict(ds.x_test)
    >>> probs_RxNxC.shape, run.history["loss"].shape   # history: [R, epochs]
    ((4, 360, 10), (4, 2))
    >>> alone = fit(model, tx, ds, replicas=(2,), seed=0, vary=("init", "order"), batch_size=128,
    ...             epochs=2)                         # replica 2 trained alone: the same replica
    >>> bool((alone.predict(ds.x_test)[0] == probs_RxNxC[2]).all())
    True

One replica's training is written once, without a replica axis: ``train_step`` (one batch) and
``train_epochs`` (a ``lax.scan`` over epochs and steps, with the data order and per-step keys
derived inside). Which sources are varied is a traced argument, so one compilation serves every
randomness setting of a study. The replica axis enters at one place, ``_over_replicas``, by
one of the batching strategies:

- ``"map"``: ``lax.map`` over replicas, each running its own scan over all steps of the call.
  Every replica executes the same program as a replica trained alone.
- ``"vmap"``: ``vmap`` over replicas (batched matrix products).
- ``"chunked:n"``: ``lax.map`` over chunks of n replicas, ``vmap`` inside a chunk.
- ``"auto"``: ``"map"`` on CPU; on accelerators ``"vmap"``, or ``"chunked:n"`` when a
  device's replicas would not fit in its memory (``choose_strategy``; BUILD_NOTES.md has the
  measurements behind the rule).

The whole training set lives on the device; each replica's batch is gathered inside the
jitted step from its own order. Compiled functions are cached by the static description of the
run (model, optimizer, loss, augmentation, shapes), so a second run of the same task with other
seeds, other replicas or another window reuses them; an optimizer equal to one used before
(a fresh ``optax.adam(1e-3)``) counts as the same (``compilation.canonical_optimizer``), and the
weights of the loss transforms are run-time arguments, not part of that description
(``losses.with_weights``): one compilation serves a sweep of them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrepro import (
    checks,
    compilation,
    distributed,
    losses,
    models,
    nnx_models,
    portable,
    randomness,
)

Array = jax.Array
PyTree = Any

DEFAULT_LOSS = losses.softmax_cross_entropy()
"""The task loss when none is given: softmax cross-entropy (of the ensemble prediction)."""

DEFAULT_PERTURB_SCALE = 1e-6
"""Relative size of the ``perturb`` source's change of the initial weights when it is varied."""

MAX_REPLICA = 2**31 - 1
"""The largest replica index (indices are int32 on the device)."""

DEFAULT_DIVERGENCE = 100.0
"""``FitConfig.divergence``'s default: the factor of the blow-up rule (``diverged``)."""

STRATEGIES = ("auto", "map", "vmap", "chunked:n")

# Incremented each time the epoch function is traced (never at run time): lets tests assert
# that training compiles once across epochs and across runs of the same task.
TRACE_COUNTS = {"train_epochs": 0, "init": 0}


class TrainState(NamedTuple):
    """Everything one replica carries from step to step (stacked: a leading replica axis).

    Attributes:
      params: model parameters.
      batch_stats: BatchNorm running statistics (an empty dict when the model has none).
      opt_state: optax state, including per-replica hyperparameters when the optimizer was
        built with ``optax.inject_hyperparams``.
      health: the divergence rule's record (``Health``); a state built by hand may leave it
        None, and the engine starts one.
    """

    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    health: Health | None = None


class Health(NamedTuple):
    """What the divergence rule (``FitConfig.divergence``) carries per replica.

    Attributes:
      first_loss: the loss on the replica's very first batch, before any update (NaN until
        trained).
      diverged_at: -1, or the index of the epoch after which the replica was found diverged
        and frozen (its history column).
    """

    first_loss: Array
    diverged_at: Array


def fresh_health() -> Health:
    """One replica's ``Health`` before training."""
    return Health(jnp.float32(jnp.nan), jnp.int32(-1))


@dataclasses.dataclass(frozen=True)
class Task:
    """The static description of one replica's training: hashable, a ``jit`` static argument.

    Attributes:
      model: a Flax linen module called as ``model(x, train=...)`` returning logits ``[B, C]``,
        or a ``models.Ensemble`` returning its K components' logits ``[K, B, C]``; a Flax NNX
        model as ``nnx_models.FromNNX.of(ModelClass, *args)`` (each replica draws its own
        parameters), or an ``nnx.Module`` instance (its parameters start every replica; see
        ``nnx_models``).
      tx: any optax ``GradientTransformation``.
      loss_fn: ``(logits_KxBxC, batch) -> scalar`` (``jaxrepro.losses``: a plain model's
        logits get a leading axis of 1); default: softmax cross-entropy.
      augment: optional ``(key, x_B...) -> x_B...`` drawing from the ``augment`` source.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    loss_fn: losses.Loss = DEFAULT_LOSS
    augment: Callable[[Array, Array], Array] | None = None

    def __post_init__(self):
        if isinstance(self.model, nnx.Module):  # an NNX instance: its parameters, every replica
            object.__setattr__(self, "model", nnx_models.from_nnx(self.model))
        if isinstance(getattr(self.model, "model", None), nnx.Module):  # Ensemble(instance)
            inner = nnx_models.from_nnx(self.model.model)
            object.__setattr__(self, "model", self.model.clone(model=inner))

    @property
    def num_components(self) -> int | None:
        """K when the model is an ``Ensemble``, else None."""
        return models.num_components(self.model)


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How a set of replicas is trained; plain values, so it converts to JSON.

    Attributes:
      replicas: a count R (replicas 0..R-1) or explicit replica indices; replica ``r`` is the
        same model whichever other replicas train beside it. Indices may repeat: a paired
        sweep, whose arms (told apart by ``fit``'s per-replica ``hparams``) share their keys.
      seed: the root seed, an integer in ``[0, 2**32)``.
      vary: sources whose key differs per replica (others are fixed): any of
        ``randomness.SOURCES``, or ``"all"``.
      batch_size: examples per step per replica.
      epochs: passes over the training set.
      window: shuffling window w (``None``: the whole training set, a full shuffle; 1: one
        fixed order for every replica and epoch).
      perturb_scale: relative size eps of the weight perturbation (of the initial weights, or
        after ``perturb_step``)
        ``w0 + eps * rms(w0) * N(0, 1)`` per parameter array (rms taken as 1 for an all-zero
        array such as a fresh bias); ``None`` means ``DEFAULT_PERTURB_SCALE`` when ``perturb``
        is varied and 0 otherwise. Scaling by the array's rms is the project's choice.
      perturb_step: the global step t after which the perturbation is applied (methods.md
        section 1, "Perturbation during training"): 0 (the default) perturbs the initial
        weights; t >= 1 leaves initialisation alone and applies
        ``w <- w + eps * rms(w) * N(0, 1)`` to the parameters right after the t-th update
        (global steps counted from 1 here; t = epochs * steps perturbs the final weights).
        The draw is the one t = 0 makes (the replica's ``perturb`` key, split per array), so
        runs that differ in t differ only in *when*; the optimizer state is not touched. t is
        a traced value: one compilation serves every t. Needs a perturbation (``perturb``
        varied, or ``perturb_scale`` given; an explicit ``perturb_scale=0`` perturbs nothing,
        at any step).
      strategy: batching strategy over replicas, one of ``STRATEGIES``.
      epochs_per_call: epochs run per dispatch of the compiled function (more: fewer host
        round trips; fewer: more frequent callbacks and checkpoints).
      devices: how many devices the replica axis is sharded over (``None``: every device of
        every process, or R of them when R is smaller; in a run of several processes it must
        be all of them). When R is not a multiple of it, the replica axis is padded with copies
        of the last replica, computed and dropped (never returned). The result does not depend
        on it.
      deterministic: compile with XLA's GPU deterministic-ops option
        (``xla_gpu_deterministic_ops``: no atomics in reductions and scatters, deterministic
        algorithms only), so the same command twice gives bitwise the same result on a GPU.
        CPU and TPU runs are deterministic without it; there it changes nothing.
      portable: compute in portable mode (``jaxrepro.portable``): the same bits on any x86-64
        CPU, by pinning what XLA's CPU backend may use. A setting of the process, read when
        JAX starts: switched on here when this is the process's first computation, else it
        must already be on (``jaxrepro.portable.enable()`` right after import), or a
        RuntimeError says so. The CPU backend only; results record the machine either way.
      divergence: the factor f of the rule that declares a replica diverged (the project's
        choice): after an epoch whose mean training loss is NaN or infinite, or exceeds
        ``L0 + f * max(|L0|, 1)`` with L0 the replica's loss on its very first batch (before
        any update), or that leaves a parameter NaN or infinite. A diverged replica is frozen
        inside the compiled step: from then on its updates are masked, so it keeps its state
        from the end of its last good epoch (its predictions stay finite), and
        ``Run.diverged_epoch`` records the epoch. ``None``: only NaN or infinite values count.
        The default, 100, flags Adam at a learning rate of 1e6 (loss 1e13) in its first epoch
        and no run that trains. The select costs no arithmetic in the other replicas, but
        holds one more copy of a replica's state during an epoch (counted by
        ``replica_memory_bytes``). A state built by hand without ``health`` takes its first
        batch as L0.
    """

    replicas: int | tuple[int, ...] = 8
    seed: int = 0
    vary: tuple[str, ...] = ("init", "order")
    batch_size: int = 128
    epochs: int = 10
    window: int | None = None
    perturb_scale: float | None = None
    perturb_step: int = 0
    strategy: str = "auto"
    epochs_per_call: int = 1
    devices: int | None = None
    deterministic: bool = False
    portable: bool = False
    divergence: float | None = DEFAULT_DIVERGENCE

    def __post_init__(self):
        # Every count, index and seed must be an integer (never a float, bool or string that
        # Python would truncate or read as one): ``checks`` refuses them, naming the field.
        object.__setattr__(self, "vary", randomness.check_sources(self.vary, what="vary"))
        object.__setattr__(self, "seed", randomness.check_seed(self.seed))
        if np.ndim(self.replicas) == 0:  # a count (a str, None or float is refused by name)
            note = "or a sequence of replica indices"
            count = checks.integer("replicas", self.replicas, minimum=1, note=note)
            object.__setattr__(self, "replicas", count)
        else:
            ids = checks.integers("replicas", self.replicas, minimum=0, maximum=MAX_REPLICA)
            if not ids:
                raise ValueError("replicas: the list of replica indices is empty")
            object.__setattr__(self, "replicas", ids)
        for name in ("batch_size", "epochs", "epochs_per_call"):
            object.__setattr__(self, name, checks.integer(name, getattr(self, name), minimum=1))
        if self.devices is not None:
            object.__setattr__(self, "devices", checks.integer("devices", self.devices, minimum=1))
        if self.window is not None:
            window = checks.integer(
                "window", self.window, minimum=1, note="or None: a full shuffle"
            )
            object.__setattr__(self, "window", window)
        if self.perturb_scale is not None:
            scale = checks.number("perturb_scale", self.perturb_scale, minimum=0)
            object.__setattr__(self, "perturb_scale", scale)
        step = checks.integer("perturb_step", self.perturb_step, minimum=0, maximum=MAX_REPLICA)
        object.__setattr__(self, "perturb_step", step)
        if step and self.perturb_scale is None and "perturb" not in self.vary:
            raise ValueError(
                f"perturb_step={step} but nothing is perturbed: vary 'perturb' (eps "
                f"{DEFAULT_PERTURB_SCALE:g} per replica) or give perturb_scale"
            )
        if self.divergence is not None:
            factor = checks.number("divergence", self.divergence, minimum=0, strict=True)
            object.__setattr__(self, "divergence", factor)
        if not isinstance(self.strategy, str):
            raise checks.BadType(
                f"strategy must be a string, one of {STRATEGIES}; got {self.strategy!r}"
            )
        parse_strategy(self.strategy)
        object.__setattr__(
            self, "deterministic", checks.boolean("deterministic", self.deterministic)
        )
        object.__setattr__(self, "portable", checks.boolean("portable", self.portable))

    @property
    def replica_ids(self) -> np.ndarray:
        if isinstance(self.replicas, tuple):
            return np.asarray(self.replicas, np.int32)
        return np.arange(self.replicas, dtype=np.int32)

    @property
    def effective_perturb_scale(self) -> float:
        if self.perturb_scale is not None:
            return float(self.perturb_scale)
        return DEFAULT_PERTURB_SCALE if "perturb" in self.vary else 0.0

    @property
    def initial_perturb_scale(self) -> float:
        """eps of the perturbation of the initial weights: 0 when it comes at a later step."""
        return self.effective_perturb_scale if self.perturb_step == 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vary"] = list(self.vary)
        if isinstance(self.replicas, tuple):
            d["replicas"] = list(self.replicas)
        return d


def parse_strategy(strategy: str, num_replicas: int | None = None) -> tuple[str, int]:
    """``strategy`` as ``(kind, chunk)``; resolves ``"auto"`` for the default backend without
    looking at memory (``"map"`` on CPU, ``"vmap"`` elsewhere; ``Placement.create`` refines
    it on accelerators)."""
    if strategy == "auto":
        strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    if strategy in ("map", "vmap"):
        return strategy, 0
    if strategy.startswith("chunked:"):
        try:
            chunk = int(strategy.split(":", 1)[1])
        except ValueError:
            chunk = 0
        if chunk >= 1:
            return "chunked", chunk
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


# ---------------------------------------------------------------------------------------------
# One replica (no replica axis anywhere below until `_over_replicas`).


def init_replica(
    task: Task,
    x_example: Array,
    init_key: Array,
    perturb_key: Array,
    perturb_scale: Array,
    hparams: Mapping[str, Array],
) -> TrainState:
    """Initial state of one replica from its ``init`` and ``perturb`` keys."""
    variables = task.model.init({"params": init_key}, x_example, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    params = perturb_params(params, perturb_key, perturb_scale)
    opt_state = task.tx.init(params)
    if hparams:
        opt_state = optax.tree_utils.tree_set(opt_state, **hparams)
    return TrainState(params, batch_stats, opt_state, fresh_health())


def perturb_params(params: PyTree, key: Array, scale: Array) -> PyTree:
    """``w + scale * rms(w) * N(0, 1)`` for every parameter array (rms 1 for all-zero arrays).

    With ``scale == 0`` the parameters come back bitwise unchanged.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for leaf, k in zip(leaves, keys, strict=True):
        rms = jnp.sqrt(jnp.mean(jnp.square(leaf)))
        rms = jnp.where(rms > 0, rms, 1.0)
        noise = jax.random.normal(k, leaf.shape, leaf.dtype)
        out.append(jnp.where(scale > 0, leaf + (scale * rms) * noise, leaf))
    return jax.tree.unflatten(treedef, out)


def train_step(
    task: Task,
    state: TrainState,
    x_B: Array,
    y_B: Array,
    idx_B: Array,
    dropout_key: Array,
    augment_key: Array,
    loss_weights: Mapping[str, Array] | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimisation step of one replica on one batch.

    ``idx_B`` are the batch's positions in the training set (``losses.Batch.index``). The
    reported accuracy is the ensemble prediction's for an ``Ensemble``. ``loss_weights``
    (``{name: scalar}``, names as ``losses.weights``) replace the weights of the task's loss
    transforms: the engine passes every weight this way, so they are traced values.
    """
    loss_fn = losses.with_weights(task.loss_fn, loss_weights) if loss_weights else task.loss_fn
    if task.augment is not None:
        x_B = task.augment(augment_key, x_B)
    has_stats = bool(jax.tree.leaves(state.batch_stats))
    ensemble = task.num_components is not None

    def loss_of(params):
        variables = {"params": params}
        if has_stats:
            variables["batch_stats"] = state.batch_stats
            logits, updated = task.model.apply(
                variables, x_B, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"]
            )
            batch_stats = updated["batch_stats"]
        else:
            logits = task.model.apply(variables, x_B, train=True, rngs={"dropout": dropout_key})
            batch_stats = state.batch_stats
        logits_KxBxC = logits if ensemble else logits[None]
        # Trace-time invariants (no run-time cost): what the losses are written against.
        chex.assert_shape(logits_KxBxC, (task.num_components or 1, y_B.shape[0], None))
        chex.assert_rank(y_B, 1)
        batch = losses.Batch(
            x_B, y_B, jax.nn.one_hot(y_B, logits.shape[-1], dtype=jnp.float32), idx_B
        )
        return loss_fn(logits_KxBxC, batch), (logits_KxBxC, batch_stats)

    (loss, (logits_KxBxC, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state.params
    )
    updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    scores_BxC = losses.ensemble_log_probs(logits_KxBxC) if ensemble else logits_KxBxC[0]
    accuracy = jnp.mean((jnp.argmax(scores_BxC, axis=-1) == y_B).astype(jnp.float32))
    new = TrainState(params, batch_stats, opt_state, state.health)
    return new, {"loss": loss, "accuracy": accuracy}


def epoch_batches(order_key: Array, epoch, base_N: Array, window, batch_size: int) -> Array:
    """The example indices ``[steps, batch_size]`` one replica visits in one epoch.

    The epoch's order cut into ``N // batch_size`` full batches; the last ``N mod batch_size``
    examples of the order are left out of that epoch.
    """
    steps = base_N.shape[0] // batch_size
    order_N = randomness.epoch_order(order_key, epoch, base_N, window)
    return order_N[: steps * batch_size].reshape(steps, batch_size)


class ReplicaKeys(NamedTuple):
    """One replica's keys for the sources drawn during training."""

    order: Array
    dropout: Array
    augment: Array
    perturb: Array


def train_epochs(
    task: Task,
    state: TrainState,
    keys: ReplicaKeys,
    x_N: Array,
    y_N: Array,
    base_N: Array,
    window: Array,
    epochs_E: Array,
    *,
    batch_size: int,
    loss_weights: Mapping[str, Array] | None = None,
    divergence: Array | float = DEFAULT_DIVERGENCE,
    perturb_step: Array | int = 0,
    perturb_scale: Array | float = 0.0,
) -> tuple[TrainState, dict[str, Array]]:
    """Trains one replica for the epochs listed in ``epochs_E``; metrics are per-epoch means.

    Each epoch draws the replica's order (``randomness.epoch_order``) and runs
    ``N // batch_size`` steps; the ``N mod batch_size`` examples at the end of that epoch's
    order are not visited in that epoch (with a shuffle they differ from epoch to epoch; with
    window 1 they are always the same examples, the end of the base order). Step ``s`` of epoch
    ``e`` is global step ``e * steps + s``, which the dropout and augment keys fold in.

    ``perturb_step`` t >= 1 (traced): right after the update of global step t - 1 (the t-th
    update), the parameters get ``perturb_params(params, keys.perturb, perturb_scale)``
    (``FitConfig.perturb_step``; t = 0 is initialisation's business and never matches here).
    A ``lax.cond`` on a value shared by all replicas, so no other step pays for the draw.

    After each epoch the divergence rule (``FitConfig.divergence``, factor ``divergence``,
    traced; ``inf`` for non-finite values only) is applied: a replica found diverged keeps the
    state it had before that epoch, every later epoch's update is masked (a select: the other
    replicas' arithmetic is untouched), ``state.health.diverged_at`` records the epoch, and its
    metrics for the epochs after it are NaN.
    """
    steps = x_N.shape[0] // batch_size
    if state.health is None:
        state = state._replace(health=fresh_health())

    def epoch_body(state, epoch):
        order_TxB = epoch_batches(keys.order, epoch, base_N, window, batch_size)

        def step_body(state, inputs):
            idx_B, step = inputs
            state, metrics = train_step(
                task,
                state,
                x_N[idx_B],
                y_N[idx_B],
                idx_B,
                randomness.step_key(keys.dropout, step),
                randomness.step_key(keys.augment, step),
                loss_weights,
            )
            params = _perturb_after(state.params, step, keys.perturb, perturb_step, perturb_scale)
            return state._replace(params=params), metrics

        step_T = epoch * steps + jnp.arange(steps)
        new, step_metrics = lax.scan(step_body, state, (order_TxB, step_T))
        metrics = jax.tree.map(jnp.mean, step_metrics)
        return _apply_divergence_rule(state, new, metrics, step_metrics, epoch, divergence)

    return lax.scan(epoch_body, state, epochs_E)


def _perturb_after(params, step, key, perturb_step, perturb_scale):
    """The parameters after global step ``step`` (0-based): perturbed when this is the
    ``perturb_step``-th update (``FitConfig.perturb_step``), else as they are."""
    return lax.cond(
        step + 1 == perturb_step,
        lambda p: perturb_params(p, key, perturb_scale),
        lambda p: p,
        params,
    )


def _apply_divergence_rule(old, new, metrics, step_metrics, epoch, divergence):
    """One replica after one epoch: ``new``, or ``old`` when it is (or was already) diverged."""
    health = old.health
    # L0 is the first batch's loss; a state resumed without one (built by hand) takes the
    # first batch it trains on (a replica whose L0 is NaN in epoch 0 is frozen already).
    unknown = (epoch == 0) | jnp.isnan(health.first_loss)
    first = jnp.where(unknown, step_metrics["loss"][0], health.first_loss)
    loss = metrics["loss"]
    blown_up = jnp.isfinite(first) & (loss > first + divergence * jnp.maximum(jnp.abs(first), 1.0))
    ok = jnp.isfinite(loss) & _finite_one(new.params) & ~blown_up
    frozen = health.diverged_at >= 0
    keep_old = frozen | ~ok
    kept = jax.tree.map(
        lambda a, b: jnp.where(keep_old, a, b),
        (old.params, old.batch_stats, old.opt_state),
        (new.params, new.batch_stats, new.opt_state),
    )
    diverged_at = jnp.where(frozen, health.diverged_at, jnp.where(ok, -1, epoch))
    state = TrainState(*kept, Health(first.astype(jnp.float32), diverged_at.astype(jnp.int32)))
    metrics = jax.tree.map(lambda m: jnp.where(frozen, jnp.nan, m), metrics)
    return state, metrics


# ---------------------------------------------------------------------------------------------
# The replica axis.


REPLICA_AXIS = "replica"


def use_cpu_devices(count: int | None = None) -> int:
    """Splits the host CPU into ``count`` JAX devices (default: one per core).

    The replica axis is then sharded over them, so replicas train in parallel, one block per
    core. Must be called before JAX runs its first computation (JAX fixes its devices then);
    results do not depend on the count.

    Returns:
      The number of CPU devices asked for.
    """
    if count is None:
        count = os.cpu_count() or 1
    count = checks.integer("use_cpu_devices: count", count, minimum=1)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:
        raise RuntimeError(
            "use_cpu_devices must be called before JAX's first computation (JAX fixes its "
            "devices then); call it right after importing jaxrepro"
        ) from e
    return count


def replica_mesh(num_replicas: int, devices: int | None = None) -> Mesh | None:
    """The 1-D device mesh the replica axis is sharded over, or None for a single device.

    ``devices=None`` takes every device of every process (``jax.devices()``, global in a run
    of several processes), or R of them when there are fewer replicas than devices in a
    single process. In a run of several processes the mesh always spans every device: each
    process must hold a block of the replica axis to take part in the computation. R need
    not be a multiple of the count: ``Placement`` pads the replica axis.
    """
    if int(num_replicas) < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if devices is not None and int(devices) < 1:
        raise ValueError(f"devices must be >= 1 (or None), got {devices}")
    available = jax.devices()
    processes = jax.process_count()
    if devices is None:
        devices = len(available) if processes > 1 else min(num_replicas, len(available))
    devices = int(devices)
    if devices > len(available):
        raise ValueError(
            f"devices={devices} but only {len(available)} "
            f"{jax.default_backend()} devices exist"
            + (f" across {processes} processes" if processes > 1 else "")
        )
    if processes > 1 and devices != len(available):
        raise ValueError(
            f"devices={devices}: a run of {processes} processes shards the replicas over all "
            f"{len(available)} devices of all processes (leave devices unset)"
        )
    if devices == 1:
        return None
    return Mesh(np.asarray(available[:devices]), (REPLICA_AXIS,))


def _device_memory_bytes(device) -> int | None:
    """The memory an accelerator's allocator may use (``bytes_limit``), or None when the
    backend does not report it (CPU). The limit, not what is free at the moment: the same
    hardware then always gives the same strategy (and so the same bits), on every process and
    on every rerun or resume."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


@functools.cache
def replica_memory_bytes(task: Task, example_shape: tuple[int, ...], batch_size: int) -> int:
    """Estimated device memory of one replica while it trains: its state, its optimizer state
    and the buffers of one training step on one batch of inputs shaped ``example_shape``
    (XLA's own memory analysis of the compiled step, the state donated as in training; at
    least 4x the state, the floor where the backend gives no analysis). Cached per task and
    shape."""
    x_1 = jax.ShapeDtypeStruct((1,) + tuple(example_shape), jnp.float32)
    x_B = jax.ShapeDtypeStruct((batch_size,) + tuple(example_shape), jnp.float32)
    y_B = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    key = jax.random.key(0, impl=randomness.PRNG_IMPL)
    state = jax.eval_shape(lambda x: init_replica(task, x, key, key, jnp.float32(0.0), {}), x_1)
    state_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state))
    try:
        compiled = (
            jax.jit(functools.partial(train_step, task), donate_argnums=0)
            .lower(state, x_B, y_B, y_B, key, key)
            .compile()
        )
        mem = compiled.memory_analysis()
        total = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - no memory analysis on this backend
        total = 0
    # The divergence rule keeps the state from before the epoch for its select: one more copy.
    return int(max(total, 4 * state_bytes) + state_bytes)


def choose_strategy(
    replicas_per_device: int,
    bytes_per_replica: int,
    free_bytes: int | None,
    *,
    headroom: float = 0.8,
) -> tuple[str, int]:
    """``"auto"`` on an accelerator: ``vmap`` over all of a device's replicas when they fit in
    ``headroom`` of ``free_bytes`` (the device's memory less the training data), else
    ``chunked:n`` with the largest n that fits (at least 1). Unknown memory: ``vmap``."""
    if free_bytes is None:
        return "vmap", 0
    fits = int(headroom * free_bytes) // max(1, int(bytes_per_replica))
    if fits >= replicas_per_device:
        return "vmap", 0
    return "chunked", max(1, fits)


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """Where the replica axis lives: the strategy, the device mesh and the padding.

    The R replicas are padded to ``num_padded`` (a multiple of the mesh size) with copies of
    the last replica: its index, its hyperparameters, its state. The copies are computed like
    any replica and dropped by ``unpad`` and ``to_host``, the only ways results leave the
    device, so they never reach a returned value, a metric or a file.

    On the device a stacked array is ``[num_padded, ...]`` sharded over the mesh's
    ``replica`` axis (a global array spanning every process in a multi-process run). What the
    user holds is ``[R, ...]``: the same array when nothing is padded in a single process,
    else a copy replicated over the mesh, which every process can read.
    """

    strategy: tuple[str, int]
    mesh: Mesh | None
    num_replicas: int
    num_padded: int

    @classmethod
    def create(
        cls,
        num_replicas: int,
        strategy: str,
        devices: int | None = None,
        *,
        memory: Callable[[], int] | None = None,
        shared_bytes: int = 0,
    ) -> Placement:
        """The placement of ``num_replicas`` replicas.

        ``memory`` (called only for ``"auto"`` on an accelerator) estimates the bytes of one
        training replica; ``shared_bytes`` is what every device holds besides (the training
        data). The accelerator rule reads the memory limit of process 0's first device and
        sends it to every process, so all processes choose the same strategy.
        """
        mesh = replica_mesh(num_replicas, devices)
        size = 1 if mesh is None else mesh.size
        padded = -(-num_replicas // size) * size
        if strategy == "auto" and jax.default_backend() != "cpu" and memory is not None:
            limit = distributed.from_writer(_device_memory_bytes(jax.local_devices()[0]))
            free = None if limit is None else max(0, limit - int(shared_bytes))
            kind = choose_strategy(padded // size, memory(), free)
        else:
            kind = parse_strategy(strategy)
        return cls(kind, mesh, int(num_replicas), int(padded))

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def num_pad(self) -> int:
        return self.num_padded - self.num_replicas

    def _sharding(self, spec: P):
        return None if self.mesh is None else NamedSharding(self.mesh, spec)

    def pad_host(self, x_R: np.ndarray) -> np.ndarray:
        """A host array ``[R, ...]`` padded to ``[num_padded, ...]`` with its last row."""
        x_R = np.asarray(x_R)
        if not self.num_pad:
            return x_R
        return np.concatenate([x_R, np.repeat(x_R[-1:], self.num_pad, axis=0)])

    def shard(self, x_R) -> Array:
        """A host array ``[R, ...]`` as a device array ``[num_padded, ...]`` split over the
        replica axis."""
        x = self.pad_host(x_R)
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(
            x.shape, self._sharding(P(REPLICA_AXIS)), lambda index: x[index]
        )

    def replicate(self, x) -> Array:
        """A host array the same for every replica, on every device of the mesh."""
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, self._sharding(P()), lambda index: x[index])

    def pad(self, tree_R: PyTree) -> PyTree:
        """A stacked tree ``[R, ...]`` (host or device) laid out for training."""
        leading = {int(np.shape(a)[0]) if np.ndim(a) else None for a in jax.tree.leaves(tree_R)}
        if leading - {self.num_replicas}:
            raise ValueError(
                f"a stacked state must have a leading replica axis of "
                f"{self.num_replicas} on every array; got leading sizes "
                f"{sorted(leading, key=str)}"
            )
        if self.mesh is None:
            return tree_R
        return _pad_fn(self.num_padded, self._sharding(P(REPLICA_AXIS)))(tree_R)

    def unpad(self, tree: PyTree) -> PyTree:
        """A device tree ``[num_padded, ...]`` as ``[R, ...]`` readable on every process."""
        if self.mesh is None or (not self.num_pad and jax.process_count() == 1):
            return tree
        return _unpad_fn(self.num_replicas, self._sharding(P()))(tree)

    def to_host(self, tree: PyTree) -> PyTree:
        """A device tree ``[num_padded, ...]`` as NumPy ``[R, ...]``, the same on every process:
        the one way results are read back (gathered across processes where needed)."""
        if self.mesh is not None and jax.process_count() > 1:
            tree = self.unpad(tree)
        return jax.tree.map(lambda a: np.asarray(a)[: self.num_replicas], tree)


@functools.cache
def _pad_fn(num_padded: int, sharding):
    def pad(a):
        extra = num_padded - a.shape[0]
        return jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)]) if extra else a

    return jax.jit(lambda tree: jax.tree.map(pad, tree), out_shardings=sharding)


@functools.cache
def _unpad_fn(num_replicas: int, sharding):
    return jax.jit(
        lambda tree: jax.tree.map(lambda a: a[:num_replicas], tree), out_shardings=sharding
    )


def _over_replicas(
    fn: Callable,
    strategy: tuple[str, int],
    mesh: Mesh | None,
    per_replica: tuple,
    shared: tuple = (),
):
    """The one place the replica axis enters: ``fn(*replica_slice, *shared)`` for each replica.

    ``per_replica`` arrays have a leading replica axis; ``shared`` ones are the same for all
    replicas. With a mesh, each device runs the strategy over its own block of replicas
    (``shard_map``); the data and other shared arrays are replicated.
    """
    kind, chunk = strategy

    def local(per_replica, shared):
        one = lambda *a: fn(*a, *shared)
        if kind == "vmap":
            return jax.vmap(one)(*per_replica)
        return lax.map(
            lambda a: one(*a), per_replica, batch_size=chunk if kind == "chunked" else None
        )

    if mesh is None:
        return local(per_replica, shared)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(REPLICA_AXIS), P()),
        out_specs=P(REPLICA_AXIS),
        check_vma=False,
    )(per_replica, shared)


DETERMINISTIC_OPTIONS = {"xla_gpu_deterministic_ops": True}
"""XLA compiler options of ``FitConfig(deterministic=True)``: deterministic GPU kernels (no
atomics in reductions and scatters, no run-to-run choice between algorithms). A GPU option;
the CPU and TPU backends accept it and are deterministic without it."""


def _jit_pair(*, static_argnames=(), donate_argnames=()):
    """``fn`` jitted twice, plainly and with ``DETERMINISTIC_OPTIONS``; the wrapper takes a
    ``deterministic`` keyword that picks one (each compiles on first use only)."""

    def wrap(fn):
        plain = jax.jit(fn, static_argnames=static_argnames, donate_argnames=donate_argnames)
        det = jax.jit(
            fn,
            static_argnames=static_argnames,
            donate_argnames=donate_argnames,
            compiler_options=DETERMINISTIC_OPTIONS,
        )

        @functools.wraps(fn)
        def call(*args, deterministic: bool = False, **kwargs):
            return (det if deterministic else plain)(*args, **kwargs)

        return call

    return wrap


def _keys_for(seed, replica: Array, varied_V: Array) -> ReplicaKeys:
    return ReplicaKeys(
        *(
            randomness.replica_key(seed, s, replica, varied=varied_V[randomness.SOURCE_IDS[s]])
            for s in ReplicaKeys._fields
        )
    )


@_jit_pair(static_argnames=("task", "strategy", "mesh"))
def _init_states(
    ids_R, seed, varied_V, x_example, perturb_scale, hparams_R, *, task, strategy, mesh
):
    TRACE_COUNTS["init"] += 1

    def one(r, hparams, seed, varied_V, x_example, perturb_scale):
        ids = randomness.SOURCE_IDS
        init_key = randomness.replica_key(seed, "init", r, varied=varied_V[ids["init"]])
        perturb_key = randomness.replica_key(seed, "perturb", r, varied=varied_V[ids["perturb"]])
        return init_replica(task, x_example, init_key, perturb_key, perturb_scale, hparams)

    return _over_replicas(
        one, strategy, mesh, (ids_R, hparams_R), (seed, varied_V, x_example, perturb_scale)
    )


@_jit_pair(
    static_argnames=("task", "strategy", "mesh", "batch_size", "num_epochs"),
    donate_argnames=("state_R",),
)
def _train_epochs_R(
    state_R,
    ids_R,
    weights_R,
    seed,
    varied_V,
    x_N,
    y_N,
    window,
    first_epoch,
    divergence,
    perturb_step,
    perturb_scale,
    *,
    task,
    strategy,
    mesh,
    batch_size,
    num_epochs,
):
    TRACE_COUNTS["train_epochs"] += 1
    base_N = randomness.base_order(seed, x_N.shape[0])
    epochs_E = first_epoch + jnp.arange(num_epochs, dtype=jnp.int32)

    def one(
        state, r, weights, seed, varied_V, x_N, y_N, base_N, window, epochs_E, divergence, t, eps
    ):
        return train_epochs(
            task,
            state,
            _keys_for(seed, r, varied_V),
            x_N,
            y_N,
            base_N,
            window,
            epochs_E,
            batch_size=batch_size,
            loss_weights=weights,
            divergence=divergence,
            perturb_step=t,
            perturb_scale=eps,
        )

    return _over_replicas(
        one,
        strategy,
        mesh,
        (state_R, ids_R, weights_R),
        (
            seed,
            varied_V,
            x_N,
            y_N,
            base_N,
            window,
            epochs_E,
            divergence,
            perturb_step,
            perturb_scale,
        ),
    )


@functools.partial(jax.jit, static_argnames=("batch_size", "num_train"))
def _batches_R(ids_R, seed, varied_V, num_train, window, epoch, *, batch_size):
    base_N = randomness.base_order(seed, num_train)
    keys_R = jax.vmap(lambda r: _keys_for(seed, r, varied_V).order)(ids_R)
    return jax.vmap(lambda k: epoch_batches(k, epoch, base_N, window, batch_size))(keys_R)


def _finite_one(params) -> Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(params)]))


@_jit_pair(static_argnames=("strategy", "mesh"))
def _finite_R(params_R, *, strategy, mesh):
    return _over_replicas(_finite_one, strategy, mesh, (params_R,))


@_jit_pair(static_argnames=("model", "strategy", "mesh", "components", "probs"))
def _predict_chunk(params_R, batch_stats_R, x_B, *, model, strategy, mesh, components, probs):
    """Every replica's logits (or probabilities) for one chunk of examples. The softmax runs
    inside the per-replica function, so a replica's probabilities are bitwise the same
    whatever R, the strategy's batching or the device count."""

    def one(params, batch_stats, x_B):
        variables = {"params": params}
        if jax.tree.leaves(batch_stats):
            variables["batch_stats"] = batch_stats
        logits = model.apply(variables, x_B, train=False)
        if models.num_components(model) is None:
            out = logits[None] if components else logits
        else:
            out = logits if components else losses.ensemble_log_probs(logits)
        return jax.nn.softmax(out, axis=-1) if probs else out

    return _over_replicas(one, strategy, mesh, (params_R, batch_stats_R), (x_B,))


# ---------------------------------------------------------------------------------------------
# The user-facing API.


def _check_data(data) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test", "num_classes"):
        if not hasattr(data, name):
            raise checks.BadType(
                f"data must be a jaxrepro.data.Dataset (or have x_train, y_train, x_test, y_test "
                f"and num_classes); it has no {name!r}"
            )


def _check_task(task: Task) -> None:
    """The parts of a task are what they claim to be (a string loss would otherwise fail deep
    inside tracing)."""
    if not isinstance(task.model, nn.Module):
        raise checks.BadType(f"model must be a Flax linen Module, got {type(task.model).__name__}")
    if not (
        callable(getattr(task.tx, "init", None)) and callable(getattr(task.tx, "update", None))
    ):
        raise checks.BadType(
            f"tx must be an optax GradientTransformation (with init and update), got {task.tx!r}"
        )
    if not callable(task.loss_fn):
        raise checks.BadType(
            f"loss_fn must be a loss of jaxrepro.losses (e.g. losses.softmax_cross_entropy()) "
            f"or a function (logits_KxBxC, batch) -> scalar, got {task.loss_fn!r}"
        )
    if task.augment is not None and not callable(task.augment):
        raise checks.BadType(
            f"augment must be a function (key, x_B) -> x_B or None, got {task.augment!r}"
        )


def _per_replica(name: str, values: np.ndarray, num_replicas: int) -> np.ndarray:
    if values.ndim == 0:
        values = np.full((num_replicas,), values, np.float32)
    if values.shape != (num_replicas,):
        raise ValueError(
            f"hparams[{name!r}] must hold one value per replica, shape ({num_replicas},); "
            f"got shape {values.shape}"
        )
    return values


def _check_hparams(
    hparams: Mapping[str, Any] | None, num_replicas: int, opt_state_example, loss_fn
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``hparams`` split into the optimizer's (``inject_hyperparams``) and the loss weights
    (``losses.weights``), each ``{name: float32 [R]}``; every weight of the loss is in the
    second, its static value repeated where ``hparams`` does not name it."""
    if hparams is not None and not isinstance(hparams, Mapping):
        raise checks.BadType(
            f"hparams must be a mapping {{name: one value per replica}}, got "
            f"{type(hparams).__name__}"
        )
    loss_weights = losses.weights(loss_fn)
    opt, weights = {}, {}
    for name, values in (hparams or {}).items():
        in_optimizer = optax.tree_utils.tree_get(opt_state_example, name, _MISSING) is not _MISSING
        if name in loss_weights and in_optimizer:
            raise ValueError(
                f"hparams[{name!r}] names both a weight of the loss and a hyperparameter of the "
                "optimizer; rename one of them"
            )
        if name in loss_weights:
            weights[name] = _per_replica(
                name, losses.check_weight(loss_fn, name, values), num_replicas
            )
            continue
        try:
            values = np.asarray(values, np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"hparams[{name!r}] must hold numbers, got {values!r}") from None
        values = _per_replica(name, values, num_replicas)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"hparams[{name!r}] holds NaN or inf")
        if not in_optimizer:
            raise ValueError(
                f"hparams[{name!r}]: the optimizer state has no hyperparameter {name!r} (build "
                f"the optimizer with optax.inject_hyperparams(...) so it can differ per replica), "
                f"and the loss has no weight of that name (its weights: "
                f"{', '.join(loss_weights) or 'none'})"
            )
        opt[name] = values
    for name, value in loss_weights.items():
        weights.setdefault(name, np.full((num_replicas,), value, np.float32))
    return opt, weights


_MISSING = object()


class Engine:
    """Trains a set of replicas of one task on one dataset; the resumable core of ``fit``.

    ``init()`` gives the stacked initial state; ``train(state, first_epoch, num_epochs)``
    continues it. A checkpointed state and its epoch count are all a resumed run needs: every
    draw derives from (seed, source, replica, step).

    States passed in and out are ``[R, ...]``; inside, the replica axis is padded and sharded
    as ``placement`` says. In a run of several processes (after ``jax.distributed.initialize``)
    every process builds the same Engine and makes the same calls; each computes its block of
    replicas, and what comes back (states, histories, predictions) is the whole ``[R, ...]``
    on every process.
    """

    def __init__(
        self, task: Task, data, config: FitConfig, *, hparams: Mapping[str, Any] | None = None
    ):
        if not isinstance(config, FitConfig):
            raise checks.BadType(f"config must be a FitConfig, got {type(config).__name__}")
        if config.portable:
            portable.require()  # before anything starts JAX's backend
        _check_data(data)
        _check_task(task)
        self.task, self.data, self.config = task, data, config
        self.replica_ids = config.replica_ids
        num_train = int(np.shape(data.x_train)[0])
        if config.batch_size > num_train:
            raise ValueError(
                f"batch_size {config.batch_size} is larger than the training set "
                f"({num_train} examples)"
            )
        self.steps_per_epoch = num_train // config.batch_size
        total_steps = config.epochs * self.steps_per_epoch
        if config.perturb_step > total_steps:
            raise ValueError(
                f"perturb_step={config.perturb_step} is after the last step: {config.epochs} "
                f"epochs of {self.steps_per_epoch} steps make {total_steps} (perturb_step "
                f"{total_steps} perturbs the final weights)"
            )
        self.window = num_train if config.window is None else min(int(config.window), num_train)
        self._varied_V = randomness.varied_mask(config.vary)
        inner = getattr(task.model, "model", None)  # an Ensemble's component
        fixed_init = getattr(task.model, "fixed_init", False) or getattr(inner, "fixed_init", False)
        if fixed_init and "init" in randomness.check_sources(config.vary):
            raise ValueError(
                "vary includes 'init' but the model is an nnx.Module instance, which carries "
                "one set of initial parameters; pass nnx_models.FromNNX.of(ModelClass, *args) so "
                "each replica draws its own from the init source, or leave 'init' fixed"
            )
        x_host = np.asarray(data.x_train)  # kept as JAX would keep it (float64 -> float32)
        x_host = x_host.astype(jax.dtypes.canonicalize_dtype(x_host.dtype), copy=False)
        y_host = np.asarray(data.y_train)
        y_host = y_host.astype(jax.dtypes.canonicalize_dtype(y_host.dtype), copy=False)
        x_example = jnp.asarray(x_host[:1])

        def shapes(x):  # one abstract trace of init: logits, parameters, optimizer state
            logits, variables = task.model.init_with_output(
                {"params": jax.random.key(0)}, x, train=False
            )
            return logits, variables["params"], task.tx.init(variables["params"])

        try:
            logits_example, params_example, opt_example = jax.eval_shape(shapes, x_example)
        except Exception as e:  # noqa: BLE001 - the model (or optimizer) rejects the inputs
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"the model {type(task.model).__name__} (with its optimizer) cannot be "
                f"initialised on this dataset's inputs of shape {tuple(x_host.shape[1:])} per "
                f"example: {type(e).__name__}: {first} (model.init on one example shows where)"
            ) from None
        k = task.num_components
        expected = 2 if k is None else 3
        if len(logits_example.shape) != expected:
            raise ValueError(
                "the model must return logits [B, C]"
                + (" (an Ensemble: [K, B, C])" if k else "")
                + f"; it returned shape {logits_example.shape} for a batch of 1"
            )
        if logits_example.shape[-1] != int(data.num_classes):
            raise ValueError(
                f"the model outputs {logits_example.shape[-1]} logits per example but the "
                f"dataset {getattr(data, 'name', '')!r} has {data.num_classes} classes"
            )
        losses.check(
            task.loss_fn,
            num_components=k or 1,
            num_train=num_train,
            num_classes=int(data.num_classes),
        )
        hparams_R, weights_R = _check_hparams(
            hparams, len(self.replica_ids), opt_example, task.loss_fn
        )
        # What the compiled functions are cached by: an optimizer equal to one seen before is
        # replaced by it (``compilation.canonical_optimizer``), and the loss's weights are
        # zeroed (``losses.canonical``) because they are passed at run time, per replica.
        self._compiled_task = dataclasses.replace(
            task,
            tx=compilation.canonical_optimizer(task.tx, params_example),
            loss_fn=losses.canonical(task.loss_fn),
        )
        compiled_task = self._compiled_task
        self.placement = Placement.create(
            len(self.replica_ids),
            config.strategy,
            config.devices,
            memory=lambda: replica_memory_bytes(
                compiled_task, tuple(x_host.shape[1:]), config.batch_size
            ),
            shared_bytes=x_host.nbytes + y_host.nbytes,
        )
        pl = self.placement
        self._ids_R = pl.shard(self.replica_ids)
        self._hparams_R = {name: pl.shard(v) for name, v in hparams_R.items()}
        self._loss_weights_R = {name: pl.shard(v) for name, v in weights_R.items()}
        self.loss_weights = weights_R
        """``{name: float32 [R]}``: each replica's weight of each loss transform."""
        self._x_N = pl.replicate(x_host)
        self._y_N = pl.replicate(y_host)
        self._x_example = pl.replicate(x_host[:1])
        self._num_train = num_train
        self.input_shape = tuple(x_host.shape[1:])

    @property
    def num_replicas(self) -> int:
        return len(self.replica_ids)

    @property
    def strategy(self) -> tuple[str, int]:
        return self.placement.strategy

    @property
    def mesh(self) -> Mesh | None:
        return self.placement.mesh

    def _init_padded(self) -> TrainState:
        c = self.config
        # Initialisation depends on the model and optimizer only: tasks that differ in their
        # loss or augmentation (a sweep over a loss weight) share its compilation.
        init_task = Task(model=self.task.model, tx=self._compiled_task.tx)
        return _init_states(
            self._ids_R,
            jnp.uint32(c.seed),
            self._varied_V,
            self._x_example,
            jnp.float32(c.initial_perturb_scale),
            self._hparams_R,
            task=init_task,
            strategy=self.strategy,
            mesh=self.mesh,
            deterministic=c.deterministic,
        )

    def init(self) -> TrainState:
        """The stacked initial state ``[R, ...]``."""
        return self.placement.unpad(self._init_padded())

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of ``init()``'s state, computing nothing (what a
        checkpoint is restored into)."""
        shapes = jax.eval_shape(self._init_padded)
        pl = self.placement
        sharding = (
            pl._sharding(P())
            if pl.mesh is not None
            else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        )
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(
                (pl.num_replicas,) + a.shape[1:], a.dtype, sharding=sharding
            ),
            shapes,
        )

    def batch_indices(self, epoch: int) -> np.ndarray:
        """int ``[R, steps, batch_size]``: the training examples each replica visits in ``epoch``.

        Computed by the same function the training step uses.
        """
        c = self.config
        epoch = checks.integer("epoch", epoch, minimum=0)
        return np.asarray(
            _batches_R(
                jnp.asarray(self.replica_ids),
                jnp.uint32(c.seed),
                self._varied_V,
                self._num_train,
                jnp.int32(self.window),
                jnp.int32(epoch),
                batch_size=c.batch_size,
            )
        )

    def _train_padded(
        self, state: TrainState, first_epoch: int, num_epochs: int, *, to_host: bool = True
    ) -> tuple[TrainState, dict[str, np.ndarray]]:
        c = self.config
        state, metrics = _train_epochs_R(
            state,
            self._ids_R,
            self._loss_weights_R,
            jnp.uint32(c.seed),
            self._varied_V,
            self._x_N,
            self._y_N,
            jnp.int32(self.window),
            jnp.int32(first_epoch),
            jnp.float32(np.inf if c.divergence is None else c.divergence),
            jnp.int32(c.perturb_step),
            jnp.float32(c.effective_perturb_scale),
            task=self._compiled_task,
            strategy=self.strategy,
            mesh=self.mesh,
            batch_size=c.batch_size,
            num_epochs=num_epochs,
            deterministic=c.deterministic,
        )
        if not to_host:  # left on the device: the next dispatch need not wait for this one
            return state, metrics
        metrics = self.placement.to_host(metrics)
        return state, {k: np.asarray(v, np.float32) for k, v in metrics.items()}

    def train(
        self, state: TrainState, first_epoch: int, num_epochs: int
    ) -> tuple[TrainState, dict[str, np.ndarray]]:
        """Runs epochs ``first_epoch .. first_epoch + num_epochs - 1``.

        The input ``state`` is donated (its buffers are reused); use the returned one.

        Returns:
          The new stacked state and ``{"loss", "accuracy"}``, each float ``[R, num_epochs]``:
          per-replica means over the epoch's training batches.
        """
        first_epoch = checks.integer("first_epoch", first_epoch, minimum=0)
        num_epochs = checks.integer("num_epochs", num_epochs, minimum=1)
        state = self.placement.pad(self._with_health(state))
        state, metrics = self._train_padded(state, first_epoch, num_epochs)
        return self.placement.unpad(state), metrics

    def _with_health(self, state: TrainState) -> TrainState:
        """A stacked state ``[R, ...]`` with a ``Health`` (a fresh one when built by hand)."""
        if state.health is not None:
            return state
        r = self.num_replicas
        return state._replace(health=jax.tree.map(lambda a: np.full((r,), a), fresh_health()))

    def run(
        self,
        state: TrainState | None = None,
        *,
        first_epoch: int = 0,
        history: Mapping[str, np.ndarray] | None = None,
        callback: Callable[[int, TrainState, dict[str, np.ndarray]], None] | None = None,
        callback_state: Callable[[int], bool] | None = None,
        progress: bool | str = False,
    ) -> Run:
        """Trains to the config's last epoch, from the start or from a saved point.

        Dispatches ``config.epochs_per_call`` epochs at a time. ``fit`` is this from the start;
        a resumed run passes the restored ``state``, its ``first_epoch`` and the ``history`` of
        the epochs before it, and ends bitwise where an uninterrupted run would.

        Args:
          state: the stacked state ``[R, ...]`` after ``first_epoch`` epochs (default:
            ``init()``).
          first_epoch: epochs already trained.
          history: ``{"loss", "accuracy"}`` float ``[R, first_epoch]`` of those epochs.
          callback: called after each dispatch as ``callback(epochs_done, state, history)``
            (to checkpoint, say), on every process; the state is ``[R, ...]`` and may be
            donated to the next dispatch, so the callback must finish with it before returning.
          callback_state: ``callback_state(epochs_done)`` says whether the callback needs the
            state after that dispatch (default: always); when it does not, it gets None. In a
            padded or multi-process run the ``[R, ...]`` state is a copy gathered onto every
            device, which a callback that checkpoints every few epochs need not pay for at
            every epoch.
          progress: show a progress bar (``progress_bar``) over the epochs, with the replica
            count and the replicas' mean training loss of the last epoch; a string is the bar's
            label. Reading the loss waits for each dispatch, so a run with a bar cannot queue
            its next dispatch before the last one ends (a negligible cost per epoch).

        Returns:
          A ``Run`` with the whole history ``[R, epochs]``.
        """
        c = self.config
        first_epoch = checks.integer("first_epoch", first_epoch, minimum=0, maximum=c.epochs)
        if not isinstance(progress, (bool, str)):
            raise checks.BadType(f"progress must be a bool or a label, got {progress!r}")
        if history is not None:
            for k in ("loss", "accuracy"):
                shape = np.shape(history[k]) if k in history else None
                if shape != (self.num_replicas, first_epoch):
                    raise ValueError(
                        f"history[{k!r}] must be [R, first_epoch] = "
                        f"({self.num_replicas}, {first_epoch}), got {shape}"
                    )
        compilation.release_near_map_limit()  # a long process's programs, before this one's
        start = time.perf_counter()
        compile_start = compilation.compile_seconds()
        state = (
            self._init_padded() if state is None else self.placement.pad(self._with_health(state))
        )
        past = {
            k: [np.asarray(history[k], np.float32)]
            if history is not None
            else [np.zeros((self.num_replicas, 0), np.float32)]
            for k in ("loss", "accuracy")
        }
        done = first_epoch
        pending = []  # without a callback, the metrics stay on the device until the end
        bar = progress_bar(progress, c.epochs, first_epoch, self.num_replicas)
        try:
            while done < c.epochs:
                n = min(c.epochs_per_call, c.epochs - done)
                to_host = callback is not None or progress is not False
                state, metrics = self._train_padded(state, done, n, to_host=to_host)
                done += n
                if bar is not None:  # the loss came to the host on every process (collective)
                    _advance(bar, n, np.asarray(metrics["loss"], np.float32)[:, -1])
                if not to_host:
                    pending.append(metrics)
                else:
                    for k in past:
                        past[k].append(np.asarray(metrics[k], np.float32))
                if callback is not None:
                    wanted = callback_state is None or callback_state(done)
                    callback(
                        done,
                        self.placement.unpad(state) if wanted else None,
                        {k: np.concatenate(v, axis=1) for k, v in past.items()},
                    )
        finally:
            if bar is not None:
                bar.close()
        for metrics in pending:
            metrics = self.placement.to_host(metrics)
            for k in past:
                past[k].append(np.asarray(metrics[k], np.float32))
        jax.block_until_ready(state)
        return Run(
            task=self.task,
            config=c,
            device_state=state,
            placement=self.placement,
            replica_ids=self.replica_ids,
            history={k: np.concatenate(v, axis=1) for k, v in past.items()},
            seconds=time.perf_counter() - start,
            compile_seconds=compilation.compile_seconds() - compile_start,
            loss_weights=dict(self.loss_weights),
            input_shape=self.input_shape,
        )


def progress_bar(progress: bool | str, total: int, initial: int, num_replicas: int):
    """A tqdm bar over ``total`` epochs (``tqdm.auto``: a widget in a notebook, text on a
    terminal), or None when ``progress`` is False or this is not process 0 of a multi-process
    run. A string ``progress`` is the bar's label (default: the replica count)."""
    if progress is False or not distributed.is_writer():
        return None
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else f"{num_replicas} replicas"
    return tqdm(
        total=total, initial=initial, unit="epoch", desc=label, dynamic_ncols=True, leave=True
    )


def _advance(bar, epochs: int, last_loss_R: np.ndarray) -> None:
    """Moves the bar on by ``epochs`` and shows the finite replicas' mean loss."""
    finite = last_loss_R[np.isfinite(last_loss_R)]
    loss = f"{float(finite.mean()):.4f}" if finite.size else "nan"
    diverged = int(last_loss_R.size - finite.size)
    bar.set_postfix(loss=loss, **({"diverged": diverged} if diverged else {}), refresh=False)
    bar.update(epochs)


@dataclasses.dataclass
class Run:
    """Trained replicas: stacked state, per-epoch history, and prediction.

    In a run of several processes every process holds the same ``Run``: ``history``,
    ``diverged``, ``state`` and ``predict`` give the whole ``[R, ...]`` result on each of
    them (so the same script, run as every process, reads its results the same way; only the
    writing of files is left to process 0, see ``jaxrepro.distributed``). Reading ``state``,
    ``diverged``, ``diverged_epoch``, ``predict`` or ``replica`` there is a collective
    computation: every process
    must make the call, not process 0 alone.

    ``state`` is ``[R, ...]``; assigning it (or ``with_state``) lays the new state out as
    training did, and ``predict`` and ``diverged`` then use it.

    Attributes:
      task: the static description of the training.
      config: the ``FitConfig`` used.
      device_state: the stacked ``TrainState`` as training left it, ``[num_padded, ...]``
        sharded over devices (``placement`` says how). The one attribute that holds the
        padding replicas: the device layout itself, for code that continues on the device.
      placement: the strategy, mesh and padding of the replica axis.
      replica_ids: int ``[R]``, the replica indices (keys) of the stacked replicas.
      history: ``{"loss", "accuracy"}``, float ``[R, epochs]`` training means per epoch.
      seconds: wall time of training (compilation included).
      compile_seconds: the part of ``seconds`` spent tracing, lowering and compiling
        (``compilation.compile_seconds``, an upper bound); 0 when every program was compiled
        before.
      loss_weights: ``{name: float32 [R]}``, each replica's weight of each loss transform
        (``losses.weights``; from ``hparams`` or the loss itself). ``task.loss_fn`` holds the
        loss as given: to continue training with ``Engine``, pass these as its ``hparams``.
      input_shape: the shape of one training example; ``predict`` takes ``[N, *input_shape]``
        (empty: not recorded, not checked).
    """

    task: Task
    config: FitConfig
    device_state: TrainState
    placement: Placement
    replica_ids: np.ndarray
    history: dict[str, np.ndarray]
    seconds: float = 0.0
    compile_seconds: float = 0.0
    loss_weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    input_shape: tuple[int, ...] = ()

    @property
    def num_replicas(self) -> int:
        return len(self.replica_ids)

    @property
    def state(self) -> TrainState:
        """The stacked ``TrainState`` ``[R, ...]`` (padding replicas dropped), readable with
        ``np.asarray`` on every process; computed once per ``device_state``."""
        cached = self.__dict__.get("_state_cache")
        if cached is None or cached[0] is not self.device_state:
            cached = (self.device_state, self.placement.unpad(self.device_state))
            self.__dict__["_state_cache"] = cached
        return cached[1]

    @state.setter
    def state(self, state: TrainState) -> None:
        self.device_state = self.placement.pad(state)

    @property
    def diverged(self) -> np.ndarray:
        """bool ``[R]``: the replica diverged in training (``FitConfig.divergence``: its loss
        became NaN or infinite or blew up; it was frozen, see ``diverged_epoch``), or its
        parameters are NaN or infinite now (a state assigned by hand)."""
        pl = self.placement
        finite = pl.to_host(
            _finite_R(
                self.device_state.params,
                strategy=pl.strategy,
                mesh=pl.mesh,
                deterministic=self.config.deterministic,
            )
        )
        in_training = (self.diverged_epoch >= 0) | ~np.all(np.isfinite(self.history["loss"]), 1)
        return in_training | ~np.asarray(finite, bool)

    @property
    def diverged_epoch(self) -> np.ndarray:
        """int ``[R]``: the epoch (0-based, the ``history`` column) after which each replica was
        found diverged and frozen, or -1. Its parameters are those from before that epoch."""
        health = self.device_state.health
        if health is None:
            return np.full((self.num_replicas,), -1, np.int64)
        return np.asarray(self.placement.to_host(health.diverged_at), np.int64)

    def with_state(self, state: TrainState) -> Run:
        """This run with another stacked state ``[R, ...]`` (edited parameters, say), laid out
        as training left this one's; history and config are kept."""
        return dataclasses.replace(self, device_state=self.placement.pad(state))

    def replica(self, index: int) -> TrainState:
        """The state of the replica at position ``index`` of the stack (not its key index)."""
        return jax.tree.map(lambda a: a[index], self.state)

    def predict(
        self, x, *, logits: bool = False, components: bool = False, chunk_size: int = 1024
    ) -> np.ndarray:
        """Stacked predictions ``[R, N, C]`` in eval mode, computed in chunks of examples.

        For an ``Ensemble`` model the prediction is the ensemble's, the mean of its components'
        probabilities (its logits: their log, ``losses.ensemble_log_probs``). Each replica's
        prediction is computed by the same per-replica function whatever R and the device
        count, softmax included.

        Args:
          x: inputs ``[N, ...]`` shaped like the training inputs.
          logits: return logits instead of softmax probabilities.
          components: return every component, ``[R, K, N, C]`` (K = 1 for a plain model).
          chunk_size: examples per compiled call; memory is ``O(R * chunk_size * C)`` on the
            device (on every device when it is gathered: padded or multi-process runs). The
            last chunk is padded so every call has the same shape.

        Returns:
          float32 numpy ``[R, N, C]`` (``[R, K, N, C]`` with ``components``), the same on
          every process.
        """
        chunk_size = checks.integer("predict: chunk_size", chunk_size, minimum=1)
        logits = checks.boolean("predict: logits", logits)
        components = checks.boolean("predict: components", components)
        x = np.asarray(x)
        if not (
            x.dtype == np.bool_
            or np.issubdtype(x.dtype, np.integer)
            or np.issubdtype(x.dtype, np.floating)
        ):
            raise checks.BadType(f"predict: x must hold real numbers, got dtype {x.dtype}")
        want = "[N, " + ", ".join(map(str, self.input_shape)) + "]" if self.input_shape else None
        if x.ndim < 2:
            raise ValueError(
                f"predict: x must be {want or '[N, ...]'} with an example axis, got shape {x.shape}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"predict: x is empty (shape {x.shape}); it needs examples")
        if self.input_shape and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"predict: x must be {want} like the training inputs, got shape {x.shape} "
                f"(examples of shape {tuple(x.shape[1:])}, not {self.input_shape})"
            )
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"predict: x holds {int(np.sum(~np.isfinite(x)))} NaN or inf values")
        n = x.shape[0]
        chunk = max(1, min(chunk_size, n))
        pl = self.placement
        out = []
        for start in range(0, n, chunk):
            x_B = x[start : start + chunk]
            valid = x_B.shape[0]
            if valid < chunk:
                x_B = np.concatenate([x_B, np.zeros((chunk - valid,) + x.shape[1:], x.dtype)])
            out_RxBxC = _predict_chunk(
                self.device_state.params,
                self.device_state.batch_stats,
                pl.replicate(x_B),
                model=self.task.model,
                strategy=pl.strategy,
                mesh=pl.mesh,
                components=components,
                probs=not logits,
                deterministic=self.config.deterministic,
            )
            out.append(pl.to_host(out_RxBxC)[..., :valid, :])
        return np.concatenate(out, axis=-2)


def fit(
    model: nn.Module,
    tx: optax.GradientTransformation,
    data,
    *,
    config: FitConfig | None = None,
    loss_fn: losses.Loss = DEFAULT_LOSS,
    augment: Callable[[Array, Array], Array] | None = None,
    hparams: Mapping[str, Sequence[float]] | None = None,
    callback: Callable[[int, TrainState, dict[str, np.ndarray]], None] | None = None,
    progress: bool | str = False,
    **config_kwargs,
) -> Run:
    """Trains R replicas of ``model`` with ``tx`` on ``data`` at once.

    Args:
      model: a Flax linen module ``model(x, train=...) -> logits [B, C]``, or a
        ``models.Ensemble`` (``[K, B, C]``): R replicas of a K-component ensemble.
      tx: an optax ``GradientTransformation`` (schedules included); each replica has its own
        optimizer state.
      data: a ``jaxrepro.data.Dataset``.
      config: a ``FitConfig``; or give its fields as keyword arguments (``replicas=32,
        vary=("init", "order"), batch_size=128, epochs=20, ...``).
      loss_fn: ``(logits_KxBxC, batch) -> scalar``: a task loss of ``jaxrepro.losses``,
        possibly wrapped in its transforms (default: softmax cross-entropy).
      augment: an augmentation drawing from the ``augment`` source (``jaxrepro.augment``).
      hparams: per-replica values, ``{name: [R] values}`` (or one value for all): the
        hyperparameters of an optimizer built with ``optax.inject_hyperparams`` (a learning
        rate per replica, say), and the weights of the loss transforms, by transform name
        (``losses.weights``: ``"anti_distillation"``, ``"codistillation"``,
        ``"anchor_distillation"``, ``"min_entropy"``, ``"label_smoothing"``). Either kind is
        a traced argument: a sweep trains in one run and one compilation.
      callback: called after each dispatch as ``callback(epochs_done, state, history)``.
      progress: a progress bar over the epochs (tqdm's, a widget in a notebook) with the
        replica count and the mean training loss; a string labels it (``Engine.run``).

    Returns:
      A ``Run``; ``run.predict(x)`` gives stacked probabilities ``[R, N, C]``.

    Example:
      A learning rate per replica, as a sweep in one run:

      >>> import optax
      >>> from jaxrepro import data, models
      >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
      >>> run = fit(models.MLP(widths=(32,), num_classes=10), tx, data.load("digits"),
      ...           replicas=2, hparams={"learning_rate": [1e-3, 1e-2]}, epochs=1)
      >>> run.history["accuracy"].shape                   # [R, epochs]
      (2, 1)

      Four anti-distillation weights, one per replica, in one compilation:

      >>> from jaxrepro import losses
      >>> ens = models.Ensemble(models.MLP(widths=(16,), num_classes=10), num_components=2)
      >>> loss = losses.anti_distillation(losses.softmax_cross_entropy(), 1.0)
      >>> run = fit(ens, optax.adam(1e-3), data.load("digits"), loss_fn=loss, replicas=4,
      ...           hparams={"anti_distillation": [0.0, 0.1, 1.0, 10.0]}, epochs=1)
    """
    if config is None:
        config = FitConfig(**config_kwargs)
    elif config_kwargs:
        config = dataclasses.replace(config, **config_kwargs)
    task = Task(model=model, tx=tx, loss_fn=loss_fn, augment=augment)
    return Engine(task, data, config, hparams=hparams).run(callback=callback, progress=progress)
