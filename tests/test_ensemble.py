"""Ensembles inside a replica (models.Ensemble) trained by the engine with the loss transforms;
the optimizers of the regulariser study."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrepro import engine, losses, metrics, models, optim

# Shared objects: compiled functions are cached by model, optimizer and loss, so the tests that
# train the same task share one compilation.
MLP = models.MLP(widths=(16,), num_classes=3)
ENS2 = models.Ensemble(MLP, num_components=2)
ENS1 = models.Ensemble(MLP, num_components=1)
TX = optax.adam(1e-2)
BASE = losses.softmax_cross_entropy()
AD = losses.anti_distillation(BASE, 1.0)
# "map": the bitwise equalities below need it on an accelerator ("auto" is "vmap" there).
CFG = dict(replicas=4, epochs=4, batch_size=32, vary=("init", "order"), seed=3, strategy="map")


@pytest.fixture(scope="module")
def plain_ensemble(ds):
    return engine.fit(ENS2, TX, ds, loss_fn=BASE, **CFG)


@pytest.fixture(scope="module")
def anti_distilled(ds):
    return engine.fit(ENS2, TX, ds, loss_fn=AD, **CFG)


def _component_correlation(run, x):
    """Mean over replicas of the test-set correlation between the two components' logits."""
    logits = run.predict(x, logits=True, components=True)  # [R, K, N, C]
    return float(np.mean([losses.pairwise_correlation(jnp.asarray(r))[0, 1] for r in logits]))


# --------------------------------------------------------------------------------------------
# The wrapper as a model.


def test_ensemble_outputs_one_logit_set_per_component():
    x = jnp.ones((5, 12))
    variables = ENS2.init({"params": jax.random.key(0)}, x, train=False)
    logits = ENS2.apply(variables, x, train=False)
    assert logits.shape == (2, 5, 3)
    # Towers have their own parameters, initialised differently.
    kernel = variables["params"]["model"]["dense_0"]["kernel"]
    assert kernel.shape == (2, 12, 16)
    assert not np.allclose(kernel[0], kernel[1])
    assert not np.allclose(logits[0], logits[1])
    # Each tower is the wrapped model with its slice of the parameters.
    for k in range(2):
        own = jax.tree.map(lambda a, k=k: a[k], variables["params"]["model"])
        np.testing.assert_allclose(
            logits[k], MLP.apply({"params": own}, x, train=False), rtol=1e-6, atol=1e-6
        )


def test_shared_body_has_one_body_and_k_heads():
    model = models.Ensemble(models.MLP((16,), 3, norm="batch"), 4, shared_body=True)
    x = jnp.ones((5, 12)) * jnp.arange(5.0)[:, None]
    variables = model.init({"params": jax.random.key(0)}, x, train=False)
    params = variables["params"]["body"]
    assert params["dense_0"]["kernel"].shape == (12, 16)  # one body
    assert params["head"]["kernel"].shape == (16, 4 * 3)  # four heads
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (4, 5, 3)
    assert not np.allclose(logits[0], logits[1])


def test_ensemble_field_errors():
    with pytest.raises(ValueError, match="num_components"):
        models.Ensemble(MLP, 0)
    with pytest.raises(ValueError, match="heads=1"):
        models.Ensemble(models.MLP((8,), 3, heads=2), 2)


