"""Tests for jaxrepro.activations: SmeLU formulas, gradients, smoothness and the spec registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import activations


def _smelu_ref(x, beta):
    """SmeLU straight from the definition, in float64 NumPy."""
    x = np.asarray(x, np.float64)
    return np.where(x <= -beta, 0.0, np.where(x >= beta, x, (x + beta) ** 2 / (4 * beta)))


def _gsmelu_ref(x, g, alpha, beta):
    """Generalized SmeLU from the a, b, c, t coefficients of methods.md section 3."""
    x = np.asarray(x, np.float64)
    s = alpha + beta
    a = (1 - g) / (2 * s)
    b = (alpha + g * beta) / s
    c = (1 - g) * beta**2 / (2 * s)
    t = (1 - g) * (beta - alpha) / 2
    return np.where(x <= -alpha, g * x + t, np.where(x >= beta, x, a * x**2 + b * x + c))


def _points(left, right):
    """Points in each region: well left, inside, well right, avoiding the exact joins."""
    return np.concatenate(
        [
            np.linspace(left - 5, left - 1e-2, 17),
            np.linspace(left + 1e-2, right - 1e-2, 33),
            np.linspace(right + 1e-2, right + 5, 17),
        ]
    ).astype(np.float32)


def _grad(fn, x_N):
    return np.asarray(jax.vmap(jax.grad(fn))(jnp.asarray(x_N)))


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 3.0])
def test_smelu_values_and_gradient(beta):
    x_N = _points(-beta, beta)
    np.testing.assert_allclose(activations.smelu(x_N, beta), _smelu_ref(x_N, beta), atol=1e-5)
    grad_N = _grad(lambda x: activations.smelu(x, beta), x_N)
    np.testing.assert_allclose(grad_N, np.clip((x_N + beta) / (2 * beta), 0, 1), atol=1e-5)


def test_smelu_region_values_are_the_textbook_ones():
    x = jnp.array([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(activations.smelu(x, 1.0), [0.0, 0.0, 0.25, 0.5625, 1.0, 2.0])
    # Gradient at the exact joins too (both one-sided derivatives agree there).
    grad = jax.vmap(jax.grad(activations.smelu))(x)
    np.testing.assert_allclose(grad, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize(
    "g, alpha, beta", [(0.0, 1.0, 1.0), (0.1, 0.5, 1.0), (-0.2, 2.0, 0.3), (0.5, 1.0, 2.0)]
)
def test_generalized_smelu_values_and_gradient(g, alpha, beta):
    x_N = _points(-alpha, beta)
    y_N = activations.generalized_smelu(x_N, g, alpha, beta)
    np.testing.assert_allclose(y_N, _gsmelu_ref(x_N, g, alpha, beta), atol=1e-5)
    grad_N = _grad(lambda x: activations.generalized_smelu(x, g, alpha, beta), x_N)
    expected = g + (1 - g) * np.clip((x_N + alpha) / (alpha + beta), 0, 1)
    np.testing.assert_allclose(grad_N, expected, atol=1e-5)


def _one_sided(fn, x0, eps=1e-3):
    """Values and derivatives of fn just left and right of x0 (approximate one-sided limits)."""
    left = np.float32(x0 - eps)
    right = np.float32(x0 + eps)
    df = jax.grad(fn)
    return (float(fn(left)), float(fn(right))), (float(df(left)), float(df(right)))


@pytest.mark.parametrize(
    "fn, joins",
    [
        (lambda x: activations.smelu(x, 0.5), (-0.5, 0.5)),
        (lambda x: activations.smelu(x, 2.0), (-2.0, 2.0)),
        (lambda x: activations.generalized_smelu(x, 0.1, 0.5, 1.0), (-0.5, 1.0)),
        (lambda x: activations.generalized_smelu(x, -0.3, 2.0, 0.25), (-2.0, 0.25)),
    ],
)
def test_value_and_first_derivative_are_continuous_at_joins(fn, joins):
    for x0 in joins:
        for eps in (1e-2, 1e-3):
            (f_l, f_r), (d_l, d_r) = _one_sided(fn, x0, eps)
            # Value jumps by at most slope * 2 eps; the derivative changes by O(eps), not O(1).
            assert abs(f_l - f_r) <= 2.5 * eps * max(1.0, abs(d_l), abs(d_r))
            assert abs(d_l - d_r) <= 5 * eps, (x0, eps, d_l, d_r)


def test_relu_derivative_is_not_continuous_sanity():
    """The continuity check above would catch a kink (so it is not vacuous)."""
    (_, _), (d_l, d_r) = _one_sided(jax.nn.relu, 0.0, 1e-3)
    assert abs(d_l - d_r) > 0.5


def test_generalized_with_g0_alpha_eq_beta_is_smelu():
    for beta in (0.25, 1.0, 4.0):
        x_N = _points(-beta, beta)
        np.testing.assert_array_equal(
            activations.generalized_smelu(x_N, 0.0, beta, beta), activations.smelu(x_N, beta)
        )


def test_smelu_under_jit_and_int_input():
    x = jnp.arange(-3, 4)
    out = jax.jit(activations.smelu, static_argnums=1)(x, 1.0)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _smelu_ref(np.arange(-3, 4), 1.0))


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf"), float("nan")])
def test_smelu_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        activations.smelu(jnp.ones(3), beta)


@pytest.mark.parametrize("kwargs, name", [({"alpha": 0.0}, "alpha"), ({"beta": -2.0}, "beta")])
def test_generalized_smelu_rejects_bad_widths(kwargs, name):
    with pytest.raises(ValueError, match=name):
        activations.generalized_smelu(jnp.ones(3), **kwargs)


def test_traced_parameters_are_not_checked_but_work():
    out = jax.jit(activations.smelu)(jnp.array([0.0]), jnp.float32(2.0))
    np.testing.assert_allclose(out, [0.5])


@pytest.mark.parametrize("name", activations.NAMES)
def test_every_registered_name_evaluates(name):
    fn = activations.get(name)
    x = jnp.linspace(-3, 3, 13)
    y = fn(x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
    assert np.all(np.isfinite(np.asarray(jax.vmap(jax.grad(fn))(x))))


def test_names_cover_the_required_set():
    required = {"relu", "leaky_relu", "gelu", "silu", "swish", "softplus", "elu", "tanh"}
    required |= {"sigmoid", "smelu", "generalized_smelu"}
    assert required <= set(activations.NAMES)
    assert isinstance(activations.NAMES, tuple)


def test_known_values_of_the_standard_activations():
    x = jnp.array([-1.0, 2.0])
    np.testing.assert_allclose(activations.get("relu")(x), [0.0, 2.0])
    np.testing.assert_allclose(activations.get("leaky_relu")(x), [-0.01, 2.0])
    np.testing.assert_allclose(activations.get("swish")(x), activations.get("silu")(x))
    np.testing.assert_allclose(activations.get("tanh")(x), np.tanh([-1.0, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(activations.get("gelu")(jnp.array(1.0)), 0.8413447, rtol=1e-6)


@pytest.mark.parametrize(
    "spec, x, expected",
    [
        ("smelu", 0.0, 0.25),
        ("smelu(0.5)", 0.0, 0.125),
        ("smelu(beta=0.5)", 0.0, 0.125),
        ("  smelu ( beta = 5e-1 ) ", 0.0, 0.125),
        ("smelu()", 0.0, 0.25),
        ("leaky_relu(0.1)", -2.0, -0.2),
        ("leaky_relu(negative_slope=0.1)", -2.0, -0.2),
        ("generalized_smelu(g=0.1, alpha=0.5, beta=1.0)", -3.0, -0.3 + 0.9 * 0.5 / 2),
        ("generalized_smelu(0.1, 0.5, beta=1)", -3.0, -0.3 + 0.9 * 0.5 / 2),
        ("generalized_smelu(-.5, alpha=1)", -3.0, 1.5),
    ],
)
def test_spec_parsing(spec, x, expected):
    np.testing.assert_allclose(activations.get(spec)(jnp.float32(x)), expected, rtol=1e-6)


def test_parse_returns_name_and_bound_parameters():
    assert activations.parse("generalized_smelu(0.1, alpha=0.5)") == (
        "generalized_smelu",
        {"g": 0.1, "alpha": 0.5},
    )
    assert activations.parse("relu") == ("relu", {})


def test_callable_spec_is_returned_as_is():
    fn = lambda x: 2 * x  # noqa: E731
    assert activations.get(fn) is fn


@pytest.mark.parametrize(
    "spec",
    [
        "nope",
        "smelu(",
        "smelu(1.0",
        "smelu)(",
        "smelu(x)",
        "smelu(__import__('os'))",
        "smelu(1, 2)",
        "smelu(gamma=1)",
        "smelu(beta=1, beta=2)",
        "smelu(0.5, beta=1)",
        "generalized_smelu(g=0.1, 0.5)",
        "relu(1)",
        "smelu(1e)",
        "smelu(inf)",
        "",
        "smelu beta",
        "smelu(0)",
        "smelu(beta=-1)",
        "generalized_smelu(alpha=0)",
    ],
)
def test_bad_specs_raise_value_error_naming_spec(spec):
    with pytest.raises(ValueError) as info:
        activations.get(spec)
    assert repr(spec) in str(info.value)


def test_unknown_name_error_lists_known_names():
    with pytest.raises(ValueError, match="nope") as info:
        activations.get("nope")
    for name in activations.NAMES:
        assert name in str(info.value)
