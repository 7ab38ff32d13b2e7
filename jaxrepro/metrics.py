"""Reproducibility metrics: compare the stacked predictions of many replicas.

Synopsis::

    from jaxrepro import metrics
    report = metrics.compare(probs_RxNxC, labels_N)           # dict of Python floats
    report["churn"], report["pd_abs"], report["var_ratio"], report["churn_max"]
    report = metrics.compare(logits_RxNxC, labels_N, from_logits=True, key=jax.random.key(0))
    report["churn_ci"]                                        # [lo, hi], replicas resampled
    curve = metrics.ensemble_curve(probs_RxNxC, labels_N)     # PD against ensemble size k
    d = metrics.difference(probs_a, probs_b, labels_N, key)   # arm a - arm b, paired replicas
    d["churn"]["diff"], d["churn"]["ci"], d["churn"]["significant"]

Inputs are the predictions of R replicas on the same N examples: ``[R, N, C]`` class
probabilities, ``[R, N, C]`` logits with ``from_logits=True``, or ``[R, N]`` positive-class
probabilities (logits) of a binary task. A binary ``[R, N]`` input is treated exactly as the
two-class distribution ``(1 - p, p)``, and any input with C = 2 counts as binary (class 1 is the
positive class for ``pd_rel``, ``pred_range`` and ``var_cal``). Definitions and key names
follow ``methods.md`` sections 4-6, 9 (predictive multiplicity: ``ambiguity``,
``discrepancy``, ``churn_max``, ``pred_range``) and 10 (``var_dist``).

Two layers:

* One pure, jit-compatible function per metric (:func:`churn`, :func:`pd_abs`, ...), for
  in-memory arrays. They check shapes (static) but not values.
* :func:`compare`, :func:`bootstrap`, :func:`difference` (two arms) and
  :func:`ensemble_curve`: the whole report at once, with value validation, a replica mask,
  and memory bounded by streaming fixed-size blocks of examples through one jitted function
  (compiled once; the last block is padded and masked).
  ``probs`` may be a jax or numpy array, an ``np.memmap``, or any object with ``.shape`` whose
  ``obj[:, start:stop]`` returns the ``[R, stop - start, ...]`` slice (an h5py/zarr dataset, or
  a small class that computes predictions block by block): at most two blocks are in memory
  (the one computing and the next one being read). Per-example terms are computed in
  float32 on the device and summed in float64 on the host.

No metric loops over the R(R-1)/2 pairs: churn counts votes per class, the absolute
differences use the sorted-gap identity sum_{r<s} |x_r - x_s| = sum_k k (R - k) (x_(k+1) - x_(k))
(sorted with a bitonic network, much faster than XLA's CPU sort on the short replica axis), and
the squared and KL differences use the variance and covariance identities of methods.md.
``churn_max`` (the worst pair) comes from the G x G agreement matrix, a product of the one-hot
predictions accumulated over chunks of examples (for more than 32 classes, a vectorised
comparison of the G x G pairs, C times less work).

Project choices (methods.md leaves them open or names them the project's): TV normalisation
of ``pd_abs``; ``pd_rel`` normalised by the replica mean; ``pd_l2``; ``js_ensemble``;
``churn_correctness``; the R/(R-1) factor of ``var_ind``; probabilities clipped to
``LOG_FLOOR`` inside logarithms (probability inputs only); consecutive ensemble groups; the
bootstrap's distinct-pairs convention; the draw streams and p-value of :func:`difference`;
the plurality vote (ties: lowest class) as the baseline of ``discrepancy``; intervals of the
multiplicity measures over examples only.
Each is stated where it is used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro import checks, losses

LOG_FLOOR = 1e-12
"""Probabilities are clipped to this value inside logarithms (KL, JS): project's choice."""

PBAR_FLOOR = 1e-7
"""Examples whose mean probability is below this count 0 in ``pd_rel`` (methods.md)."""

DEFAULT_ATOL = 1e-3
"""Tolerance for probabilities that should sum to 1 and lie in [0, 1]."""

PROBS_AS_LOGITS_ATOL = 1e-3
"""With ``from_logits=True``, a multiclass stack whose every row lies in [0, 1] and sums to 1
within this is refused as probabilities passed as logits (real logits essentially never do).
The project's choice: every row, so a stack of genuine logits is never refused."""

PAIR_KEYS = (
    "churn",
    "pd_abs",
    "pd_rel",
    "pd_l2",
    "kl_pairwise",
    "js_ensemble",
    "churn_correctness",
)
ACC_KEYS = (
    "acc_mean",
    "acc_std",
    "acc_min",
    "acc_max",
    "eta",
    "var_obs",
    "var_ind",
    "var_ratio",
    "var_dist",
)
MULTIPLICITY_KEYS = ("ambiguity", "discrepancy", "churn_max", "pred_range")
"""Predictive multiplicity over the replicas (methods.md section 9). They describe the replica
set itself and grow with R, so their intervals (:func:`bootstrap`) always resample *examples*,
with the example multiplicities of ``over="examples"``, whatever ``over`` is: resampling
replicas with replacement leaves about 0.63 R distinct replicas and biases every one of them
down (the reason ``acc_min`` / ``acc_max`` get no replica interval). Not in :func:`difference`."""

METRIC_KEYS = PAIR_KEYS + ACC_KEYS + MULTIPLICITY_KEYS
"""Keys of :func:`compare` for every task; binary tasks add ``var_cal``."""

CI_KEYS = tuple(k for k in METRIC_KEYS if k not in ("acc_min", "acc_max") + MULTIPLICITY_KEYS) + (
    "var_cal",
)
"""Metrics whose bootstrap intervals resample what ``over`` says, in :func:`compare`,
:func:`bootstrap` and :func:`difference` (extremes are left out: the bootstrap is not
consistent for a minimum or maximum). ``MULTIPLICITY_KEYS`` get intervals over examples
only, from :func:`compare` and :func:`bootstrap`."""

_TERMS = ("disagree", "tv", "rel", "sq", "kl", "js", "cc")
_SUB_ELEMS = 1 << 15  # elements per inner sub-chunk: keeps the sort network in cache
_BLOCK_BYTES = 32 << 20  # input bytes per host block


# --------------------------------------------------------------------------------------------
# Per-example terms (pure jax).


def _bitonic_sort(v_RxM: jax.Array, idx_RxM: jax.Array | None = None):
    """Sorts along axis 0 with a bitonic network (XLA's CPU sort is several times slower on a
    short axis), optionally carrying an index array through the same exchanges."""
    r, m = v_RxM.shape
    rp = 1 << max(r - 1, 0).bit_length()
    if rp != r:  # pad to a power of two with +inf, which sorts last
        v_RxM = jnp.concatenate([v_RxM, jnp.full((rp - r, m), jnp.inf, v_RxM.dtype)])
        if idx_RxM is not None:
            pad = jnp.broadcast_to(jnp.arange(r, rp, dtype=idx_RxM.dtype)[:, None], (rp - r, m))
            idx_RxM = jnp.concatenate([idx_RxM, pad])
    stages = [(1 << e, 1 << s) for e in range(1, rp.bit_length()) for s in range(e - 1, -1, -1)]
    if not stages:
        return v_RxM if idx_RxM is None else (v_RxM, idx_RxM)
    block_k = jnp.array([k for k, _ in stages], jnp.int32)
    dist_j = jnp.array([j for _, j in stages], jnp.int32)
    pos = jnp.arange(rp, dtype=jnp.int32)

    def stage(t, carry):
        v, idx = carry
        partner = pos ^ dist_j[t]
        keep_min = ((pos < partner) == ((pos & block_k[t]) == 0))[:, None]
        other = jnp.take(v, partner, axis=0)
        if idx is None:
            return jnp.where(keep_min, jnp.minimum(v, other), jnp.maximum(v, other)), None
        take = jnp.where(keep_min, other < v, other > v)
        return jnp.where(take, other, v), jnp.where(take, jnp.take(idx, partner, axis=0), idx)

    v_RxM, idx_RxM = lax.fori_loop(0, len(stages), stage, (v_RxM, idx_RxM))
    return v_RxM[:r] if idx_RxM is None else (v_RxM[:r], idx_RxM[:r])


def _prepare(x, from_logits: bool, k: int):
    """Predictions -> probabilities P, log-probabilities L ([G, n, C]) and top-1 yhat [G, n]."""
    checks.boolean("from_logits", from_logits)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 2:  # binary: positive-class probability (or logit)
        if from_logits:
            logp_RxNxC = jnp.stack([jax.nn.log_sigmoid(-x), jax.nn.log_sigmoid(x)], axis=-1)
            p_RxNxC = jnp.exp(logp_RxNxC)
        else:
            p_RxNxC = jnp.stack([1.0 - x, x], axis=-1)
            logp_RxNxC = jnp.log(jnp.maximum(p_RxNxC, LOG_FLOOR))
    elif from_logits:
        logp_RxNxC = jax.nn.log_softmax(x, axis=-1)
        p_RxNxC = jnp.exp(logp_RxNxC)
    else:
        p_RxNxC = x
        logp_RxNxC = jnp.log(jnp.maximum(x, LOG_FLOOR))
    if k > 1:  # average probabilities within consecutive groups of k replicas
        g = p_RxNxC.shape[0] // k
        p_GxKxNxC = p_RxNxC[: g * k].reshape((g, k) + p_RxNxC.shape[1:])
        p_RxNxC = jnp.mean(p_GxKxNxC, axis=1)
        if from_logits:
            logp_GxKxNxC = logp_RxNxC[: g * k].reshape(p_GxKxNxC.shape)
            mx = jnp.max(logp_GxKxNxC, axis=1)
            logp_RxNxC = mx + jnp.log(jnp.mean(jnp.exp(logp_GxKxNxC - mx[:, None]), axis=1))
        else:
            logp_RxNxC = jnp.log(jnp.maximum(p_RxNxC, LOG_FLOOR))
    return p_RxNxC, logp_RxNxC, _argmax(logp_RxNxC if from_logits else p_RxNxC)


def _argmax(v):
    """First index of the maximum along the last axis (as jnp.argmax; XLA's CPU argmax is
    several times slower than a max followed by a min)."""
    is_max = v == jnp.max(v, axis=-1, keepdims=True)
    index = lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 1)
    return jnp.min(jnp.where(is_max, index, v.shape[-1]), axis=-1)


def _features(x, labels, *, from_logits: bool, k: int = 1, want=_TERMS, index: bool = False):
    """Weight-independent quantities of a block of examples (sorts done once here)."""
    p, logp, yhat = _prepare(x, from_logits, k)
    g, n, c = p.shape
    f: dict[str, Any] = {"p": p, "logp": logp, "yhat": yhat, "from_logits": from_logits}
    if labels is not None:
        labels = jnp.asarray(labels, jnp.int32)
        f["correct"] = yhat == labels[None, :]
    if "rel" in want:
        if c == 2:
            q = p[..., 1]
        elif labels is None:
            raise ValueError("pd_rel of a multiclass task needs labels (it uses p of the label)")
        else:
            q = jnp.take_along_axis(p, labels[None, :, None], axis=-1)[..., 0]
        f["q"] = q
    # One sorting network for both sorted quantities (columns: p for tv, then q for rel).
    parts = [
        (name, v)
        for name, v, term in (("p", p.reshape(g, n * c), "tv"), ("q", f.get("q"), "rel"))
        if term in want
    ]
    if not parts:
        return f
    v = jnp.concatenate([v for _, v in parts], axis=1)
    if index:
        ids = jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32)[:, None], v.shape)
        s, i = _bitonic_sort(v, ids)
    else:
        s, i = _bitonic_sort(v), None
    start = 0
    for name, part in parts:
        cols = slice(start, start + part.shape[1])
        f["gap_" + name] = s[1:, cols] - s[:-1, cols]
        if index:
            f["idx_" + name] = i[:, cols]
        start += part.shape[1]
    return f


def _dot(a, b):
    """Matrix product at full float32 precision (GPU/TPU defaults may use TF32/bf16)."""
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _pair_coef(g: int):
    kk = jnp.arange(1, g, dtype=jnp.float32)
    return kk * (g - kk)


