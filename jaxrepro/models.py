"""Small Flax (linen) classifiers: an MLP, a 1-D CNN for MNIST-1D, a 2-D CNN for small images and
airbench's fast network for 32x32 images such as CIFAR-10.

Synopsis::

    >>> import jax, jax.numpy as jnp
    >>> from jaxrepro import models
    >>> model = models.MLP(widths=(64, 64), num_classes=10, activation="smelu(0.5)",
    ...                    dropout_rate=0.1, norm="batch")
    >>> key, x_BxD = jax.random.key(0), jnp.ones((8, 40))
    >>> variables = model.init({"params": key}, x_BxD, train=False)
    >>> model.apply(variables, x_BxD, train=False).shape          # logits [B, C]
    (8, 10)
    >>> logits_BxC, updates = model.apply(
    ...     variables, x_BxD, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    >>> sorted(updates)
    ['batch_stats']

Every model maps a batch to float32 logits ``[B, num_classes]`` and is called as
``model(x, *, train)``. Dropout draws from the rng stream ``"dropout"``; BatchNorm keeps running
statistics (momentum 0.9) in the ``"batch_stats"`` collection and uses them when ``train=False``.
Both norms are Flax's with its defaults, over the last (feature / channel) axis with a learned
``scale`` and ``bias``: LayerNorm ``(x - mean) / sqrt(var + 1e-6) * scale + bias`` per example
(and position); BatchNorm in eval mode ``(x - mean) / sqrt(var + 1e-5) * scale + bias`` with the
running ``mean`` and ``var``. Dropout is Flax's: each element is kept with probability
``1 - rate`` and then divided by ``1 - rate`` (identity when ``train=False``).
Fields are validated at construction, so a bad activation spec or width fails where the model is
built, not later inside ``init``. Kernels use Flax's default initialisers (LeCun normal for
kernels, zeros for biases); one replica differs from another only through the keys it is given.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrepro import activations

NORMS = (None, "layer", "batch")
CONVS = ("patches", "xla")


class PatchConv(nn.Module):
    """A strided "SAME" convolution computed as patches times one matrix (im2col).

    Same parameters (``kernel [*window, C_in, C_out]``, ``bias [C_out]``), initialisers and
    output as ``nn.Conv(features, window, strides, padding="SAME")``, to float rounding: a
    cross-correlation (the kernel is not flipped) with XLA's "SAME" padding, an output length
    ``out = ceil(n / s)`` per spatial axis and ``max((out - 1) * s + k - n, 0)`` zeros in all,
    the smaller half (``total // 2``) before and the rest after. The patches are built from
    ``prod(window)`` static strided slices, so the backward pass is pads and adds, and the
    whole layer is one matrix product. On CPU, XLA's native convolution
    of these small layers is slower by an order of magnitude or more (the CPU measurements are
    in BUILD_NOTES.md).
    """

    features: int
    window: tuple[int, ...]
    strides: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = x.shape[1:-1]
        if len(spatial) != len(self.window):
            raise ValueError(
                f"PatchConv: window {self.window} needs {len(self.window)} spatial "
                f"axes, got input {x.shape}"
            )
        pads, outs = [(0, 0)], []
        for size, k, s in zip(spatial, self.window, self.strides, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
            outs.append(out)
        x = jnp.pad(x, pads + [(0, 0)])
        patches = []
        for offsets in itertools.product(*(range(k) for k in self.window)):
            patch = x
            for axis, (o, s, out) in enumerate(zip(offsets, self.strides, outs, strict=True)):
                patch = jax.lax.slice_in_dim(patch, o, o + s * (out - 1) + 1, s, axis=axis + 1)
            patches.append(patch)
        patches = jnp.concatenate(patches, axis=-1)
        c_in = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.window, c_in, self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return patches @ kernel.reshape(-1, self.features) + bias


def _conv(
    kind: str, features: int, window: tuple[int, ...], strides: tuple[int, ...], name: str
) -> nn.Module:
    if kind == "patches":
        return PatchConv(features, window, strides, name=name)
    return nn.Conv(features, window, strides=strides, padding="SAME", name=name)


BATCH_NORM_MOMENTUM = 0.9


def _check_positive_ints(name: str, values: Sequence[int], *, allow_empty: bool) -> tuple:
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    if not values and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must contain positive ints, got {values!r}")
    return values


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _conv_stack(
    module: nn.Module, h: jax.Array, window: tuple[int, ...], act, *, train: bool
) -> jax.Array:
    """``module.features`` layers of stride-2 conv -> [norm] -> activation -> [dropout].

    Called from a CNN's compact ``__call__``, so the layers are its submodules ``conv_i`` and
    ``norm_i``.
    """
    strides = (2,) * len(window)
    for i, feats in enumerate(module.features):
        h = _conv(module.conv, feats, window, strides, f"conv_{i}")(h)
        h = _normalize(h, module.norm, train=train, name=f"norm_{i}")
        h = _dropout(act(h), module.dropout_rate, train=train)
    return h


def _check_conv(conv: str) -> None:
    if conv not in CONVS:
        raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")


def _check_common(module: nn.Module) -> None:
    """Validates the fields every model here shares: activation, dropout_rate, norm, classes."""
    activations.get(module.activation)  # Raises ValueError naming the spec.
    rate = module.dropout_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate!r}")
    if module.norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {module.norm!r}")
    n = module.num_classes
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {n!r}")
    _check_positive_int("heads", module.heads)


def _head(h_BxD: jax.Array, num_classes: int, heads: int) -> jax.Array:
    """The output layer ``head``: logits ``[B, C]``, or ``[heads, B, C]`` for several heads.

    Several heads are one Dense layer of ``heads * C`` outputs (each head's kernel columns are
    initialised as a lone head's would be: the same fan-in); head ``k``'s logits are output
    columns ``k * C`` to ``(k + 1) * C - 1``.
    """
    if heads == 1:
        return nn.Dense(num_classes, name="head")(h_BxD)
    out = nn.Dense(heads * num_classes, name="head")(h_BxD)
    return jnp.moveaxis(out.reshape(h_BxD.shape[0], heads, num_classes), 1, 0)


def _normalize(h: jax.Array, norm: str | None, *, train: bool, name: str) -> jax.Array:
    """Applies the optional normalisation over the last (feature) axis."""
    if norm == "layer":
        return nn.LayerNorm(name=name)(h)
    if norm == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, name=name)(
            h
        )
    return h


def _dropout(h: jax.Array, rate: float, *, train: bool) -> jax.Array:
    if rate == 0.0:
        return h
    return nn.Dropout(rate)(h, deterministic=not train)


class MLP(nn.Module):
    """Multi-layer perceptron: ``Dense -> [norm] -> activation -> [dropout]`` per hidden layer.

    Inputs are flattened beyond the batch axis. With ``residual=True`` hidden layer ``i >= 1``
    computes ``h = h + layer(h)`` when its width equals the previous layer's width; a layer whose
    width differs, and the first layer (which maps the input features), has no skip connection.

    Example:
        >>> model = MLP(widths=(256, 256), num_classes=10)
        >>> variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 40)), train=False)
        >>> model.apply(variables, jnp.zeros((8, 40)), train=False).shape
        (8, 10)

    Attributes:
        widths: hidden layer widths (positive); ``()`` gives a linear classifier.
        num_classes: number of output logits, >= 2.
        activation: activation spec for `activations.get`, e.g. ``"relu"``, ``"smelu(0.5)"``.
        dropout_rate: dropout probability after each hidden activation, in [0, 1).
        norm: ``None``, ``"layer"`` or ``"batch"`` after each hidden Dense.
        residual: add skip connections between equal-width hidden layers.
        heads: output heads on the shared body; more than 1 gives logits ``[heads, B, C]``
            (``Ensemble(..., shared_body=True)`` sets it).
    """

    widths: tuple[int, ...]
    num_classes: int
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    dropout_rate: float = 0.0
    norm: str | None = None
    residual: bool = False
    heads: int = 1

    def __post_init__(self):
        object.__setattr__(
            self, "widths", _check_positive_ints("widths", self.widths, allow_empty=True)
        )
        _check_common(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps ``x [B, ...]`` to float32 logits ``[B, num_classes]``."""
        act = activations.get(self.activation)
        h_BxD = jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)
        for i, width in enumerate(self.widths):
            y_BxW = nn.Dense(width, name=f"dense_{i}")(h_BxD)
            y_BxW = _normalize(y_BxW, self.norm, train=train, name=f"norm_{i}")
            y_BxW = _dropout(act(y_BxW), self.dropout_rate, train=train)
            skip = self.residual and i > 0 and self.widths[i - 1] == width
            h_BxD = h_BxD + y_BxW if skip else y_BxW
        return _head(h_BxD, self.num_classes, self.heads)