def test_k1_ensemble_equals_the_plain_model(ds):
    """Same initial parameters (with a leading component axis of 1), same keys: the K = 1
    wrapper trains and predicts as the plain model does."""
    config = engine.FitConfig(**CFG)
    plain = engine.Engine(engine.Task(MLP, TX), ds, config)
    wrapped = engine.Engine(engine.Task(ENS1, TX), ds, config)
    start = plain.init()
    params = {"model": jax.tree.map(lambda a: a[:, None], start.params)}
    wrapped_start = engine.TrainState(params, {}, jax.vmap(TX.init)(params))
    plain_run = plain.run(jax.tree.map(jnp.copy, start))
    wrapped_run = wrapped.run(wrapped_start)
    got = jax.tree.map(lambda a: a[:, 0], wrapped_run.state.params["model"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain_run.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wrapped_run.history["loss"], plain_run.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        wrapped_run.predict(ds.x_test), plain_run.predict(ds.x_test), atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Training R replicas of a K-component ensemble.


def test_prediction_is_the_mean_of_the_components(plain_ensemble, ds):
    probs = plain_ensemble.predict(ds.x_test)
    comps = plain_ensemble.predict(ds.x_test, components=True)
    assert probs.shape == (4, ds.num_test, 3)
    assert comps.shape == (4, 2, ds.num_test, 3)
    np.testing.assert_allclose(probs, comps.mean(axis=1), atol=1e-6)
    assert np.all(plain_ensemble.history["loss"][:, -1] < plain_ensemble.history["loss"][:, 0])
    assert not plain_ensemble.diverged.any()
    # The ensemble's logits are the log of that mean.
    logits = plain_ensemble.predict(ds.x_test, logits=True)
    np.testing.assert_allclose(np.exp(logits), probs, atol=1e-6)


def test_replica_of_an_ensemble_among_many_equals_it_alone(anti_distilled, ds):
    """The replica axis composes with the component axis: replica 2 of an anti-distilled
    ensemble trained among 4 is bitwise the one trained alone (map strategy, CPU)."""
    alone = engine.fit(ENS2, TX, ds, loss_fn=AD, **dict(CFG, replicas=(2,)))
    for a, b in zip(
        jax.tree.leaves(anti_distilled.state.params),
        jax.tree.leaves(alone.state.params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a)[2], np.asarray(b)[0])


def test_anti_distillation_lowers_the_measured_component_correlation(
    plain_ensemble, anti_distilled, ds
):
    """Same keys, lambda = 1 against lambda = 0: the components' logits are less correlated on
    held-out data."""
    plain = _component_correlation(plain_ensemble, ds.x_test)
    pushed = _component_correlation(anti_distilled, ds.x_test)
    assert pushed < plain - 0.2, (plain, pushed)
    # Same keys, so the same initial parameters: only the loss differs.
    first = jax.tree.leaves(
        engine.Engine(engine.Task(ENS2, TX, loss_fn=AD), ds, engine.FitConfig(**CFG)).init().params
    )
    again = jax.tree.leaves(
        engine.Engine(engine.Task(ENS2, TX, loss_fn=BASE), ds, engine.FitConfig(**CFG))
        .init()
        .params
    )
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_transforms_that_need_components_are_rejected_for_a_plain_model(ds):
    with pytest.raises(ValueError, match="anti_distillation needs an ensemble of K >= 2"):
        engine.Engine(engine.Task(MLP, TX, loss_fn=AD), ds, engine.FitConfig(**CFG))
    bad_anchor = losses.anchor_distillation(BASE, 0.5, np.full((10, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"anchor_distillation: .* \[266, 3\]"):
        engine.Engine(engine.Task(MLP, TX, loss_fn=bad_anchor), ds, engine.FitConfig(**CFG))


def test_distillation_towards_an_anchor_run_reduces_churn_against_it(ds):
    """Replicas distilled towards an anchor (a trained run) disagree with the anchor less than
    replicas trained on the labels alone, with the same keys."""
    anchor_run = engine.fit(MLP, TX, ds, **dict(CFG, replicas=(100,)))
    towards = losses.anchor_distillation(BASE, 1.0, anchor_run, x=ds.x_train)
    distilled = engine.fit(MLP, TX, ds, loss_fn=towards, **CFG)
    labels_only = engine.fit(MLP, TX, ds, **CFG)
    anchor_top = anchor_run.predict(ds.x_test)[0].argmax(-1)

    def churn_to_anchor(run):
        return float(np.mean(run.predict(ds.x_test).argmax(-1) != anchor_top))

    assert churn_to_anchor(distilled) < churn_to_anchor(labels_only)


def test_ensemble_with_batchnorm_and_dropout_keeps_per_component_state(ds):
    model = models.Ensemble(models.MLP((8,), 3, norm="batch", dropout_rate=0.2), 2)
    run = engine.fit(
        model,
        TX,
        ds,
        loss_fn=losses.codistillation(BASE, 0.5),
        **dict(CFG, replicas=2, epochs=1, vary=("init", "order", "dropout")),
    )
    mean = run.state.batch_stats["model"]["norm_0"]["mean"]
    assert mean.shape == (2, 2, 8)  # [R, K, features]
    assert not np.allclose(mean[:, 0], mean[:, 1])
    probs = run.predict(ds.x_test)
    assert metrics.finite_replicas(probs).all()


# --------------------------------------------------------------------------------------------
# Optimizers.


def test_optimizers_by_name_and_weight_decay():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    for name in optim.OPTIMIZERS:
        tx = optim.optimizer(name, 0.1)
        assert tx is optim.optimizer(name, 0.1)  # cached: shared compilations
        tx.update(grads, tx.init(params), params)
    tx = optim.optimizer("sgd", 0.1, weight_decay=0.01)
    updates, _ = tx.update(grads, tx.init(params), params)
    # PyTorch-style L2: the step is -lr * (g + wd * w).
    np.testing.assert_allclose(updates["w"], -0.1 * (grads["w"] + 0.01 * params["w"]), rtol=1e-6)
    momentum = optim.optimizer("momentum", 0.1, momentum=0.5)
    state = momentum.init(params)
    first, state = momentum.update(grads, state, params)
    second, _ = momentum.update(grads, state, params)
    np.testing.assert_allclose(second["w"], -0.1 * (0.5 * grads["w"] + grads["w"]), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="rmsprop", learning_rate=0.1), "optimizer must be one of"),
        (dict(name="sgd", learning_rate=0.0), "learning_rate"),
        (dict(name="sgd", learning_rate=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(name="momentum", learning_rate=0.1, momentum=1.0), "momentum"),
    ],
)
def test_optimizer_errors(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        optim.optimizer(name, **kwargs)


def test_plain_model_components_view_has_one_component(ds):
    run = engine.fit(MLP, TX, ds, **dict(CFG, epochs=1))
    comps = run.predict(ds.x_test, components=True)
    assert comps.shape == (4, 1, ds.num_test, 3)
    np.testing.assert_array_equal(comps[:, 0], run.predict(ds.x_test))


def test_equivalent_optimizer_calls_share_one_object():
    assert optim.optimizer("adam", 1e-3) is optim.optimizer("adam", 0.001, weight_decay=0.0)
    assert optim.optimizer("sgd", 0.1, momentum=0.5) is optim.optimizer("sgd", 0.1)
    assert optim.optimizer("momentum", 0.1, momentum=0.5) is not optim.optimizer("momentum", 0.1)


def test_a_multi_head_model_must_be_wrapped(ds):
    """Several heads give [K, B, C] logits: the engine asks for the Ensemble wrapper, which
    tells it how to combine them."""
    with pytest.raises(ValueError, match=r"must return logits \[B, C\]; it returned shape"):
        engine.Engine(engine.Task(models.MLP((8,), 3, heads=2), TX), ds, engine.FitConfig(**CFG))