def _unweighted(f, want=_TERMS):
    """Per-example sums over replica pairs (all replicas weight 1); exactly 0 for identical
    replicas because everything is centred on replica 0 first."""
    p, logp, yhat = f["p"], f["logp"], f["yhat"]
    g, n, c = p.shape
    out = {}
    if "disagree" in want:
        counts = jnp.sum(yhat[:, :, None] == jnp.arange(c)[None, None, :], axis=0)
        out["disagree"] = (g * g - jnp.sum(counts * counts, axis=-1)) // 2
    if "tv" in want:
        out["tv"] = 0.5 * jnp.sum(_dot(_pair_coef(g), f["gap_p"]).reshape(n, c), axis=-1)
    if "rel" in want:
        q = f["q"]
        qbar = (q[:1] + jnp.mean(q - q[:1], axis=0, keepdims=True))[0]
        mean_abs = _dot(_pair_coef(g), f["gap_q"]) / (g * (g - 1) / 2)
        out["rel"] = jnp.where(qbar < PBAR_FLOOR, 0.0, mean_abs / jnp.maximum(qbar, PBAR_FLOOR))
    if "sq" in want or "kl" in want:
        dp = p - p[:1]
        dp = dp - jnp.mean(dp, axis=0, keepdims=True)
    if "sq" in want:
        out["sq"] = g * jnp.sum(dp * dp, axis=(0, 2))
    if "kl" in want:
        dl = logp - logp[:1]
        dl = dl - jnp.mean(dl, axis=0, keepdims=True)
        out["kl"] = g * jnp.sum(dp * dl, axis=(0, 2))
    if "js" in want:
        if f["from_logits"]:
            mx = jnp.max(logp, axis=0, keepdims=True)
            logpbar = mx + jnp.log(jnp.mean(jnp.exp(logp - mx), axis=0, keepdims=True))
        else:
            pbar = p[:1] + jnp.mean(p - p[:1], axis=0, keepdims=True)
            # Exact 0 where a replica equals the mean (log may differ by an ulp across kernels).
            logpbar = jnp.where(p == pbar, logp, jnp.log(jnp.maximum(pbar, LOG_FLOOR)))
        out["js"] = jnp.sum(p * (logp - logpbar), axis=(0, 2)) / g
    if "cc" in want:
        kc = jnp.sum(f["correct"], axis=0, dtype=jnp.int32)
        out["cc"] = kc * (g - kc)
    return out


def _weighted_setup(f):
    """Weight-independent parts of the weighted sums (replica-centred to limit cancellation)."""
    p, logp, yhat = f["p"], f["logp"], f["yhat"]
    g, n, c = p.shape
    pmean, lmean = jnp.mean(p, axis=0, keepdims=True), jnp.mean(logp, axis=0, keepdims=True)
    pc, lc = p - pmean, logp - lmean
    return {
        "onehot": (yhat[:, :, None] == jnp.arange(c)[None, None, :]).astype(jnp.float32),
        "pc": pc,
        "lc": lc,
        "pmean": pmean,
        "norm": jnp.sum(pc * pc, axis=-1),
        "cross": jnp.sum(pc * lc, axis=-1),
        "negent": jnp.sum(p * logp, axis=-1),
        "correct": f["correct"].astype(jnp.float32),
        **{key: f[key] for key in ("gap_p", "idx_p", "gap_q", "idx_q", "q")},
    }


def _weighted_pair_abs(gap_GxM, idx_GxM, w_BxG):
    """sum_{r<s} w_r w_s |x_r - x_s| per column from sorted gaps: a scan over sorted positions
    accumulating each column's cumulative weight (much faster than gather + cumsum)."""
    tot = jnp.sum(w_BxG, axis=1)[:, None]

    def step(carry, xs):
        cum, acc = carry
        idx_M, gap_M = xs
        cum = cum + jnp.take(w_BxG, idx_M, axis=1)
        return (cum, acc + gap_M[None, :] * cum * (tot - cum)), None

    zeros = jnp.zeros((w_BxG.shape[0], gap_GxM.shape[1]), jnp.float32)
    (_, acc), _ = lax.scan(step, (zeros, zeros), (idx_GxM[:-1], gap_GxM))
    return acc


def _weighted(s, w_BxG):
    """Per-example sums over pairs of distinct replicas r != s weighted by w_r w_s, for a
    batch of B weight vectors (bootstrap multiplicities): copies of one replica never form a
    pair. ``s`` comes from :func:`_weighted_setup`. Returns ``{term: [B, n]}``."""
    g, n, c = s["pc"].shape
    w = w_BxG.astype(jnp.float32)
    b = w.shape[0]
    tot = jnp.sum(w, axis=1)[:, None]
    pairs = (tot * tot - jnp.sum(w * w, axis=1)[:, None]) / 2
    counts = _dot(w, s["onehot"].reshape(g, n * c)).reshape(b, n, c)
    pbar = _dot(w, s["pc"].reshape(g, n * c)).reshape(b, n, c) / tot[:, :, None]
    lbar = _dot(w, s["lc"].reshape(g, n * c)).reshape(b, n, c) / tot[:, :, None]
    pens = pbar + s["pmean"]
    qbar = _dot(w, s["q"]) / tot
    rel = _weighted_pair_abs(s["gap_q"], s["idx_q"], w) / pairs
    kc = _dot(w, s["correct"])
    return {
        "disagree": (tot * tot - jnp.sum(counts * counts, axis=-1)) / 2,
        "tv": 0.5 * jnp.sum(_weighted_pair_abs(s["gap_p"], s["idx_p"], w).reshape(b, n, c), -1),
        "rel": jnp.where(qbar < PBAR_FLOOR, 0.0, rel / jnp.maximum(qbar, PBAR_FLOOR)),
        "sq": tot * _dot(w, s["norm"]) - tot * tot * jnp.sum(pbar * pbar, axis=-1),
        "kl": tot * _dot(w, s["cross"]) - tot * tot * jnp.sum(pbar * lbar, axis=-1),
        "js": _dot(w, s["negent"]) / tot
        - jnp.sum(pens * jnp.log(jnp.maximum(pens, LOG_FLOOR)), axis=-1),
        "cc": kc * (tot - kc),
    }


# --------------------------------------------------------------------------------------------
# Pure per-metric functions.


def _static_checks(probs, labels=None, *, min_replicas: int = 2, k: int = 1):
    if not hasattr(probs, "shape"):
        raise checks.BadType(
            f"probs must be an array [R, N, C] or [R, N], got {type(probs).__name__}"
        )
    _check_probs_dtype(getattr(probs, "dtype", None), from_logits=False)
    shape = tuple(probs.shape)
    if len(shape) not in (2, 3):
        raise ValueError(
            "probs must have rank 2 ([R, N] positive-class probabilities of a "
            f"binary task) or 3 ([R, N, C]); got shape {shape}"
        )
    if len(shape) == 3 and shape[2] < 2:
        raise ValueError(
            f"probs has C = {shape[2]} classes; need at least 2 "
            "(use shape [R, N] for a binary task)"
        )
    if shape[1] == 0:
        raise ValueError("probs has no examples (N = 0)")
    if k < 1:
        raise ValueError(f"ensemble_size must be >= 1; got {k}")
    if shape[0] // k < min_replicas:
        what = (
            f"{shape[0]} replicas"
            if k == 1
            else (f"{shape[0] // k} groups of ensemble_size={k} from {shape[0]} replicas")
        )
        raise ValueError(f"pairwise metrics need at least {min_replicas} replicas; got {what}")
    if labels is not None and tuple(jnp.shape(labels)) != (shape[1],):
        raise ValueError(
            f"labels must have shape [N] = ({shape[1]},); got {tuple(jnp.shape(labels))}"
        )


def _mean_pairs(probs, labels, term, *, from_logits, k=1, ordered=False):
    _static_checks(probs, labels, k=k)
    t = _unweighted(_features(probs, labels, from_logits=from_logits, k=k, want=(term,)), (term,))[
        term
    ]
    g = probs.shape[0] // k
    return jnp.mean(t.astype(jnp.float32)) / (g * (g - 1) / (1 if ordered else 2))


def churn(probs, *, from_logits: bool = False) -> jax.Array:
    """Top-1 disagreement: mean over replica pairs and examples of 1[yhat_r != yhat_s].

    Counts votes per class (agreeing pairs are sum_c k_c (k_c - 1) / 2), so no pair loop.

    Args:
      probs: ``[R, N, C]`` probabilities (or logits with ``from_logits=True``), or ``[R, N]``
        positive-class probabilities of a binary task.
      from_logits: whether ``probs`` holds logits.

    Returns:
      Scalar in [0, 1].

    Example:
      >>> p = jnp.array([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.1, 0.9]]])
      >>> float(churn(p))
      0.5

    References:
      Bhojanapalli et al. 2021, "On the reproducibility and stability of deep learning
      models"; robustness_metrics ``disagreement``; apurvakokate/Reproducibility (PD).
    """
    return _mean_pairs(probs, None, "disagree", from_logits=from_logits)


def pd_abs(probs, *, from_logits: bool = False) -> jax.Array:
    """Absolute prediction difference: mean over pairs and examples of the total variation
    1/2 sum_c |P_r - P_s| (for binary tasks |p_r - p_s|). TV normalisation is the project's.

    Example:
      >>> p = jnp.array([[0.2, 0.6], [0.4, 0.6]])  # binary [R=2, N=2]
      >>> round(float(pd_abs(p)), 6)
      0.1

    References:
      Shamir, Lin & Coviello 2020 (absolute PD); Snapp & Shamir 2021.
    """
    return _mean_pairs(probs, None, "tv", from_logits=from_logits)


def pd_rel(probs, labels=None, *, from_logits: bool = False) -> jax.Array:
    """Relative prediction difference: mean over examples of
    [mean over pairs |p_r - p_s|] / mean_r p_r, with p the positive-class probability (binary)
    or the probability of the label (multiclass, ``labels`` required); examples with mean
    below ``PBAR_FLOOR`` count 0. Normalising by the replica mean is the project's choice.

    Example:
      >>> p = jnp.array([[0.2, 0.6], [0.4, 0.6]])
      >>> round(float(pd_rel(p)), 6)  # (0.2 / 0.3 + 0) / 2
      0.333333

    References:
      Shamir, Lin & Coviello 2020 (relative PD); Shamir & Coviello 2020 (Anti-Distillation).
    """
    _static_checks(probs, labels)
    t = _unweighted(_features(probs, labels, from_logits=from_logits, want=("rel",)), ("rel",))[
        "rel"
    ]
    return jnp.mean(t)


def pd_l2(probs, *, from_logits: bool = False) -> jax.Array:
    """Square root of the mean over pairs and examples of ||P_r - P_s||^2 (project's metric).

    Binary ``[R, N]`` inputs are the distributions (1 - p, p), so this is sqrt(2) times the
    root mean square of p_r - p_s.

    Example:
      >>> p = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
      >>> round(float(pd_l2(p)), 6)
      1.414214

    References:
      Project's metric (methods.md section 4), via sum over pairs = R sum_r ||P_r - Pbar||^2.
    """
    return jnp.sqrt(_mean_pairs(probs, None, "sq", from_logits=from_logits))


def kl_pairwise(probs, *, from_logits: bool = False) -> jax.Array:
    """Mean over ordered pairs r != s and examples of KL(P_r || P_s).

    Probability inputs are clipped to ``LOG_FLOOR`` inside the logarithm (project's choice:
    a zero probability where another replica has mass gives a large finite KL, not inf).

    Example:
      >>> p = jnp.array([[[0.5, 0.5]], [[0.5, 0.5]]])
      >>> float(kl_pairwise(p))
      0.0

    References:
      robustness_metrics ``average_kl``; identity sum_{r != s} KL = R sum_r cov(P_r, log P_r).
    """
    return _mean_pairs(probs, None, "kl", from_logits=from_logits, ordered=True)


def js_ensemble(probs, *, from_logits: bool = False) -> jax.Array:
    """Generalised Jensen-Shannon divergence to the ensemble: mean over examples of
    H(mean_r P_r) - mean_r H(P_r) = mean_r KL(P_r || mean_s P_s) (project's metric).

    Example:
      >>> p = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
      >>> round(float(js_ensemble(p)), 6)  # log 2
      0.693147

    References:
      Project's metric (methods.md section 4); Lin 1991, "Divergence measures based on the
      Shannon entropy".
    """
    _static_checks(probs)
    t = _unweighted(_features(probs, None, from_logits=from_logits, want=("js",)), ("js",))
    return jnp.mean(t["js"])


