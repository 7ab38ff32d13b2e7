"""Values, not shapes: models, dropout, activations and optimizer steps against NumPy float64.

Every reference here is written from the documentation (the docstrings of jaxrepro.models,
jaxrepro.activations and jaxrepro.optim, methods.md section 3) and from the documented
semantics of the Flax, XLA and optax layers they name, never by calling the library's code:

- Dense: ``x @ kernel + bias`` (kernel ``[in, out]``).
- LayerNorm (Flax defaults): over the last axis, ``(x - mean) / sqrt(var + 1e-6) * scale +
  bias``. BatchNorm in eval mode (Flax defaults): ``(x - running_mean) / sqrt(running_var +
  1e-5) * scale + bias`` per feature / channel.
- Convolution: cross-correlation (kernel ``[*window, C_in, C_out]``, not flipped), stride 2,
  XLA's "SAME" padding: ``out = ceil(n / s)``, ``max((out - 1) s + k - n, 0)`` zeros in all,
  the smaller half before.
- Dropout (Flax): each element kept with probability ``1 - p`` and divided by ``1 - p``.

Parameters are not the initialiser's (zero biases, unit norm scales would hide mistakes): the
structure comes from ``jax.eval_shape(model.init)`` and NumPy fills it with random values.
Applies are jitted (on CPU one small jit compiles faster than op-by-op dispatch).

Tolerances: the library computes in float32 (eps 1.2e-7). The models are a few layers of dot
products of length <= 50 with O(1) values, so their rounding error is ~1e-6 of the output's
scale; ``rtol = atol / scale = 1e-5`` leaves a margin of ten and is still far below what a wrong
epsilon, padding split, flattening order, residual or head column order gives (each makes some
case here fail; the epsilon, padding and residual ones are also asserted below).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrepro
from jaxrepro import activations, models, optim

# --------------------------------------------------------------------------------------------
# Helpers.

LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's default epsilon.
BATCH_NORM_EPS = 1e-5  # flax.linen.BatchNorm's default epsilon.


def _x(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _random_variables(model, x, seed=0):
    """Variables with ``model.init``'s structure, filled with random NumPy float32 values.

    Kernels ~ N(0, 1/fan_in) (activations stay O(1)), biases and norm offsets ~ N(0, 0.5^2),
    norm scales ~ 1 + N(0, 0.3^2), running means ~ N(0, 0.5^2) and running variances
    log-uniform in [1e-6, 1] (so BatchNorm's epsilon matters for some channels).
    """
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            stacked = "['model']" in name  # an Ensemble's towers: [K, ...] kernels
            fan_in = int(np.prod(s.shape[1 if stacked else 0 : -1]))
            values = rng.normal(size=s.shape) / math.sqrt(fan_in)
        elif name.endswith("['scale']"):
            values = 1 + 0.3 * rng.normal(size=s.shape)
        elif name.endswith("['var']"):
            values = 10.0 ** rng.uniform(-6, 0, size=s.shape)
        else:
            values = 0.5 * rng.normal(size=s.shape)
        return np.asarray(values, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _assert_close_to_scale(actual, expected, rtol=1e-5):
    """``|actual - expected| <= rtol * (|expected| + max |expected|)`` elementwise."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------------------------
# NumPy float64 activations (methods.md section 3 and the activations' docstrings).


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gsmelu(x, g=0.0, alpha=1.0, beta=1.0):
    """Generalized SmeLU from methods.md's a, b, c, t (the library evaluates another form)."""
    s = alpha + beta
    a, b, c = (1 - g) / (2 * s), (alpha + g * beta) / s, (1 - g) * beta**2 / (2 * s)
    t = (1 - g) * (beta - alpha) / 2
    return np.where(x <= -alpha, g * x + t, np.where(x >= beta, x, a * x**2 + b * x + c))


def _smelu(x, beta=1.0):
    return np.where(x <= -beta, 0.0, np.where(x >= beta, x, (x + beta) ** 2 / (4 * beta)))


def _gelu_grad(x):
    return 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)


def _silu_grad(x):
    s = _sigmoid(x)
    return s * (1 + x * (1 - s))


