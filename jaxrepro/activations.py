"""Activation functions, including SmeLU, and a registry that resolves them by name.

Synopsis::

    >>> import jax.numpy as jnp
    >>> from jaxrepro import activations
    >>> act = activations.get("smelu(beta=0.5)")   # a callable Array -> Array
    >>> act(jnp.array([-1.0, 0.0, 1.0])).tolist()
    [0.0, 0.125, 1.0]
    >>> "smelu" in activations.NAMES and "relu" in activations.NAMES
    True

String specs (``"name"`` or ``"name(arg, key=arg)"`` with numeric arguments) are what experiment
flags and model fields carry: strings are hashable, which Flax module fields and ``jit`` static
arguments need. Specs are parsed by a small grammar, never evaluated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


def _as_float(x: jax.typing.ArrayLike) -> jax.Array:
    """Returns `x` as an array with a floating dtype (integers promote to the default float)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_param(name: str, value, *, positive: bool) -> None:
    """Raises ValueError if a Python/NumPy number `value` is non-finite (or not > 0 if `positive`).

    Traced or array-valued parameters are not checked (their values are unknown at trace time).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def smelu(x: jax.typing.ArrayLike, beta: float = 1.0) -> jax.Array:
    """Smooth ReLU (SmeLU) with half-width `beta`, applied elementwise.

    ``0`` for ``x <= -beta``, ``(x + beta)**2 / (4 beta)`` for ``|x| <= beta``, ``x`` for
    ``x >= beta``. Its gradient ``clip((x + beta) / (2 beta), 0, 1)`` is continuous, so SmeLU is
    C^1; all three pieces are finite polynomials, so ``jnp.where`` gives exact gradients everywhere.

    Example:
        >>> smelu(jnp.array([-2.0, 0.0, 2.0]), beta=1.0)
        Array([0.  , 0.25, 2.  ], dtype=float32)

    Args:
        x: input of any shape.
        beta: half-width of the quadratic region, > 0.

    Returns:
        An array with the shape of `x` (floating dtype).

    Raises:
        ValueError: if `beta` is a Python number that is not positive and finite.

    References:
        Shamir, Lin & Coviello, "Smooth activations and reproducibility in deep networks",
        arXiv:2010.09931, 2020.
    """
    _check_param("beta", beta, positive=True)
    x = _as_float(x)
    quadratic = (x + beta) ** 2 / (4 * beta)
    return jnp.where(x <= -beta, jnp.zeros_like(x), jnp.where(x >= beta, x, quadratic))


def generalized_smelu(
    x: jax.typing.ArrayLike, g: float = 0.0, alpha: float = 1.0, beta: float = 1.0
) -> jax.Array:
    """Generalized SmeLU: left slope `g`, left half-width `alpha`, right half-width `beta`.

    The C^1 piecewise linear-quadratic-linear function

            f(x) = g x + t                        for x <= -alpha
                      = a x^2 + b x + c                for -alpha <= x <= beta
                      = x                              for x >= beta

    with ``a = (1-g) / (2(alpha+beta))``, ``b = (alpha + g beta) / (alpha+beta)``,
    ``c = (1-g) beta^2 / (2(alpha+beta))`` and ``t = (1-g)(beta-alpha)/2``. These coefficients
    are derived in this project (by requiring f and f' to match at both joins), not copied from
    the paper. The middle piece is evaluated as the equivalent ``g x + t + a (x + alpha)^2``. With
    ``g = 0`` and ``alpha = beta`` it is `smelu` (bit for bit). The gradient is
    ``g + (1-g) clip((x + alpha) / (alpha + beta), 0, 1)``.

    Example:
        >>> generalized_smelu(jnp.array([-2.0, 0.0, 3.0]), g=0.5, alpha=1.0, beta=1.0)
        Array([-1.   ,  0.125,  3.   ], dtype=float32)

    Args:
        x: input of any shape.
        g: slope of the left linear piece (any finite number).
        alpha: left half-width of the quadratic region, > 0.
        beta: right half-width of the quadratic region, > 0.

    Returns:
        An array with the shape of `x` (floating dtype).

    Raises:
        ValueError: if `alpha` or `beta` is a Python number that is not positive and finite, or `g`
            is a Python number that is not finite.

    References:
        Shamir, Lin & Coviello, "Smooth activations and reproducibility in deep networks",
        arXiv:2010.09931, 2020.
    """
    _check_param("g", g, positive=False)
    _check_param("alpha", alpha, positive=True)
    _check_param("beta", beta, positive=True)
    x = _as_float(x)
    t = (1 - g) * (beta - alpha) / 2
    left = g * x + t
    middle = left + (1 - g) * (x + alpha) ** 2 / (2 * (alpha + beta))
    return jnp.where(x <= -alpha, left, jnp.where(x >= beta, x, middle))


def _gelu(x: jax.typing.ArrayLike) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's default; `jax.nn.gelu` defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def _leaky_relu(x: jax.typing.ArrayLike, negative_slope: float = 0.01) -> jax.Array:
    """Leaky ReLU: ``x`` for ``x >= 0``, ``negative_slope * x`` otherwise."""
    _check_param("negative_slope", negative_slope, positive=False)
    return jax.nn.leaky_relu(x, negative_slope=negative_slope)


def _elu(x: jax.typing.ArrayLike, alpha: float = 1.0) -> jax.Array:
    """ELU: ``x`` for ``x > 0``, ``alpha * (exp(x) - 1)`` otherwise."""
    _check_param("alpha", alpha, positive=False)
    return jax.nn.elu(x, alpha=alpha)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A registered activation: its function, its numeric parameters in order, the ones > 0."""

    fn: Callable[..., jax.Array]
    params: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()


_REGISTRY: dict[str, _Entry] = {
    "relu": _Entry(jax.nn.relu),
    "leaky_relu": _Entry(_leaky_relu, ("negative_slope",)),
    "gelu": _Entry(_gelu),
    "silu": _Entry(jax.nn.silu),
    "swish": _Entry(jax.nn.silu),
    "softplus": _Entry(jax.nn.softplus),
    "elu": _Entry(_elu, ("alpha",)),
    "tanh": _Entry(jnp.tanh),
    "sigmoid": _Entry(jax.nn.sigmoid),
    "smelu": _Entry(smelu, ("beta",), positive=("beta",)),
    "generalized_smelu": _Entry(
        generalized_smelu, ("g", "alpha", "beta"), positive=("alpha", "beta")
    ),
}

NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))

