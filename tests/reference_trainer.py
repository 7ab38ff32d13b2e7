"""An independent reference trainer, written from the documented training contract only.

It imports neither ``jaxrepro.engine`` nor ``jaxrepro.randomness`` (nor anything else of
jaxrepro): plain JAX, optax and NumPy, trained one replica at a time in a Python loop over
steps (each step one jitted function; the data order, batches and keys are made on the
host). Every fact it uses is stated in BUILD_NOTES.md, section "The training contract", and
the numbered comments below point to its items. ``tests/test_reference.py`` checks that
replica r of ``jaxrepro.fit`` equals this trainer's replica r.

The shuffling window is computed here in NumPy (a stable lexicographic sort), not with
``lax.sort``; the keys and random bits come from ``jax.random`` (the contract names those
draws: they are the definition, not the implementation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

# (1) Source ids.
SOURCE_IDS = {"init": 0, "order": 1, "dropout": 2, "augment": 3, "perturb": 4}
# (8) Relative size of the perturbation when `perturb` is varied and no scale is given.
DEFAULT_PERTURB_SCALE = 1e-6


def root_key(seed: int) -> jax.Array:
    """(2) The root key: threefry2x32 of the seed, an integer in [0, 2**32)."""
    assert 0 <= seed < 2**32
    return jax.random.key(np.uint32(seed), impl="threefry2x32")


def source_key(seed: int, source: str, replica: int, varied: bool) -> jax.Array:
    """(3) fold_in(fold_in(fold_in(root, source_id), 0), replica if varied else 0)."""
    key = jax.random.fold_in(root_key(seed), SOURCE_IDS[source])
    key = jax.random.fold_in(key, 0)
    return jax.random.fold_in(key, replica if varied else 0)


def base_order(seed: int, n: int) -> np.ndarray:
    """(4) permutation(fold_in(fold_in(root, 1), 1), N), shared by every replica."""
    key = jax.random.fold_in(jax.random.fold_in(root_key(seed), SOURCE_IDS["order"]), 1)
    return np.asarray(jax.random.permutation(key, n))


def epoch_order(order_key: jax.Array, epoch: int, base: np.ndarray, window: int | None):
    """(5) Position i of the base order belongs to window i // w (w = N when there is no
    window, capped at N); 32 random bits per position, ``bits(fold_in(order key, epoch), (N,),
    uint32)``; the epoch's order is the base order sorted by (window, bits), stably."""
    n = base.shape[0]
    w = n if window is None else min(int(window), n)
    bits = np.asarray(jax.random.bits(jax.random.fold_in(order_key, epoch), (n,), jnp.uint32))
    window_of = np.arange(n) // w
    return base[np.lexsort((bits, window_of))]  # last key is the primary one; lexsort is stable


def step_key(key: jax.Array, t: int) -> jax.Array:
    """(6) The dropout and augment keys of global step t: fold_in(replica's key, t)."""
    return jax.random.fold_in(key, t)