class _Ref:
    """A reference activation: value, derivative, the parameter sets to test (the first is the
    documented default, written out), the joins of its pieces (checked by value), and the
    points where it is not differentiable (left out of the gradient check)."""

    def __init__(self, fn, grad, params=({},), joins=lambda **kw: (), kinks=lambda **kw: ()):
        self.fn, self.grad, self.params, self.joins, self.kinks = fn, grad, params, joins, kinks


_ACTIVATION_REFS = {
    "relu": _Ref(
        lambda x: np.maximum(x, 0.0),
        lambda x: (x > 0).astype(np.float64),
        joins=lambda: (0.0,),
        kinks=lambda: (0.0,),
    ),
    "leaky_relu": _Ref(
        lambda x, negative_slope=0.01: np.where(x >= 0, x, negative_slope * x),
        lambda x, negative_slope=0.01: np.where(x > 0, 1.0, negative_slope),
        params=({}, {"negative_slope": 0.2}),
        joins=lambda **kw: (0.0,),
        kinks=lambda **kw: (0.0,),
    ),
    "gelu": _Ref(lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))), _gelu_grad),
    "silu": _Ref(lambda x: x * _sigmoid(x), _silu_grad),
    "swish": _Ref(lambda x: x * _sigmoid(x), _silu_grad),
    "softplus": _Ref(lambda x: np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0), _sigmoid),
    "elu": _Ref(
        lambda x, alpha=1.0: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0))),
        lambda x, alpha=1.0: np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0))),
        params=({}, {"alpha": 0.5}),
        joins=lambda **kw: (0.0,),
        # Differentiable at 0 only when alpha == 1 (both one-sided slopes are 1).
        kinks=lambda alpha=1.0: () if alpha == 1.0 else (0.0,),
    ),
    "tanh": _Ref(np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "sigmoid": _Ref(_sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x))),
    # SmeLU is C^1: its gradient is checked at the joins too.
    "smelu": _Ref(
        _smelu,
        lambda x, beta=1.0: np.clip((x + beta) / (2 * beta), 0, 1),
        params=({}, {"beta": 0.1}, {"beta": 3.0}),
        joins=lambda beta=1.0: (-beta, beta),
    ),
    "generalized_smelu": _Ref(
        _gsmelu,
        lambda x, g=0.0, alpha=1.0, beta=1.0: (
            g + (1 - g) * np.clip((x + alpha) / (alpha + beta), 0, 1)
        ),
        params=({}, {"g": 0.1, "alpha": 0.5, "beta": 2.0}, {"g": -0.3, "alpha": 1.5, "beta": 0.25}),
        joins=lambda g=0.0, alpha=1.0, beta=1.0: (-alpha, beta),
    ),
}


def _spec(name, params):
    if not params:
        return name
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def _np_activation(spec):
    """The NumPy float64 reference of an activation spec of this file (``_spec``'s form)."""
    name, kwargs = activations.parse(spec)
    return lambda x: _ACTIVATION_REFS[name].fn(x, **kwargs)


# --------------------------------------------------------------------------------------------
# 3. Every registered activation, by value and gradient.


@pytest.mark.parametrize("name", activations.NAMES)
def test_activation_values_and_gradients(name):
    assert name in _ACTIVATION_REFS, f"activation {name!r} has no NumPy reference in this file"
    ref = _ACTIVATION_REFS[name]
    for params in ref.params:
        spec = _spec(name, params)
        joins = [float(j) for j in ref.joins(**params)]
        x_N = np.concatenate(
            [
                np.linspace(-8, 8, 161),
                [-30.0, -15.0, 15.0, 30.0],
                joins,
                [j + d for j in joins for d in (-1e-3, 1e-3, -0.25, 0.25)],
            ]
        ).astype(np.float32)
        x64_N = x_N.astype(np.float64)
        fn = activations.get(spec)

        @jax.jit
        def value_and_grad(x, fn=fn):
            y, vjp = jax.vjp(fn, x)
            return y, vjp(jnp.ones_like(y))[0]  # elementwise: the vjp of ones is f'(x)

        y_N, dy_N = value_and_grad(jnp.asarray(x_N))
        assert y_N.dtype == jnp.float32 and y_N.shape == x_N.shape
        # Values: a few float32 roundings of transcendental functions, ~1e-7 relative.
        np.testing.assert_allclose(y_N, ref.fn(x64_N, **params), rtol=2e-6, atol=1e-7, err_msg=spec)
        # Gradients wherever differentiable (SmeLU's joins included: it is C^1).
        smooth_N = np.ones(x_N.shape, bool)
        for kink in ref.kinks(**params):
            smooth_N &= x_N != np.float32(kink)
        np.testing.assert_allclose(
            np.asarray(dy_N)[smooth_N],
            ref.grad(x64_N, **params)[smooth_N],
            rtol=1e-5,
            atol=1e-6,
            err_msg=spec,
        )