_SPEC_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_ARG_RE = re.compile(rf"^\s*(?:([A-Za-z_]\w*)\s*=\s*)?({_NUMBER})\s*$")


def _spec_error(spec: object, problem: str) -> ValueError:
    return ValueError(
        f"Bad activation spec {spec!r}: {problem}. Known names: {', '.join(NAMES)}. "
        "Form: 'name' or 'name(1.0, key=2.0)' with numeric arguments."
    )


def parse(spec: str) -> tuple[str, dict[str, float]]:
    """Parses an activation spec string into ``(name, keyword arguments)``; nothing is evaluated.

    Example:
        >>> parse("generalized_smelu(0.1, alpha=0.5)")
        ('generalized_smelu', {'g': 0.1, 'alpha': 0.5})

    Args:
        spec: ``"name"``, ``"name()"`` or ``"name(v1, ..., key=v, ...)"``; values are decimal
            numbers (``1``, ``-0.5``, ``1e-3``); positional arguments bind to the activation's
            parameters in order and may not follow keyword arguments.

    Returns:
        The registered name and a dict of its parameters (floats), in the order given.

    Raises:
        ValueError: unknown name, malformed syntax, unknown/duplicate/excess parameters, or values
            the activation rejects (e.g. ``smelu(beta=0)``); the message names `spec` and lists
            the known names.
    """
    if not isinstance(spec, str):
        raise _spec_error(spec, f"expected a string or callable, got {type(spec).__name__}")
    match = _SPEC_RE.match(spec)
    if match is None:
        raise _spec_error(spec, "malformed")
    name, arg_text = match.group(1), match.group(2)
    if name not in _REGISTRY:
        raise _spec_error(spec, f"unknown activation {name!r}")
    params = _REGISTRY[name].params
    kwargs: dict[str, float] = {}
    if arg_text is None or not arg_text.strip():
        return name, kwargs
    seen_keyword = False
    for position, item in enumerate(arg_text.split(",")):
        arg = _ARG_RE.match(item)
        if arg is None:
            raise _spec_error(spec, f"argument {item.strip()!r} is not a number or key=number")
        key, value = arg.group(1), float(arg.group(2))
        if key is None:
            if seen_keyword:
                raise _spec_error(spec, "positional argument after keyword argument")
            if position >= len(params):
                raise _spec_error(spec, f"{name} takes at most {len(params)} argument(s) {params}")
            key = params[position]
        else:
            seen_keyword = True
            if key not in params:
                raise _spec_error(spec, f"{name} has no parameter {key!r} (parameters: {params})")
        if key in kwargs:
            raise _spec_error(spec, f"parameter {key!r} given twice")
        try:
            _check_param(key, value, positive=key in _REGISTRY[name].positive)
        except ValueError as e:
            raise _spec_error(spec, str(e)) from e
        kwargs[key] = value
    return name, kwargs


def get(spec: str | Activation) -> Activation:
    """Returns the activation named by `spec` as a callable ``Array -> Array``.

    Example:
        >>> act = get("leaky_relu(0.1)")
        >>> act(jnp.array([-1.0, 1.0]))
        Array([-0.1,  1. ], dtype=float32)

    Args:
        spec: a callable (returned unchanged) or a spec string accepted by `parse`, e.g.
            ``"relu"``, ``"smelu(0.5)"``, ``"smelu(beta=0.5)"``,
            ``"generalized_smelu(g=0.1, alpha=0.5, beta=1)"``.

    Returns:
        The activation function, with any parameters bound.

    Raises:
        ValueError: unknown name or malformed spec (the message names it and lists `NAMES`), or
            parameter values the activation rejects (e.g. ``smelu(beta=0)``).
    """
    if callable(spec):
        return spec
    name, kwargs = parse(spec)
    entry = _REGISTRY[name]
    if not kwargs:
        return entry.fn
    return functools.partial(entry.fn, **kwargs)