class CNN1D(nn.Module):
    """1-D convolutional classifier for sequences such as MNIST-1D.

    Each layer is ``Conv(kernel_size, stride 2, SAME) -> [norm] -> activation -> [dropout]``, so
    the length halves per layer (40 -> 20 -> 10 -> 5 for MNIST-1D); the features ``[B, L', C]``
    are then flattened row-major, position by position with the channels innermost (position
    matters in MNIST-1D), and a Dense layer gives the logits. Strided convolutions rather than
    pooling keep the network small, fast and free of max-pool kinks.

    Example:
        >>> model = CNN1D(num_classes=10)
        >>> variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 40)), train=False)
        >>> model.apply(variables, jnp.zeros((8, 40)), train=False).shape
        (8, 10)

    Attributes:
        features: channels of each conv layer (positive, non-empty).
        kernel_size: width of every conv kernel.
        num_classes: number of output logits, >= 2.
        activation: activation spec for `activations.get`.
        dropout_rate: dropout probability after each activation, in [0, 1).
        norm: ``None``, ``"layer"`` or ``"batch"`` after each conv (over the channel axis).
        conv: ``"patches"`` (``PatchConv``, the default: one matrix product per layer) or
            ``"xla"`` (``nn.Conv``); same parameters and, to float rounding, same outputs.
        heads: output heads on the shared body (logits ``[heads, B, C]`` when more than 1).
    """

    features: tuple[int, ...] = (32, 32, 32)
    kernel_size: int = 5
    num_classes: int = 10
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    dropout_rate: float = 0.0
    norm: str | None = None
    conv: str = "patches"
    heads: int = 1

    def __post_init__(self):
        object.__setattr__(
            self, "features", _check_positive_ints("features", self.features, allow_empty=False)
        )
        _check_positive_int("kernel_size", self.kernel_size)
        _check_conv(self.conv)
        _check_common(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps ``x [B, L]`` (one channel) or ``[B, L, C]`` to float32 logits ``[B, classes]``."""
        if x.ndim not in (2, 3):
            raise ValueError(f"CNN1D expects x of shape [B, L] or [B, L, C], got {x.shape}")
        act = activations.get(self.activation)
        h_BxLxC = (x[..., None] if x.ndim == 2 else x).astype(jnp.float32)
        h_BxLxC = _conv_stack(self, h_BxLxC, (self.kernel_size,), act, train=train)
        h_BxD = h_BxLxC.reshape((h_BxLxC.shape[0], -1))
        return _head(h_BxD, self.num_classes, self.heads)


class CNN2D(nn.Module):
    """2-D convolutional classifier for small images (e.g. 8x8 digits, 28x28 MNIST).

    Each conv layer is ``Conv(kernel_size x kernel_size, stride 2, SAME) -> [norm] -> activation
    -> [dropout]`` (spatial size halves per layer); then flatten ``[B, H', W', C]`` row-major
    (channels innermost), a hidden ``Dense(dense) -> [norm] -> activation -> [dropout]`` and a
    Dense layer to the logits.

    Example:
        >>> model = CNN2D(num_classes=10)
        >>> x = jnp.zeros((1, 8, 8, 1))
        >>> variables = model.init({"params": jax.random.key(0)}, x, train=False)
        >>> model.apply(variables, jnp.zeros((4, 8, 8)), train=False).shape
        (4, 10)

    Attributes:
        features: channels of each conv layer (positive, non-empty).
        kernel_size: height and width of every conv kernel.
        dense: width of the hidden Dense layer.
        num_classes: number of output logits, >= 2.
        activation: activation spec for `activations.get`.
        dropout_rate: dropout probability after each activation, in [0, 1).
        norm: ``None``, ``"layer"`` or ``"batch"`` after each conv / the hidden Dense.
        conv: ``"patches"`` (``PatchConv``, the default: one matrix product per layer) or
            ``"xla"`` (``nn.Conv``); same parameters and, to float rounding, same outputs.
        heads: output heads on the shared body (logits ``[heads, B, C]`` when more than 1).
    """

    features: tuple[int, ...] = (16, 32)
    kernel_size: int = 3
    dense: int = 64
    num_classes: int = 10
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    dropout_rate: float = 0.0
    norm: str | None = None
    conv: str = "patches"
    heads: int = 1

    def __post_init__(self):
        object.__setattr__(
            self, "features", _check_positive_ints("features", self.features, allow_empty=False)
        )
        _check_positive_int("kernel_size", self.kernel_size)
        _check_positive_int("dense", self.dense)
        _check_conv(self.conv)
        _check_common(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps ``x [B, H, W, C]`` or ``[B, H, W]`` to float32 logits ``[B, num_classes]``."""
        if x.ndim not in (3, 4):
            raise ValueError(f"CNN2D expects x of shape [B, H, W] or [B, H, W, C], got {x.shape}")
        act = activations.get(self.activation)
        h_BxHxWxC = (x[..., None] if x.ndim == 3 else x).astype(jnp.float32)
        k = self.kernel_size
        h_BxHxWxC = _conv_stack(self, h_BxHxWxC, (k, k), act, train=train)
        h_BxD = h_BxHxWxC.reshape((h_BxHxWxC.shape[0], -1))
        h_BxD = nn.Dense(self.dense, name="dense")(h_BxD)
        h_BxD = _normalize(h_BxD, self.norm, train=train, name="norm_dense")
        h_BxD = _dropout(act(h_BxD), self.dropout_rate, train=train)
        return _head(h_BxD, self.num_classes, self.heads)


class AirbenchNet(nn.Module):
    """airbench94's convolutional network for 32x32 images (CIFAR-10), with configurable widths.

    A stem ``Conv(stem, 2x2) -> activation``, then per block of width ``widths[i]``::

        Conv(3x3) -> max pool 2x2 (stride 2) -> [norm] -> activation
        -> Conv(3x3) -> [norm] -> activation -> [dropout]

    then a max over the remaining spatial positions, a Dense layer to the logits and a
    multiplication by ``head_scale``. Every conv is stride 1 with "SAME" padding, so each block
    halves the image (32 -> 16 -> 8 -> 4 with three blocks); the features ``[B, C]`` are the
    maximum over those 4x4 positions. Despite its lineage (a fast ResNet) it has no skip
    connections, as airbench94 has none.

    ``AirbenchNet(widths=(64, 256, 256), stem=24)`` is airbench94's shape. It differs from
    airbench94 in what the engine cannot or does not do: the stem is an ordinary learned conv
    with the default initialiser (airbench initialises it from the data's whitening patches and
    freezes it; ``init`` here sees no data), the stem's padding is "SAME" rather than "VALID",
    the convs have biases, BatchNorm is the project's (`BATCH_NORM_MOMENTUM`, eps 1e-5, learned
    scale; airbench freezes the scale) and the head has a bias. The small default widths are
    the project's, for CPU tests; the defaults of activation (GELU), norm (batch) and
    ``head_scale`` (1/9) are airbench94's.

    Example:
        >>> model = AirbenchNet(widths=(8, 16, 16), stem=4)
        >>> x = jnp.zeros((2, 32, 32, 3))
        >>> variables = model.init({"params": jax.random.key(0)}, x, train=False)
        >>> model.apply(variables, x, train=False).shape
        (2, 10)

    Attributes:
        widths: channels of each block (positive, non-empty); an image needs at least
            ``2 ** len(widths)`` pixels a side.
        stem: channels of the 2x2 stem conv.
        kernel_size: height and width of the blocks' conv kernels.
        num_classes: number of output logits, >= 2.
        activation: activation spec for `activations.get` (default ``"gelu"``).
        dropout_rate: dropout probability at the end of each block, in [0, 1).
        norm: ``"batch"`` (the default), ``"layer"`` or ``None`` after each block conv.
        conv: ``"patches"`` (``PatchConv``, the default: one matrix product per layer) or
            ``"xla"`` (``nn.Conv``); same parameters and, to float rounding, same outputs.
        head_scale: positive factor on the logits.
        heads: output heads on the shared body (logits ``[heads, B, C]`` when more than 1).

    References:
        Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498
        (airbench94).
    """

    widths: tuple[int, ...] = (16, 32, 32)
    stem: int = 8
    kernel_size: int = 3
    num_classes: int = 10
    activation: str | Callable[[jax.Array], jax.Array] = "gelu"
    dropout_rate: float = 0.0
    norm: str | None = "batch"
    conv: str = "patches"
    head_scale: float = 1.0 / 9.0
    heads: int = 1

    def __post_init__(self):
        object.__setattr__(
            self, "widths", _check_positive_ints("widths", self.widths, allow_empty=False)
        )
        _check_positive_int("stem", self.stem)
        _check_positive_int("kernel_size", self.kernel_size)
        s = self.head_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf:
            raise ValueError(f"head_scale must be a positive finite number, got {s!r}")
        _check_conv(self.conv)
        _check_common(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps ``x [B, H, W, C]`` or ``[B, H, W]`` to float32 logits ``[B, num_classes]``."""
        if x.ndim not in (3, 4):
            raise ValueError(
                f"AirbenchNet expects x of shape [B, H, W] or [B, H, W, C], got {x.shape}"
            )
        need = 2 ** len(self.widths)
        if min(x.shape[1:3]) < need:
            raise ValueError(
                f"AirbenchNet with {len(self.widths)} blocks halves the image {len(self.widths)} "
                f"times, so it needs images of at least {need}x{need}; got {x.shape}"
            )
        act = activations.get(self.activation)
        h_BxHxWxC = (x[..., None] if x.ndim == 3 else x).astype(jnp.float32)
        k, one = (self.kernel_size, self.kernel_size), (1, 1)
        h_BxHxWxC = act(_conv(self.conv, self.stem, (2, 2), one, "stem")(h_BxHxWxC))
        for i, width in enumerate(self.widths):
            h_BxHxWxC = _conv(self.conv, width, k, one, f"conv_{i}_a")(h_BxHxWxC)
            h_BxHxWxC = nn.max_pool(h_BxHxWxC, (2, 2), strides=(2, 2))
            h_BxHxWxC = act(_normalize(h_BxHxWxC, self.norm, train=train, name=f"norm_{i}_a"))
            h_BxHxWxC = _conv(self.conv, width, k, one, f"conv_{i}_b")(h_BxHxWxC)
            h_BxHxWxC = act(_normalize(h_BxHxWxC, self.norm, train=train, name=f"norm_{i}_b"))
            h_BxHxWxC = _dropout(h_BxHxWxC, self.dropout_rate, train=train)
        h_BxC = jnp.max(h_BxHxWxC, axis=(1, 2))
        return self.head_scale * _head(h_BxC, self.num_classes, self.heads)


class Ensemble(nn.Module):
    """K components of a model as one model: logits ``[K, B, C]``.

    Separate towers (the default): K independent copies of ``model``, each with its own
    parameters (and BatchNorm statistics, and dropout masks), computed together with
    ``nn.vmap`` (one batched matrix product per layer): the variables are ``model``'s, under
    the name ``"model"``, each with a leading axis K, and component k's are slice ``[k]``.
    Component k's initial parameters come from the replica's ``init`` key split K ways (Flax's
    ``split_rngs``), so components differ through their initialisation like independently
    trained models. With
    ``shared_body=True``: one body and K output heads (``model.heads = K``); the components then
    differ only in their heads (the variables are those of ``model.clone(heads=K)`` under the
    name ``"body"``).

    The ensemble's prediction is the mean of the components' probabilities
    (``losses.ensemble_log_probs``); ``engine.Run.predict`` returns it, or every component with
    ``components=True``. Replicas of an ensemble train exactly as replicas of a model do, so R
    replicas of a K-component ensemble are one training step. K = 1 computes the model itself
    (same outputs and training, given the same parameters with a leading axis of 1).

    Example:
        >>> model = Ensemble(MLP(widths=(32,), num_classes=10), num_components=4)
        >>> variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 40)), train=False)
        >>> model.apply(variables, jnp.zeros((8, 40)), train=False).shape
        (4, 8, 10)

    Attributes:
        model: any model here (or a module called as ``model(x, train=...)`` returning
            ``[B, C]``; ``shared_body=True`` needs a ``heads`` field).
        num_components: K >= 1.
        shared_body: K heads on one body instead of K towers.

    References:
        Shamir & Coviello, arXiv 2010.09923 (ensembles inside a model); methods.md section 7.
    """

    model: nn.Module
    num_components: int
    shared_body: bool = False

    def __post_init__(self):
        _check_positive_int("num_components", self.num_components)
        if self.shared_body and not hasattr(self.model, "heads"):
            raise ValueError(
                f"shared_body=True needs a model with a 'heads' field (MLP, CNN1D, "
                f"CNN2D, AirbenchNet); {type(self.model).__name__} has none"
            )
        if getattr(self.model, "heads", 1) != 1:
            raise ValueError("Ensemble: the wrapped model must have heads=1")
        super().__post_init__()

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps ``x [B, ...]`` to the components' logits ``[K, B, C]``."""
        k = self.num_components
        if self.shared_body:
            return self.model.clone(heads=k, parent=self, name="body")(x, train=train)
        towers = nn.vmap(
            lambda module, x: module(x, train=train),
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=None,
            out_axes=0,
            axis_size=k,
        )
        return towers(self.model, x)


def num_components(model: nn.Module) -> int | None:
    """K for an ``Ensemble`` (its logits are ``[K, B, C]``), None for a plain model
    (``[B, C]``)."""
    return model.num_components if isinstance(model, Ensemble) else None