def test_activation_spot_values():
    """A few textbook numbers, independent of the reference formulas above."""
    x = jnp.array([-1.0, 0.0, 1.0])
    expected = {
        "gelu": [-0.15865525393145707, 0.0, 0.8413447460685429],  # x * Phi(x)
        "softplus": [0.31326168751822286, math.log(2), 1.3132616875182228],
        "sigmoid": [0.2689414213699951, 0.5, 0.7310585858130049],
        "silu": [-0.2689414213699951, 0.0, 0.7310585858130049],
        "elu": [math.exp(-1) - 1, 0.0, 1.0],
        "smelu": [0.0, 0.25, 1.0],
        "smelu(beta=0.5)": [0.0, 0.125, 1.0],
        "generalized_smelu(g=0.5, alpha=1, beta=1)": [-0.5, 0.125, 1.0],
    }
    specs = list(expected)
    got = jax.jit(lambda x: [activations.get(spec)(x) for spec in specs])(x)  # one compilation
    for spec, values in zip(specs, got, strict=True):
        np.testing.assert_allclose(values, expected[spec], rtol=1e-6, atol=1e-7, err_msg=spec)


# --------------------------------------------------------------------------------------------
# 1. Forward passes of every model against NumPy.


def _np_layer_norm(h, p, eps=LAYER_NORM_EPS):
    mu = h.mean(axis=-1, keepdims=True)
    var = ((h - mu) ** 2).mean(axis=-1, keepdims=True)
    return (h - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_batch_norm_eval(h, p, stats, eps=BATCH_NORM_EPS):
    return (h - stats["mean"]) / np.sqrt(stats["var"] + eps) * p["scale"] + p["bias"]


def _np_norm(h, norm, params, stats, name):
    if norm == "layer":
        return _np_layer_norm(h, params[name])
    if norm == "batch":
        return _np_batch_norm_eval(h, params[name], stats[name])
    assert norm is None
    return h


def _np_dense(h, p):
    return h @ p["kernel"] + p["bias"]


def _np_head(h_BxD, p, num_classes, heads):
    """One Dense of ``heads * C`` outputs; head k's logits are columns ``k*C:(k+1)*C``."""
    out = _np_dense(h_BxD, p)
    if heads == 1:
        return out
    return np.stack([out[:, k * num_classes : (k + 1) * num_classes] for k in range(heads)])


def _np_conv_same(x, kernel, bias, strides):
    """Cross-correlation with XLA's "SAME" padding, as explicit loops over output positions and
    kernel offsets. ``x [B, *spatial, C_in]``, ``kernel [*window, C_in, C_out]``."""
    spatial, window = x.shape[1:-1], kernel.shape[:-2]
    outs = [-(-n // s) for n, s in zip(spatial, strides, strict=True)]
    before = [
        max((o - 1) * s + k - n, 0) // 2
        for o, s, k, n in zip(outs, strides, window, spatial, strict=True)
    ]
    y = np.zeros((x.shape[0], *outs, kernel.shape[-1]))
    for o in np.ndindex(*outs):
        acc = np.broadcast_to(bias, (x.shape[0], bias.shape[0])).copy()
        for d in np.ndindex(*window):
            pos = [oi * s + di - b for oi, s, di, b in zip(o, strides, d, before, strict=True)]
            if all(0 <= q < n for q, n in zip(pos, spatial, strict=True)):  # else a padded zero
                acc += x[(slice(None), *pos)] @ kernel[d]
        y[(slice(None), *o)] = acc
    return y


def _np_mlp(model, params, stats, x):
    act = _np_activation(model.activation)
    h = x.reshape(x.shape[0], -1)
    for i, width in enumerate(model.widths):
        y = _np_dense(h, params[f"dense_{i}"])
        y = act(_np_norm(y, model.norm, params, stats, f"norm_{i}"))  # dropout: identity in eval
        skip = model.residual and i > 0 and model.widths[i - 1] == width
        h = h + y if skip else y
    return _np_head(h, params["head"], model.num_classes, model.heads)


def _np_conv_body(model, params, stats, h, ndim):
    act = _np_activation(model.activation)
    for i in range(len(model.features)):
        p = params[f"conv_{i}"]
        assert p["kernel"].shape[:-2] == (model.kernel_size,) * ndim
        h = _np_conv_same(h, p["kernel"], p["bias"], (2,) * ndim)
        h = act(_np_norm(h, model.norm, params, stats, f"norm_{i}"))
    return h.reshape(h.shape[0], -1)  # row-major: positions, then channels


def _np_cnn1d(model, params, stats, x):
    h = x[..., None] if x.ndim == 2 else x
    h = _np_conv_body(model, params, stats, h, 1)
    return _np_head(h, params["head"], model.num_classes, model.heads)


def _np_cnn2d(model, params, stats, x):
    act = _np_activation(model.activation)
    h = x[..., None] if x.ndim == 3 else x
    h = _np_conv_body(model, params, stats, h, 2)
    h = act(_np_norm(_np_dense(h, params["dense"]), model.norm, params, stats, "norm_dense"))
    return _np_head(h, params["head"], model.num_classes, model.heads)


def _np_model(model, params, stats, x):
    if isinstance(model, models.Ensemble):
        inner = model.model
        if model.shared_body:
            body = inner.clone(heads=model.num_components)
            return _np_model(body, params["body"], stats.get("body", {}), x)
        # Separate towers: component k's variables are slice k of the stacked ones.
        p, s = params["model"], stats.get("model", {})
        return np.stack(
            [
                _np_model(inner, *(jax.tree.map(lambda a, k=k: a[k], t) for t in (p, s)), x)
                for k in range(model.num_components)
            ]
        )
    fn = {models.MLP: _np_mlp, models.CNN1D: _np_cnn1d, models.CNN2D: _np_cnn2d}[type(model)]
    return fn(model, params, stats, x)


MODEL_CASES = {
    "mlp_linear": (models.MLP(widths=(), num_classes=3), (4, 5)),
    "mlp_relu_3d_input": (models.MLP(widths=(6, 4), num_classes=3), (4, 2, 3)),
    # Layer 1 has a skip (5 == 5), layer 2 none (4 != 5), layer 0 never.
    "mlp_layer_residual": (
        models.MLP(
            widths=(5, 5, 4), num_classes=3, activation="smelu(0.5)", norm="layer", residual=True
        ),
        (4, 6),
    ),
    "mlp_batch_residual_dropout": (
        models.MLP(
            widths=(5, 5),
            num_classes=4,
            activation="gelu",
            norm="batch",
            residual=True,
            dropout_rate=0.3,
        ),
        (4, 6),
    ),
    "mlp_heads": (models.MLP(widths=(5,), num_classes=3, activation="tanh", heads=3), (4, 6)),
    # Length 10, kernel 3: 1 padding zero in all at the first layer (after the input), 2 at
    # the second. Length 7, kernel 4: 3 zeros (1 before, 2 after), then 2.
    "cnn1d_patches": (
        models.CNN1D(features=(3, 2), kernel_size=3, num_classes=3, activation="elu"),
        (3, 10),
    ),
    "cnn1d_xla_even_kernel_layer": (
        models.CNN1D(
            features=(3, 2),
            kernel_size=4,
            num_classes=3,
            activation="silu",
            norm="layer",
            conv="xla",
        ),
        (3, 7),
    ),
    "cnn1d_batch_channels_dropout": (
        models.CNN1D(features=(4,), kernel_size=5, num_classes=3, norm="batch", dropout_rate=0.5),
        (3, 7, 2),
    ),
    "cnn2d_patches": (
        models.CNN2D(features=(2, 3), kernel_size=3, dense=5, num_classes=3, activation="softplus"),
        (2, 7, 6),
    ),
    "cnn2d_xla_batch_channels": (
        models.CNN2D(
            features=(2,),
            kernel_size=2,
            dense=4,
            num_classes=3,
            activation="sigmoid",
            norm="batch",
            conv="xla",
        ),
        (2, 5, 6, 2),
    ),
    "cnn2d_layer_heads": (
        models.CNN2D(
            features=(3,),
            kernel_size=4,
            dense=4,
            num_classes=3,
            activation="leaky_relu(0.2)",
            norm="layer",
            conv="xla",
            heads=2,
        ),
        (2, 6, 6),
    ),
    "ensemble_towers_batch": (
        models.Ensemble(models.MLP(widths=(5,), num_classes=3, norm="batch"), num_components=3),
        (4, 6),
    ),
    "ensemble_shared_body": (
        models.Ensemble(
            models.MLP(widths=(5,), num_classes=3, activation="sigmoid"),
            num_components=2,
            shared_body=True,
        ),
        (4, 6),
    ),
}


def _apply_eval(model, variables, x):
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_forward_matches_numpy(case):
    model, shape = MODEL_CASES[case]
    x = _x(shape)
    variables = _random_variables(model, x)
    logits = _apply_eval(model, variables, x)
    v64 = _f64(variables)
    expected = _np_model(model, v64["params"], v64.get("batch_stats", {}), x.astype(np.float64))
    assert logits.dtype == np.float32
    _assert_close_to_scale(logits, expected)


def test_residual_changes_the_reference():
    """The skip connection changes the logits far beyond the tolerance, so the forward test of
    the residual MLP can tell a missing (or extra) skip."""
    model, shape = MODEL_CASES["mlp_layer_residual"]
    x = _x(shape).astype(np.float64)
    params = _f64(_random_variables(model, x))["params"]
    with_skip = _np_mlp(model, params, {}, x)
    no_skip = _np_mlp(model.clone(residual=False), params, {}, x)
    assert np.max(np.abs(with_skip - no_skip)) > 1e-2 * np.max(np.abs(with_skip))


@pytest.mark.parametrize("make", [models.PatchConv, None], ids=["patches", "reference"])
def test_strided_same_convolution_by_hand(make):
    """Length 4, kernel 3, stride 2: 2 outputs and 1 padding zero, after the input. With kernel
    [1, 10, 100] and bias 0.5: 1 + 20 + 300 + 0.5 and 3 + 40 + 0 + 0.5 (a zero before instead
    would give 0 + 10 + 200 + 0.5 and 2 + 30 + 400 + 0.5; a flipped kernel 100 + 20 + 3 + 0.5)."""
    x = np.array([[[1.0], [2.0], [3.0], [4.0]]], np.float32)
    kernel = np.array([1.0, 10.0, 100.0], np.float32).reshape(3, 1, 1)
    bias = np.array([0.5], np.float32)
    if make is None:
        y = _np_conv_same(x.astype(np.float64), kernel, bias, (2,))
    else:
        conv = make(features=1, window=(3,), strides=(2,))
        y = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    np.testing.assert_array_equal(np.asarray(y).ravel(), [321.5, 43.5])


def test_layer_norm_epsilon():
    """Pre-norm variance ~1e-6, so the epsilon matters: Flax's 1e-6, not PyTorch's 1e-5.
    (BatchNorm's 1e-5 is checked in the forward test: running variances go down to 1e-6.)"""
    eps, other = LAYER_NORM_EPS, 1e-5
    model = models.MLP(widths=(6,), num_classes=3, norm="layer")
    x = _x((4, 5))
    variables = _random_variables(model, x)
    dense = variables["params"]["dense_0"]
    dense["kernel"] = (dense["kernel"] * 1e-3).astype(np.float32)
    dense["bias"] = (dense["bias"] * 1e-3).astype(np.float32)
    logits = _apply_eval(model, variables, x)
    p = _f64(variables)["params"]
    h = _np_dense(x.astype(np.float64), p["dense_0"])
    expected = _np_dense(np.maximum(_np_layer_norm(h, p["norm_0"], eps), 0), p["head"])
    wrong = _np_dense(np.maximum(_np_layer_norm(h, p["norm_0"], other), 0), p["head"])
    assert np.max(np.abs(expected - wrong)) > 1e-2 * np.max(np.abs(expected))
    # Rounding of the 1e-3-sized pre-norm values is amplified ~1e3 times relative to them, but
    # stays relative: the float32 error is still ~1e-6 of the logits' scale.
    _assert_close_to_scale(logits, expected)


# --------------------------------------------------------------------------------------------
# 2. Dropout: which elements are zeroed, and the scaling of the others.


@pytest.mark.parametrize("rate", [0.2, 0.7])
def test_dropout_zero_fraction_and_scaling(rate):
    """MLP: Dense -> sigmoid (never 0) -> Dropout -> head. The Dropout layer's output (read with
    ``capture_intermediates``) is zero on a fraction of elements within 5 binomial sigmas of the
    rate, and equal to the eval-mode activation / (1 - rate) elsewhere; the logits are the head
    applied to that output."""
    model = models.MLP(widths=(256,), num_classes=3, activation="sigmoid", dropout_rate=rate)
    x = _x((64, 8))
    variables = _random_variables(model, x)

    @jax.jit
    def run(variables, x, key):
        return model.apply(
            variables, x, train=True, rngs={"dropout": key}, capture_intermediates=True
        )

    logits, state = run(variables, x, jax.random.key(7))
    captured = state["intermediates"]
    (dropped,) = [v for k, v in captured.items() if k.startswith("Dropout")][0]["__call__"]
    dropped = np.asarray(dropped, np.float64)

    p = _f64(variables)["params"]
    h = _sigmoid(_np_dense(x.astype(np.float64), p["dense_0"]))
    assert dropped.shape == h.shape and np.all(h > 0)

    zero = dropped == 0
    n = zero.size
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs(zero.mean() - rate) < 5 * sigma, (zero.mean(), rate, sigma)
    # Kept values: input / (1 - rate), to float32 rounding (sigmoid and one division).
    np.testing.assert_allclose(dropped[~zero], h[~zero] / (1 - rate), rtol=2e-6)
    # The mask is per element: rows and columns are not dropped as a whole.
    assert 0 < zero.mean(axis=0).min() and zero.mean(axis=0).max() < 1
    assert 0 < zero.mean(axis=1).min() and zero.mean(axis=1).max() < 1
    # The head sees exactly the dropped activations.
    _assert_close_to_scale(logits, _np_dense(dropped, p["head"]))
    # A second key: another mask.
    _, state2 = run(variables, x, jax.random.key(8))
    (dropped2,) = [v for k, v in state2["intermediates"].items() if k.startswith("Dropout")][0][
        "__call__"
    ]
    assert np.mean((np.asarray(dropped2) == 0) != zero) > 0.5 * rate * (1 - rate)


# --------------------------------------------------------------------------------------------
# 4. One closed-form step of each optimizer, with L2 weight decay added to the gradient.

LR, MU, WD = 0.1, 0.9, 0.05
B1, B2, EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults.


def _opt_problem():
    rng = np.random.default_rng(5)
    params = {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=(3,))}
    grads = [
        {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=(3,))},
        {"w": rng.normal(size=(2, 3)), "b": 0.01 * rng.normal(size=(3,))},
    ]
    f32 = lambda t: jax.tree.map(lambda a: a.astype(np.float32), t)
    # The reference starts from the float32 values too.
    return _f64(f32(params)), [_f64(f32(g)) for g in grads]


def _np_steps(name, params, grads, decoupled=False):
    """Two steps of ``name`` in NumPy float64. ``decoupled=False``: the documented rule, grad +
    WD * w then the optimizer; ``True``: AdamW-style, -LR * WD * w added to the update."""
    out = {}
    for k in params:
        w = params[k].copy()
        trace = m = v = np.zeros_like(w)
        for t, g_tree in enumerate(grads, start=1):
            g = g_tree[k] if decoupled else g_tree[k] + WD * w
            if name == "sgd":
                u = -LR * g
            elif name == "momentum":  # optax heavy ball: trace = g + mu * trace
                trace = g + MU * trace
                u = -LR * trace
            else:  # Adam, bias-corrected, eps outside the square root
                m = B1 * m + (1 - B1) * g
                v = B2 * v + (1 - B2) * g**2
                m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
                u = -LR * m_hat / (np.sqrt(v_hat) + EPS)
            if decoupled:
                u = u - LR * WD * w
            w = w + u
        out[k] = w
    return out


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizer_two_steps_with_weight_decay(name):
    params, grads = _opt_problem()
    tx = optim.optimizer(name, LR, momentum=MU, weight_decay=WD)

    @jax.jit
    def two_steps(params, grads):
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params

    f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
    got = _f64(two_steps(f32(params), [f32(g) for g in grads]))
    expected = _np_steps(name, params, grads)
    # SGD and momentum: a handful of float32 operations on O(1) values, ~1e-7 relative. Adam:
    # optax computes the bias correction 1 - b2**t in float32, where the cancellation leaves a
    # relative error up to ~ulp(1) / (1 - b2**t) = 6e-5 (t = 1), ~3e-5 after the square root,
    # in every update of size <= ~LR (seen: 1.6e-6 = 1.6e-5 LR; a float32 emulation of the same
    # formulas matches the library to 1e-8).
    atol = 5e-5 * LR if name == "adam" else 1e-6
    for k in params:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=atol, err_msg=k)
    if name != "sgd":  # For plain SGD the two rules coincide.
        adamw = _np_steps(name, params, grads, decoupled=True)
        gap = max(np.max(np.abs(adamw[k] - expected[k])) for k in params)
        assert gap > 1e-3, gap  # far above the tolerance: the test tells the two apart
    no_decay = _np_steps(name, params, [jax.tree.map(lambda a: a * 0, g) for g in grads])
    assert max(np.max(np.abs(no_decay[k] - params[k])) for k in params) > 1e-3


