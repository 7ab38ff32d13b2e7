"""Task losses and loss transforms: known values, weight 0, composition order, jit/vmap, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxrepro import losses

K, B, C = 3, 16, 5


def _logits(seed=0, k=K, b=B, c=C):
    return jax.random.normal(jax.random.key(seed), (k, b, c))


def _batch(seed=1, b=B, c=C, n=40):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, b)
    index = rng.choice(n, b, replace=False)
    return losses.make_batch(jnp.zeros((b, 2)), jnp.asarray(labels), c, jnp.asarray(index))


def _anchor(n=40, c=C, seed=2):
    return np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(seed), (n, c))))


BASE = losses.softmax_cross_entropy()


# --------------------------------------------------------------------------------------------
# The decorrelation penalty.


def test_decorrelation_identical_components_give_the_maximum():
    one = jax.random.normal(jax.random.key(0), (1, 64, C))
    same = jnp.repeat(one, 4, axis=0)
    assert float(losses.decorrelation(same)) == pytest.approx(1.0, abs=1e-5)
    assert float(losses.decorrelation(same, penalty="absolute")) == pytest.approx(1.0, abs=1e-5)
    # An affine image of a component is perfectly correlated with it as well.
    affine = jnp.concatenate([one, 3.0 * one + 2.0])
    assert float(losses.decorrelation(affine)) == pytest.approx(1.0, abs=1e-5)
    # Anti-correlated components: |rho| = 1, squared penalty 1 too.
    assert float(losses.decorrelation(jnp.concatenate([one, -one]))) == pytest.approx(1.0, 1e-5)


def test_decorrelation_independent_components_give_about_zero():
    outputs = jax.random.normal(jax.random.key(1), (4, 8192, C))
    squared = float(losses.decorrelation(outputs))
    absolute = float(losses.decorrelation(outputs, penalty="absolute"))
    assert 0 <= squared < 1e-3  # expectation about 1 / (B * C) for class-averaged correlations
    assert 0 <= absolute < 0.03
    # Between the extremes: partly shared components.
    shared = jax.random.normal(jax.random.key(2), (1, 8192, C))
    mixed = outputs + shared
    assert 0.2 < float(losses.decorrelation(mixed)) < 0.3  # rho = 1/2, squared 1/4


def test_decorrelation_matches_a_numpy_reference():
    outputs = np.asarray(_logits(3, k=4, b=32))
    rhos = []
    for i in range(4):
        for j in range(i + 1, 4):
            per_class = [np.corrcoef(outputs[i, :, c], outputs[j, :, c])[0, 1] for c in range(C)]
            rhos.append(np.mean(per_class))
    rhos = np.asarray(rhos)
    np.testing.assert_allclose(float(losses.decorrelation(outputs)), np.mean(rhos**2), rtol=1e-4)
    np.testing.assert_allclose(
        float(losses.decorrelation(outputs, penalty="absolute")), np.mean(np.abs(rhos)), rtol=1e-4
    )


@pytest.mark.parametrize("penalty", ["squared", "absolute"])
def test_decorrelation_gradient_matches_finite_differences(penalty):
    outputs = _logits(4, k=3, b=12, c=4)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(outputs), jnp.float64)
        check_grads(
            lambda o: losses.decorrelation(o, penalty=penalty),
            (x64,),
            order=1,
            modes=["rev"],
            eps=1e-6,
            atol=1e-6,
            rtol=1e-6,
        )


def test_decorrelation_needs_two_components():
    with pytest.raises(ValueError, match="K >= 2"):
        losses.decorrelation(_logits(k=1))


# --------------------------------------------------------------------------------------------
# Task losses against references.


def test_cross_entropy_of_one_component_is_the_plain_loss():
    logits, batch = _logits(k=1), _batch()
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[0], batch.labels).mean()
    for over in losses.OVER:
        got = losses.softmax_cross_entropy(over=over)(logits, batch)
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)


def test_cross_entropy_of_the_ensemble_and_of_the_components():
    logits, batch = _logits(), _batch()
    p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    y = np.asarray(batch.labels)
    ensemble = -np.mean(np.log(p.mean(0)[np.arange(B), y]))
    components = -np.mean(np.log(p[:, np.arange(B), y]))
    np.testing.assert_allclose(float(BASE(logits, batch)), ensemble, rtol=1e-5)
    np.testing.assert_allclose(
        float(losses.softmax_cross_entropy(over="components")(logits, batch)), components, rtol=1e-5
    )
    # The ensemble's log probabilities are logits whose softmax is the mean probability.
    np.testing.assert_allclose(
        np.asarray(jax.nn.softmax(losses.ensemble_log_probs(logits))),
        p.mean(0),
        rtol=1e-5,
        atol=1e-7,
    )


def test_sigmoid_binary_cross_entropy_matches_optax():
    logits, batch = _logits(k=1), _batch()
    expected = optax.sigmoid_binary_cross_entropy(logits[0], batch.targets).sum(-1).mean()
    for over in losses.OVER:
        got = losses.sigmoid_binary_cross_entropy(over=over)(logits, batch)
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    # Ensemble: the loss of the components' mean sigmoid probabilities.
    logits = _logits()
    q = np.asarray(jax.nn.sigmoid(logits), np.float64).mean(0)
    t = np.asarray(batch.targets)
    ref = -np.mean(np.sum(t * np.log(q) + (1 - t) * np.log(1 - q), axis=-1))
    np.testing.assert_allclose(
        float(losses.sigmoid_binary_cross_entropy()(logits, batch)), ref, rtol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Each transform's own value.


def test_label_smoothing_and_anchor_rewrite_the_targets():
    logits, batch = _logits(), _batch()
    anchor = _anchor()
    c = batch.targets.shape[-1]
    smoothed = 0.9 * batch.targets + 0.1 / c
    np.testing.assert_allclose(
        float(losses.label_smoothing(BASE, 0.1)(logits, batch)),
        float(BASE(logits, batch._replace(targets=smoothed))),
        rtol=1e-6,
    )
    mixed = 0.3 * anchor[np.asarray(batch.index)] + 0.7 * batch.targets
    np.testing.assert_allclose(
        float(losses.anchor_distillation(BASE, 0.3, anchor)(logits, batch)),
        float(BASE(logits, batch._replace(targets=mixed))),
        rtol=1e-6,
    )


def test_composition_order_of_target_transforms_is_outermost_first():
    logits, batch = _logits(), _batch()
    anchor = _anchor()
    a = anchor[np.asarray(batch.index)]
    onehot = np.asarray(batch.targets)
    smooth_then_mix = 0.5 * a + 0.5 * (0.8 * onehot + 0.2 / C)
    mix_then_smooth = 0.8 * (0.5 * a + 0.5 * onehot) + 0.2 / C
    outer_smoothing = losses.label_smoothing(losses.anchor_distillation(BASE, 0.5, anchor), 0.2)
    outer_anchor = losses.anchor_distillation(losses.label_smoothing(BASE, 0.2), 0.5, anchor)
    np.testing.assert_allclose(
        float(outer_smoothing(logits, batch)),
        float(BASE(logits, batch._replace(targets=jnp.asarray(smooth_then_mix)))),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(outer_anchor(logits, batch)),
        float(BASE(logits, batch._replace(targets=jnp.asarray(mix_then_smooth)))),
        rtol=1e-6,
    )
    assert abs(float(outer_smoothing(logits, batch)) - float(outer_anchor(logits, batch))) > 1e-4


def test_penalties_add_up_in_any_order():
    logits, batch = _logits(), _batch()
    base = float(BASE(logits, batch))
    ad = float(losses.decorrelation(logits))
    p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    pbar = p.mean(0)
    ent = -np.mean(np.sum(pbar * np.log(pbar), -1))
    kl = []
    for k in range(K):
        q = (p.sum(0) - p[k]) / (K - 1)
        kl.append(np.mean(np.sum(q * (np.log(q) - np.log(p[k])), -1)))
    codist = np.mean(kl)
    expected = base + 0.5 * ad + 0.2 * ent + 0.3 * codist
    orders = [
        losses.min_entropy(losses.codistillation(losses.anti_distillation(BASE, 0.5), 0.3), 0.2),
        losses.anti_distillation(losses.min_entropy(losses.codistillation(BASE, 0.3), 0.2), 0.5),
        losses.codistillation(losses.anti_distillation(losses.min_entropy(BASE, 0.2), 0.5), 0.3),
    ]
    for loss in orders:
        np.testing.assert_allclose(float(loss(logits, batch)), expected, rtol=1e-5)


def test_residual_anti_distillation_decorrelates_the_errors():
    logits, batch = _logits(), _batch()
    residual = jax.nn.softmax(logits, axis=-1) - batch.targets[None]
    got = losses.anti_distillation(BASE, 1.0, output="residual")(logits, batch)
    np.testing.assert_allclose(
        float(got - BASE(logits, batch)), float(losses.decorrelation(residual)), rtol=1e-5
    )


def test_centred_logits_penalty_ignores_a_per_example_shift():
    """A shift common to all classes of an example leaves the prediction unchanged: the centred
    penalty is blind to it, the raw-logit penalty is not (it can be lowered that way)."""
    logits, batch = _logits(), _batch()
    shift_KxBx1 = 10.0 * jax.random.normal(jax.random.key(5), (K, B, 1))
    centred = losses.anti_distillation(BASE, 1.0, output="centred_logits")
    raw = losses.anti_distillation(BASE, 1.0)
    np.testing.assert_allclose(
        float(centred(logits + shift_KxBx1, batch)), float(centred(logits, batch)), rtol=1e-5
    )
    assert abs(float(raw(logits + shift_KxBx1, batch)) - float(raw(logits, batch))) > 1e-2


def test_codistillation_target_carries_no_gradient():
    """The distillation target is the stop-gradient mean of the others: with two components the
    term's gradient for component 0 depends only on component 0's own softmax."""
    logits, batch = _logits(k=2), _batch()
    term = lambda z: losses.codistillation(BASE, 1.0)(z, batch) - BASE(z, batch)
    g = jax.grad(term)(logits)
    p = jax.nn.softmax(logits, axis=-1)
    # d/dz0 KL(q || softmax(z0)) = softmax(z0) - q, with q = p1 held fixed; halved by the mean
    # over the two components and divided by B by the batch mean.
    np.testing.assert_allclose(np.asarray(g[0]), np.asarray((p[0] - p[1]) / (2 * B)), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Weight 0, jit and vmap.


def _all_transforms(weight):
    anchor = _anchor()
    return {
        "label_smoothing": losses.label_smoothing(BASE, weight),
        "anchor_distillation": losses.anchor_distillation(BASE, weight, anchor),
        "anti_distillation": losses.anti_distillation(BASE, weight),
        "anti_distillation_residual": losses.anti_distillation(
            BASE, weight, output="residual", penalty="absolute"
        ),
        "anti_distillation_centred": losses.anti_distillation(
            BASE, weight, output="centred_logits"
        ),
        "codistillation": losses.codistillation(BASE, weight),
        "min_entropy": losses.min_entropy(BASE, weight),
    }


@pytest.mark.parametrize("name", sorted(_all_transforms(0.0)))
def test_weight_zero_leaves_loss_and_gradient_unchanged(name):
    logits, batch = _logits(), _batch()
    loss = _all_transforms(0.0)[name]
    value, grad = jax.jit(jax.value_and_grad(loss))(logits, batch)
    base_value, base_grad = jax.jit(jax.value_and_grad(BASE))(logits, batch)
    # Equal up to float rounding: XLA may fuse the base loss with the zero-weighted term's
    # shared intermediates (the softmax) and round the gradient differently in the last bit.
    np.testing.assert_allclose(float(value), float(base_value), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(base_grad), rtol=1e-6, atol=1e-9)
    # ... and a positive weight does change them (the transform is not a no-op).
    changed = _all_transforms(0.25)[name]
    assert float(changed(logits, batch)) != float(base_value)


@pytest.mark.parametrize("name", sorted(_all_transforms(0.0)))
def test_transforms_agree_under_jit_and_vmap(name):
    loss = _all_transforms(0.3)[name]
    logits_R = jax.random.normal(jax.random.key(9), (4, K, B, C))
    batch = _batch()
    looped = np.asarray([float(loss(logits_R[r], batch)) for r in range(4)])
    vmapped = jax.jit(jax.vmap(loss, in_axes=(0, None)))(logits_R, batch)
    np.testing.assert_allclose(np.asarray(vmapped), looped, rtol=1e-5)
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))(logits_R, batch)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_equal_losses_are_equal_objects():
    """Equal losses hash equal, so tasks built twice share their compiled functions."""
    a = losses.anti_distillation(losses.label_smoothing(BASE, 0.1), 0.5)
    b = losses.anti_distillation(losses.label_smoothing(losses.softmax_cross_entropy(), 0.1), 0.5)
    assert a == b and hash(a) == hash(b)
    assert a != losses.anti_distillation(losses.label_smoothing(BASE, 0.1), 0.25)


# --------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: losses.anti_distillation(BASE, -1.0), "anti_distillation: weight"),
        (lambda: losses.anti_distillation(BASE, float("nan")), "anti_distillation: weight"),
        (lambda: losses.anti_distillation(BASE, 0.1, output="probs"), "output"),
        (lambda: losses.anti_distillation(BASE, 0.1, penalty="cubic"), "penalty"),
        (lambda: losses.codistillation(BASE, "a"), "codistillation: weight"),
        (lambda: losses.min_entropy(BASE, float("inf")), "min_entropy: weight"),
        (lambda: losses.label_smoothing(BASE, 1.5), r"label_smoothing: weight must be \[0, 1.0\]"),
        (lambda: losses.anchor_distillation(BASE, 2.0, _anchor()), "anchor_distillation: weight"),
        (lambda: losses.anchor_distillation(BASE, 0.5, np.ones((4,))), "anchor must be"),
        (lambda: losses.anchor_distillation(BASE, 0.5, np.ones((4, 3))), "probability"),
        (lambda: losses.anchor_distillation(BASE, 0.5, np.full((4, 2), np.nan)), "NaN"),
        (lambda: losses.softmax_cross_entropy(over="mean"), "over must be"),
    ],
)
def test_bad_arguments_name_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_check_rejects_transforms_that_do_not_fit_the_task():
    ok = dict(num_train=40, num_classes=C)
    with pytest.raises(ValueError, match="anti_distillation needs an ensemble of K >= 2"):
        losses.check(
            losses.min_entropy(losses.anti_distillation(BASE, 0.1), 0.1), num_components=1, **ok
        )
    with pytest.raises(ValueError, match="codistillation needs"):
        losses.check(losses.codistillation(BASE, 0.1), num_components=1, **ok)
    with pytest.raises(ValueError, match=r"anchor_distillation: .* \[41, 5\]"):
        losses.check(
            losses.anchor_distillation(BASE, 0.1, _anchor()),
            num_components=1,
            num_train=41,
            num_classes=C,
        )
    losses.check(
        losses.codistillation(losses.anchor_distillation(BASE, 0.1, _anchor()), 0.1),
        num_components=2,
        **ok,
    )  # fits: no error


def test_anchor_from_stacked_predictions_is_their_mean():
    stacked = np.stack([_anchor(seed=s) for s in range(3)])
    t = losses.anchor_distillation(BASE, 0.5, stacked)
    np.testing.assert_allclose(t.anchor, stacked.mean(0), rtol=1e-6)
