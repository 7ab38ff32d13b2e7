"""Statistics the study analyses share beyond ``metrics``: a multiple-comparison correction,
pooled effects with cluster-bootstrap intervals, and Wilcoxon signed-rank tests on prediction
differences.

Synopsis::

    >>> import numpy as np
    >>> np.round(holm([0.01, 0.04, 0.03, 0.005]), 6).tolist()   # Holm-adjusted p-values
    [0.03, 0.06, 0.06, 0.02]
    >>> min_clusters(0.95)   # fewer clusters than this: no pooled interval
    6

A study's verdicts rest on these rather than on how many of its cells came out significant: a
count of significant cells jumps by one when a single cell's interval moves across 0 (a
last-bit rounding difference between machines can do that), while a pooled difference and its
interval move continuously with every cell's value.

Project's choices, stated where used: Holm's correction (over Benjamini-Hochberg: the reports
call single cells 'lower' or 'higher', a family-wise claim); the cluster bootstrap with the
expanded percentile interval and its minimum number of clusters; the per-example and per-pair
Wilcoxon tests' handling of all-zero differences.

References:
  Holm 1979, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6;
  Davison & Hinkley 1997, "Bootstrap Methods and their Application", section 3.8 (resampling
  clusters); Hesterberg 2015, "What teachers should know about the bootstrap", The American
  Statistician 69(4) (the expanded percentile interval); Wilcoxon 1945;
  apurvakokate/Reproducibility ``ex_mlp.py`` (``scipy.stats.wilcoxon`` of the runs' pairwise
  prediction differences).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sps

from jaxrepro import metrics

POOLED_STREAM = 0x8000_0010
"""``fold_in`` constant of the pooled intervals' cluster draws: a study draws them from
``fold_in(randomness.bootstrap_key(seed), POOLED_STREAM)``. Above 2^31, so the stream never
coincides with a bootstrap sample's key ``fold_in(bootstrap_key, i)`` nor with the streams of
``metrics.difference`` (0x80000001, 0x80000002)."""


# ---------------------------------------------------------------------------------------------
# Multiple comparisons.


def holm(p_values: Sequence[float | None]) -> np.ndarray:
    """Holm's step-down adjusted p-values (the project's correction for the per-cell tests).

    With the K finite p-values sorted, p_(1) <= ... <= p_(K), the adjusted value of p_(i) is
    max_{j <= i} min(1, (K - j + 1) p_(j)); rejecting where it is <= alpha controls the
    family-wise error rate at alpha under any dependence between the tests. Undefined entries
    (None, NaN) stay NaN and do not count in K. Ties keep their input order (stable sort), which
    the adjusted values do not depend on.

    Args:
      p_values: the raw p-values of one family of tests.

    Returns:
      float64 ``[K']``, the adjusted p-values in input order (NaN where undefined).

    Example:
      >>> holm([0.02, None, 0.01]).tolist()
      [0.02, nan, 0.02]
    """
    p = np.array([np.nan if v is None else float(v) for v in p_values], np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    order = np.argsort(q, kind="stable")
    factors = len(q) - np.arange(len(q))
    adjusted = np.empty(len(q))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(factors * q[order]))
    out[ok] = adjusted
    return out


def holm_verdict(entry: Mapping[str, Any] | None, alpha: float) -> str:
    """Where a comparison (a ``metrics.difference`` entry with ``p_holm``) lies after Holm's
    correction: ``lower`` / ``higher`` (the sign of ``diff``) when ``p_holm`` <= ``alpha``,
    ``no difference`` otherwise, ``undefined`` without an adjusted p-value.

    Example:
      >>> holm_verdict({"diff": -0.1, "p_holm": 0.01}, 0.05), holm_verdict(
      ...     {"diff": -0.1, "p_holm": 0.2}, 0.05)
      ('lower', 'no difference')
    """
    p = None if entry is None else entry.get("p_holm")
    if p is None or not math.isfinite(p):
        return "undefined"
    if p > alpha or entry["diff"] == 0:
        return "no difference"
    return "lower" if entry["diff"] < 0 else "higher"


# ---------------------------------------------------------------------------------------------
# Pooled effects.


def min_clusters(level: float) -> int:
    """Fewest clusters a pooled interval at ``level`` needs: the smallest n with 2^(1 - n) <=
    1 - level (6 at 95%). With fewer, every cluster's difference having the same sign happens
    by chance alone more often than 1 - level when there is no effect, and no bootstrap
    interval over clusters can be calibrated (project's rule)."""
    return max(2, math.ceil(1 + math.log2(1 / (1 - level)) - 1e-9))


def expanded_level(level: float, n: int) -> float:
    """The coverage of the percentile interval over n clusters that gives a ``level``
    interval: the expanded percentile interval (Hesterberg 2015) widens the plain one, too
    narrow for few clusters (its half-width is about z s sqrt((n - 1) / n) / sqrt(n) where a
    t interval has t_{n-1} s / sqrt(n)), by using the level 1 - 2 Phi(-sqrt(n / (n - 1))
    t_{n-1, (1 + level) / 2}).

    Example:
      >>> round(expanded_level(0.95, 9), 4), round(expanded_level(0.95, 1000), 4)
      (0.9856, 0.9504)
    """
    t = sps.t.ppf((1 + level) / 2, n - 1)
    return float(1 - 2 * sps.norm.sf(math.sqrt(n / (n - 1)) * t))


def _bucket(n: int) -> int:
    """Draws per sample of :func:`cluster_counts`: a power of two, at least 64, so that one
    compiled program serves every number of clusters up to it."""
    return max(64, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("bucket",))
def _counts_jit(key, start, size, *, bucket: int):
    """Samples start .. start + 63 (a fixed batch: one compile per bucket)."""

    def one(i):
        draw = jax.random.randint(jax.random.fold_in(key, i), (bucket,), 0, size)
        return jnp.bincount(jnp.where(jnp.arange(bucket) < size, draw, bucket), length=bucket)

    return jax.vmap(one)(start + jnp.arange(64))


def cluster_counts(key: jax.Array, size: int, count: int) -> np.ndarray:
    """Multiplicities ``[count, size]`` of ``count`` resamples of ``size`` clusters with
    replacement. Sample i depends only on (key, i): the bincount of the first ``size`` entries
    of ``randint(fold_in(key, i), (B,), 0, size)`` with B = max(64, the next power of two >=
    size) (drawing B entries lets one compiled program serve any ``size`` up to B).

    Example:
      >>> w = cluster_counts(jax.random.key(0), 5, 3)
      >>> w.shape, w.sum(axis=1).tolist()
      ((3, 5), [5, 5, 5])
    """
    b, n = _bucket(size), jnp.int32(size)
    w = [np.asarray(_counts_jit(key, s, n, bucket=b)) for s in range(0, int(count), 64)]
    return np.concatenate(w)[:count, :size]


def pooled_difference(
    values: Sequence[float | None],
    clusters: Sequence[Hashable],
    key: jax.Array,
    *,
    num_samples: int,
    level: float,
) -> dict[str, Any]:
    """The mean of per-comparison differences with a cluster-bootstrap interval: "across the
    study's cells, does the intervention move the metric, and which way?".

    ``diff`` is the mean of the finite ``values`` (None / NaN are left out). The interval
    resamples whole clusters with replacement (comparisons that share an arm, e.g. every
    regulariser of one (depth, optimizer) cell shares its baseline, form one cluster, so their
    common noise is resampled together); a sample's pooled value is the mean over the
    comparisons of the drawn clusters, each cluster counted as often as it was drawn. The
    spread of the cells' differences carries both their heterogeneity and each cell's own
    noise (replicas, test examples), so the interval is about the cells of this kind, not only
    the ones run (a random-effects reading). The cells' own bootstrap samples are not reused
    (``metrics.difference`` does not return them). The interval is the percentile interval of the
    samples at :func:`expanded_level` (``np.percentile``'s linear interpolation, as
    ``metrics.bootstrap``); it is [nan, nan] with fewer than :func:`min_clusters` clusters.
    Draws: :func:`cluster_counts` (sample i from ``fold_in(key, i)``), clusters in order of
    first appearance, so equal inputs give bitwise equal intervals.

    Args:
      values: the per-comparison differences (intervention minus reference).
      clusters: the cluster of each comparison (any hashable label).
      key: a jax PRNG key.
      num_samples: bootstrap samples.
      level: coverage of the interval.

    Returns:
      ``{"diff", "ci": [lo, hi], "num_comparisons", "num_clusters", "min_clusters", "level",
      "percentile_level"}``: ``diff`` NaN without a finite value; ``percentile_level`` the
      expanded level the percentiles were taken at (NaN without an interval).

    Example:
      >>> d = pooled_difference([-2.0, -1.0, -3.0, -2.5, -1.5, -2.0], "abcdef",
      ...                       jax.random.key(0), num_samples=200, level=0.95)
      >>> d["diff"], d["num_clusters"], d["ci"][1] < 0
      (-2.0, 6, True)
    """
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    x = np.array([np.nan if v is None else float(v) for v in values], np.float64)
    ok = np.isfinite(x)
    labels = list(dict.fromkeys(c for c, keep in zip(clusters, ok, strict=True) if keep))
    n = len(labels)
    index = {c: i for i, c in enumerate(labels)}
    sums, counts = np.zeros(n), np.zeros(n)
    for v, c, keep in zip(x, clusters, ok, strict=True):
        if keep:
            sums[index[c]] += v
            counts[index[c]] += 1
    need = min_clusters(level)
    out = {
        "diff": float(x[ok].mean()) if ok.any() else math.nan,
        "ci": [math.nan, math.nan],
        "num_comparisons": int(ok.sum()),
        "num_clusters": n,
        "min_clusters": need,
        "level": float(level),
        "percentile_level": math.nan,
    }
    if n < need:
        return out
    w = cluster_counts(key, n, num_samples).astype(np.float64)
    samples = (w * sums).sum(axis=1) / (w * counts).sum(axis=1)
    cover = expanded_level(level, n)
    lo, hi = (1 - cover) / 2 * 100, (1 + cover) / 2 * 100
    out["ci"] = [float(np.percentile(samples, lo)), float(np.percentile(samples, hi))]
    out["percentile_level"] = cover
    return out


# ---------------------------------------------------------------------------------------------
# Wilcoxon signed-rank tests.


@jax.jit
def _per_example_jit(probs):
    def one(p):  # one example: [R, C] (or [R] binary) -> its pairwise mean terms
        p = p[:, None]
        return jnp.stack([metrics.pd_abs(p), metrics.churn(p)])

    return jax.vmap(one, in_axes=1)(probs)


def per_example(probs, mask=None) -> dict[str, np.ndarray]:
    """Per test example, the mean over replica pairs of ``pd_abs`` and ``churn`` (the metrics'
    own functions on one example at a time; their means over examples are the metrics).
    ``churn`` is returned as the exact fraction k / P (k disagreeing of P pairs, rounded from
    the float32 term), so equal differences between two arms tie exactly in a rank test.

    Args:
      probs: ``[R, N, C]`` probabilities (or ``[R, N]`` binary).
      mask: optional bool ``[R]``, the replicas to use (at least 2).

    Returns:
      ``{"pd_abs": [N], "churn": [N]}`` as float64 arrays.
    """
    p = np.asarray(probs, np.float32)
    if mask is not None:
        p = p[np.asarray(mask, bool)]
    if p.shape[0] < 2:
        raise ValueError(f"per-example differences need 2 replicas; got {p.shape[0]}")
    v = np.asarray(_per_example_jit(jnp.asarray(p)), np.float64)
    pairs = p.shape[0] * (p.shape[0] - 1) / 2
    return {"pd_abs": v[:, 0], "churn": np.round(v[:, 1] * pairs) / pairs}


def wilcoxon(x, y=None) -> dict[str, Any]:
    """``scipy.stats.wilcoxon(x, y)`` with its defaults (two-sided, zeros dropped: the
    "wilcox" method): the signed-rank test of the differences x - y (of x alone without y)
    against a median of 0.

    When every difference is 0 scipy has nothing to rank (old versions raise): the result is
    statistic 0 and p-value 1, no evidence of a difference (project's choice; the source
    repository records statistic -1 and p 0.5 there).

    Returns:
      ``{"statistic", "p_value", "n", "num_nonzero", "median_diff"}``: ``n`` the differences,
      ``num_nonzero`` those the test ranks, ``median_diff`` their median (the statistic of a
      two-sided test is min(W+, W-), which carries no sign).

    Example:
      >>> r = wilcoxon([0.3, 0.2, 0.4, 0.1, 0.5, 0.6], [0.0] * 6)
      >>> r["statistic"], round(r["p_value"], 5), r["median_diff"]
      (0.0, 0.03125, 0.35)
    """
    x = np.asarray(x, np.float64)
    d = x if y is None else x - np.asarray(y, np.float64)
    nonzero = int(np.count_nonzero(d))
    out = {"n": int(d.size), "num_nonzero": nonzero, "median_diff": float(np.median(d))}
    if nonzero == 0:
        return {"statistic": 0.0, "p_value": 1.0, **out}
    res = sps.wilcoxon(d)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), **out}


def pairwise_churn(probs, mask=None) -> np.ndarray:
    """The churn of every pair of replicas r < s (in that order): the fraction of test
    examples on which their top-1 predictions differ, the source repository's prediction
    difference of two runs, as the exact fraction k / N (rounded from the float32 metric, so
    pairs with equal counts tie exactly)."""
    p = np.asarray(probs, np.float32)
    if mask is not None:
        p = p[np.asarray(mask, bool)]
    pairs = np.array(list(itertools.combinations(range(p.shape[0]), 2)), np.int32)
    if len(pairs) == 0:
        raise ValueError(f"pairwise churn needs 2 replicas; got {p.shape[0]}")
    v = np.asarray(_pair_churn_jit(jnp.asarray(p), jnp.asarray(pairs)), np.float64)
    return np.round(v * p.shape[1]) / p.shape[1]


@jax.jit
def _pair_churn_jit(probs, pairs_Px2):
    return jax.vmap(lambda ij: metrics.churn(probs[ij]))(pairs_Px2)
