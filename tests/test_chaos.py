"""The perturbation at a chosen global step (``FitConfig.perturb_step``, methods.md section 1):
what the state is before and after it, one compilation for every step, replica r among R equal
to replica r alone, resume across it, and its bad inputs. The chaos study's binary is tested
end to end in ``tests/test_experiments.py``."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxrepro import data, engine, models, randomness

STEPS = 4  # 64 examples in batches of 16
EPS = 1e-2


@pytest.fixture(scope="module")
def ds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 8)).astype(np.float32)
    y = rng.integers(0, 3, 80).astype(np.int32)
    return data.Dataset(x[:64], y[:64], x[64:], y[64:], num_classes=3, name="tiny")


TASK = engine.Task(models.MLP(widths=(16,), num_classes=3), optax.adam(1e-2))


def _run(ds, *, replicas=3, epochs=2, **kw):
    """Trains and returns ({epochs done: params after them}, run)."""
    cfg = engine.FitConfig(
        replicas=replicas, batch_size=16, epochs=epochs, strategy="map", seed=3, **kw
    )
    after = {}

    def keep(done, state, history):
        after[done] = jax.tree.map(np.asarray, state.params)

    run = engine.Engine(TASK, ds, cfg).run(callback=keep)
    return after, run


def _equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def control(ds):
    """Every replica identical (nothing varied, nothing perturbed)."""
    return _run(ds, vary=())[0]


def _noise(params_R, replica, perturb_replica, seed=3):
    """The draws the perturbation makes for one replica: ``normal(split(perturb key))``."""
    key = randomness.replica_key(seed, "perturb", perturb_replica, varied=True)
    leaves = jax.tree.leaves(jax.tree.map(lambda a: a[replica], params_R))
    keys = jax.random.split(key, len(leaves))
    return [
        np.asarray(jax.random.normal(k, a.shape, a.dtype))
        for k, a in zip(keys, leaves, strict=True)
    ]


def test_state_before_step_t_is_the_unperturbed_run_bitwise(ds, control):
    # t = 6: the sixth update is step 1 of epoch 1, so after epoch 0 nothing has happened yet.
    after, _ = _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=6)
    assert _equal(after[1], control[1])
    assert not _equal(after[2], control[2])
    # t = 4 is right after epoch 0's last update: epoch 0's state is already perturbed.
    after4, _ = _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=4)
    assert not _equal(after4[1], control[1])


def test_perturbation_after_the_last_step_has_the_stated_size(ds, control):
    """t = epochs * steps perturbs the final weights: w + eps * rms(w) * N(0, 1) with the
    replica's perturb key, each replica its own draw."""
    after, _ = _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=2 * STEPS)
    for r in range(3):
        final = [a[r] for a in jax.tree.leaves(after[2])]
        plain = [a[r] for a in jax.tree.leaves(control[2])]
        for got, w, z in zip(final, plain, _noise(after[2], r, r), strict=True):
            rms = np.sqrt(np.mean(np.square(w))) or 1.0
            np.testing.assert_allclose((got - w) / (EPS * rms), z, rtol=1e-3, atol=1e-3)


def test_initial_perturbation_is_step_zero_and_later_steps_leave_init_alone(ds, control):
    """t = 0 is the perturbation of the initial weights (as before ``perturb_step`` existed);
    t >= 1 leaves initialisation alone."""
    cfg0 = engine.FitConfig(replicas=2, vary=("perturb",), perturb_scale=EPS, batch_size=16)
    cfg5 = engine.FitConfig(
        replicas=2, vary=("perturb",), perturb_scale=EPS, batch_size=16, perturb_step=5
    )
    plain = engine.Engine(TASK, ds, engine.FitConfig(replicas=2, vary=(), batch_size=16)).init()
    assert not _equal(engine.Engine(TASK, ds, cfg0).init().params, plain.params)
    assert _equal(engine.Engine(TASK, ds, cfg5).init().params, plain.params)


def test_one_compilation_serves_every_step(ds):
    _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=1)  # compiled here (if not yet)
    before = engine.TRACE_COUNTS["train_epochs"]
    outs = [
        _run(ds, vary=("perturb",), perturb_scale=eps, perturb_step=t)[0][2]
        for t in (2, 3, 7, 8)
        for eps in (1e-6, 1e-3)
    ]
    assert engine.TRACE_COUNTS["train_epochs"] == before
    assert not _equal(outs[0], outs[2])  # and the steps really differ


def test_replica_among_r_equals_replica_alone(ds):
    together = _run(ds, replicas=(0, 1, 2), vary=("perturb",), perturb_step=5)[0][2]
    alone = _run(ds, replicas=(2,), vary=("perturb",), perturb_step=5)[0][2]
    assert _equal(jax.tree.map(lambda a: a[2:], together), alone)
    # Replica 0 of a run varying perturb is perturbed too (it is not the control).
    assert not _equal(jax.tree.map(lambda a: a[:1], together), _run(ds, vary=())[0][2])


@pytest.mark.parametrize("t", [3, 4, 5])
def test_resume_across_the_perturbation(ds, t):
    """Resumed after epoch 1 (the perturbation before, at or after the boundary), the run ends
    bitwise where the uninterrupted one does."""
    cfg = engine.FitConfig(
        replicas=2,
        vary=("perturb",),
        perturb_scale=EPS,
        perturb_step=t,
        batch_size=16,
        epochs=2,
        strategy="map",
    )
    eng = engine.Engine(TASK, ds, cfg)
    saved = {}
    whole = eng.run(
        callback=lambda done, state, hist: saved.setdefault(
            done, (jax.tree.map(np.asarray, state), hist)
        )
    )
    state, hist = saved[1]
    resumed = engine.Engine(TASK, ds, cfg).run(state, first_epoch=1, history=hist)
    assert _equal(resumed.state.params, whole.state.params)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(perturb_step=-1), "perturb_step must be"),
        (dict(perturb_step=1.5), "perturb_step must be"),
        (dict(perturb_step="3"), "perturb_step must be"),
        (dict(perturb_step=True), "perturb_step must be"),
        (dict(perturb_step=2, vary=("init",)), "nothing is perturbed"),
    ],
)
def test_bad_perturb_step(kw, message):
    with pytest.raises(ValueError, match=message):
        engine.FitConfig(**kw)


def test_perturb_step_after_the_last_step_is_refused(ds):
    cfg = engine.FitConfig(vary=("perturb",), perturb_step=2 * STEPS + 1, batch_size=16, epochs=2)
    with pytest.raises(ValueError, match="after the last step: 2 epochs of 4 steps make 8"):
        engine.Engine(TASK, ds, cfg)
