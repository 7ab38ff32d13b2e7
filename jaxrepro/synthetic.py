"""Synthetic classification data from a fixed random teacher (methods.md section 8).

Synopsis::

    >>> from jaxrepro import synthetic
    >>> spec = synthetic.Synthetic(dim=10, teacher="single", hidden=8, temperature=0.25, seed=3)
    >>> ds = spec.dataset()                 # a jaxrepro.data.Dataset, binary by default
    >>> ds.x_train.shape, ds.num_classes
    ((2000, 10), 2)
    >>> spec.make_teacher()(ds.x_test).shape           # teacher logits: [N, 1] when binary
    (1000, 1)
    >>> ds4 = synthetic.generate(seed=3, num_classes=4, label_noise=0.1)   # the same, as a call
    >>> ds4.num_classes
    4

Inputs are ``x ~ N(0, I_dim)``. The teacher is a random function chosen by the data seed:

- ``"linear"``: ``x @ W``.
- ``"single"``: one hidden layer, ``act(x @ W1 + b1) @ W2``: a single nonlinearity.
- ``"mlp"``: ``depth`` hidden layers of width ``hidden``.

Weights are standard normal, scaled by ``1/sqrt(fan_in)``; biases of hidden layers are standard
normal too, so the kinks of a piecewise-linear teacher fall inside the data. The teacher's
outputs are then standardised (mean 0, standard deviation 1 per output, estimated once on
``NORM_SAMPLES`` inputs from a stream of the data seed) so that ``temperature`` means the same for
every teacher. Labels:

- binary (``num_classes=2``, one output f): ``y ~ Bernoulli(sigmoid(f(x) / temperature))``;
  ``temperature=0`` gives the deterministic ``y = 1[f(x) > 0]``.
- multiclass (K outputs): ``y = argmax_k f_k(x)`` (or a draw from ``softmax(f / temperature)``
  when ``temperature > 0``).
- then, with probability ``label_noise``, ``y`` is replaced by a class drawn uniformly.

The data seed is separate from the replica keys of training: one dataset serves every replica.
Everything is drawn from NumPy generators seeded by ``(seed, purpose)`` (teacher, train inputs,
test inputs, ...), so a spec always gives the same arrays, and changing ``num_train`` leaves the
teacher and the test set as they are. The paper's exact generator is not available to us; every
choice above is the project's own.

References:
  Snapp & Shamir, "Synthesizing Irreproducibility in Deep Networks", arXiv 2102.10696.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro import activations
from jaxrepro.data import Dataset

TEACHERS = ("linear", "single", "mlp")
NORM_SAMPLES = 8192
"""Inputs drawn (from the data seed) to standardise the teacher's outputs."""

# Stream ids under the data seed (project's own fixed scheme).
_TEACHER, _X_TRAIN, _X_TEST, _Y_TRAIN, _Y_TEST, _NORM = range(6)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    """NumPy's PCG64 seeded by ``(seed, purpose)``: independent streams per purpose."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), purpose]))


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A fixed random function ``x [N, dim] -> logits [N, K]`` (K = 1 for a binary task).

    Attributes:
      layers: ``(W, b)`` per layer as float32 NumPy arrays; the last layer is linear.
      activation: the activation spec between layers.
      shift: per-output mean subtracted from the raw outputs.
      scale: per-output standard deviation the outputs are divided by.
    """

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    activation: str
    shift: np.ndarray
    scale: np.ndarray

    def raw(self, x_NxD) -> jax.Array:
        """The unstandardised outputs ``[N, K]``."""
        act = activations.get(self.activation)
        h = jnp.asarray(x_NxD, jnp.float32)
        for i, (w, b) in enumerate(self.layers):
            h = jnp.matmul(h, w, precision=jax.lax.Precision.HIGHEST) + b
            if i < len(self.layers) - 1:
                h = act(h)
        return h

    def __call__(self, x_NxD) -> np.ndarray:
        """The standardised outputs (logits) ``[N, K]`` as float32 NumPy."""
        return np.asarray((self.raw(x_NxD) - self.shift) / self.scale, np.float32)


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ValueError(f"synthetic {field}: {message}")


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """Every knob of the generator; ``dataset()`` and ``make_teacher()`` are pure functions of it.

    Attributes:
      dim: input dimension d.
      num_train: training examples.
      num_test: test examples.
      teacher: ``"linear"``, ``"single"`` (one hidden nonlinearity) or ``"mlp"``.
      hidden: hidden width of the teacher (``single`` and ``mlp``).
      depth: hidden layers of an ``mlp`` teacher (``single`` is depth 1).
      activation: the teacher's activation spec (see ``jaxrepro.activations``).
      num_classes: 2 (binary, one teacher output) or more (one output per class).
      temperature: label temperature (>= 0; 0 means deterministic labels).
      label_noise: probability that a label is replaced by a uniformly drawn class.
      seed: the data seed (independent of the training seed).
    """

    dim: int = 10
    num_train: int = 2000
    num_test: int = 1000
    teacher: str = "single"
    hidden: int = 8
    depth: int = 2
    activation: str = "tanh"
    num_classes: int = 2
    temperature: float = 0.25
    label_noise: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "num_train", "num_test", "hidden", "depth"):
            v = getattr(self, name)
            _check(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1,
                name,
                f"must be an int >= 1, got {v!r}",
            )
        _check(
            self.teacher in TEACHERS,
            "teacher",
            f"unknown teacher {self.teacher!r}; choose one of {', '.join(TEACHERS)}",
        )
        activations.get(self.activation)  # Raises ValueError naming the spec.
        _check(
            isinstance(self.num_classes, (int, np.integer)) and self.num_classes >= 2,
            "num_classes",
            f"must be an int >= 2, got {self.num_classes!r}",
        )
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be finite and >= 0, got {self.temperature!r}",
        )
        _check(
            0.0 <= self.label_noise <= 1.0,
            "label_noise",
            f"must be in [0, 1], got {self.label_noise!r}",
        )
        _check(
            isinstance(self.seed, (int, np.integer))
            and not isinstance(self.seed, bool)
            and 0 <= self.seed < 2**32,
            "seed",
            f"must be an int in [0, 2**32), got {self.seed!r}",
        )

    @property
    def num_outputs(self) -> int:
        return 1 if self.num_classes == 2 else int(self.num_classes)

    def make_teacher(self) -> Teacher:
        """The fixed teacher of this spec: a function of the data seed and the teacher's shape."""
        if self.teacher == "linear":
            sizes = [self.dim, self.num_outputs]
        elif self.teacher == "single":
            sizes = [self.dim, self.hidden, self.num_outputs]
        else:
            sizes = [self.dim] + [self.hidden] * self.depth + [self.num_outputs]
        rng = _rng(self.seed, _TEACHER)
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            w = rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)
            last = i == len(sizes) - 2
            b = np.zeros(fan_out) if last else rng.standard_normal(fan_out)
            layers.append((w.astype(np.float32), b.astype(np.float32)))
        unscaled = Teacher(
            tuple(layers),
            self.activation,
            np.zeros(self.num_outputs, np.float32),
            np.ones(self.num_outputs, np.float32),
        )
        x_norm = _rng(self.seed, _NORM).standard_normal((NORM_SAMPLES, self.dim))
        raw = np.asarray(unscaled.raw(x_norm.astype(np.float32)), np.float64)
        scale = raw.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        return dataclasses.replace(
            unscaled, shift=raw.mean(axis=0).astype(np.float32), scale=scale.astype(np.float32)
        )

    def _labels(self, rng: np.random.Generator, logits_NxK: np.ndarray) -> np.ndarray:
        n = logits_NxK.shape[0]
        f = logits_NxK.astype(np.float64)
        u = rng.random(n)  # drawn whatever the mode, so streams stay aligned
        if self.num_classes == 2:
            f = f[:, 0]
            if self.temperature == 0:
                y = (f > 0).astype(np.int32)
            else:
                y = (u < 1.0 / (1.0 + np.exp(-f / self.temperature))).astype(np.int32)
        elif self.temperature == 0:
            y = np.argmax(f, axis=-1).astype(np.int32)
        else:
            z = f / self.temperature
            p = np.exp(z - z.max(axis=-1, keepdims=True))
            cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
            y = np.minimum(np.sum(cdf < u[:, None], axis=-1), self.num_classes - 1)
            y = y.astype(np.int32)
        flip = rng.random(n) < self.label_noise
        other = rng.integers(0, self.num_classes, n).astype(np.int32)
        return np.where(flip, other, y).astype(np.int32)

    def dataset(self) -> Dataset:
        """The dataset of this spec: train and test inputs and labels, named ``"synthetic"``."""
        teacher = self.make_teacher()
        arrays = {}
        for split, n, kx, ky in (
            ("train", self.num_train, _X_TRAIN, _Y_TRAIN),
            ("test", self.num_test, _X_TEST, _Y_TEST),
        ):
            x = _rng(self.seed, kx).standard_normal((n, self.dim)).astype(np.float32)
            arrays[f"x_{split}"] = x
            arrays[f"y_{split}"] = self._labels(_rng(self.seed, ky), teacher(x))
        return Dataset(**arrays, num_classes=int(self.num_classes), name="synthetic")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def generate(**knobs) -> Dataset:
    """``Synthetic(**knobs).dataset()``: a synthetic dataset from a fixed random teacher.

    Example:
      >>> ds = generate(dim=4, num_train=100, num_test=50, seed=1)
      >>> ds.x_train.shape, ds.num_classes
      ((100, 4), 2)
    """
    return Synthetic(**knobs).dataset()


def teacher(**knobs) -> Teacher:
    """``Synthetic(**knobs).make_teacher()``: the teacher that labels ``generate(**knobs)``."""
    return Synthetic(**knobs).make_teacher()
