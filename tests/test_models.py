"""Tests for jaxrepro.models: shapes, parameter counts, BatchNorm, dropout, residuals, vmap.

Compiling PRNG code (init, dropout) is slow on CPU, so each model is initialised for real once
(vmapped over `R` keys, cached in `_stacked`), jitted applies are cached per case in `_fns`, and
tests that only need some parameters fill `jax.eval_shape`'s structure with NumPy values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import models

R = 3


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_variables(model, x, seed=0):
    """Variables with the structure `model.init` gives, filled by NumPy (nothing compiled)."""
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        values = rng.normal(size=s.shape) * 0.5
        if jax.tree_util.keystr(path).endswith("['var']"):  # BatchNorm variances must be > 0.
            values = np.abs(values) + 0.5
        return jnp.asarray(values, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _n_params(variables):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))


# name -> (model, input shape [B, ...]): every model and input layout, every option somewhere.
CASES = {
    "mlp": (models.MLP(widths=(16, 16), num_classes=10), (4, 40)),
    "mlp_image_input": (models.MLP(widths=(8,), num_classes=3, norm="layer"), (4, 8, 8, 1)),
    "cnn1d": (models.CNN1D(features=(4, 4), activation="gelu"), (4, 40)),
    "cnn1d_channels": (models.CNN1D(features=(4,), kernel_size=3, norm="batch"), (4, 40, 2)),
    "cnn2d": (models.CNN2D(features=(4,), dense=8, num_classes=3), (4, 8, 8, 1)),
    "cnn2d_gray": (models.CNN2D(features=(4, 4), dense=8, norm="layer"), (4, 8, 8)),
}
# One per model class, with normalisation (and dropout in the MLP), for the slower tests that
# run the real init and dropout (compiling PRNG code costs ~0.5 s per call site on CPU).
VMAP_CASES = {
    "mlp": (
        models.MLP(
            widths=(8, 8),
            num_classes=5,
            activation="smelu(0.5)",
            norm="batch",
            residual=True,
            dropout_rate=0.2,
        ),
        (4, 4, 3),
    ),
    "cnn1d": (
        models.CNN1D(features=(4,), kernel_size=3, norm="layer"),
        (4, 40),
    ),
    "cnn2d": (
        models.CNN2D(features=(4,), dense=8, norm="batch", num_classes=3),
        (4, 8, 8),
    ),
}


@functools.cache
def _stacked(name):
    """Variables of `R` replicas of `VMAP_CASES[name]` from one vmapped, jitted init; the keys."""
    model, shape = VMAP_CASES[name]
    keys_R = jax.random.split(jax.random.key(7), R)
    init = jax.jit(jax.vmap(lambda k: model.init({"params": k}, _x(shape), train=False)))
    return init(keys_R), keys_R


@functools.cache
def _fns(name):
    """Jitted (eval_apply(v, x), train_apply(v, x, key)) for `VMAP_CASES[name]`."""
    model, _ = VMAP_CASES[name]
    mutable = ["batch_stats"] if model.norm == "batch" else False

    def eval_apply(v, x):
        return model.apply(v, x, train=False)

    def train_apply(v, x, key):
        out = model.apply(v, x, train=True, rngs={"dropout": key}, mutable=mutable)
        return out if mutable else (out, {})

    return jax.jit(eval_apply), jax.jit(train_apply)


# ---------------------------------------------------------------- shapes and structure


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape_dtype_and_jit_matches_eager(name):
    model, shape = CASES[name]
    x = _x(shape)
    variables = _random_variables(model, x)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (shape[0], model.num_classes)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(jitted, logits, atol=1e-5)


def test_default_cnns_on_their_datasets_shapes():
    for model, x in [
        (models.CNN1D(), jnp.zeros((2, 40))),
        (models.CNN2D(), jnp.zeros((2, 8, 8, 1))),
    ]:
        out = jax.eval_shape(lambda m=model, x=x: m.apply(_random_variables(m, x), x, train=False))
        assert out.shape == (2, 10) and out.dtype == jnp.float32


def test_mlp_param_count():
    model = models.MLP(widths=(256, 256), num_classes=10)
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 40)), train=False)
    )
    assert _n_params(shapes) == 40 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert set(shapes) == {"params"}


def test_mlp_linear_when_no_hidden_layers():
    model = models.MLP(widths=(), num_classes=3)
    assert _n_params(_random_variables(model, jnp.zeros((1, 5)))) == 5 * 3 + 3


def test_fields_are_normalised_to_hashable_tuples():
    model = models.MLP(widths=[8, 8], num_classes=3)
    assert model.widths == (8, 8)
    hash(model)


# ---------------------------------------------------------------- BatchNorm, dropout, residual


def test_batchnorm_running_stats_update_and_are_used_in_eval():
    eval_apply, train_apply = _fns("mlp")
    stacked, _ = _stacked("mlp")
    variables = jax.tree.map(lambda a: a[0], stacked)
    stats0 = variables["batch_stats"]
    np.testing.assert_array_equal(stats0["norm_0"]["mean"], np.zeros(8))
    np.testing.assert_array_equal(stats0["norm_0"]["var"], np.ones(8))

    x = _x((4, 4, 3)) * 3.0 + 2.0
    _, updates = train_apply(variables, x, jax.random.key(0))
    stats1 = updates["batch_stats"]
    # momentum 0.9: new = 0.9 * old + 0.1 * batch statistic (biased variance).
    dense_0 = variables["params"]["dense_0"]
    h_BxW = np.asarray(x.reshape(4, -1) @ dense_0["kernel"] + dense_0["bias"], np.float64)
    np.testing.assert_allclose(stats1["norm_0"]["mean"], 0.1 * h_BxW.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats1["norm_0"]["var"], 0.9 + 0.1 * h_BxW.var(0), rtol=1e-4)

    new_vars = {"params": variables["params"], "batch_stats": stats1}
    eval_new = eval_apply(new_vars, x)
    assert not np.allclose(eval_apply(variables, x), eval_new)
    # Eval mode is per example (running statistics): permuting the batch permutes the rows.
    np.testing.assert_allclose(eval_apply(new_vars, x[::-1]), eval_new[::-1], atol=1e-5)
    train_out, _ = train_apply(new_vars, x, jax.random.key(0))
    assert not np.allclose(train_out, eval_new)


def test_batchnorm_train_mode_uses_batch_statistics():
    model = models.MLP(widths=(8,), num_classes=3, norm="batch")
    x = _x((6, 5))
    variables = _random_variables(model, x)

    def train(x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    # Train mode: a row's output depends on the rest of the batch. Eval mode: it does not.
    assert not np.allclose(train(x)[:3], train(x[:3]))
    np.testing.assert_allclose(
        model.apply(variables, x, train=False)[:3],
        model.apply(variables, x[:3], train=False),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "model, shape",
    [(VMAP_CASES["mlp"][0], (4, 4, 3)), (models.CNN2D(features=(4,), dropout_rate=0.3), (4, 8, 8))],
    ids=["mlp", "cnn2d"],
)
def test_dropout_random_in_train_mode_only(model, shape):
    x = _x(shape)
    variables = _random_variables(model, x)
    mutable = ["batch_stats"] if model.norm == "batch" else False

    @jax.jit
    def train_apply(key):
        out = model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=mutable)
        return out[0] if mutable else out

    a, a_again, b = (
        train_apply(jax.random.key(0)),
        train_apply(jax.random.key(0)),
        train_apply(jax.random.key(1)),
    )
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, b)
    e1 = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(0)})
    e2 = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(e1, e2)


def test_without_dropout_train_equals_eval():
    model, shape = CASES["mlp"]
    x = _x(shape)
    variables = _random_variables(model, x)
    np.testing.assert_array_equal(
        model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)}),
        model.apply(variables, x, train=False),
    )


def test_residual_differs_from_plain_with_same_params():
    x = _x((4, 6))
    plain = models.MLP(widths=(8, 8, 8), num_classes=3)
    res = models.MLP(widths=(8, 8, 8), num_classes=3, residual=True)
    variables = _random_variables(plain, x)
    assert jax.tree.structure(variables) == jax.tree.structure(_random_variables(res, x))
    assert not np.allclose(
        plain.apply(variables, x, train=False), res.apply(variables, x, train=False)
    )


def test_residual_skips_only_between_equal_widths():
    # Widths 8 -> 4 cannot skip, and the first layer (8 inputs -> 8) never skips: these agree.
    x = _x((4, 8))
    plain = models.MLP(widths=(8, 4), num_classes=3)
    res = models.MLP(widths=(8, 4), num_classes=3, residual=True)
    variables = _random_variables(plain, x)
    np.testing.assert_array_equal(
        plain.apply(variables, x, train=False), res.apply(variables, x, train=False)
    )


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("cls", [models.MLP, models.CNN1D, models.CNN2D])
def test_unknown_activation_raises_at_construction(cls):
    kwargs = {"widths": (4,), "num_classes": 3} if cls is models.MLP else {}
    with pytest.raises(ValueError, match="swishy"):
        cls(activation="swishy", **kwargs)
    with pytest.raises(ValueError, match="smelu"):
        cls(activation="smelu(beta=-1)", **kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (models.MLP, {"widths": (4, 0), "num_classes": 3}, "widths"),
        (models.MLP, {"widths": (4, -2), "num_classes": 3}, "widths"),
        (models.MLP, {"widths": (4,), "num_classes": 1}, "num_classes"),
        (models.MLP, {"widths": (4,), "num_classes": 3, "dropout_rate": 1.0}, "dropout_rate"),
        (models.MLP, {"widths": (4,), "num_classes": 3, "dropout_rate": -0.1}, "dropout_rate"),
        (models.MLP, {"widths": (4,), "num_classes": 3, "norm": "group"}, "norm"),
        (models.CNN1D, {"features": ()}, "features"),
        (models.CNN1D, {"features": (4, 0)}, "features"),
        (models.CNN1D, {"kernel_size": 0}, "kernel_size"),
        (models.CNN1D, {"norm": "instance"}, "norm"),
        (models.CNN2D, {"dense": 0}, "dense"),
        (models.CNN2D, {"features": (2.5,)}, "features"),
        (models.CNN2D, {"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_fields_raise_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "model, shape",
    [(models.CNN1D(features=(4,)), (2,)), (models.CNN2D(features=(4,)), (2, 8))],
)
def test_wrong_input_rank_raises(model, shape):
    with pytest.raises(ValueError, match=type(model).__name__):
        jax.eval_shape(
            lambda: model.init({"params": jax.random.key(0)}, jnp.zeros(shape), train=False)
        )


# ---------------------------------------------------------------- replicas under vmap


@pytest.mark.parametrize("name", sorted(VMAP_CASES))
def test_vmap_over_replicas_matches_per_replica_apply(name):
    model, shape = VMAP_CASES[name]
    eval_apply, train_apply = _fns(name)
    x = _x(shape)
    stacked, _ = _stacked(name)
    for leaf in jax.tree.leaves(stacked):
        assert leaf.shape[0] == R

    logits_RxBxC = jax.jit(jax.vmap(eval_apply, in_axes=(0, None)))(stacked, x)
    assert logits_RxBxC.shape == (R, shape[0], model.num_classes)
    assert not np.allclose(logits_RxBxC[0], logits_RxBxC[1])  # Different init keys.
    drop_R = jax.random.split(jax.random.key(8), R)
    train_R = jax.jit(jax.vmap(train_apply, in_axes=(0, None, 0)))(stacked, x, drop_R)

    for i in range(R):
        v_i = jax.tree.map(lambda a, i=i: a[i], stacked)
        np.testing.assert_allclose(logits_RxBxC[i], eval_apply(v_i, x), atol=1e-5)
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, atol=1e-5),
            train_R,
            train_apply(v_i, x, drop_R[i]),
        )


def test_vmapped_init_equals_per_key_init():
    """Replica r's initial variables depend only on its key, not on how many replicas there are."""
    model, shape = VMAP_CASES["mlp"]
    stacked, keys_R = _stacked("mlp")
    init = jax.jit(lambda k: model.init({"params": k}, _x(shape), train=False))
    for i in range(R):
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, atol=1e-6),
            stacked,
            init(keys_R[i]),
        )


