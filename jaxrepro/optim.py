"""The optimizers of the regulariser study: SGD, SGD with momentum and Adam, with weight decay.

Synopsis::

    >>> from jaxrepro import optim
    >>> tx = optim.optimizer("momentum", 0.05, weight_decay=5e-4)
    >>> tx is optim.optimizer("momentum", 0.05, weight_decay=5e-4)   # cached: one per arguments
    True

``optimizer`` returns one optax object per distinct argument list for the whole process
(cached). Compiled training functions are shared by equal optimizers in any case (the engine
compares them by what they compute, ``compilation.canonical_optimizer``); the cache saves that
comparison.
"""

from __future__ import annotations

import functools
import math

import optax

OPTIMIZERS = ("sgd", "momentum", "adam")


def optimizer(
    name: str, learning_rate: float, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """An optax optimizer by name.

    Args:
      name: ``"sgd"``, ``"momentum"`` (SGD with heavy-ball momentum) or ``"adam"``.
      learning_rate: the step size.
      momentum: the momentum coefficient of ``"momentum"``.
      weight_decay: L2 weight decay added to the gradient before the optimizer,
        ``g + weight_decay * w`` (the ``weight_decay`` of PyTorch's SGD and Adam, which the
        regulariser study's source repository used; not AdamW's decoupled decay). It applies to
        every parameter, biases and norm scales included (project's choice, as in PyTorch's
        default).

    Raises:
      ValueError: an unknown name or a negative or non-finite number.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    for label, value, positive in (
        ("learning_rate", learning_rate, True),
        ("momentum", momentum, False),
        ("weight_decay", weight_decay, False),
    ):
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"{label} must be finite and {bound}, got {value!r}")
    if momentum >= 1:
        raise ValueError(f"momentum must be < 1, got {momentum!r}")
    # Normalised arguments, so equivalent calls return the same (cached) object.
    return _build(
        name,
        float(learning_rate),
        float(momentum) if name == "momentum" else 0.0,
        float(weight_decay),
    )


@functools.cache
def _build(
    name: str, learning_rate: float, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
    if name == "sgd":
        tx = optax.sgd(learning_rate)
    elif name == "momentum":
        tx = optax.sgd(learning_rate, momentum=momentum)
    else:
        tx = optax.adam(learning_rate)
    if weight_decay:
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx
