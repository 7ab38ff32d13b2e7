"""Data augmentations driven by the ``augment`` source of randomness.

Synopsis::

    run = jaxrepro.fit(model, tx, data, vary=("augment",), augment=RandomShift(max_shift=3))
    run = jaxrepro.fit(airbench, tx, cifar, vary=("augment",), augment=RandomCropFlip(pad=4))

An augmentation is a hashable callable ``(key, x_BxD...) -> x_BxD...`` applied to one replica's
batch inside the jitted step, with the replica's ``augment`` key folded with the global step.
Hashable (frozen dataclasses) because it is part of the static description of a training run.
Each draws per example from the one key it is given, so it is pure: the same key and batch give
the same output, jitted or not, and under ``vmap`` over replicas.

`RandomShift` and `GaussianNoise` suit any input; `RandomCrop`, `RandomFlip` and their
composition `RandomCropFlip` (the standard CIFAR-10 augmentation) take NHWC images.
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


PADDINGS = ("reflect", "zero")


def _check_images(who: str, x: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"{who} expects images [B, H, W, C]; got shape {x.shape}")


@dataclasses.dataclass(frozen=True)
class RandomCrop:
    """Pads each image by ``pad`` pixels on every side, then crops a random ``H x W`` window.

    Per example, the window's top-left corner ``(dy, dx)`` in the padded image is drawn
    uniformly and independently in ``[0, 2 * pad]``: output pixel ``(i, j)`` is padded pixel
    ``(i + dy, j + dx)``, so the image moves by ``pad - dy`` rows down and ``pad - dx`` columns
    right, and ``dy = dx = pad`` leaves it unchanged. Padding ``"reflect"`` (the default)
    mirrors the image about its edge pixel without repeating it (``jnp.pad``'s ``"reflect"``,
    torch's ``ReflectionPad2d``; airbench's choice), so the new border looks like the image;
    ``"zero"`` pads with zeros (the classic ResNet recipe; after `data.cifar10`'s normalisation
    zero is the mean colour). Reflect as the default is the project's choice.

    Example:
        >>> x = jnp.arange(2 * 5 * 5 * 1.0).reshape(2, 5, 5, 1)
        >>> RandomCrop(pad=2)(jax.random.key(0), x).shape
        (2, 5, 5, 1)

    Attributes:
        pad: pixels of padding on each side (>= 0; 0 is the identity). Reflect padding needs
            ``pad < H`` and ``pad < W``.
        padding: ``"reflect"`` or ``"zero"``.
    """

    pad: int = 4
    padding: str = "reflect"

    def __post_init__(self):
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"RandomCrop.pad must be an int >= 0, got {self.pad!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"RandomCrop.padding must be one of {PADDINGS}, got {self.padding!r}")

    def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
        _check_images("RandomCrop", x)
        p = self.pad
        b, h, w, c = x.shape
        if p == 0:
            return x
        if self.padding == "reflect" and p >= min(h, w):
            raise ValueError(
                f"RandomCrop: reflect padding of {p} needs images larger than {p} pixels on "
                f"each side, got {h}x{w}; use a smaller pad or padding='zero'"
            )
        mode = "reflect" if self.padding == "reflect" else "constant"
        padded_BxHxWxC = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode=mode)
        corners_Bx2 = jax.random.randint(key, (b, 2), 0, 2 * p + 1)

        def crop(image_HxWxC, corner_2):
            return jax.lax.dynamic_slice(image_HxWxC, (corner_2[0], corner_2[1], 0), (h, w, c))

        return jax.vmap(crop)(padded_BxHxWxC, corners_Bx2)


@dataclasses.dataclass(frozen=True)
class RandomFlip:
    """Mirrors each image left to right (``x[:, ::-1]`` of one ``[H, W, C]`` image) with
    probability 1/2, drawn per example.

    Example:
        >>> x = jnp.arange(8.0).reshape(4, 1, 2, 1)
        >>> RandomFlip()(jax.random.key(0), x).shape
        (4, 1, 2, 1)
    """

    def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
        _check_images("RandomFlip", x)
        flip_B = jax.random.bernoulli(key, 0.5, (x.shape[0],))
        return jnp.where(flip_B[:, None, None, None], x[:, :, ::-1], x)


@dataclasses.dataclass(frozen=True)
class RandomCropFlip:
    """The standard CIFAR-10 augmentation: `RandomCrop` (``pad``, ``padding``), then
    `RandomFlip`; the crop draws from ``jax.random.split(key)[0]``, the flip from ``[1]``.

    Example:
        >>> x = jnp.zeros((8, 32, 32, 3))
        >>> RandomCropFlip(pad=4)(jax.random.key(0), x).shape
        (8, 32, 32, 3)

    Attributes:
        pad: `RandomCrop`'s padding in pixels (4: the standard CIFAR-10 recipe).
        padding: ``"reflect"`` (the project's default) or ``"zero"``.
    """

    pad: int = 4
    padding: str = "reflect"

    def __post_init__(self):
        RandomCrop(self.pad, self.padding)  # Raises ValueError naming the bad field.

    def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
        crop_key, flip_key = jax.random.split(key)
        return RandomFlip()(flip_key, RandomCrop(self.pad, self.padding)(crop_key, x))