# --------------------------------------------------------------------------------------------
# 5. End to end: two full-batch epochs of fit on a linear model.


def _np_softmax_ce_and_grad(W, b, X, y):
    logits = X @ W + b
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    onehot = np.eye(W.shape[1])[y]
    loss = -np.mean(np.sum(onehot * logp, axis=1))
    delta = (np.exp(logp) - onehot) / X.shape[0]
    return loss, X.T @ delta, delta.sum(axis=0)


def test_training_full_batch_momentum_matches_numpy(ds):
    """Batch = the whole training set, so the order does not matter: each epoch is one step of
    gradient descent on the mean softmax cross-entropy, with momentum and L2 weight decay.

    ``Engine(...).run(state)`` is ``fit`` from a given initial state (random, nonzero bias), so
    no initialiser is compiled."""
    model = models.MLP(widths=(), num_classes=3)
    lr, mu, wd = 0.5, 0.9, 0.01
    tx = optim.optimizer("momentum", lr, momentum=mu, weight_decay=wd)
    n = ds.x_train.shape[0]
    config = jaxrepro.FitConfig(replicas=1, vary=(), batch_size=n, epochs=2, window=1, seed=3)
    rng = np.random.default_rng(4)
    W0 = (0.3 * rng.normal(size=(ds.x_train.shape[1], 3))).astype(np.float32)
    b0 = (0.3 * rng.normal(size=(3,))).astype(np.float32)
    params0 = {"head": {"kernel": jnp.asarray(W0), "bias": jnp.asarray(b0)}}
    state0 = jaxrepro.TrainState(params0, {}, tx.init(params0))
    state0 = jax.tree.map(lambda a: jnp.asarray(a)[None], state0)  # R = 1
    run = jaxrepro.Engine(jaxrepro.Task(model=model, tx=tx), ds, config).run(state0)

    W, b = W0.astype(np.float64), b0.astype(np.float64)
    X, y = np.asarray(ds.x_train, np.float64), np.asarray(ds.y_train)
    trace_W, trace_b, losses = np.zeros_like(W), np.zeros_like(b), []
    for _ in range(2):
        loss, gW, gb = _np_softmax_ce_and_grad(W, b, X, y)
        losses.append(loss)
        trace_W = gW + wd * W + mu * trace_W
        trace_b = gb + wd * b + mu * trace_b
        W, b = W - lr * trace_W, b - lr * trace_b

    params = run.state.params["head"]
    # Sums over 266 examples in float32: ~1e-6 relative.
    np.testing.assert_allclose(np.asarray(params["kernel"][0]), W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["bias"][0]), b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.history["loss"][0], losses, rtol=1e-5)
