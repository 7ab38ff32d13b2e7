"""Flax NNX models in the engine (``jaxrepro.nnx_models``): training, replica equivalence, the
sources of randomness, BatchNorm per replica, equality with the linen model, ensembles,
checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrepro import engine, models, nnx_models, study


class MLP(nnx.Module):
    def __init__(self, din, width, num_classes, *, dropout=0.0, batchnorm=False, rngs):
        self.hidden = nnx.Linear(din, width, rngs=rngs)
        self.norm = nnx.BatchNorm(width, momentum=0.9, rngs=rngs) if batchnorm else None
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.out = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        h = self.hidden(x)
        if self.norm is not None:
            h = self.norm(h)
        h = nnx.relu(h)
        if self.drop is not None:
            h = self.drop(h)
        return self.out(h)


TX = optax.adam(1e-2)
PLAIN = nnx_models.FromNNX.of(MLP, 12, 8, 3)
FULL = nnx_models.FromNNX.of(MLP, 12, 8, 3, dropout=0.2, batchnorm=True)
BASE = dict(replicas=3, epochs=2, batch_size=32, seed=5, strategy="map")
ALL = ("init", "order", "dropout")


def _at(tree, r):
    return jax.tree.map(lambda a: np.asarray(a)[r], tree)


def _equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def full3(ds):
    return engine.fit(FULL, TX, ds, vary=ALL, **BASE)


def test_an_nnx_mlp_trains_and_predicts(ds):
    run = engine.fit(PLAIN, TX, ds, vary=("init", "order"), **dict(BASE, epochs=6))
    loss = run.history["loss"]
    assert np.all(loss[:, -1] < 0.7 * loss[:, 0]), loss
    probs = run.predict(ds.x_test)
    assert probs.shape == (3, ds.num_test, 3)
    acc = (probs.argmax(-1) == ds.y_test).mean(-1)
    assert np.all(acc > 0.6), acc  # three classes: chance is 1/3
    assert set(run.state.params) == {"hidden.kernel", "hidden.bias", "out.kernel", "out.bias"}


def test_replica_among_many_equals_replica_alone_bitwise(ds, full3):
    for r in (0, 2):
        alone = engine.fit(FULL, TX, ds, vary=ALL, **dict(BASE, replicas=(r,)))
        assert _equal(_at(full3.state.params, r), _at(alone.state.params, 0))
        assert _equal(_at(full3.state.batch_stats, r), _at(alone.state.batch_stats, 0))
        np.testing.assert_array_equal(full3.predict(ds.x_test)[r], alone.predict(ds.x_test)[0])


def test_each_source_varies_what_it_names(ds, full3):
    order_only = engine.Engine(engine.Task(FULL, TX), ds, engine.FitConfig(vary=("order",), **BASE))
    init = order_only.init().params
    for r in (1, 2):  # varying only the order: identical initial parameters
        assert _equal(_at(init, r), _at(init, 0))
    varied = engine.Engine(engine.Task(FULL, TX), ds, engine.FitConfig(vary=("init",), **BASE))
    p = varied.init().params
    assert not np.array_equal(p["hidden.kernel"][0], p["hidden.kernel"][1])
    # Only dropout varied: same start, different masks, so different end points.
    drop = engine.fit(FULL, TX, ds, vary=("dropout",), **BASE)
    assert not np.array_equal(
        drop.state.params["hidden.kernel"][0], drop.state.params["hidden.kernel"][1]
    )
    nothing = engine.fit(FULL, TX, ds, vary=(), **BASE)
    assert _equal(_at(nothing.state.params, 1), _at(nothing.state.params, 0))


def test_batchnorm_statistics_are_per_replica_and_used_in_evaluation(ds, full3):
    mean = full3.state.batch_stats["norm.mean"]
    assert mean.shape == (3, 8)
    assert not np.array_equal(mean[0], mean[1])
    assert np.any(mean != 0)  # updated by training from their zero start
    # Evaluation uses the running statistics and no dropout: the engine's prediction equals
    # the NNX model rebuilt by hand from replica 1's arrays, in eval mode.
    model = MLP(12, 8, 3, dropout=0.2, batchnorm=True, rngs=nnx.Rngs(0))
    for name, value in {**full3.state.params, **full3.state.batch_stats}.items():
        layer, leaf = name.split(".")
        getattr(getattr(model, layer), leaf)[...] = jnp.asarray(value[1])
    model.eval()
    by_hand = jax.nn.softmax(model(jnp.asarray(ds.x_test)), -1)
    np.testing.assert_allclose(full3.predict(ds.x_test)[1], by_hand, atol=1e-6)


def test_nnx_and_linen_mlps_from_the_same_parameters_train_identically(ds):
    """The same architecture in both APIs (Linear/Dense with bias, relu), given the same initial
    parameters: the same training, bit for bit (both compute ``x @ kernel + bias``)."""
    linen = models.MLP(widths=(8,), num_classes=3)
    cfg = engine.FitConfig(vary=("order",), **dict(BASE, epochs=3))
    nnx_eng = engine.Engine(engine.Task(PLAIN, TX), ds, cfg)
    linen_eng = engine.Engine(engine.Task(linen, TX), ds, cfg)
    start = nnx_eng.init()
    lp = linen_eng.init().params
    names = {"hidden": "dense_0", "out": "head"}  # models.MLP's layer names
    assert jax.tree.structure(lp) == jax.tree.structure(
        {names[k.split(".")[0]]: {"kernel": 0, "bias": 0} for k in start.params}
    ), lp.keys()
    params = {
        names[layer]: {
            "kernel": start.params[f"{layer}.kernel"],
            "bias": start.params[f"{layer}.bias"],
        }
        for layer in ("hidden", "out")
    }
    params = jax.tree.map(np.array, params)  # copies: a run donates the state it is given
    health = jax.tree.map(np.array, start.health)
    linen_start = engine.TrainState(params, {}, jax.vmap(TX.init)(params), health)
    a = nnx_eng.run(start)
    b = linen_eng.run(linen_start)
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])
    for layer in ("hidden", "out"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(
                a.state.params[f"{layer}.{leaf}"], b.state.params[names[layer]][leaf]
            )
    np.testing.assert_array_equal(a.predict(ds.x_test), b.predict(ds.x_test))


def test_an_ensemble_of_nnx_models_and_a_checkpoint_round_trip(ds, tmp_path):
    ens = models.Ensemble(FULL, num_components=2)
    eng = engine.Engine(
        engine.Task(ens, TX), ds, engine.FitConfig(vary=ALL, **dict(BASE, epochs=1))
    )
    state, history = eng.train(eng.init(), 0, 1)
    leaves = jax.tree.leaves(state.params)
    assert all(leaf.shape[:2] == (3, 2) for leaf in leaves), [leaf.shape for leaf in leaves]
    study.save_checkpoint(tmp_path, 1, state, history)
    restored, epoch, _ = study.restore_checkpoint(tmp_path, eng.init())
    assert epoch == 1 and _equal(restored, state)
    run = eng.run(restored, first_epoch=1, history=history)
    assert run.predict(ds.x_test).shape == (3, ds.num_test, 3)


def test_an_nnx_instance_starts_every_replica_from_its_parameters(ds):
    instance = MLP(12, 8, 3, rngs=nnx.Rngs(3))
    run = engine.fit(instance, TX, ds, vary=("order",), **dict(BASE, epochs=1))
    eng = engine.Engine(engine.Task(instance, TX), ds, engine.FitConfig(vary=("order",), **BASE))
    start = eng.init().params
    for r in range(3):
        np.testing.assert_array_equal(start["hidden.kernel"][r], instance.hidden.kernel[...])
    assert run.history["loss"].shape == (3, 1)
    with pytest.raises(ValueError, match="nnx.Module instance.*FromNNX.of"):
        engine.fit(instance, TX, ds, vary=("init",), **BASE)
    with pytest.raises(ValueError, match="nnx.Module instance"):  # inside an Ensemble too
        engine.fit(models.Ensemble(instance, num_components=2), TX, ds, vary="all", **BASE)
    # The instance's parameters are copied when the task is made: later changes are not seen.
    task = engine.Task(instance, TX)
    kernel = np.array(instance.hidden.kernel[...])
    instance.hidden.kernel[...] = instance.hidden.kernel[...] + 1.0
    cfg = engine.FitConfig(vary=("order",), **BASE)
    np.testing.assert_array_equal(
        engine.Engine(task, ds, cfg).init().params["hidden.kernel"][0], kernel
    )


def test_a_refit_with_an_equal_factory_does_not_compile_again(ds):
    cfg = dict(vary=("init",), **dict(BASE, epochs=1))
    first = engine.fit(nnx_models.FromNNX.of(MLP, 12, 8, 3), TX, ds, **cfg)
    traces = dict(engine.TRACE_COUNTS)
    second = engine.fit(nnx_models.FromNNX.of(MLP, 12, 8, 3), optax.adam(1e-2), ds, **cfg)
    assert engine.TRACE_COUNTS == traces
    assert _equal(first.state, second.state)


def test_unsupported_nnx_state_and_bad_factories_are_named(ds):
    class WithCounter(nnx.Module):
        def __init__(self, *, rngs):
            self.lin = nnx.Linear(12, 3, rngs=rngs)
            self.calls = nnx.Variable(jnp.zeros(()))

        def __call__(self, x):
            return self.lin(x)

    with pytest.raises(ValueError, match="calls.*Variable"):
        engine.fit(nnx_models.FromNNX.of(WithCounter), TX, ds, **dict(BASE, epochs=1))

    class DropoutWithoutRngs(nnx.Module):
        def __init__(self, *, rngs):
            self.lin = nnx.Linear(12, 3, rngs=rngs)
            self.drop = nnx.Dropout(0.5)

        def __call__(self, x):
            return self.drop(self.lin(x))

    with pytest.raises(ValueError, match="'drop'.*built without rngs"):
        engine.fit(nnx_models.FromNNX.of(DropoutWithoutRngs), TX, ds, **dict(BASE, epochs=1))
    with pytest.raises(TypeError, match="hashable"):
        nnx_models.FromNNX.of(MLP, 12, {"a": 1}, 3)
    assert nnx_models.FromNNX.of(MLP, [12, 8]) == nnx_models.FromNNX.of(MLP, (12, 8))
    with pytest.raises(ValueError, match="must return an nnx.Module"):
        engine.fit(nnx_models.FromNNX(lambda rngs: 3), TX, ds, **dict(BASE, epochs=1))
