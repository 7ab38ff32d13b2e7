"""The replica engine: equivalence, determinism, sources of randomness, compilation, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrepro import augment, data, engine, models

# One model and one optimizer object for the whole file: compiled functions are cached by them,
# so the tests share compilations.
MODEL = models.MLP(widths=(16,), num_classes=3, dropout_rate=0.1)
TX = optax.adam(1e-2)
# The tests assert bitwise equalities between runs of different shapes (R, epochs per call,
# replicas alone): they name the "map" strategy, which gives them on any backend ("auto" is
# "vmap" on an accelerator).
BASE = dict(
    replicas=4, epochs=3, batch_size=32, vary=("init", "order", "dropout"), seed=7, strategy="map"
)


def _max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def _bitwise_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _at(tree, r):
    """Replica ``r`` of a stacked tree."""
    return jax.tree.map(lambda a: a[r], tree)


@pytest.fixture(scope="module")
def run4(ds):
    return engine.fit(MODEL, TX, ds, **BASE)


def test_history_and_prediction_shapes(run4, ds):
    assert run4.history["loss"].shape == (4, 3)
    assert run4.history["accuracy"].shape == (4, 3)
    # Training makes progress on this learnable task.
    assert np.all(run4.history["loss"][:, -1] < run4.history["loss"][:, 0])
    probs = run4.predict(ds.x_test)
    assert probs.shape == (4, ds.num_test, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert not run4.diverged.any()


@pytest.mark.parametrize("strategy", ["auto", "map", "vmap", "chunked:2"])
def test_replica_among_many_equals_replica_alone(ds, strategy):
    cfg = dict(BASE, strategy=strategy)
    many = engine.fit(MODEL, TX, ds, **cfg)
    many_probs = many.predict(ds.x_test)
    for index in (0, 2):
        alone = engine.fit(MODEL, TX, ds, **dict(cfg, replicas=(index,)))
        diff = _max_diff(_at(many.state.params, index), _at(alone.state.params, 0))
        probs_diff = float(np.max(np.abs(many_probs[index] - alone.predict(ds.x_test)[0])))
        assert diff <= 1e-5 and probs_diff <= 1e-5, (strategy, index, diff, probs_diff)
        if engine.Placement.create(4, strategy).strategy[0] == "map":
            # The map strategy runs each replica as the same program as a replica alone,
            # softmax included ("auto" is "map" on CPU only).
            assert diff == 0.0 and probs_diff == 0.0


def test_same_call_twice_is_bitwise_identical(run4, ds):
    again = engine.fit(MODEL, TX, ds, **BASE)
    assert _bitwise_equal(run4.state, again.state)
    np.testing.assert_array_equal(run4.predict(ds.x_test), again.predict(ds.x_test))
    np.testing.assert_array_equal(run4.history["loss"], again.history["loss"])


def test_vary_nothing_gives_identical_replicas(ds):
    run = engine.fit(MODEL, TX, ds, **dict(BASE, vary=()))
    for leaf in jax.tree.leaves(run.state):
        leaf = np.asarray(leaf)
        for r in range(1, 4):
            np.testing.assert_array_equal(leaf[r], leaf[0])
    probs = run.predict(ds.x_test)
    assert np.array_equal(probs[1:], np.broadcast_to(probs[0], probs[1:].shape))


def _engine(ds, **kw):
    return engine.Engine(engine.Task(MODEL, TX), ds, engine.FitConfig(**dict(BASE, **kw)))


def test_vary_only_init(ds):
    eng = _engine(ds, vary=("init",))
    batches = eng.batch_indices(epoch=1)
    assert batches.shape == (4, ds.num_train // 32, 32)
    for r in range(1, 4):
        np.testing.assert_array_equal(batches[r], batches[0])
    kernel = np.asarray(eng.init().params["dense_0"]["kernel"])
    for r in range(1, 4):
        assert not np.array_equal(kernel[r], kernel[0])


def test_vary_only_order(ds):
    eng = _engine(ds, vary=("order",))
    state = eng.init()
    for leaf in jax.tree.leaves(state.params):
        leaf = np.asarray(leaf)
        for r in range(1, 4):
            np.testing.assert_array_equal(leaf[r], leaf[0])
    batches = eng.batch_indices(epoch=0)
    for r in range(1, 4):
        assert not np.array_equal(batches[r], batches[0])
    # Every batch is drawn from the training set without repetition within the epoch.
    for r in range(4):
        assert len(np.unique(batches[r])) == batches[r].size


def test_window_one_gives_every_replica_the_same_batches(ds):
    eng = _engine(ds, vary=("order",), window=1)
    b0, b1 = eng.batch_indices(0), eng.batch_indices(1)
    for r in range(1, 4):
        np.testing.assert_array_equal(b0[r], b0[0])
    np.testing.assert_array_equal(b0, b1)


def test_vary_only_perturb_changes_initial_weights_by_the_stated_amount(ds):
    eps = 1e-6
    eng = _engine(ds, vary=("perturb",))
    control = _engine(ds, vary=()).init()
    state = eng.init()
    kernel = np.asarray(state.params["dense_0"]["kernel"], np.float64)
    kernel0 = np.asarray(control.params["dense_0"]["kernel"], np.float64)[0]
    rms = np.sqrt(np.mean(kernel0**2))
    for r in range(4):
        delta = (kernel[r] - kernel0) / (eps * rms)
        assert 0 < np.abs(delta).max() < 8  # tiny: a few eps relative
        assert 0.8 < delta.std() < 1.2  # N(0, 1) scaled by eps * rms
    assert not np.array_equal(kernel[1], kernel[0])
    # An explicit scale of 0 leaves the weights bitwise unchanged.
    zero = _engine(ds, vary=("perturb",), perturb_scale=0.0).init()
    assert _bitwise_equal(zero.params, control.params)


def test_perturbation_alone_changes_the_trained_model(ds):
    run = engine.fit(MODEL, TX, ds, **dict(BASE, vary=("perturb",)))
    kernel = np.asarray(run.state.params["dense_0"]["kernel"])
    assert not np.array_equal(kernel[0], kernel[1])


def test_vary_only_dropout_and_augment(ds):
    run_d = engine.fit(MODEL, TX, ds, **dict(BASE, vary=("dropout",)))
    init = _engine(ds, vary=("dropout",)).init().params
    assert _bitwise_equal(_at(init, 0), _at(init, 1))
    assert not np.array_equal(
        np.asarray(run_d.state.params["dense_0"]["kernel"][0]),
        np.asarray(run_d.state.params["dense_0"]["kernel"][1]),
    )
    run_a = engine.fit(
        MODEL,
        TX,
        ds,
        augment=augment.GaussianNoise(0.1),
        **dict(BASE, vary=("augment",), replicas=2, epochs=1),
    )
    assert not np.array_equal(
        np.asarray(run_a.state.params["dense_0"]["kernel"][0]),
        np.asarray(run_a.state.params["dense_0"]["kernel"][1]),
    )


def test_training_traces_once_across_epochs_and_runs(ds):
    tx = optax.sgd(0.0917)  # an optimizer no other test uses: a task not compiled before
    before = engine.TRACE_COUNTS["train_epochs"]
    engine.fit(MODEL, tx, ds, **dict(BASE, epochs=4, epochs_per_call=1))
    assert engine.TRACE_COUNTS["train_epochs"] == before + 1
    # Another seed, window, replica set and choice of varied sources: same compiled function.
    engine.fit(
        MODEL,
        tx,
        ds,
        **dict(
            BASE, epochs=2, seed=11, window=5, replicas=(1, 2, 3, 9), vary=("perturb", "augment")
        ),
    )
    assert engine.TRACE_COUNTS["train_epochs"] == before + 1


def test_epochs_per_call_does_not_change_the_result(ds, run4):
    other = engine.fit(MODEL, TX, ds, **dict(BASE, epochs_per_call=2))
    assert _bitwise_equal(run4.state.params, other.state.params)


def test_resume_from_state_equals_uninterrupted(ds, run4):
    eng = _engine(ds)
    state, _ = eng.train(eng.init(), 0, 2)
    state = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), state)  # as from a checkpoint
    state, _ = eng.train(state, 2, 1)
    assert _bitwise_equal(state, run4.state)


def test_per_replica_learning_rates(ds):
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    run = engine.fit(
        MODEL,
        tx,
        ds,
        hparams={"learning_rate": [0.0, 0.05, 0.2]},
        **dict(BASE, replicas=3, vary=()),
    )
    init = engine.Engine(
        engine.Task(MODEL, tx), ds, engine.FitConfig(**dict(BASE, replicas=3, vary=()))
    ).init()
    # Learning rate 0: the parameters never move; the others do, differently.
    assert _bitwise_equal(_at(run.state.params, 0), _at(init.params, 0))
    k = np.asarray(run.state.params["dense_0"]["kernel"])
    assert not np.array_equal(k[1], k[0]) and not np.array_equal(k[1], k[2])
    # Replica 2 with lr 0.2 equals a plain sgd(0.2) run of the same replica.
    plain = engine.fit(MODEL, optax.sgd(0.2), ds, **dict(BASE, replicas=3, vary=()))
    assert _max_diff(_at(run.state.params, 2), _at(plain.state.params, 2)) < 1e-5


def test_optax_schedules_work(ds):
    schedule = optax.cosine_decay_schedule(1e-2, decay_steps=20)
    run = engine.fit(MODEL, optax.adam(schedule), ds, **dict(BASE, replicas=2, epochs=2))
    assert np.all(np.isfinite(run.history["loss"]))


def test_batchnorm_statistics_are_per_replica(ds):
    model = models.MLP(widths=(8,), num_classes=3, norm="batch")
    run = engine.fit(model, TX, ds, **dict(BASE, replicas=3, epochs=1))
    mean = np.asarray(jax.tree.leaves(run.state.batch_stats)[0])
    assert mean.shape[0] == 3
    assert not np.array_equal(mean[0], mean[1])
    alone = engine.fit(model, TX, ds, **dict(BASE, replicas=(1,), epochs=1))
    assert _max_diff(_at(run.state.batch_stats, 1), _at(alone.state.batch_stats, 0)) == 0.0


def test_diverging_replica_is_reported_and_others_unaffected(ds):
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    cfg = dict(BASE, replicas=3, epochs=2)
    run = engine.fit(MODEL, tx, ds, hparams={"learning_rate": [0.1, 1e30, 0.1]}, **cfg)
    np.testing.assert_array_equal(run.diverged, [False, True, False])
    ok = engine.fit(MODEL, tx, ds, hparams={"learning_rate": [0.1, 0.1, 0.1]}, **cfg)
    for r in (0, 2):
        assert _max_diff(_at(run.state.params, r), _at(ok.state.params, r)) <= 1e-6


def test_predict_in_chunks_matches_plain_apply(run4, ds):
    full = run4.predict(ds.x_test, logits=True, chunk_size=4096)
    small = run4.predict(ds.x_test, logits=True, chunk_size=7)
    np.testing.assert_allclose(small, full, atol=1e-5)
    for r in range(4):
        ref = MODEL.apply({"params": _at(run4.state.params, r)}, ds.x_test, train=False)
        np.testing.assert_allclose(full[r], np.asarray(ref), atol=1e-5)


def test_runs_under_disable_jit(ds):
    # One step of two replicas: eager execution of the whole training is slow.
    # Plain SGD and a one-layer model: eager execution dispatches (and compiles) every
    # operation separately, and Adam's state doubles their number.
    small = data.Dataset(ds.x_train[:32], ds.y_train[:32], ds.x_test, ds.y_test, num_classes=3)
    cfg = dict(BASE, replicas=2, epochs=1)
    model, tx = models.MLP(widths=(), num_classes=3), optax.sgd(0.1)
    jitted = engine.fit(model, tx, small, **cfg)
    with jax.disable_jit():
        eager = engine.fit(model, tx, small, **cfg)
    assert _max_diff(jitted.state.params, eager.state.params) < 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(replicas=0), "replicas must be an integer >= 1"),
        (dict(batch_size=10_000), "batch_size 10000 is larger than the training set"),
        (dict(vary=("init", "shuffle")), "unknown source of randomness 'shuffle'"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(window=0), "window must be an integer >= 1"),
        (dict(strategy="pmap"), "unknown strategy 'pmap'"),
        (
            dict(replicas=(1, -1)),
            "replicas must hold integers in \\[0, 2147483647\\]; item 1 is -1",
        ),
        (dict(perturb_scale=float("nan")), "perturb_scale"),
        (dict(devices=64), "devices=64 but only"),
        (dict(devices=0), "devices must be an integer >= 1"),
    ],
)
def test_bad_configuration_is_a_clear_error(ds, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.fit(MODEL, TX, ds, **dict(BASE, **kwargs))


def test_bad_inputs_are_clear_errors(ds):
    with pytest.raises(ValueError, match="10 logits.*3 classes"):
        engine.fit(models.MLP(widths=(4,), num_classes=10), TX, ds, **BASE)
    with pytest.raises(ValueError, match="learning_rate.*shape"):
        engine.fit(
            MODEL,
            optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            ds,
            hparams={"learning_rate": [0.1, 0.2]},
            **BASE,
        )
    with pytest.raises(ValueError, match="inject_hyperparams"):
        engine.fit(MODEL, TX, ds, hparams={"learning_rate": [0.1] * 4}, **BASE)
    with pytest.raises(ValueError, match="activation"):
        models.MLP(widths=(4,), num_classes=3, activation="relu6x")
    with pytest.raises(TypeError, match="Dataset"):
        engine.fit(MODEL, TX, {"x": 1}, **BASE)
    x, y = ds.x_train.copy(), ds.y_train.copy()
    y[3] = 5
    with pytest.raises(ValueError, match="y_train"):
        data.Dataset(x, y, ds.x_test, ds.y_test, num_classes=3)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="x_train"):
        data.Dataset(x, ds.y_train, ds.x_test, ds.y_test, num_classes=3)
    with pytest.raises(ValueError, match="x_train|y_train"):
        data.Dataset(ds.x_train, ds.y_train[:-1], ds.x_test, ds.y_test, num_classes=3)


def test_config_round_trips_through_a_dict():
    cfg = engine.FitConfig(**dict(BASE, replicas=(0, 3)))
    assert engine.FitConfig(**cfg.to_dict()) == cfg
    assert dataclasses.asdict(cfg)["vary"] == ("init", "order", "dropout")