@pytest.mark.parametrize(
    "make, x_shape",
    [
        (
            lambda conv: models.CNN1D(features=(4, 6), kernel_size=5, num_classes=3, conv=conv),
            (5, 13, 2),
        ),
        (
            lambda conv: models.CNN2D(
                features=(4, 6), kernel_size=3, dense=8, num_classes=3, conv=conv
            ),
            (5, 9, 7, 1),
        ),
    ],
)
def test_patch_convolution_equals_xla_convolution(make, x_shape):
    """PatchConv (im2col by strided slices) has nn.Conv's parameters, init and outputs."""
    x = jax.random.normal(jax.random.key(1), x_shape)
    patches, xla = make("patches"), make("xla")
    # Each model's init, output and gradient in one jitted function (eagerly, the patches'
    # many slices would each be dispatched and compiled on their own).
    loss = lambda m: lambda v: jnp.sum(jnp.square(m.apply(v, x, train=False)))

    @functools.partial(jax.jit, static_argnums=0)
    def everything(m):
        v = m.init({"params": jax.random.key(0)}, x, train=False)
        return v, m.apply(v, x, train=False), jax.grad(loss(m))(v)

    v_patches, out_p, g_p = everything(patches)
    v_xla, out_x, g_x = everything(xla)
    assert jax.tree.structure(v_patches) == jax.tree.structure(v_xla)
    for a, b in zip(jax.tree.leaves(v_patches), jax.tree.leaves(v_xla), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same init, bitwise
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_x), atol=1e-5)
    # Gradients agree too.
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_unknown_conv_is_rejected():
    with pytest.raises(ValueError, match="conv must be one of"):
        models.CNN1D(conv="fft")