def churn_correctness(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """Mean over pairs and examples of 1[exactly one of r, s is correct] (project's metric:
    good plus bad churn). With k correct replicas an example has k (R - k) such pairs.

    Example:
      >>> p = jnp.array([[0.9, 0.9], [0.1, 0.9]]); y = jnp.array([1, 1])
      >>> float(churn_correctness(p, y))
      0.5

    References:
      brauden/prediction-churn (good and bad churn); Milani Fard et al. 2016.
    """
    return _mean_pairs(probs, labels, "cc", from_logits=from_logits)


def accuracy(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """Per-replica accuracy ``acc[r] = mean_n 1[yhat_r(n) = y(n)]``, shape [R].

    Example:
      >>> p = jnp.array([[0.9, 0.9], [0.1, 0.9]]); y = jnp.array([1, 1])
      >>> accuracy(p, y).tolist()
      [1.0, 0.5]
    """
    _static_checks(probs, labels, min_replicas=1)
    _, _, yhat = _prepare(probs, from_logits, 1)
    return jnp.mean(yhat == jnp.asarray(labels)[None, :], axis=1, dtype=jnp.float32)


def phat(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """Per-example accuracy: fraction of replicas correct on each example, shape [N].

    Example:
      >>> p = jnp.array([[0.9, 0.9], [0.1, 0.9]]); y = jnp.array([1, 1])
      >>> phat(p, y).tolist()
      [0.5, 1.0]

    References:
      Jordan 2023, "On the variance of neural network training with respect to test sets and
      distributions" (arXiv 2304.01910).
    """
    _static_checks(probs, labels, min_replicas=1)
    _, _, yhat = _prepare(probs, from_logits, 1)
    return jnp.mean(yhat == jnp.asarray(labels)[None, :], axis=0, dtype=jnp.float32)


def eta(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """Effective Test Accuracy: mean_r acc[r] - churn.

    Example:
      >>> p = jnp.array([[0.9, 0.9], [0.1, 0.9]]); y = jnp.array([1, 1])
      >>> float(eta(p, y))  # 0.75 - 0.5
      0.25

    References:
      apurvakokate/Reproducibility ``ex_mlp.py`` ("Do regularizers improve reproducibility?").
    """
    return jnp.mean(accuracy(probs, labels, from_logits=from_logits)) - churn(
        probs, from_logits=from_logits
    )


def var_obs(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """Observed variance of accuracy across replicas (ddof = 1).

    References:
      Jordan 2023 (arXiv 2304.01910).
    """
    _static_checks(probs, labels)
    return jnp.var(accuracy(probs, labels, from_logits=from_logits), ddof=1)


def var_ind(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """Accuracy variance if per-example errors were independent:
    (1/N^2) sum_n phat (1 - phat) R / (R - 1). The unbiased R/(R-1) factor is the project's.

    Example:
      >>> p = jnp.array([[0.9, 0.9], [0.1, 0.9]]); y = jnp.array([1, 1])
      >>> float(var_ind(p, y))  # (1/4) * (1/4) * 2
      0.125

    References:
      Jordan 2023 (arXiv 2304.01910).
    """
    _static_checks(probs, labels)
    r, n = probs.shape[0], probs.shape[1]
    ph = phat(probs, labels, from_logits=from_logits)
    return jnp.sum(ph * (1 - ph)) / (n * n) * r / (r - 1)


def var_ratio(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """``var_obs / var_ind``: about 1 when errors are independent across replicas (Jordan),
    above 1 for correlated errors (whole runs better or worse). NaN when both are 0.

    References:
      Jordan 2023 (arXiv 2304.01910).
    """
    return var_obs(probs, labels, from_logits=from_logits) / var_ind(
        probs, labels, from_logits=from_logits
    )


def var_cal(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """Binary tasks: the variance a class-calibrated ensemble predicts, err / (2N), with err the
    mean test error (derived from the calibration property in Jordan's paper).

    References:
      Jordan 2023 (arXiv 2304.01910).
    """
    if not (probs.ndim == 2 or probs.shape[-1] == 2):
        raise ValueError(f"var_cal is defined for binary tasks only; got shape {probs.shape}")
    err = 1.0 - jnp.mean(accuracy(probs, labels, from_logits=from_logits))
    return err / (2 * probs.shape[1])


def var_dist(probs, labels, *, from_logits: bool = False) -> jax.Array:
    """Variance of accuracy on the test *distribution* (Jordan's "true instability"):
    ``N / (N - 1) * (var_obs - var_ind)``, what remains of the observed variance once the part
    independent per-example errors explain is taken out (methods.md section 10; the independent
    part is ``var_ind``, with the project's unbiased R/(R-1) factor). It may come out negative
    by sampling error and is returned as computed; NaN for a single test example.

    Example:
      >>> p = jnp.array([[0.9, 0.9], [0.1, 0.1]]); y = jnp.array([1, 1])  # whole runs differ
      >>> float(var_dist(p, y))  # 2 * (0.5 - 0.25)
      0.5

    References:
      Jordan 2023 (arXiv 2304.01910); KellerJordan/cifar10-zoo's analysis.
    """
    n = probs.shape[1]
    obs = var_obs(probs, labels, from_logits=from_logits)
    ind = var_ind(probs, labels, from_logits=from_logits)
    if n < 2:  # one test example: no distribution to speak of
        return jnp.float32(jnp.nan)
    return n / (n - 1) * (obs - ind)


def _votes(probs, from_logits):
    """Top-1 predictions ``[R, N]`` and per-class vote counts ``[N, C]``."""
    _, _, yhat = _prepare(probs, from_logits, 1)
    c = 2 if probs.ndim == 2 else probs.shape[-1]
    onehot = yhat[:, :, None] == jnp.arange(c)[None, None, :]
    return yhat, onehot, jnp.sum(onehot, axis=0, dtype=jnp.int32)


def ambiguity(probs, *, from_logits: bool = False) -> jax.Array:
    """Fraction of examples on which the replicas do not all predict the same class
    (methods.md section 9; Marx, Calmon & Ustun 2020, with one of the replicas as baseline).
    Grows with R: report R beside it.

    Example:
      >>> p = jnp.array([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.1, 0.9]]])
      >>> float(ambiguity(p))
      0.5
    """
    _static_checks(probs)
    _, _, counts = _votes(probs, from_logits)
    return jnp.mean(jnp.max(counts, axis=-1) < probs.shape[0], dtype=jnp.float32)


def discrepancy(probs, *, from_logits: bool = False) -> jax.Array:
    """Max over replicas of the fraction of examples where the replica's prediction differs from
    the plurality vote (ties: the lowest class index; the vote as baseline is the project's).
    Marx, Calmon & Ustun 2020 (methods.md section 9).

    Example:
      >>> p = jnp.array([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.1, 0.9]],
      ...                [[0.8, 0.2], [0.4, 0.6]]])
      >>> float(discrepancy(p))  # vote: class 0, then class 1; replica 1 differs once of two
      0.5
    """
    _static_checks(probs)
    yhat, _, counts = _votes(probs, from_logits)
    vote = jnp.argmax(counts, axis=-1)  # the first maximum: the lowest class index
    return jnp.max(jnp.mean(yhat != vote[None, :], axis=1, dtype=jnp.float32))


def churn_max(probs, *, from_logits: bool = False) -> jax.Array:
    """The largest churn of any pair of replicas r < s (the worst pair; project's, methods.md
    section 9), from the R x R agreement matrix: one product of the one-hot predictions, no pair
    loop.

    Example:
      >>> p = jnp.array([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.1, 0.9]],
      ...                [[0.8, 0.2], [0.4, 0.6]]])
      >>> float(churn_max(p))
      0.5
    """
    _static_checks(probs)
    _, onehot, _ = _votes(probs, from_logits)
    r, n = onehot.shape[0], onehot.shape[1]
    flat = onehot.reshape(r, -1).astype(jnp.float32)
    agree = _dot(flat, flat.T)  # [R, R]: examples on which r and s agree (exact below 2**24)
    off = ~jnp.eye(r, dtype=bool)
    return jnp.max(jnp.where(off, 1.0 - agree / n, -jnp.inf))


def pred_range(probs, labels=None, *, from_logits: bool = False) -> jax.Array:
    """Mean over examples of ``max_r p_r(n) - min_r p_r(n)``, with p the probability of the
    label (as ``pd_rel``; the positive class for a binary task): the viable prediction range of
    Watson-Daniels, Parkes & Ustun 2023, over the replicas (methods.md section 9).

    Example:
      >>> p = jnp.array([[0.9, 0.2], [0.6, 0.4]])  # binary: positive-class probabilities
      >>> round(float(pred_range(p)), 6)
      0.25
    """
    _static_checks(probs, labels)
    p, _, _ = _prepare(probs, from_logits, 1)
    if p.shape[-1] == 2:
        q = p[..., 1]
    elif labels is None:
        raise ValueError("pred_range of a multiclass task needs labels (it uses p of the label)")
    else:
        q = jnp.take_along_axis(p, jnp.asarray(labels, jnp.int32)[None, :, None], axis=-1)[..., 0]
    return jnp.mean(jnp.max(q, axis=0) - jnp.min(q, axis=0))


def ensemble(probs, ensemble_size: int, *, from_logits: bool = False) -> jax.Array:
    """Averages probabilities within consecutive groups of ``ensemble_size`` replicas.

    Group g holds replicas g*k ... g*k + k - 1; the last R mod k replicas are dropped
    (consecutive groups are the project's choice: replicas are exchangeable, and consecutive
    groups keep the result a function of the replica indices only).

    Returns:
      ``[R // k, N, C]`` probabilities (``[R // k, N]`` for a binary ``[R, N]`` input).

    Example:
      >>> ensemble(jnp.array([[0.25], [0.75], [1.0], [0.5]]), 2).tolist()
      [[0.5], [0.75]]

    References:
      methods.md section 6; Shamir & Coviello 2020 (ensembles reduce PD).
    """
    ensemble_size = checks.integer("ensemble_size", ensemble_size, minimum=1)
    _static_checks(probs, min_replicas=1, k=ensemble_size)
    p, _, _ = _prepare(probs, from_logits, ensemble_size)
    return p[..., 1] if probs.ndim == 2 else p


# --------------------------------------------------------------------------------------------
# Streaming engine.


def _is_jax(x) -> bool:
    return isinstance(x, jax.Array)


def finite_replicas(probs, *, chunk_size: int | None = None):
    """Which replicas have only finite predictions: bool ``[R]`` (True = keep).

    Use it as the ``mask`` of :func:`compare` to exclude replicas whose predictions are not
    finite. For replicas trained by ``jaxrepro.fit``, ``mask=~run.diverged`` is the mask: the
    engine freezes a diverged replica at its last good state (``FitConfig.divergence``), so its
    predictions are finite and this function keeps it. A jax array gives a jax array
    (jit-compatible); anything else is scanned block by block and gives numpy.

    Example:
      >>> p = np.full((3, 4, 2), 0.5, np.float32); p[1, 2] = np.nan
      >>> finite_replicas(p).tolist()
      [True, False, True]
    """
    if chunk_size is not None:
        checks.integer("chunk_size", chunk_size, minimum=1)
    if _is_jax(probs):
        return jnp.all(jnp.isfinite(probs.reshape(probs.shape[0], -1)), axis=1)
    r, n = probs.shape[0], probs.shape[1]
    step = chunk_size or max(1, _BLOCK_BYTES // (4 * r * int(np.prod(probs.shape[2:]))))
    keep = np.ones(r, bool)
    for a in range(0, n, step):
        blk = np.asarray(probs[:, a : a + step])
        keep &= np.isfinite(blk.reshape(r, -1)).all(axis=1)
    return keep


def _check_stats(x, from_logits):
    """Per replica: non-finite count, largest deviation of a row's sum from 1, min and max.
    Computed for logits too: a stack whose every row is a probability vector was most likely
    passed with ``from_logits=True`` by mistake (``_Scan._raise_on_values``)."""
    r = x.shape[0]
    flat = x.reshape(r, -1)
    nonfinite = jnp.sum(~jnp.isfinite(flat), axis=1)
    dev = jnp.zeros(r) if x.ndim == 2 else jnp.max(jnp.abs(jnp.sum(x, -1) - 1.0), axis=1)
    return nonfinite, dev, jnp.min(flat, axis=1), jnp.max(flat, axis=1)


def _sub_size(r, c):
    """Examples per inner sub-chunk: about ``_SUB_ELEMS`` values, a power of two."""
    sub = max(1, _SUB_ELEMS // (r * c))
    return 1 << (sub.bit_length() - 1)


def _class_dtype(c: int):
    """The smallest integer dtype that holds class indices 0 .. c - 1 (kept top-1 predictions
    of the example bootstrap: G x N of them)."""
    return jnp.int8 if c <= 127 else jnp.int16 if c <= 32767 else jnp.int32


def _multiplicity_terms(f):
    """Per-example multiplicity quantities of a sub-chunk of examples (methods.md section 9)
    from :func:`_features`: the non-unanimity indicator ``amb``, the range ``range`` of q
    (pd_rel's probability) over the groups, the plurality vote ``vote`` (ties: the lowest
    class) and the top-1 predictions ``yhat`` ([G, n]; both as small integers)."""
    yhat, q = f["yhat"], f["q"]
    g, n, c = f["p"].shape
    counts = jnp.sum(yhat[:, :, None] == jnp.arange(c)[None, None, :], axis=0, dtype=jnp.int32)
    vote = _argmax(counts)  # the first maximum: the lowest class index among ties
    return {
        "amb": jnp.max(counts, axis=-1) < g,
        "range": jnp.max(q, axis=0) - jnp.min(q, axis=0),
        "vote": vote.astype(_class_dtype(c)),
        "yhat": yhat.astype(_class_dtype(c)),
    }


_AGREE_ELEMS = 1 << 20
"""Values per chunk of examples of the agreement matrix (one-hot values, or compared pairs):
a few MiB, and products large enough to run near the matrix unit's peak."""

_AGREE_ONEHOT_MAX_C = 32
"""Up to this many classes the agreement matrix is a product of one-hot predictions; above,
a direct comparison of the G x G pairs per example (C times fewer operations, which then
outweighs the product's speed: about 3x faster at C = 100 on CPU, 2x slower at C = 10)."""


def _agreement(yhat_GxN, valid_N, c: int):
    """``[G, G]`` int32: the valid examples on which groups r and s predict the same class,
    accumulated in int32 over chunks of m examples. Up to ``_AGREE_ONEHOT_MAX_C`` classes one
    product of the one-hot predictions ([G, m C] by [m C, G], exact in float32: m < 2**24)
    per chunk, above it a vectorised comparison of the [G, G, m] pairs. No pair loop."""
    g, n = yhat_GxN.shape
    onehot = c <= _AGREE_ONEHOT_MAX_C
    m = max(1, min(n, _AGREE_ELEMS // (g * (c if onehot else g))))
    pad = (-n) % m
    # Invalid examples (and the chunks' padding) get class -1: they agree with nothing.
    yhat = jnp.where(valid_N[None, :], yhat_GxN.astype(jnp.int32), -1)
    yhat = jnp.pad(yhat, ((0, 0), (0, pad)), constant_values=-1)

    def step(agree, i):
        ys = lax.dynamic_slice_in_dim(yhat, i * m, m, axis=1)
        if onehot:
            hot = (ys[:, :, None] == jnp.arange(c)).astype(jnp.float32).reshape(g, m * c)
            return agree + _dot(hot, hot.T).astype(jnp.int32), None
        same = (ys[:, None, :] == ys[None, :, :]) & (ys >= 0)[None, :, :]
        return agree + jnp.sum(same, axis=-1, dtype=jnp.int32), None

    agree, _ = lax.scan(step, jnp.zeros((g, g), jnp.int32), jnp.arange((n + pad) // m))
    return agree


@functools.partial(jax.jit, static_argnames=("from_logits", "k", "sub", "batch"))
def _block(x, labels, valid, w_SxG, v_SxB=None, *, from_logits, k, sub, batch):
    """One block of examples: per-example terms, correctness, checks, the multiplicity
    quantities (:func:`_multiplicity_terms` per example; over the valid examples, each group's
    disagreements with the vote ``disc`` [G] and the agreement matrix ``agree`` [G, G], see
    :func:`_agreement`) and (when ``w_SxG`` has rows) per-sample weighted sums for the replica
    bootstrap.

    ``v_SxB`` (two-way bootstrap only): each sample's multiplicities of the block's examples.
    Each sample's per-example terms are then weighted by its v_n, and the sums gain ``cor``
    (per-replica weighted correct counts sum_n v_n correct_rn, [S, G]) and ``dup``
    (sum_n v_n (v_n - 1) cc_w,n, the duplicate-example self-products of ``var_obs``)."""
    nb = x.shape[1]
    index = w_SxG.shape[0] > 0

    def body(i):
        xs = lax.dynamic_slice_in_dim(x, i * sub, sub, axis=1)
        ys = lax.dynamic_slice_in_dim(labels, i * sub, sub)
        vs = lax.dynamic_slice_in_dim(valid, i * sub, sub).astype(jnp.float32)
        f = _features(xs, ys, from_logits=from_logits, k=k, index=index)
        out = (_unweighted(f), f["correct"], _multiplicity_terms(f))
        if not index:
            return out + ({},)

        setup = _weighted_setup(f)
        g = w_SxG.shape[1]
        if v_SxB is None:

            def one_batch(w_BxG):
                return {t: _dot(v, vs) for t, v in _weighted(setup, w_BxG).items()}

            sums = lax.map(one_batch, w_SxG.reshape(-1, batch, g))
            return out + ({t: v.reshape(-1) for t, v in sums.items()},)

        ve = lax.dynamic_slice_in_dim(v_SxB, i * sub, sub, axis=1).astype(jnp.float32)
        ve = ve * vs[None, :]  # padded examples get multiplicity 0

        def one_batch_two_way(args):
            w_BxG, v_BxM = args
            terms = _weighted(setup, w_BxG)
            sums = {t: jnp.sum(v * v_BxM, axis=1) for t, v in terms.items()}
            sums["cor"] = _dot(v_BxM, setup["correct"].T)
            sums["dup"] = jnp.sum(terms["cc"] * v_BxM * (v_BxM - 1), axis=1)
            return sums

        sums = lax.map(one_batch_two_way, (w_SxG.reshape(-1, batch, g), ve.reshape(-1, batch, sub)))
        return out + ({t: v.reshape((-1,) + v.shape[2:]) for t, v in sums.items()},)

    terms, correct, multi, boot = lax.map(body, jnp.arange(nb // sub))
    terms = {t: v.reshape(nb) for t, v in terms.items()}
    correct = jnp.moveaxis(correct, 1, 0).reshape(correct.shape[1], nb)
    boot = {t: jnp.sum(v, axis=0) for t, v in boot.items()}
    multi = {t: v.reshape(nb) for t, v in multi.items() if t != "yhat"} | {
        "yhat": jnp.moveaxis(multi["yhat"], 1, 0).reshape(correct.shape[0], nb)
    }
    # Over the valid examples: each group's disagreements with the vote, the agreement matrix.
    multi["disc"] = jnp.sum((multi["yhat"] != multi["vote"][None, :]) & valid[None, :], axis=1)
    multi["agree"] = _agreement(multi["yhat"], valid, 2 if x.ndim == 2 else x.shape[2])
    return terms, correct, boot, _check_stats(x, from_logits), multi


class _Scan:
    """Streams blocks of examples from ``probs`` and accumulates everything in float64."""

    def __init__(self, probs, labels, *, from_logits, mask, atol, chunk_size, ks=(1,)):
        checks.boolean("from_logits", from_logits)
        self.atol = checks.number("atol", atol, minimum=0)
        if chunk_size is not None:
            checks.integer("chunk_size", chunk_size, minimum=1)
        ks = tuple(checks.integer("ensemble_size", k, minimum=1) for k in ks)
        if not hasattr(probs, "shape"):
            try:
                probs = np.asarray(probs)
            except (TypeError, ValueError) as e:
                raise checks.BadType(f"probs must be an array of numbers ({e})") from None
        if not hasattr(probs, "__getitem__"):
            raise ValueError(
                "probs must be an array, or an object with .shape whose "
                "probs[:, start:stop] returns that block of examples"
            )
        _check_probs_dtype(getattr(probs, "dtype", None), from_logits)
        shape = tuple(probs.shape)
        _static_checks(probs, None, min_replicas=1)
        r, n = shape[0], shape[1]
        self.binary = len(shape) == 2 or shape[2] == 2
        c = 2 if len(shape) == 2 else shape[2]
        labels = np.asarray(labels)
        if len(shape) == 2 and labels.shape == (r,) and r != n:
            raise ValueError(
                f"probs of shape {shape} is read as [R, N] (the positive-class probabilities of "
                f"{r} replicas on {n} examples of a binary task), but labels has {r} entries: "
                "it looks like one model's [N, C] without a replica axis; stack the replicas' "
                "predictions as [R, N, C] (probs[None] for a single model)"
            )
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape [N] = ({n},); got {labels.shape}")
        if labels.dtype == bool:
            labels = labels.astype(np.int32)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= c:
            raise ValueError(
                f"labels out of range: values must lie in [0, {c - 1}]; found "
                f"min {labels.min()} and max {labels.max()}"
            )
        if mask is None:
            keep = np.arange(r)
        else:
            mask = np.asarray(mask)
            if mask.shape != (r,) or mask.dtype != bool:
                raise ValueError(
                    f"mask must be a boolean array of shape [R] = ({r},) "
                    f"(True = keep); got {mask.dtype} {mask.shape}"
                )
            keep = np.flatnonzero(mask)
        self.num_excluded = r - len(keep)
        rk = len(keep)
        for k in ks:
            if k < 1 or rk // k < 2:
                why = "" if not self.num_excluded else f" ({self.num_excluded} masked out)"
                raise ValueError(
                    f"pairwise metrics need at least 2 replicas (or groups); got {rk} "
                    f"replicas{why} and ensemble_size={k}"
                )
        self.probs, self.labels = probs, labels.astype(np.int32)
        self.keep = None if rk == r else keep
        if _is_jax(probs) and self.keep is not None:
            self.probs, self.keep = probs[jnp.asarray(keep)], None
        self.from_logits = bool(from_logits)
        self.r, self.n, self.c, self.ks = rk, n, c, tuple(ks)
        # Blocks of nb examples (the last one padded), each cut into sub-chunks of sub; nb is
        # balanced so that padding stays small, and never exceeds a chunk_size given.
        strict = chunk_size is not None
        if chunk_size is None:
            chunk_size = math.ceil(n / max(1, math.ceil(n * rk * c * 4 / _BLOCK_BYTES)))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
        want = min(chunk_size, n)
        self.sub = min(_sub_size(rk, c), want)
        per_block = math.ceil(n / math.ceil(n / want))
        self.nb = math.ceil(per_block / self.sub) * self.sub
        if strict and self.nb > want:
            self.nb = want // self.sub * self.sub

    def _blocks(self):
        # Padding examples are masked out of every sum; a multiclass pad row is uniform 1/C (a
        # probability vector either way, so it leaves the checks of _raise_on_values alone).
        if len(self.probs.shape) == 3:
            pad_value = 1.0 / self.c
        else:
            pad_value = 0.0 if self.from_logits else 0.5
        for a in range(0, self.n, self.nb):
            b = min(a + self.nb, self.n)
            if _is_jax(self.probs):
                blk = jnp.asarray(self.probs[:, a:b], jnp.float32)
                xp = jnp
            else:
                blk = np.asarray(self.probs[:, a:b], dtype=np.float32)
                if self.keep is not None:
                    blk = blk[self.keep]
                xp = np
            if b - a < self.nb:
                widths = [(0, 0), (0, self.nb - (b - a))] + [(0, 0)] * (blk.ndim - 2)
                blk = xp.pad(blk, widths, constant_values=pad_value)
            lab = np.zeros(self.nb, np.int32)
            lab[: b - a] = self.labels[a:b]
            yield a, b, blk, lab, np.arange(self.nb) < (b - a)

    def run(self, boot_w=None, keep_examples=False, boot_v=None):
        """Returns, per ensemble size k: term sums, per-replica correct counts, the
        multiplicity counts (``multi``: non-unanimous examples, summed q range, per-group
        disagreements with the vote [G], agreement matrix [G, G]), optionally
        (``keep_examples``) the per-example terms and correctness and the per-example
        multiplicity data (``mex`` [n, 2]: amb, range; ``yhat`` [G, n]; ``vote`` [n], per
        block), and the bootstrap sums. ``keep_examples`` and ``boot_w`` may be combined (one
        pass serves a replica bootstrap and the example-resampled multiplicity intervals).
        Block i + 1 is read from the source while block i computes (jax dispatch is
        asynchronous).

        ``boot_v`` (with ``boot_w``; two-way bootstrap): ``[S, N]`` example multiplicities of
        each sample, sliced per block; the bootstrap sums then also hold ``cor`` ([S, G]) and
        ``dup`` (see :func:`_block`)."""
        res = {
            k: {
                "sums": dict.fromkeys(_TERMS, 0.0),
                "correct": 0,
                "multi": {"amb": 0, "range": 0.0, "disc": 0, "agree": 0},
                "ex": [],
                "cor": [],
                "mex": [],
                "yhat": [],
                "vote": [],
                "boot": None,
            }
            for k in self.ks
        }
        state = {
            "nonfinite": np.zeros(self.r, np.int64),
            "dev": np.zeros(self.r),
            "lo": np.full(self.r, np.inf),
            "hi": np.full(self.r, -np.inf),
        }
        w_arr = {}
        for k in self.ks:
            g = self.r // k
            if boot_w is None or k != self.ks[0]:
                w_arr[k] = np.zeros((0, g), np.float32)
            else:
                batch = min(len(boot_w), 256)
                pad = np.ones(((-len(boot_w)) % batch, g), np.float32)
                w_arr[k] = np.concatenate([boot_w, pad]).astype(np.float32)
        v_arr = None
        if boot_v is not None:
            if boot_w is None or len(self.ks) != 1 or len(boot_v) != len(boot_w):
                raise ValueError("boot_v needs boot_w with as many samples and one ensemble size")
            rows = len(w_arr[self.ks[0]])
            v_arr = np.asarray(boot_v, np.float32)
            if len(v_arr) < rows:  # the padding samples of w_arr
                v_arr = np.concatenate([v_arr, np.zeros((rows - len(v_arr), self.n), np.float32)])

        def collect(nv, outs):
            for k, out in outs.items():
                *out, multi = out
                if not keep_examples:  # the kept predictions stay on the device
                    multi = {t: v for t, v in multi.items() if t not in ("yhat", "vote")}
                terms, correct, boot, checks, multi = jax.device_get((*out, multi))
                acc = res[k]
                for t in _TERMS:
                    acc["sums"][t] += np.sum(terms[t][:nv], dtype=np.float64)
                acc["correct"] = acc["correct"] + np.sum(correct[:, :nv], axis=1, dtype=np.int64)
                m = acc["multi"]
                m["amb"] += int(np.sum(multi["amb"][:nv], dtype=np.int64))
                m["range"] += np.sum(multi["range"][:nv], dtype=np.float64)
                m["disc"] = m["disc"] + multi["disc"].astype(np.int64)
                m["agree"] = m["agree"] + multi["agree"].astype(np.int64)
                if keep_examples:
                    acc["ex"].append(np.stack([terms[t][:nv] for t in _TERMS], axis=1))
                    acc["cor"].append(correct[:, :nv])
                    amb = multi["amb"][:nv].astype(np.float32)
                    acc["mex"].append(np.stack([amb, multi["range"][:nv]], axis=1))
                    acc["yhat"].append(multi["yhat"][:, :nv])
                    acc["vote"].append(multi["vote"][:nv])
                if len(w_arr[k]):
                    bs = {t: np.asarray(v[: len(boot_w)], np.float64) for t, v in boot.items()}
                    acc["boot"] = (
                        bs if acc["boot"] is None else {t: acc["boot"][t] + bs[t] for t in bs}
                    )
            nf, dv, mn, mx = checks
            state["nonfinite"] += nf
            state["dev"] = np.maximum(state["dev"], dv)
            state["lo"], state["hi"] = np.minimum(state["lo"], mn), np.maximum(state["hi"], mx)

        pending = None
        for a, b, blk, lab, valid in self._blocks():
            extra = ()
            if v_arr is not None:
                v_blk = np.zeros((len(v_arr), self.nb), np.float32)
                v_blk[:, : b - a] = v_arr[:, a:b]
                extra = (v_blk,)
            outs = {
                k: _block(
                    blk,
                    lab,
                    valid,
                    w_arr[k],
                    *extra,
                    from_logits=self.from_logits,
                    k=k,
                    sub=self.sub,
                    batch=max(1, min(len(w_arr[k]), 256)),
                )
                for k in self.ks
            }
            if pending is not None:
                collect(*pending)
            pending = (b - a, outs)
        collect(*pending)
        self._raise_on_values(state["nonfinite"], state["dev"], state["lo"], state["hi"])
        return res

    def _raise_on_values(self, nonfinite, dev, lo, hi):
        ids = np.arange(self.r) if self.keep is None else self.keep
        if nonfinite.any():
            bad = np.flatnonzero(nonfinite)
            raise ValueError(
                f"probs has non-finite values (NaN or inf): {int(nonfinite.sum())} values in "
                f"replicas {ids[bad].tolist()}; exclude diverged replicas with "
                "mask=metrics.finite_replicas(probs) (or mask=~run.diverged for a fit)"
            )
        if self.from_logits:
            # Rows that already are probability vectors (in [0, 1], summing to 1) would get a
            # second softmax and silently shrink every difference: refused (multiclass only; a
            # binary [R, N] stack has no row sum to tell logits from probabilities).
            simplex = (dev <= PROBS_AS_LOGITS_ATOL) & (lo >= 0) & (hi <= 1)
            if len(self.probs.shape) == 3 and simplex.all():
                raise ValueError(
                    "from_logits=True, but every row of probs is already a probability vector "
                    f"(in [0, 1], summing to 1 within {PROBS_AS_LOGITS_ATOL:g}): a second softmax "
                    "would shrink every difference; pass from_logits=False for probabilities"
                )
            return
        if (dev > self.atol).any():
            bad = np.flatnonzero(dev > self.atol)
            raise ValueError(
                f"probabilities do not sum to 1: replicas {ids[bad].tolist()} deviate by up to "
                f"{dev.max():.3g} (atol={self.atol}); pass from_logits=True for logits"
            )
        if (lo < -self.atol).any() or (hi > 1 + self.atol).any():
            bad = np.flatnonzero((lo < -self.atol) | (hi > 1 + self.atol))
            raise ValueError(
                f"probabilities outside [0, 1] in replicas {ids[bad].tolist()} (min "
                f"{lo.min():.3g}, max {hi.max():.3g}); pass from_logits=True for logits"
            )


def _check_probs_dtype(dtype, from_logits: bool) -> None:
    if dtype is None or jnp.issubdtype(dtype, jnp.floating):  # bfloat16 included
        return
    dtype = np.dtype(dtype)
    what = "logits" if from_logits else "probabilities"
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        raise checks.BadType(
            f"probs has dtype {dtype}: compare takes {what} as floats, not predicted class ids; "
            "for hard predictions pass one-hot probabilities (jax.nn.one_hot(ids, C))"
        )
    raise checks.BadType(f"probs must hold real floating-point {what}, got dtype {dtype}")


def _finalize(sums, acc_SxG, n, w_SxG, binary, var_excess=0.0):
    """Metric values from term sums; vectorised over a leading sample axis. Weights w are
    replica multiplicities (all ones for the point estimate); ``var_excess`` is subtracted
    from the variance of accuracies (duplicated examples, see the example bootstrap)."""
    acc_SxG, w_SxG = np.asarray(acc_SxG, np.float64), np.asarray(w_SxG, np.float64)
    tot = w_SxG.sum(-1)
    pairs = (tot * tot - (w_SxG * w_SxG).sum(-1)) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "churn": sums["disagree"] / (n * pairs),
            "pd_abs": sums["tv"] / (n * pairs),
            "pd_rel": sums["rel"] / n,
            "pd_l2": np.sqrt(np.maximum(sums["sq"], 0.0) / (n * pairs)),
            "kl_pairwise": sums["kl"] / (n * 2 * pairs),
            "js_ensemble": sums["js"] / n,
            "churn_correctness": sums["cc"] / (n * pairs),
        }
        dev = acc_SxG - acc_SxG[..., :1]  # centred on one replica: exactly 0 if all agree
        mean_dev = (w_SxG * dev).sum(-1) / tot
        mean = acc_SxG[..., 0] + mean_dev
        var = tot * (w_SxG * (dev - mean_dev[..., None]) ** 2).sum(-1) / (2 * pairs)
        var = np.maximum(var - var_excess, 0.0)
        out.update(
            acc_mean=mean,
            acc_std=np.sqrt(var),
            acc_min=np.where(w_SxG > 0, acc_SxG, np.inf).min(-1),
            acc_max=np.where(w_SxG > 0, acc_SxG, -np.inf).max(-1),
            eta=mean - out["churn"],
            var_obs=var,
            var_ind=sums["cc"] / (n * n * 2 * pairs),
        )
        out["var_ratio"] = out["var_obs"] / out["var_ind"]
        # Jordan's distribution-wise variance (methods.md section 10); one example: NaN.
        gap = out["var_obs"] - out["var_ind"]
        out["var_dist"] = n / (n - 1) * gap if n > 1 else np.full_like(gap, np.nan)
        if binary:
            out["var_cal"] = (1.0 - mean) / (2 * n)
    return out


def _interval(samples, level):
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [math.nan, math.nan]
    return [float(np.percentile(finite, lo)), float(np.percentile(finite, hi))]


@functools.partial(jax.jit, static_argnames=("size", "count"))
def _resample_counts(key, start, *, size, count):
    """Multiplicities of ``count`` bootstrap samples of ``size`` items; sample i depends only
    on (key, i), so results do not depend on how samples are batched."""

    def one(i):
        draw = jax.random.randint(jax.random.fold_in(key, i), (size,), 0, size)
        return jnp.bincount(draw, length=size)

    return jax.vmap(one)(start + jnp.arange(count))


@jax.jit
def _weighted_example_sums(v_SxN, ex_NxT, cor_GxN):
    v = v_SxN.astype(jnp.float32)
    dup = _dot(v * (v - 1), ex_NxT[:, _TERMS.index("cc")])
    return _dot(v, ex_NxT), _dot(v, cor_GxN.T.astype(jnp.float32)), dup


def _check_bootstrap_args(num_samples, level, key=None):
    checks.integer("num_samples", num_samples, minimum=1)
    level = checks.number("level", level)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level}")
    if key is not None:
        _check_key(key)


def _check_key(key) -> None:
    """A JAX PRNG key: a typed key (``jax.random.key``) or a raw ``uint32[2]``
    (``jax.random.PRNGKey``); an integer seed is refused rather than taken as one."""
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == np.uint32 and tuple(getattr(key, "shape", ())) == (2,)
    if not (typed and key.shape == ()) and not raw:
        raise checks.BadType(
            f"key must be one JAX PRNG key (jax.random.key(seed)), got {key!r}; to seed the "
            "bootstrap from an integer, pass key=jax.random.key(seed)"
        )


def _replica_values(res, scan, k, w):
    """Per-sample metric values of a replica (or two-way) bootstrap from
    ``scan.run(boot_w=w[, boot_v=v])[k]``; ``w`` are the float64 multiplicities ``[S, G]``."""
    g, n = scan.r // k, scan.n
    boot = res["boot"]
    if "cor" in boot:  # two-way: accuracies and the duplicate-example correction per sample
        tot = w.sum(-1)
        pairs = (tot * tot - (w * w).sum(-1)) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            excess = boot["dup"] / (n * n * 2 * pairs)
        values = _finalize(boot, boot["cor"] / n, n, w, scan.binary, excess)
    else:
        values = _finalize(boot, res["correct"][None, :] / n, n, w, scan.binary)
    # js_ensemble is not pairwise: a sample with duplicates is an ensemble of fewer
    # distinct members, whose expected diversity scales (to second order, as a plug-in
    # variance) with 1 - sum w^2 / W^2 instead of 1 - 1/G. Rescale to the point's factor.
    tot = w.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        values["js_ensemble"] = (
            values["js_ensemble"] * (1 - 1 / g) / (1 - (w * w).sum(-1) / (tot * tot))
        )
    return values


_PAIR_CHUNK_ELEMS = 1 << 22
"""Pair-by-example elements per chunk of the multiplicity bootstrap (bounds its memory: 16 MiB
of float32 pair disagreements)."""


@functools.partial(jax.jit, static_argnames=("chunk",))
def _multiplicity_sums(v_SxN, mex_NxT, idx_M, live_M, yhat_GxM, vote_M, *, chunk):
    """Example-weighted multiplicity counts of a batch of samples, sum_n v_sn x_n: ``[S, 2]``
    sums of the per-example ``amb`` and ``range`` (all N examples), and over the M (padded)
    non-unanimous examples ``idx_M`` (``live_M``: 1 for a real one, 0 for padding; unanimous
    examples add nothing to either count) ``[S, G]`` disagreements of each group with the vote
    and ``[S, P]`` disagreements of each pair r < s (``np.triu_indices`` order). The pairs are
    one vectorised gather of the top-1 predictions and a matrix product per chunk of ``chunk``
    examples (no pair loop; memory O(P x chunk)); counts are exact in float32 per chunk and
    accumulated in int32."""
    s = v_SxN.shape[0]
    g, m = yhat_GxM.shape
    pair_r, pair_s = np.triu_indices(g, 1)
    v = v_SxN.astype(jnp.float32)
    terms = _dot(v, mex_NxT)
    v = jnp.take(v, idx_M, axis=1) * live_M[None, :]

    def step(carry, i):
        disc, dis = carry
        vs = lax.dynamic_slice_in_dim(v, i * chunk, chunk, axis=1)
        ys = lax.dynamic_slice_in_dim(yhat_GxM, i * chunk, chunk, axis=1)
        off = (ys != lax.dynamic_slice_in_dim(vote_M, i * chunk, chunk)[None, :]).astype(vs.dtype)
        differ = (ys[pair_r] != ys[pair_s]).astype(vs.dtype)  # [P, chunk]
        disc = disc + _dot(vs, off.T).astype(jnp.int32)
        dis = dis + _dot(vs, differ.T).astype(jnp.int32)
        return (disc, dis), None

    init = (jnp.zeros((s, g), jnp.int32), jnp.zeros((s, len(pair_r)), jnp.int32))
    (disc, dis), _ = lax.scan(step, init, jnp.arange(m // chunk))
    return terms, disc, dis


def _multiplicity_data(scan, k, res):
    """Device arguments of :func:`_multiplicity_sums` from ``res`` (kept examples) and its
    static ``chunk``. Only the non-unanimous examples take part in the pair products; their
    count is padded up to a multiple of 1/8 of the next power of two: under 25% more work, and
    few compiles (8 sizes per doubling) across data sets."""
    g = scan.r // k
    mex = np.concatenate(res["mex"])
    idx = np.flatnonzero(mex[:, 0] > 0).astype(np.int32)
    per_chunk = max(1, _PAIR_CHUNK_ELEMS // (g * (g - 1) // 2))
    step = max(1, (1 << max(len(idx) - 1, 0).bit_length()) // 8)
    chunk = min(step, 1 << (per_chunk.bit_length() - 1))  # powers of two: chunk divides step
    m = max(step, -(-len(idx) // step) * step)
    live = np.zeros(m, np.float32)
    live[: len(idx)] = 1.0
    idx = np.concatenate([idx, np.zeros(m - len(idx), np.int32)])
    yhat = np.concatenate(res["yhat"], axis=1)[:, idx]
    vote = np.concatenate(res["vote"])[idx]
    return tuple(jnp.asarray(a) for a in (mex, idx, live, yhat, vote)), chunk


def _example_values(arms, key, num_samples, multiplicity=None):
    """Per-sample metric values of the example bootstrap for each ``(scan, k, res)`` of
    ``arms`` (``res`` from ``scan.run(keep_examples=True)[k]``; all arms on the same N
    examples), all with the same example multiplicities: sample i is
    ``_resample_counts(key, i, size=N)``.

    ``multiplicity``: an optional ``(scan, k, res)`` (``res`` kept its examples) whose
    ``MULTIPLICITY_KEYS`` values are computed from the same draws and appended to the list."""
    n = (arms[0] if arms else multiplicity)[0].n
    data = [
        (
            jnp.asarray(np.concatenate(res["ex"]).astype(np.float32)),
            jnp.asarray(np.concatenate(res["cor"], axis=1)),
        )
        for _, _, res in arms
    ]
    parts = [[] for _ in arms]
    multi_parts, multi_data = [], None
    if multiplicity is not None:
        multi_data, chunk = _multiplicity_data(*multiplicity)
    for s in range(0, num_samples, 64):  # fixed batches of 64: one compile
        v = _resample_counts(key, s, size=n, count=64)
        for part, (ex, cor) in zip(parts, data, strict=True):
            part.append(jax.device_get(_weighted_example_sums(v, ex, cor)))
        if multi_data is not None:
            multi_parts.append(jax.device_get(_multiplicity_sums(v, *multi_data, chunk=chunk)))
    out = []
    for (scan, k, _), part in zip(arms, parts, strict=True):
        g = scan.r // k
        term_sums = np.concatenate([p[0] for p in part])[:num_samples].astype(np.float64)
        acc = np.concatenate([p[1] for p in part])[:num_samples].astype(np.float64) / n
        sums = {t: term_sums[:, i] for i, t in enumerate(_TERMS)}
        # An example drawn m times enters var_obs with its own variance m^2 times instead of
        # m times (it is perfectly correlated with its copies), which would add about var_ind
        # to every sample; remove those self-products, as copies of a replica form no pair.
        dup = np.concatenate([p[2] for p in part])[:num_samples].astype(np.float64) / (
            n * n * g * (g - 1)
        )
        out.append(_finalize(sums, acc, n, np.ones((num_samples, g)), scan.binary, dup))
    if multi_data is not None:
        terms, disc, pair_dis = (
            np.concatenate([p[i] for p in multi_parts])[:num_samples] for i in range(3)
        )
        terms = terms.astype(np.float64)
        out.append(_multiplicity(terms[:, 0], terms[:, 1], disc, pair_dis, n))
    return out


def _bootstrap_from_scan(scan, k, key, num_samples, level, over):
    if over not in ("replicas", "examples"):
        raise ValueError(f"over must be 'replicas' or 'examples'; got {over!r}")
    _check_bootstrap_args(num_samples, level, key)
    g = scan.r // k
    if over == "replicas":
        w = np.asarray(_resample_counts(key, 0, size=g, count=num_samples), np.float32)
        # One pass: the replica bootstrap's sums, and the examples the multiplicity
        # intervals resample.
        res = scan.run(boot_w=w, keep_examples=True)[k]
        values = _replica_values(res, scan, k, w.astype(np.float64))
        (multi,) = _example_values([], key, num_samples, multiplicity=(scan, k, res))
    else:
        res = scan.run(keep_examples=True)[k]
        values, multi = _example_values(
            [(scan, k, res)], key, num_samples, multiplicity=(scan, k, res)
        )
    cis = {name: _interval(values[name], level) for name in CI_KEYS if name in values}
    cis.update({name: _interval(multi[name], level) for name in MULTIPLICITY_KEYS})
    return _point(res, scan, k), cis


def _multiplicity(amb, rng, disc_xG, dis_xP, n):
    """The measures of ``MULTIPLICITY_KEYS`` from (weighted) example counts, vectorised over
    leading sample axes: non-unanimous examples ``amb``, summed q range ``rng``, each group's
    disagreements with the vote ``disc_xG`` and each pair's disagreements ``dis_xP`` (pairs
    r < s)."""
    return {
        "ambiguity": np.asarray(amb, np.float64) / n,
        "discrepancy": np.asarray(disc_xG, np.float64).max(-1) / n,
        "churn_max": np.asarray(dis_xP, np.float64).max(-1) / n,
        "pred_range": np.asarray(rng, np.float64) / n,
    }


def _point(res, scan, k=1):
    g = scan.r // k
    ones = np.ones(g)
    out = _finalize(res["sums"], res["correct"] / scan.n, scan.n, ones, scan.binary)
    m = res["multi"]
    pair_r, pair_s = np.triu_indices(g, 1)
    dis = scan.n - m["agree"][pair_r, pair_s]
    out.update(_multiplicity(m["amb"], m["range"], m["disc"], dis, scan.n))
    report = {key: float(out[key]) for key in METRIC_KEYS + ("var_cal",) if key in out}
    report.update(
        num_replicas=int(g), num_examples=int(scan.n), num_excluded=int(scan.num_excluded)
    )
    return report


def compare(
    probs,
    labels,
    *,
    from_logits: bool = False,
    mask=None,
    ensemble_size: int = 1,
    key: jax.Array | None = None,
    num_samples: int = 1000,
    level: float = 0.95,
    over: str = "replicas",
    atol: float = DEFAULT_ATOL,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Every reproducibility figure of stacked predictions, as a JSON-ready dict.

    Streams blocks of ``chunk_size`` examples (default: about 32 MiB of input per block)
    through one jitted function, so memory stays bounded whatever N is; ``probs`` may be a
    jax/numpy array, an ``np.memmap``, or any object with ``.shape`` and ``obj[:, a:b]``
    slicing (see the module docstring). Values are validated on the way: non-finite values
    in kept replicas, probabilities that do not sum to 1 (beyond ``atol``) or lie outside
    [0, 1], labels out of range, and fewer than 2 replicas all raise ``ValueError``.

    Args:
      probs: ``[R, N, C]`` probabilities (logits with ``from_logits=True``), or ``[R, N]``
        positive-class probabilities (logits) of a binary task.
      labels: ``[N]`` integer labels.
      from_logits: whether ``probs`` holds logits.
      mask: optional bool ``[R]``, True = keep; e.g. ``~run.diverged`` for the replicas of a
        ``fit`` (or ``finite_replicas(probs)``) to drop diverged replicas. Excluded replicas
        are never read; their count is reported.
      ensemble_size: k > 1 compares ensembles of k consecutive replicas (see
        :func:`ensemble`); counts then refer to groups.
      key: a jax PRNG key; when given, adds ``<metric>_ci`` = [lo, hi] bootstrap intervals
        (see :func:`bootstrap`) from ``num_samples`` samples at ``level``, resampling
        ``over`` "replicas" or "examples" (the ``MULTIPLICITY_KEYS`` always over examples).
      atol: tolerance of the probability checks.
      chunk_size: examples per streamed block.

    Returns:
      ``{churn, pd_abs, pd_rel, pd_l2, kl_pairwise, js_ensemble, churn_correctness, acc_mean,
      acc_std, acc_min, acc_max, eta, var_obs, var_ind, var_ratio, var_dist, ambiguity,
      discrepancy, churn_max, pred_range}`` (``METRIC_KEYS``; plus ``var_cal`` for binary
      tasks) as floats, ``num_replicas``, ``num_examples``, ``num_excluded`` as ints and, with
      a key, the ``*_ci`` intervals and ``ci_level``, ``ci_over``, ``ci_num_samples``,
      ``multiplicity_ci_over`` (always ``"examples"``: see :func:`bootstrap`). ``var_ratio``
      is NaN when no example has disagreeing correctness; ``var_dist`` =
      N / (N - 1) (``var_obs`` - ``var_ind``) (methods.md section 10; may be negative by
      sampling error, NaN for N = 1). The multiplicity measures (methods.md section 9; the
      definitions of :func:`ambiguity`, :func:`discrepancy`, :func:`churn_max` and
      :func:`pred_range`) are computed among the groups when ``ensemble_size`` > 1 and grow
      with the number of replicas: report ``num_replicas`` beside them.

    Not jit-compatible (a host loop over blocks); inside jit use the per-metric functions.

    Example:
      >>> p = jnp.array([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.1, 0.9]]])
      >>> r = compare(p, jnp.array([0, 1]))
      >>> r["churn"], r["acc_mean"], r["eta"]
      (0.5, 0.75, 0.25)

    References:
      Bhojanapalli et al. 2021; Shamir, Lin & Coviello 2020; Jordan 2023 (arXiv 2304.01910);
      apurvakokate/Reproducibility ``ex_mlp.py`` (Effective Test Accuracy); Marx, Calmon &
      Ustun 2020 and Watson-Daniels, Parkes & Ustun 2023 (predictive multiplicity).
    """
    scan = _Scan(
        probs,
        labels,
        from_logits=from_logits,
        mask=mask,
        atol=atol,
        chunk_size=chunk_size,
        ks=(ensemble_size,),
    )
    if key is None:
        return _point(scan.run()[ensemble_size], scan, ensemble_size)
    report, cis = _bootstrap_from_scan(scan, ensemble_size, key, num_samples, level, over)
    report.update({f"{k}_ci": v for k, v in cis.items()})
    report.update(
        ci_level=float(level),
        ci_over=over,
        ci_num_samples=int(num_samples),
        multiplicity_ci_over="examples",
    )
    return report


def bootstrap(
    probs,
    labels,
    key: jax.Array,
    num_samples: int = 1000,
    level: float = 0.95,
    over: str = "replicas",
    *,
    from_logits: bool = False,
    mask=None,
    ensemble_size: int = 1,
    atol: float = DEFAULT_ATOL,
    chunk_size: int | None = None,
) -> dict[str, list[float]]:
    """Percentile bootstrap confidence intervals, deterministic given ``key``.

    ``over="replicas"`` resamples replicas (groups, with ``ensemble_size``) with replacement:
    the uncertainty due to having trained only R replicas. ``over="examples"`` resamples test
    examples: the uncertainty due to the finite test set.

    Draws: sample i (0 <= i < ``num_samples``) is drawn from ``fold_in(key, i)`` only, so
    results do not depend on batching. Its multiplicities are
    ``jnp.bincount(jax.random.randint(jax.random.fold_in(key, i), (M,), 0, M), length=M)``
    (``randint``'s default integer dtype): M uniform draws with replacement among the M = G
    replicas (groups of ``ensemble_size``, after ``mask``, in their original order) or among
    the M = N examples.

    Each sample evaluates every metric of :func:`compare` on the resampled data; duplicates are
    handled as follows (project's choices):

    * Replicas: a replica drawn m times gets multiplicity m, and pairwise metrics average over
      pairs of *distinct* original replicas weighted by m_r m_s, so copies of one replica never
      form a spurious zero-difference pair: a pairwise metric is sum_{r<s} m_r m_s t_rs / P
      with P = sum_{r<s} m_r m_s and t_rs the pair's mean over examples (``kl_pairwise``:
      (KL(r||s) + KL(s||r)) / 2; ``pd_rel``: per example, the weighted pair mean divided by
      the weighted replica mean sum_r m_r p_r / sum_r m_r). Per-replica means are weighted
      too: ``acc_mean`` = sum_r m_r acc_r / sum_r m_r. ``var_obs`` uses the matching pairwise
      form of the ddof=1 variance, sum_{r<s} m_r m_s (acc_r - acc_s)^2 / (2 P), and
      ``var_ind`` the same pairs, sum_{r<s} m_r m_s mean_n (correct_rn - correct_sn)^2 /
      (2 N P), so their ratio keeps its meaning. ``js_ensemble`` (not pairwise: the divergence
      of the ensemble in which replica r has weight m_r / sum m) is rescaled by
      (1 - 1/G) / (1 - sum m^2 / (sum m)^2), the ratio of the second-order diversity factors,
      because a sample with duplicates is an ensemble of fewer distinct members. Samples in
      which one replica was drawn every time define no pair and are left out of the pairwise
      intervals.
    * Examples: an example drawn v_n times counts v_n times in every mean over examples
      (sum_n v_n t_n / N, replica accuracies included). It would enter ``var_obs`` with v_n^2
      copies of its own variance instead of v_n (inflating it by about ``var_ind``); those
      self-products are removed, var_obs = sum_{r<s} [(sum_n v_n d_rsn)^2 - sum_n v_n (v_n - 1)
      d_rsn^2] / (N^2 G (G - 1)) with d_rsn = correct_rn - correct_sn, and a resulting
      negative variance is clipped to 0.

    ``acc_std``, ``eta``, ``var_ratio``, ``var_dist`` and ``var_cal`` follow from a sample's
    values as in :func:`compare` (``var_dist`` = N / (N - 1) (``var_obs`` - ``var_ind``) with
    the sample's ``var_obs`` and ``var_ind`` as above).

    Multiplicity measures (``MULTIPLICITY_KEYS``: ``ambiguity``, ``discrepancy``,
    ``churn_max``, ``pred_range``; project's choice): their intervals always resample
    *examples*, with the example multiplicities of ``over="examples"`` (sample i drawn from
    ``fold_in(key, i)`` with M = N), even when ``over="replicas"``. These measures describe the
    replica set itself: resampling replicas with replacement leaves about 0.63 R distinct
    replicas and biases every one of them down (the reason ``acc_min`` and ``acc_max`` get no
    replica interval). A sample's value is the measure on the examples repeated v_n times
    (each example's vote, unanimity and range do not change; ``discrepancy`` and
    ``churn_max`` are maxima over groups and pairs of v-weighted counts). A maximum's
    bootstrap distribution lies above its point value on average, so the point of
    ``discrepancy`` or ``churn_max`` may fall below its interval: read the interval as the
    spread due to the finite test set, not as a bias-corrected range.

    Interval: [lo, hi] are the 100 (1 - level) / 2 and 100 (1 + level) / 2
    percentiles of a metric's finite sample values, linearly interpolated between order
    statistics (``np.percentile``'s default method); non-finite values (no pair, or
    ``var_ratio`` with ``var_ind`` = 0) are left out, and [nan, nan] is returned when none is
    finite. No standard error is reported.

    Cost: the replica bootstrap makes one pass over the data and evaluates all samples on each
    block (a few matrix products and a scan over sorted replicas per sample); the example
    bootstrap keeps per-example terms and costs a matrix product per batch of samples. The
    multiplicity intervals keep the top-1 predictions ([G, N] small integers, in the same
    pass as a replica bootstrap) and cost, per batch of 64 samples, a [64, M] by
    [M, G (G - 1) / 2] product chunked over examples, M the number of non-unanimous examples
    (a unanimous example changes no count).

    Args:
      probs, labels, from_logits, mask, ensemble_size, atol, chunk_size: as in
        :func:`compare`.
      key: a jax PRNG key (``jax.random.key`` or ``PRNGKey``).
      num_samples: number of bootstrap samples.
      level: coverage of the central percentile interval.
      over: ``"replicas"`` or ``"examples"``.

    Returns:
      ``{metric: [lo, hi]}`` for every key of ``CI_KEYS`` that applies (``var_cal`` for
      binary tasks only) and of ``MULTIPLICITY_KEYS`` (over examples).

    Example:
      >>> p = jax.random.dirichlet(jax.random.key(0), jnp.ones(3), (8, 50))
      >>> ci = bootstrap(p, jnp.zeros(50, int), jax.random.key(1), num_samples=100)
      >>> ci["churn"][0] <= ci["churn"][1]
      True

    References:
      Efron & Tibshirani 1993, "An Introduction to the Bootstrap"; Jordan 2023 (variance
      ratio).
    """
    scan = _Scan(
        probs,
        labels,
        from_logits=from_logits,
        mask=mask,
        atol=atol,
        chunk_size=chunk_size,
        ks=(ensemble_size,),
    )
    return _bootstrap_from_scan(scan, ensemble_size, key, num_samples, level, over)[1]


_STREAM_B = 0x8000_0001
"""``fold_in`` constant of :func:`difference`: arm b's replica multiplicities when
``paired=False`` come from ``fold_in(key, _STREAM_B)``. Sample indices fold in below 2^31, so
no derived stream coincides with a sample's key."""

_STREAM_EXAMPLES = 0x8000_0002
"""``fold_in`` constant of :func:`difference`: the example multiplicities of ``over="both"``
come from ``fold_in(key, _STREAM_EXAMPLES)``."""

_DIFF_BATCH = 256
"""Samples per batch of the replica and two-way bootstraps of :func:`difference` (the batch
:func:`bootstrap` uses from 256 samples on)."""


def _difference_draws(key, over, paired, num_samples, g_a, g_b, n):
    """The bootstrap multiplicities of :func:`difference`: ``(w_a [S, Ga], w_b [S, Gb],
    v [S, N])`` as float32 numpy arrays, None where ``over`` draws none.

    Sample i of each stream is ``_resample_counts(stream_key, i)``, a function of (key, i)
    only: replicas of arm a from ``key`` (the draws of ``bootstrap(over="replicas")``); arm b
    shares them when paired, else uses ``fold_in(key, _STREAM_B)``; examples (shared by both
    arms) from ``key`` for ``over="examples"`` (the draws of ``bootstrap(over="examples")``)
    and from ``fold_in(key, _STREAM_EXAMPLES)`` for ``over="both"``."""

    def counts(k, size):  # in fixed batches of 64: one compile per size
        return np.concatenate(
            [
                np.asarray(_resample_counts(k, s, size=size, count=64), np.float32)
                for s in range(0, num_samples, 64)
            ]
        )[:num_samples]

    w_a = w_b = v = None
    if over in ("replicas", "both"):
        w_a = counts(key, g_a)
        w_b = w_a if paired else counts(jax.random.fold_in(key, _STREAM_B), g_b)
    if over in ("examples", "both"):
        v = counts(key if over == "examples" else jax.random.fold_in(key, _STREAM_EXAMPLES), n)
    return w_a, w_b, v


def _for_arm(arm, fn, *args, **kwargs):
    """Calls fn, prefixing a ValueError's message with the arm it concerns."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise ValueError(f"probs_{arm}: {e}") from None


def _difference_scans(
    probs_a, probs_b, labels, *, paired, mask, mask_b, from_logits, atol, chunk_size
):
    """Validates the two arms of :func:`difference` and returns their scans."""
    arms = []
    for arm, probs in (("a", probs_a), ("b", probs_b)):
        if not hasattr(probs, "shape"):
            probs = np.asarray(probs)
        _for_arm(arm, _static_checks, probs, None, min_replicas=1)
        arms.append(probs)
    probs_a, probs_b = arms
    shape_a, shape_b = tuple(probs_a.shape), tuple(probs_b.shape)
    if paired:
        if mask_b is not None:
            raise ValueError(
                "mask_b must be None when paired=True: mask applies to both arms "
                "(pass the replicas finite in both, e.g. finite_replicas(probs_a) "
                "& finite_replicas(probs_b)); use paired=False for independent "
                "replica sets"
            )
        if shape_a != shape_b:
            raise ValueError(
                f"paired=True needs probs_a and probs_b of the same shape (replica "
                f"r of a paired with replica r of b); got {shape_a} and {shape_b}; "
                "use paired=False for independent replica sets"
            )
        mask_b = mask
    elif shape_a[1:] != shape_b[1:]:
        raise ValueError(
            "probs_a and probs_b must hold predictions of the same N examples and "
            f"classes: shapes [R, N(, C)] differ after R: {shape_a} and {shape_b}"
        )
    kw = {"from_logits": from_logits, "atol": atol, "chunk_size": chunk_size}
    return (
        _for_arm("a", _Scan, probs_a, labels, mask=mask, **kw),
        _for_arm("b", _Scan, probs_b, labels, mask=mask_b, **kw),
    )


def _difference_samples(scan_a, scan_b, key, *, over, paired, num_samples):
    """Point reports and per-sample metric values ``{metric: [S]}`` of both arms."""
    if over == "examples":
        res_a = _for_arm("a", scan_a.run, keep_examples=True)[1]
        res_b = _for_arm("b", scan_b.run, keep_examples=True)[1]
        values_a, values_b = _example_values(
            [(scan_a, 1, res_a), (scan_b, 1, res_b)], key, num_samples
        )
    else:
        w_a, w_b, v = _difference_draws(
            key, over, paired, num_samples, scan_a.r, scan_b.r, scan_a.n
        )
        # Samples padded to a multiple of _DIFF_BATCH: every sample is then evaluated by the
        # same program at the same position of its batch whatever num_samples is, so its
        # values do not depend on num_samples (bitwise).
        pad = (-num_samples) % _DIFF_BATCH

        def padded(x, fill):
            return np.concatenate([x, np.full((pad, x.shape[1]), fill, np.float32)])

        v_padded = None if v is None else padded(v, 0.0)
        results, values = [], []
        for arm, scan, w in (("a", scan_a, w_a), ("b", scan_b, w_b)):
            res = _for_arm(arm, scan.run, boot_w=padded(w, 1.0), boot_v=v_padded)[1]
            res["boot"] = {t: x[:num_samples] for t, x in res["boot"].items()}
            results.append(res)
            values.append(_replica_values(res, scan, 1, w.astype(np.float64)))
        (res_a, res_b), (values_a, values_b) = results, values
    return _point(res_a, scan_a), _point(res_b, scan_b), values_a, values_b


def _paired_summary(a, b, samples_a, samples_b, level):
    samples_a, samples_b = np.asarray(samples_a), np.asarray(samples_b)
    finite = np.isfinite(samples_a) & np.isfinite(samples_b)
    d = samples_a[finite] - samples_b[finite]
    if d.size == 0:
        ci, p_value = [math.nan, math.nan], math.nan
    else:
        ci = _interval(d, level)
        p_value = min(1.0, 2 * (min(int((d <= 0).sum()), int((d >= 0).sum())) + 1) / (d.size + 1))
    return {
        "a": float(a),
        "b": float(b),
        "diff": float(a) - float(b),
        "ci": ci,
        "p_value": float(p_value),
        "significant": bool(ci[0] > 0 or ci[1] < 0),
    }


def difference(
    probs_a,
    probs_b,
    labels,
    key: jax.Array,
    *,
    paired: bool = True,
    over: str = "replicas",
    num_samples: int = 1000,
    level: float = 0.95,
    mask=None,
    mask_b=None,
    from_logits: bool = False,
    atol: float = DEFAULT_ATOL,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Bootstrap interval of the difference a - b of every metric between two arms: "is arm
    a more reproducible than arm b", deterministic given ``key``.

    Both arms predict the same N test examples (same ``labels``). Each bootstrap sample
    evaluates every metric of :func:`compare` on both arms, with the conventions of
    :func:`bootstrap` (distinct pairs of original replicas weighted by w_r w_s, the
    ``js_ensemble`` rescale, duplicate examples' self-products removed from ``var_obs``), and
    the interval is the percentile interval of the per-sample differences a_i - b_i (the
    percentiles and interpolation of :func:`bootstrap`).

    * ``paired=True``: the arms share replica keys (replica r of a is paired with replica r of
      b), so each sample gives both arms the same replica multiplicities w, and common
      training noise cancels in the difference (narrower intervals).
    * ``paired=False``: independent replica sets (R_a may differ from R_b); replica
      multiplicities are drawn independently per arm.

    Example multiplicities v are always shared, since both arms predict the same examples.
    ``over``: ``"replicas"`` resamples replicas (uncertainty due to training only a few),
    ``"examples"`` the test examples (finite test set), ``"both"`` both at once (two-way
    bootstrap: each sample draws w and v; each per-example term of the w-weighted pair sums is
    weighted by v_n, replica r's accuracy is sum_n v_n correct_rn / N, and ``var_obs`` loses
    the self-products sum_n v_n (v_n - 1) kc_n (W - kc_n) / (N^2 2 P) with kc_n = sum_r w_r
    correct_rn, W = sum_r w_r and P = (W^2 - sum_r w_r^2) / 2 the weighted distinct pairs).
    The two-way bootstrap of a crossed replicas x examples design is conservative: it
    overestimates the variance (McCullagh 2000), so its intervals err on the wide side.

    Draws (sample i depends only on (key, i), never on batching; each stream follows the law
    of :func:`bootstrap` with its own key k: sample i is the bincount of
    ``randint(fold_in(k, i), (M,), 0, M)``): replica multiplicities of arm a are those of
    ``bootstrap(probs_a, labels, key, over="replicas")`` (k = ``key``, M = G_a), shared by arm
    b when paired and drawn with k = ``fold_in(key, 0x80000001)``, M = G_b otherwise; example
    multiplicities (M = N) are those of ``bootstrap(..., over="examples")`` (k = ``key``) for
    ``over="examples"`` and drawn with k = ``fold_in(key, 0x80000002)`` for ``over="both"``.
    Samples are evaluated in fixed batches (256 replica draws, 64 example draws), so a
    sample's values do not depend on ``num_samples`` either. Arm a's samples, hence its own
    intervals, are bitwise those of ``compare(probs_a, labels, key=key, over=over)`` over
    examples, and over replicas from 256 samples on (below, :func:`bootstrap` evaluates its
    samples in one smaller batch, which may round differently in the last float32 bit).

    Cost: two passes over the data (one per arm) as :func:`bootstrap`; ``over="both"`` also
    holds the ``[num_samples, N]`` example multiplicities in memory (O(S x N)).

    Args:
      probs_a, probs_b: ``[R, N, C]`` (or binary ``[R, N]``) predictions of the two arms, any
        source :func:`compare` accepts; same shape when ``paired``.
      labels: ``[N]`` integer labels shared by both arms.
      key: a jax PRNG key.
      paired: whether replica r of a and replica r of b share their training randomness.
      over: ``"replicas"``, ``"examples"`` or ``"both"``.
      num_samples: number of bootstrap samples.
      level: coverage of the central percentile interval.
      mask: optional bool ``[R_a]`` (True = keep): the replicas of a, and of b when paired
        (pass the replicas finite in both arms).
      mask_b: optional bool ``[R_b]`` for b when ``paired=False``; must be None when paired.
      from_logits, atol, chunk_size: as in :func:`compare`, for both arms.

    Returns:
      ``{"paired", "over", "num_samples", "level", "num_replicas": [G_a, G_b],
      "num_examples": N, "num_excluded": [e_a, e_b]}`` and, for every key of ``CI_KEYS`` that
      applies (``var_cal`` for binary tasks only; ``var_dist`` included; the
      ``MULTIPLICITY_KEYS`` are left out: they describe one replica set and their intervals
      resample examples only, see :func:`bootstrap`), ``{metric: {"a", "b", "diff", "ci",
      "p_value", "significant"}}``: the point values of each arm (as :func:`compare`), their
      difference a - b, the interval [lo, hi] of the differences over the samples where both
      arms are finite, the two-sided bootstrap p-value min(1, 2 (min(#{d <= 0}, #{d >= 0}) +
      1) / (B + 1)) over those B samples, and whether the interval excludes 0. With no finite
      sample: ci [nan, nan], p_value nan, not significant. Identical paired arms give
      exactly diff 0, ci [0, 0] and p_value 1 (both arms are computed by the same program
      from the same draws).

    Raises:
      ValueError: bad ``over``, ``num_samples`` or ``level``; arms of different shapes when
        paired (or different N, C when not); ``mask_b`` when paired; anything
        :func:`compare` rejects, prefixed with the arm (``probs_a:`` / ``probs_b:``).

    Example:
      >>> y = jnp.zeros(40, int)
      >>> same = jnp.repeat(jax.random.dirichlet(jax.random.key(0), jnp.ones(3), (1, 40)), 6, 0)
      >>> noisy = jax.random.dirichlet(jax.random.key(1), jnp.ones(3), (6, 40))
      >>> d = difference(same, noisy, y, jax.random.key(2), num_samples=200)
      >>> d["churn"]["diff"] < 0, d["churn"]["ci"][1] < 0, d["churn"]["significant"]
      (True, True, True)

    References:
      Efron & Tibshirani 1993, "An Introduction to the Bootstrap" (paired bootstrap and
      bootstrap p-values); McCullagh 2000, "Resampling and exchangeable arrays", Bernoulli 6.
    """
    if over not in ("replicas", "examples", "both"):
        raise ValueError(f"over must be 'replicas', 'examples' or 'both'; got {over!r}")
    paired = checks.boolean("paired", paired)
    _check_bootstrap_args(num_samples, level, key)
    scan_a, scan_b = _difference_scans(
        probs_a,
        probs_b,
        labels,
        paired=paired,
        mask=mask,
        mask_b=mask_b,
        from_logits=from_logits,
        atol=atol,
        chunk_size=chunk_size,
    )
    point_a, point_b, values_a, values_b = _difference_samples(
        scan_a, scan_b, key, over=over, paired=paired, num_samples=int(num_samples)
    )
    report: dict[str, Any] = {
        "paired": bool(paired),
        "over": over,
        "num_samples": int(num_samples),
        "level": float(level),
        "num_replicas": [point_a["num_replicas"], point_b["num_replicas"]],
        "num_examples": point_a["num_examples"],
        "num_excluded": [point_a["num_excluded"], point_b["num_excluded"]],
    }
    for name in CI_KEYS:
        if name in values_a and name in values_b:
            report[name] = _paired_summary(
                point_a[name], point_b[name], values_a[name], values_b[name], level
            )
    return report


def ensemble_curve(
    probs,
    labels,
    ks: Sequence[int] | None = None,
    *,
    from_logits: bool = False,
    mask=None,
    atol: float = DEFAULT_ATOL,
    chunk_size: int | None = None,
) -> list[dict[str, Any]]:
    """Every metric among ensembles of k consecutive replicas, for k = 1, 2, 4, ... <= R / 2.

    All ks are computed in one pass over the data. Grouping is consecutive and the last
    R mod k replicas are left out (project's choice, see :func:`ensemble`).

    Returns:
      A list of :func:`compare`-style dicts (every key of ``METRIC_KEYS``, the multiplicity
      measures among the k-ensembles included) with ``k`` and ``num_groups`` added.

    Example:
      >>> p = jax.random.dirichlet(jax.random.key(0), jnp.ones(3), (8, 50))
      >>> [row["k"] for row in ensemble_curve(p, jnp.zeros(50, int))]
      [1, 2, 4]

    References:
      methods.md section 6; Shamir & Coviello 2020 (ensembles and reproducibility).
    """
    r = probs.shape[0] if mask is None else int(np.sum(np.asarray(mask)))
    if ks is None:
        ks = [1 << i for i in range(max(r // 2, 1).bit_length()) if (1 << i) <= r // 2]
    ks = checks.integers("ks", ks, minimum=1)
    scan = _Scan(
        probs, labels, from_logits=from_logits, mask=mask, atol=atol, chunk_size=chunk_size, ks=ks
    )
    res = scan.run()
    rows = []
    for k in ks:
        row = _point(res[k], scan, k)
        row.update(k=k, num_groups=row["num_replicas"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# The components of an ensemble.


COMPONENT_OUTPUTS = losses.AD_OUTPUTS  # ("logits", "centred_logits", "residual")
"""Outputs whose correlation between components is recorded: the logits (what the penalty
sees with ``ad_output="logits"``), the logits centred per example over the classes (what the
softmax sees: a shift common to all classes leaves the prediction unchanged but changes the
logits' correlation), and the residuals ``softmax - one-hot``."""


@jax.jit
def _mean_correlations(logits_RxKxNxC: jax.Array, labels_N: jax.Array) -> jax.Array:
    """``[3, R]``: per replica, the mean over component pairs of ``losses.pairwise_correlation``
    of each output of ``COMPONENT_OUTPUTS``."""
    k, c = logits_RxKxNxC.shape[1], logits_RxKxNxC.shape[-1]
    i, j = np.triu_indices(k, 1)
    onehot_NxC = jax.nn.one_hot(labels_N, c, dtype=logits_RxKxNxC.dtype)

    def one(logits_KxNxC):
        centred = logits_KxNxC - logits_KxNxC.mean(axis=-1, keepdims=True)
        residual = jax.nn.softmax(logits_KxNxC, axis=-1) - onehot_NxC[None]
        return jnp.stack(
            [losses.pairwise_correlation(o)[i, j].mean() for o in (logits_KxNxC, centred, residual)]
        )

    return jax.vmap(one, out_axes=1)(logits_RxKxNxC)


def component_stats(logits_RxKxNxC, labels_N) -> dict[str, Any]:
    """How far apart the K components of each replica of an ensemble are, on one set of
    examples (``Run.predict(x, logits=True, components=True)``).

    Returns:
      ``corr_<output>`` for each output of ``COMPONENT_OUTPUTS``: the mean over replicas of the mean
      over component pairs of ``losses.pairwise_correlation`` (class-averaged Pearson
      correlation over the examples), with ``corr_<output>_replicas`` the per-replica values;
      ``disagreement``: the mean fraction of examples on which two components of one replica
      predict different classes; ``component_acc``: the mean accuracy of a single component.

    Example:
      >>> logits = jnp.broadcast_to(jnp.arange(12.0).reshape(1, 1, 4, 3) % 5, (2, 3, 4, 3))
      >>> s = component_stats(logits, jnp.array([0, 1, 2, 0]))
      >>> round(s["corr_logits"], 4), s["disagreement"]   # identical components
      (1.0, 0.0)
    """
    logits = np.asarray(logits_RxKxNxC, np.float32)
    labels = np.asarray(labels_N, np.int32)
    corr = np.asarray(_mean_correlations(logits, labels), np.float64)
    i, j = np.triu_indices(logits.shape[1], 1)
    yhat = np.argmax(logits, axis=-1)
    disagree = np.mean([np.mean(yhat[:, a] != yhat[:, b]) for a, b in zip(i, j, strict=True)])
    out: dict[str, Any] = {
        f"corr_{name}": float(np.mean(corr[n])) for n, name in enumerate(COMPONENT_OUTPUTS)
    }
    out.update(
        {f"corr_{name}_replicas": corr[n].tolist() for n, name in enumerate(COMPONENT_OUTPUTS)}
    )
    out.update(
        disagreement=float(disagree), component_acc=float(np.mean(yhat == labels[None, None, :]))
    )
    return out