def perturb(params, key: jax.Array, scale: float):
    """(8) Each parameter array, in ``jax.tree.leaves`` order with its own key from
    ``split(perturb key, number of arrays)``: ``w + (eps * rms(w)) * normal(key, w.shape)``
    in float32, rms 1 for an all-zero array; nothing at all when eps is 0."""
    if scale == 0:
        return params
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for leaf, k in zip(leaves, keys, strict=True):
        rms = jnp.sqrt(jnp.mean(jnp.square(leaf)))
        rms = jnp.where(rms > 0, rms, 1.0)
        out.append(leaf + (jnp.float32(scale) * rms) * jax.random.normal(k, leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, out)


@functools.cache
def _init_jit(model):
    return jax.jit(lambda rngs, x: model.init(rngs, x, train=False))


@functools.cache
def _perturb_jit():
    return jax.jit(perturb, static_argnums=2)


@functools.cache
def _make_step(model, tx, augment):
    @jax.jit
    def step(params, batch_stats, opt_state, x_B, y_B, dropout_key, augment_key):
        # (10) The augmentation first, with the step's augment key.
        if augment is not None:
            x_B = augment(augment_key, x_B)

        def loss_of(params):
            variables = {"params": params}
            mutable = False
            if batch_stats:
                variables["batch_stats"] = batch_stats
                mutable = ["batch_stats"]
            # (9) The step's dropout key is Flax's "dropout" stream, as it is (no split).
            out = model.apply(
                variables, x_B, train=True, rngs={"dropout": dropout_key}, mutable=mutable
            )
            logits, updated = out if mutable else (out, {})
            # (11) The loss sees the logits with a leading component axis of 1, [1, B, C]:
            # the mean over the batch of the softmax cross-entropy against one-hot labels.
            onehot = jax.nn.one_hot(y_B, logits.shape[-1], dtype=jnp.float32)
            logp_BxC = jax.nn.log_softmax(logits[None], axis=-1)[0]
            loss = -jnp.mean(jnp.sum(onehot * logp_BxC, axis=-1))
            return loss, updated.get("batch_stats", batch_stats)

        (loss, new_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        # (12) The optimizer sees the gradient, its state and the parameters.
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step


def keys(seed: int, replica: int, vary) -> dict[str, jax.Array]:
    """One replica's key for every source: (3), fixed sources taking replica 0's."""
    return {s: source_key(seed, s, replica, s in vary) for s in SOURCE_IDS}


def perturb_scale_of(vary, perturb_scale):
    """(8) eps: the scale given, else 1e-6 when ``perturb`` is varied, else 0."""
    if perturb_scale is None:
        return DEFAULT_PERTURB_SCALE if "perturb" in vary else 0.0
    return float(perturb_scale)


def initial_params(model, x_train, *, replica, seed, vary, perturb_scale=None, perturb_step=0):
    """(7) Initialisation: the replica's init key as Flax's "params" stream, on the first
    training example, in eval mode; then (8) the perturbation, unless (8a) it comes at a later
    step. Returns (params, batch_stats)."""
    key = keys(seed, replica, vary)
    x_1 = jnp.asarray(np.asarray(x_train[:1], np.float32))
    variables = _init_jit(model)({"params": key["init"]}, x_1)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if perturb_step:
        return params, batch_stats
    scale = perturb_scale_of(vary, perturb_scale)
    return _perturb_jit()(params, key["perturb"], scale), batch_stats


def train(
    model,
    tx,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    replica: int,
    seed: int,
    vary: tuple[str, ...],
    batch_size: int,
    epochs: int,
    window: int | None = None,
    perturb_scale: float | None = None,
    perturb_step: int = 0,
    augment=None,
):
    """Replica ``replica`` trained alone; returns (params, batch_stats, loss per step)."""
    x_train = np.asarray(x_train, np.float32)
    y_train = np.asarray(y_train, np.int32)
    n = x_train.shape[0]
    key = keys(seed, replica, vary)
    params, batch_stats = initial_params(
        model,
        x_train,
        replica=replica,
        seed=seed,
        vary=vary,
        perturb_scale=perturb_scale,
        perturb_step=perturb_step,
    )
    opt_state = tx.init(params)

    step_fn = _make_step(model, tx, augment)
    base = base_order(seed, n)
    steps = n // batch_size  # (6) the N mod B examples at the end of each order are left out
    losses = []
    for epoch in range(epochs):  # (6) epochs count from 0
        order = epoch_order(key["order"], epoch, base, window)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            t = epoch * steps + s  # (6) the global step
            params, batch_stats, opt_state, loss = step_fn(
                params,
                batch_stats,
                opt_state,
                jnp.asarray(x_train[idx]),
                jnp.asarray(y_train[idx]),
                step_key(key["dropout"], t),
                step_key(key["augment"], t),
            )
            losses.append(float(loss))
            if perturb_step and t + 1 == perturb_step:
                # (8a) The perturbation at step t >= 1: after the t-th update (global step
                # t - 1), the same draw as at initialisation; the optimizer state untouched.
                params = _perturb_jit()(
                    params, key["perturb"], perturb_scale_of(vary, perturb_scale)
                )
    return params, batch_stats, np.asarray(losses, np.float32)
