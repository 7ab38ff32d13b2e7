"""Argument checks at the library's boundaries: a bad value is refused with a message that names
the argument, never coerced.

Python and NumPy convert silently where this library must not: ``int(1.7)`` is 1,
``int(True)`` is 1, ``tuple("12")`` is ``("1", "2")``. These helpers accept exactly the types
that mean what they say (Python and NumPy integers for counts, indices and seeds; not bool,
float or str) and raise ``TypeError`` for a wrong type and ``ValueError`` for a value out of
range, both naming the argument. A wrong type raises ``BadType``, which is both a ``TypeError``
and a ``ValueError`` (as NumPy's ``AxisError`` is both a ``ValueError`` and an ``IndexError``):
code that catches either catches it.

Example:
  >>> integer("epochs", 3, minimum=1)
  3
  >>> integer("epochs", 1.5, minimum=1)
  Traceback (most recent call last):
  ...
  jaxrepro.checks.BadType: epochs must be an integer >= 1, got 1.5 (float)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


class BadType(TypeError, ValueError):
    """An argument of the wrong type (a float where an integer is needed, say)."""


def is_integer(value) -> bool:
    """A Python or NumPy integer, or a 0-d integer array (NumPy or JAX); not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    dtype = getattr(value, "dtype", None)
    return (
        dtype is not None
        and getattr(value, "ndim", None) == 0
        and np.issubdtype(np.dtype(dtype), np.integer)
    )


def is_number(value) -> bool:
    """A Python or NumPy real number that is not a bool (finite or not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def integer(
    name: str, value, *, minimum: int | None = None, maximum: int | None = None, note: str = ""
) -> int:
    """``value`` as a Python int after checking that it is an integer within the bounds.

    Raises:
      BadType: not an integer (bool, float, str, None, ...).
      ValueError: out of ``[minimum, maximum]``.
    """
    want = f"{name} must be an integer{_bounds(minimum, maximum)}" + (f" ({note})" if note else "")
    if not is_integer(value):
        raise BadType(f"{want}, got {_describe(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{want}, got {value}")
    return value


def number(
    name: str,
    value,
    *,
    minimum: float | None = None,
    strict: bool = False,
) -> float:
    """``value`` as a Python float after checking that it is a finite real number ``>=
    minimum`` (``> minimum`` when ``strict``).

    Raises:
      BadType: not a real number (bool, str, complex, None, ...).
      ValueError: NaN, infinite or below the bound.
    """
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
    if not is_number(value):
        raise BadType(f"{name} must be a finite number{bound}, got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number{bound}, got {value}") from None
    low = minimum is not None and (value <= minimum if strict else value < minimum)
    if not math.isfinite(value) or low:
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


def boolean(name: str, value) -> bool:
    """``value`` as a Python bool after checking that it is one (``np.bool_`` accepted; 0, 1
    and strings refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise BadType(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def integers(
    name: str, values, *, minimum: int | None = None, maximum: int | None = None
) -> tuple[int, ...]:
    """A sequence (list, tuple, range or 1-D integer array) of integers within the bounds, as
    a tuple of Python ints. A string, a mapping or a scalar is refused."""
    if (
        isinstance(values, (str, bytes, dict))
        or not isinstance(values, Iterable)
        or getattr(values, "ndim", 1) == 0
    ):
        raise BadType(f"{name} must be a sequence of integers, got {_describe(values)}")
    if getattr(values, "ndim", 1) != 1:
        raise ValueError(f"{name} must be 1-D, got an array of shape {values.shape}")
    out = []
    for i, v in enumerate(values):
        if not is_integer(v):
            raise BadType(
                f"{name} must hold integers{_bounds(minimum, maximum)}; item {i} is {_describe(v)}"
            )
        v = int(v)
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            raise ValueError(
                f"{name} must hold integers{_bounds(minimum, maximum)}; item {i} is {v}"
            )
        out.append(v)
    return tuple(out)
