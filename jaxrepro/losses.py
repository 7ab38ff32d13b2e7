"""Task losses and loss transforms: a loss function in, a loss function out.

Synopsis::

    from jaxrepro import losses, models
    loss = losses.softmax_cross_entropy()                    # the task loss
    loss = losses.anti_distillation(loss, 0.1)               # + 0.1 * decorrelation penalty
    loss = losses.min_entropy(loss, 0.01)                    # + 0.01 * prediction entropy
    model = models.Ensemble(models.MLP((128,), 10), num_components=4)
    run = jaxrepro.fit(model, optax.adam(1e-3), data, loss_fn=loss, replicas=16)

**The loss interface.** A loss is called as ``loss(logits_KxBxC, batch) -> scalar``: the logits
of the K components of one replica (K = 1 for a plain model; the engine adds the axis) and a
``Batch`` (inputs, integer labels, the target distribution ``targets [B, C]`` — one-hot labels
unless a transform changed them — and the examples' positions in the training set). Any
function with that signature can be a task's ``loss_fn``; the ones here are frozen dataclasses,
so two equal losses are equal objects and share compiled training functions, and they are
jit- and vmap-compatible. **Weights are run-time values**: the engine compiles a loss with its
weights zeroed (``canonical``) and passes each replica's weights as arguments
(``with_weights``), so losses that differ only in a weight share one compilation, and ``fit``'s
``hparams`` gives each replica its own weight by transform name (``weights``), a sweep in one
run.

**Composition.** A transform wraps a loss: ``t2(t1(base))``. When called, a transform first
rewrites the batch's targets if it is a target transform (``label_smoothing``,
``anchor_distillation``), then calls the loss it wraps with that batch, then adds its own term
if it is a penalty (``anti_distillation``, ``codistillation``, ``min_entropy``). Hence:

* penalties commute with each other (they are added up);
* target transforms act outermost first: ``label_smoothing(anchor_distillation(base, a), e)``
  smooths the one-hot labels and then mixes in the anchor; the reverse order mixes first and
  smooths the mixture;
* a penalty that reads the targets (``anti_distillation`` with ``output="residual"``) sees them
  as rewritten by the target transforms *outside* it.

A transform with weight 0 leaves the loss and its gradient unchanged, to float rounding (its
term is multiplied by 0, not skipped, so XLA may round a fused gradient differently in the last
bit).

**Ensembles.** The ensemble prediction of K components is the mean of their probabilities
(methods.md sections 6 and 7); ``ensemble_log_probs`` gives its log, which is also a valid set
of logits (its softmax is the mean). The task losses take ``over="ensemble"`` (default: the
loss of the ensemble prediction, as methods.md section 7 defines anti-distillation) or
``over="components"`` (the mean of the components' own losses: independently trained members
that only share batches). With K = 1 both are the plain loss.

References:
  Shamir & Coviello, "Anti-Distillation: Improving Reproducibility of Deep Networks" (arXiv
  2010.09923); Anil et al. 2018, "Large scale distributed neural network training through online
  distillation" (arXiv 1804.03235); Jiang et al. 2022, "Churn reduction via distillation" (arXiv
  2106.02654); Bhojanapalli et al. 2021, "On the reproducibility of neural network predictions"
  (arXiv 2102.03349); Rosen 1996; Liu & Yao 1999; Szegedy et al. 2016
  (label smoothing); methods.md section 7.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro import compilation

Array = jax.Array

CORRELATION_EPS = 1e-6
"""Added to each output's squared norm over the batch before dividing in the correlation, so a
component whose output is constant over a batch has correlation 0 instead of 0/0 (project's
choice)."""


class Batch(NamedTuple):
    """What a loss sees of one mini-batch of one replica.

    Attributes:
      x: the inputs ``[B, ...]`` as the model saw them (after augmentation).
      labels: int ``[B]`` class labels.
      targets: float ``[B, C]`` target distribution: one-hot labels unless a target transform
        rewrote them.
      index: int ``[B]`` positions of the examples in the training set (anchors look their
        predictions up by it).
    """

    x: Array
    labels: Array
    targets: Array
    index: Array


def make_batch(
    x_B: Array, labels_B: Array, num_classes: int, index_B: Array | None = None
) -> Batch:
    """A ``Batch`` with one-hot targets (``index`` defaults to ``0 .. B-1``)."""
    labels_B = jnp.asarray(labels_B)
    if index_B is None:
        index_B = jnp.arange(labels_B.shape[0])
    targets = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
    return Batch(jnp.asarray(x_B), labels_B, targets, jnp.asarray(index_B))


Loss = Callable[[Array, Batch], Array]


# ---------------------------------------------------------------------------------------------
# Ensemble predictions and per-batch statistics (pure functions).


def ensemble_log_probs(logits_KxBxC: Array) -> Array:
    """``log(mean_k softmax(logits_k))``, ``[B, C]``: the log of the ensemble prediction.

    Its softmax is the mean probability, so it serves as the ensemble's logits. With K = 1 it is
    ``log_softmax(logits_0)`` exactly.
    """
    logp_KxBxC = jax.nn.log_softmax(logits_KxBxC, axis=-1)
    k = logits_KxBxC.shape[0]
    if k == 1:
        return logp_KxBxC[0]
    return jax.nn.logsumexp(logp_KxBxC, axis=0) - math.log(k)


def ensemble_probs(logits_KxBxC: Array) -> Array:
    """The ensemble prediction ``mean_k softmax(logits_k)``, ``[B, C]``."""
    return jnp.mean(jax.nn.softmax(logits_KxBxC, axis=-1), axis=0)


def entropy(log_probs_BxC: Array) -> Array:
    """Mean over the batch of the prediction entropy ``-sum_c p log p`` (nats)."""
    p = jnp.exp(log_probs_BxC)
    return -jnp.mean(jnp.sum(p * log_probs_BxC, axis=-1))


def pairwise_correlation(outputs_KxBxC: Array, *, eps: float = CORRELATION_EPS) -> Array:
    """Pearson correlation over the batch between components, averaged over classes: ``[K, K]``.

    For components i, j and class c, ``corr_ijc`` is the correlation over the B examples of
    ``outputs[i, :, c]`` and ``outputs[j, :, c]`` (each centred over the batch and divided by
    ``sqrt(sum of squares + eps)``); the result is ``mean_c corr_ijc``. The diagonal is about 1.
    """
    centred = outputs_KxBxC - jnp.mean(outputs_KxBxC, axis=1, keepdims=True)
    norm_KxC = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1) + eps)
    z_KxBxC = centred / norm_KxC[:, None, :]
    corr_KxKxC = jnp.einsum("ibc,jbc->ijc", z_KxBxC, z_KxBxC)
    return jnp.mean(corr_KxKxC, axis=-1)


def decorrelation(
    outputs_KxBxC: Array, *, penalty: str = "squared", eps: float = CORRELATION_EPS
) -> Array:
    """The anti-distillation penalty: mean over pairs i < j of ``rho_ij ** 2`` (or ``|rho_ij|``).

    ``rho_ij`` is ``pairwise_correlation``'s class-averaged Pearson correlation of components i
    and j over the batch. In [0, 1]: 1 for identical (non-constant) components, about 0 for
    independent ones (about ``1 / B`` in expectation with the squared penalty). Needs K >= 2.

    The normalisation (per-class correlation averaged over classes, then squared, averaged over
    pairs) is the project's choice: the paper's exact form is not available (methods.md
    section 7).
    """
    k = outputs_KxBxC.shape[0]
    if k < 2:
        raise ValueError(f"decorrelation needs K >= 2 components, got K = {k}")
    rho_KxK = pairwise_correlation(outputs_KxBxC, eps=eps)
    i, j = np.triu_indices(k, 1)
    rho_P = rho_KxK[i, j]
    if penalty == "squared":
        return jnp.mean(jnp.square(rho_P))
    if penalty == "absolute":
        return jnp.mean(jnp.abs(rho_P))
    raise ValueError(f"penalty must be 'squared' or 'absolute', got {penalty!r}")


# ---------------------------------------------------------------------------------------------
# Validation shared by the transforms.

OVER = ("ensemble", "components")


def _check_weight(name: str, weight, *, upper: float | None = None) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name}: weight must be a number, got {weight!r}")
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0 or (upper is not None and weight > upper):
        bound = f"[0, {upper}]" if upper is not None else ">= 0 and finite"
        raise ValueError(f"{name}: weight must be {bound}, got {weight!r}")
    return weight


def _check_loss(name: str, loss) -> None:
    if not callable(loss):
        raise TypeError(f"{name}: the wrapped loss must be callable, got {loss!r}")


def check(loss: Loss, *, num_components: int, num_train: int, num_classes: int) -> None:
    """Checks a loss (and every loss it wraps) against the task before training.

    Raises ``ValueError`` naming the transform: a transform that needs K >= 2 components on a
    plain model, an anchor whose shape does not match the training set. Losses written by users
    (no ``_check`` method) are not inspected.
    """
    context = dict(num_components=num_components, num_train=num_train, num_classes=num_classes)
    seen = 0
    while loss is not None and seen < 100:
        checker = getattr(loss, "_check", None)
        if checker is not None:
            checker(**context)
        loss = getattr(loss, "loss", None)
        seen += 1


# ---------------------------------------------------------------------------------------------
# Task losses.


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy:
    """``-sum_c targets_c log p_c``, averaged over the batch; see ``softmax_cross_entropy``."""

    over: str = "ensemble"

    def __post_init__(self):
        if self.over not in OVER:
            raise ValueError(
                f"softmax_cross_entropy: over must be one of {OVER}, got {self.over!r}"
            )

    def __call__(self, logits_KxBxC: Array, batch: Batch) -> Array:
        if self.over == "ensemble":
            logp_BxC = ensemble_log_probs(logits_KxBxC)
            return -jnp.mean(jnp.sum(batch.targets * logp_BxC, axis=-1))
        logp_KxBxC = jax.nn.log_softmax(logits_KxBxC, axis=-1)
        return -jnp.mean(jnp.sum(batch.targets[None] * logp_KxBxC, axis=-1))


def softmax_cross_entropy(*, over: str = "ensemble") -> SoftmaxCrossEntropy:
    """Softmax cross-entropy against the batch's targets: the default task loss.

    Args:
      over: ``"ensemble"``: the cross-entropy of the ensemble prediction (mean of the
        components' probabilities), the task loss of methods.md section 7;
        ``"components"``: the mean of each component's own cross-entropy.

    Example:
      >>> loss = softmax_cross_entropy()
      >>> batch = make_batch(jnp.zeros((2, 3)), jnp.array([0, 1]), 2)
      >>> float(loss(jnp.zeros((1, 2, 2)), batch))  # uniform prediction: log 2
      0.693...
    """
    return SoftmaxCrossEntropy(over)


@dataclasses.dataclass(frozen=True)
class SigmoidBinaryCrossEntropy:
    """Per-class sigmoid cross-entropy; see ``sigmoid_binary_cross_entropy``."""

    over: str = "ensemble"

    def __post_init__(self):
        if self.over not in OVER:
            raise ValueError(
                f"sigmoid_binary_cross_entropy: over must be one of {OVER}, got {self.over!r}"
            )

    def __call__(self, logits_KxBxC: Array, batch: Batch) -> Array:
        log_p = jax.nn.log_sigmoid(logits_KxBxC)
        log_q = jax.nn.log_sigmoid(-logits_KxBxC)
        t = batch.targets
        if self.over == "ensemble":
            k = logits_KxBxC.shape[0]
            log_p = jax.nn.logsumexp(log_p, axis=0) - math.log(k)
            log_q = jax.nn.logsumexp(log_q, axis=0) - math.log(k)
        else:
            t = t[None]
        return -jnp.mean(jnp.sum(t * log_p + (1 - t) * log_q, axis=-1))


def sigmoid_binary_cross_entropy(*, over: str = "ensemble") -> SigmoidBinaryCrossEntropy:
    """Binary cross-entropy of each class's sigmoid against its target, summed over classes.

    Each output is an independent one-vs-rest probability ``sigmoid(logit_c)`` (with a one-hot
    target of 2 classes this trains both outputs as logistic regressions of the label).
    ``over="ensemble"`` averages the components' sigmoid probabilities before the loss,
    ``"components"`` averages the components' losses. ``Run.predict`` still reports the
    softmax of the outputs (the metrics need a distribution); with C = 2 and a model trained
    this way, the argmax is the same as the argmax of the sigmoids.
    """
    return SigmoidBinaryCrossEntropy(over)


# ---------------------------------------------------------------------------------------------
# Target transforms.


@dataclasses.dataclass(frozen=True)
class LabelSmoothing:
    """Targets become ``(1 - epsilon) * targets + epsilon / C``; see ``label_smoothing``."""

    loss: Loss
    epsilon: float

    NAME: ClassVar[str] = "label_smoothing"
    WEIGHT: ClassVar[str] = "epsilon"
    UPPER: ClassVar[float | None] = 1.0

    def __post_init__(self):
        _check_loss("label_smoothing", self.loss)
        object.__setattr__(
            self, "epsilon", _check_weight(self.NAME, self.epsilon, upper=self.UPPER)
        )

    def __call__(self, logits_KxBxC: Array, batch: Batch) -> Array:
        c = batch.targets.shape[-1]
        targets = (1.0 - self.epsilon) * batch.targets + self.epsilon / c
        return self.loss(logits_KxBxC, batch._replace(targets=targets))


def label_smoothing(loss: Loss, epsilon: float) -> LabelSmoothing:
    """Label smoothing: the wrapped loss sees ``(1 - epsilon) * targets + epsilon / C``.

    References:
      Szegedy et al. 2016, "Rethinking the Inception architecture" (arXiv 1512.00567).
    """
    return LabelSmoothing(loss, epsilon)


@dataclasses.dataclass(frozen=True, eq=False)
class AnchorDistillation:
    """Targets become ``weight * anchor[index] + (1 - weight) * targets``; see
    ``anchor_distillation``. Two are equal when their loss and weight are and their anchors
    hold the same bytes (compared by digest)."""

    loss: Loss
    weight: float
    anchor: np.ndarray

    NAME: ClassVar[str] = "anchor_distillation"
    WEIGHT: ClassVar[str] = "weight"
    UPPER: ClassVar[float | None] = 1.0

    def __post_init__(self):
        _check_loss("anchor_distillation", self.loss)
        object.__setattr__(self, "weight", _check_weight(self.NAME, self.weight, upper=self.UPPER))

    @property
    def _anchor_digest(self) -> str:
        digest = self.__dict__.get("_digest")
        if digest is None:
            h = hashlib.sha256()
            compilation.update_digest(h, self.anchor)
            digest = h.hexdigest()
            object.__setattr__(self, "_digest", digest)
        return digest

    def __eq__(self, other):
        if not isinstance(other, AnchorDistillation):
            return NotImplemented
        return (
            self.loss == other.loss
            and float(self.weight) == float(other.weight)
            and self._anchor_digest == other._anchor_digest
        )

    def __hash__(self):
        return hash((AnchorDistillation, self.loss, float(self.weight), self._anchor_digest))

    def __call__(self, logits_KxBxC: Array, batch: Batch) -> Array:
        anchor_BxC = jnp.asarray(self.anchor)[batch.index]
        targets = self.weight * anchor_BxC + (1.0 - self.weight) * batch.targets
        return self.loss(logits_KxBxC, batch._replace(targets=targets))

    def _check(self, *, num_train: int, num_classes: int, **_):
        if self.anchor.shape != (num_train, num_classes):
            raise ValueError(
                f"anchor_distillation: the anchor holds predictions of shape "
                f"{self.anchor.shape}, but the training set needs [{num_train}, {num_classes}] "
                f"(one distribution per training example, in training-set order)"
            )


def anchor_distillation(loss: Loss, weight: float, anchor, *, x=None) -> AnchorDistillation:
    """Distillation towards an anchor: the label becomes ``weight * anchor(x) + (1-weight) * y``.

    Args:
      loss: the loss to wrap (it sees the mixed targets).
      weight: lambda in [0, 1].
      anchor: the anchor's predictions on the training set, in its order: probabilities
        ``[N, C]``, or stacked ``[R, N, C]`` (their mean, the ensemble of the R replicas, is the
        anchor); or a trained ``engine.Run`` together with ``x``, the training inputs (the mean
        of its replicas' predictions on ``x``).
      x: the training inputs, when ``anchor`` is a ``Run``.

    The anchor's prediction for an example is looked up by the example's position in the
    training set, so it is computed once, without augmentation (project's choice: with
    augmentation the anchor sees the un-augmented example).

    References:
      Jiang et al. 2022, "Churn reduction via distillation" (arXiv 2106.02654).
    """
    if hasattr(anchor, "predict") and hasattr(anchor, "device_state"):  # an engine.Run
        if x is None:
            raise ValueError("anchor_distillation: an anchor Run needs x, the training inputs")
        anchor = anchor.predict(x)
    elif x is not None:
        raise ValueError("anchor_distillation: x is only used when the anchor is a Run")
    probs = np.asarray(anchor, np.float32)
    if probs.ndim == 3:
        probs = probs.mean(axis=0)
    if probs.ndim != 2:
        raise ValueError(
            f"anchor_distillation: anchor must be [N, C] or [R, N, C] "
            f"probabilities, got shape {np.shape(anchor)}"
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError("anchor_distillation: the anchor predictions hold NaN or inf")
    if np.any(probs < -1e-6) or not np.allclose(probs.sum(-1), 1.0, atol=1e-3):
        raise ValueError(
            "anchor_distillation: anchor rows must be probability distributions "
            "(non-negative, summing to 1); pass probabilities, not logits"
        )
    return AnchorDistillation(loss, weight, probs)


# ---------------------------------------------------------------------------------------------
# Penalties.


def _need_components(name: str, num_components: int) -> None:
    if num_components < 2:
        raise ValueError(
            f"{name} needs an ensemble of K >= 2 components per replica (models.Ensemble); "
            f"the model has K = {num_components}"
        )


AD_OUTPUTS = ("logits", "centred_logits", "residual")
"""What anti-distillation decorrelates."""


@dataclasses.dataclass(frozen=True)
class AntiDistillation:
    """``loss + weight * decorrelation(outputs)``; see ``anti_distillation``."""

    loss: Loss
    weight: float
    output: str = "logits"
    penalty: str = "squared"

    NAME: ClassVar[str] = "anti_distillation"
    WEIGHT: ClassVar[str] = "weight"
    UPPER: ClassVar[float | None] = None

    def __post_init__(self):
        _check_loss("anti_distillation", self.loss)
        object.__setattr__(self, "weight", _check_weight(self.NAME, self.weight))
        if self.output not in AD_OUTPUTS:
            raise ValueError(
                f"anti_distillation: output must be one of {AD_OUTPUTS}, got {self.output!r}"
            )
        if self.penalty not in ("squared", "absolute"):
            raise ValueError(
                f"anti_distillation: penalty must be 'squared' or 'absolute', got {self.penalty!r}"
            )

    def __call__(self, logits_KxBxC: Array, batch: Batch) -> Array:
        base = self.loss(logits_KxBxC, batch)
        _need_components("anti_distillation", logits_KxBxC.shape[0])
        if self.output == "logits":
            outputs = logits_KxBxC
        elif self.output == "centred_logits":
            outputs = logits_KxBxC - jnp.mean(logits_KxBxC, axis=-1, keepdims=True)
        else:
            outputs = jax.nn.softmax(logits_KxBxC, axis=-1) - batch.targets[None]
        return base + self.weight * decorrelation(outputs, penalty=self.penalty)

    def _check(self, *, num_components: int, **_):
        _need_components("anti_distillation", num_components)


def anti_distillation(
    loss: Loss, weight: float, *, output: str = "logits", penalty: str = "squared"
) -> AntiDistillation:
    """Anti-distillation: push an ensemble's components apart over each mini-batch.

    ``loss + weight * decorrelation(o)`` where ``o`` is each component's output over the batch:
    its logits (``output="logits"``); its logits centred over the classes of each example
    (``"centred_logits"``, the project's addition: the part of the logits the softmax sees, so
    a component cannot lower the penalty by adding a per-example shift common to all classes,
    which leaves its prediction unchanged); or its residual ``softmax(logits) - targets``
    (``"residual"``: the correlation of the members' errors, as in Rosen 1996). The penalty is
    the mean over component pairs of their class-averaged Pearson correlation over the batch,
    squared (``penalty="squared"``) or absolute. Needs K >= 2 components. Wrap the task loss of
    the ensemble (``softmax_cross_entropy()``) to get methods.md section 7's definition.

    The exact normalisation of the paper is not available: these choices are the project's.
    Held-out data is the judge (Jeffares et al. 2023: jointly trained diversity terms can
    inflate diversity on the training data only).

    References:
      Shamir & Coviello, arXiv 2010.09923; Rosen 1996, "Ensemble learning using decorrelated
      neural networks"; Liu & Yao 1999, "Ensemble learning via negative correlation".
    """
    return AntiDistillation(loss, weight, output, penalty)


@dataclasses.dataclass(frozen=True)
class Codistillation:
    """``loss + weight * mean_k KL(sg(mean of the others) || p_k)``; see ``codistillation``."""

    loss: Loss
    weight: float

    NAME: ClassVar[str] = "codistillation"
    WEIGHT: ClassVar[str] = "weight"
    UPPER: ClassVar[float | None] = None

    def __post_init__(self):
        _check_loss("codistillation", self.loss)
        object.__setattr__(self, "weight", _check_weight(self.NAME, self.weight))

    def __call__(self, logits_KxBxC: Array, batch: Batch) -> Array:
        base = self.loss(logits_KxBxC, batch)
        k = logits_KxBxC.shape[0]
        _need_components("codistillation", k)
        logp_KxBxC = jax.nn.log_softmax(logits_KxBxC, axis=-1)
        p_KxBxC = jnp.exp(logp_KxBxC)
        others_KxBxC = jax.lax.stop_gradient(
            (jnp.sum(p_KxBxC, axis=0, keepdims=True) - p_KxBxC) / (k - 1)
        )
        log_others = jnp.log(jnp.maximum(others_KxBxC, 1e-30))
        kl_KxB = jnp.sum(others_KxBxC * (log_others - logp_KxBxC), axis=-1)
        return base + self.weight * jnp.mean(kl_KxB)

    def _check(self, *, num_components: int, **_):
        _need_components("codistillation", num_components)


def codistillation(loss: Loss, weight: float) -> Codistillation:
    """Codistillation: each component is also distilled towards the others' mean prediction.

    Adds ``weight * mean_k KL(q_k || p_k)`` where ``q_k`` is the stop-gradient mean of the
    other components' probabilities and ``p_k`` component k's. KL rather than the
    cross-entropy of Anil et al.: the same gradient (they differ by the entropy of the
    constant ``q_k``), and the term is 0 when the components agree (project's choice).
    Needs K >= 2 components.

    References:
      Anil et al. 2018, arXiv 1804.03235.
    """
    return Codistillation(loss, weight)


@dataclasses.dataclass(frozen=True)
class MinEntropy:
    """``loss + weight * entropy(ensemble prediction)``; see ``min_entropy``."""

    loss: Loss
    weight: float

    NAME: ClassVar[str] = "min_entropy"
    WEIGHT: ClassVar[str] = "weight"
    UPPER: ClassVar[float | None] = None

    def __post_init__(self):
        _check_loss("min_entropy", self.loss)
        object.__setattr__(self, "weight", _check_weight(self.NAME, self.weight))

    def __call__(self, logits_KxBxC: Array, batch: Batch) -> Array:
        base = self.loss(logits_KxBxC, batch)
        return base + self.weight * entropy(ensemble_log_probs(logits_KxBxC))


def min_entropy(loss: Loss, weight: float) -> MinEntropy:
    """Minimum-entropy regulariser: plus ``weight`` times the mean entropy of the prediction.

    The entropy is that of the ensemble prediction (mean of the components' probabilities;
    the model's own prediction when K = 1): project's choice for K > 1.

    References:
      Bhojanapalli et al. 2021 (arXiv 2102.03349).
    """
    return MinEntropy(loss, weight)


# ---------------------------------------------------------------------------------------------
# Weights as arguments: one compiled training step for every value of a weight.

_WEIGHTED = (LabelSmoothing, AnchorDistillation, AntiDistillation, Codistillation, MinEntropy)


def _weighted_nodes(loss: Loss):
    """``(name, transform)`` for each weighted transform of jaxrepro in ``loss``, outermost
    first, down to the first loss that is not one (a task loss, or a loss of the user's, whose
    inside is its own). A transform that occurs again is named ``name:2``, ``name:3``, ..."""
    seen: dict[str, int] = {}
    node = loss
    while isinstance(node, _WEIGHTED):
        seen[node.NAME] = seen.get(node.NAME, 0) + 1
        n = seen[node.NAME]
        yield (node.NAME if n == 1 else f"{node.NAME}:{n}"), node
        node = node.loss


def weights(loss: Loss) -> dict[str, float]:
    """The weights of the transforms in ``loss``, ``{name: value}``, outermost first.

    Names are the transforms' (``label_smoothing``'s epsilon, ``anchor_distillation``,
    ``anti_distillation``, ``codistillation``, ``min_entropy``); a transform that occurs a
    second time is ``name:2``. These are the names ``fit``'s ``hparams`` takes to give each
    replica its own weight.

    Example:
      >>> weights(min_entropy(anti_distillation(softmax_cross_entropy(), 0.1), 0.01))
      {'min_entropy': 0.01, 'anti_distillation': 0.1}
    """
    return {name: getattr(node, node.WEIGHT) for name, node in _weighted_nodes(loss)}


def weight_bounds(loss: Loss) -> dict[str, float | None]:
    """``{name: upper bound}`` of the weights of ``loss`` (None: no upper bound; every weight
    is >= 0)."""
    return {name: node.UPPER for name, node in _weighted_nodes(loss)}


def check_weight(loss: Loss, name: str, values) -> np.ndarray:
    """``values`` (a number or one per replica) as float32, checked against the bounds of the
    transform ``name`` of ``loss``; ValueError naming the weight otherwise."""
    bounds = weight_bounds(loss)
    if name not in bounds:
        have = ", ".join(bounds) or "none"
        raise ValueError(f"the loss has no weight {name!r} (its weights: {have})")
    try:
        a = np.asarray(values)
    except ValueError:  # ragged
        raise ValueError(
            f"hparams[{name!r}]: weights must be a number or one number per replica, got {values!r}"
        ) from None
    if a.dtype == bool or not (
        np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
    ):
        raise ValueError(f"hparams[{name!r}]: weights must be numbers, got {values!r}")
    a = a.astype(np.float32)
    upper = bounds[name]
    bad = ~np.isfinite(a) | (a < 0) | ((a > upper) if upper is not None else False)
    if np.any(bad):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0 and finite"
        raise ValueError(f"hparams[{name!r}]: every weight must be {bound}, got {a[bad].tolist()}")
    return a


def with_weights(loss: Loss, values: Mapping[str, Any]) -> Loss:
    """``loss`` with the weights named in ``values`` replaced (names as in ``weights``).

    The values are not checked and may be traced arrays: the engine keeps one compiled training
    step per loss *structure* and feeds each replica's weights as arguments (the
    ``canonical`` loss with the replica's weights put back gives the same computation as the
    loss built with those weights, to float rounding: a traced weight is a float32 argument
    where a static one was folded into the program as a constant).
    """
    names = {name for name, _ in _weighted_nodes(loss)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"the loss has no weight {', '.join(map(repr, unknown))} "
            f"(its weights: {', '.join(sorted(names)) or 'none'})"
        )
    return _rebuild(loss, values, {})


def _rebuild(node, values, seen):
    if not isinstance(node, _WEIGHTED):
        return node
    seen[node.NAME] = seen.get(node.NAME, 0) + 1
    name = node.NAME if seen[node.NAME] == 1 else f"{node.NAME}:{seen[node.NAME]}"
    inner = _rebuild(node.loss, values, seen)
    if name not in values and inner is node.loss:
        return node
    new = copy.copy(node)
    object.__setattr__(new, "loss", inner)
    if name in values:
        object.__setattr__(new, node.WEIGHT, values[name])
    return new


def canonical(loss: Loss) -> Loss:
    """``loss`` with every weight set to 0.0: equal for losses that differ in their weights
    only, so they share one compiled training step (the engine passes the weights at run
    time)."""
    return with_weights(loss, {name: 0.0 for name in weights(loss)})


TRANSFORMS: dict[str, Any] = {
    "label_smoothing": label_smoothing,
    "anchor_distillation": anchor_distillation,
    "anti_distillation": anti_distillation,
    "codistillation": codistillation,
    "min_entropy": min_entropy,
}
"""The transforms by name."""
