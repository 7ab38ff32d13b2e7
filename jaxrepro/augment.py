"""Data augmentations driven by the ``augment`` source of randomness.

Synopsis::

    run = jaxrepro.fit(model, tx, data, vary=("augment",), augment=RandomShift(max_shift=3))

An augmentation is a hashable callable ``(key, x_BxD...) -> x_BxD...`` applied to one replica's
batch inside the jitted step, with the replica's ``augment`` key folded with the global step.
Hashable (frozen dataclasses) because it is part of the static description of a training run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RandomShift:
    """Shifts each example by a random whole number of positions along its spatial axes.

    The shift is circular (``jnp.roll``), drawn uniformly in ``[-max_shift, max_shift]`` per
    example and per spatial axis. A 1-D input ``[B, L]`` or ``[B, L, C]`` shifts along ``L``; an
    image ``[B, H, W, C]`` along ``H`` and ``W``. Circular shifting (rather than padding) is the
    project's choice: it keeps every value of the example and needs no fill value.
    """

    max_shift: int = 2

    def __post_init__(self):
        if self.max_shift < 0:
            raise ValueError(f"RandomShift.max_shift must be >= 0, got {self.max_shift}")

    def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
        if x.ndim == 2 or x.ndim == 3:
            axes = (0,)
        elif x.ndim == 4:
            axes = (0, 1)
        else:
            raise ValueError(
                f"RandomShift expects [B, L], [B, L, C] or [B, H, W, C]; got {x.shape}"
            )
        shifts_BxA = jax.random.randint(
            key, (x.shape[0], len(axes)), -self.max_shift, self.max_shift + 1
        )

        def shift_one(x_example, shifts_A):
            for a, axis in enumerate(axes):
                x_example = jnp.roll(x_example, shifts_A[a], axis=axis)
            return x_example

        return jax.vmap(shift_one)(x, shifts_BxA)


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """Adds independent Gaussian noise of standard deviation ``std`` to every input value."""

    std: float = 0.05

    def __post_init__(self):
        if self.std < 0:
            raise ValueError(f"GaussianNoise.std must be >= 0, got {self.std}")

    def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
        return x + self.std * jax.random.normal(key, x.shape, x.dtype)
