"""The studies' shared statistics (``jaxrepro.studies.stats``): Holm's correction against a
hand-computed example and its step-down definition, the pooled difference against a NumPy
recomputation of its cluster bootstrap, its continuity (the property the verdicts rest on), and
the Wilcoxon helpers against scipy and explicit pair loops."""

import itertools
import math

import jax
import numpy as np
import pytest
from scipy import stats as sps

from jaxrepro import metrics
from jaxrepro.studies import render, stats

# --- Holm -----------------------------------------------------------------------------------


def test_holm_hand_computed_example():
    # Sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised
    # to the running maximum 0.06); the undefined entry stays undefined and is not counted.
    got = stats.holm([0.01, 0.04, 0.03, None, 0.005, math.nan])
    want = [0.03, 0.06, 0.06, math.nan, 0.02, math.nan]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert stats.holm([0.2, 0.9]).tolist() == [0.4, 0.9]  # capped by the running maximum
    assert stats.holm([0.7, 0.6]).tolist() == [1.0, 1.0]  # and at 1
    assert stats.holm([]).tolist() == []


def _step_down_rejections(p, alpha):
    """Holm's procedure as stated (Holm 1979): walk the sorted p-values, reject while
    p_(i) <= alpha / (K - i + 1), stop at the first that is not."""
    order = np.argsort(p, kind="stable")
    rejected = np.zeros(len(p), bool)
    for i, j in enumerate(order):
        if p[j] > alpha / (len(p) - i):
            break
        rejected[j] = True
    return rejected


def test_holm_adjusted_values_give_the_step_down_decisions():
    rng = np.random.default_rng(0)
    for trial in range(50):
        p = np.concatenate([rng.uniform(0, 0.02, trial % 7), rng.uniform(0, 1, 10)])
        adjusted = stats.holm(p)
        assert (adjusted >= p).all() and (adjusted <= 1).all()
        for alpha in (0.01, 0.05, 0.1):
            np.testing.assert_array_equal(adjusted <= alpha, _step_down_rejections(p, alpha))


def test_holm_verdict():
    alpha = 0.05
    assert stats.holm_verdict({"diff": -0.1, "p_holm": 0.05}, alpha) == "lower"
    assert stats.holm_verdict({"diff": 0.1, "p_holm": 0.01}, alpha) == "higher"
    assert stats.holm_verdict({"diff": 0.1, "p_holm": 0.051}, alpha) == "no difference"
    assert stats.holm_verdict({"diff": 0.0, "p_holm": 0.0}, alpha) == "no difference"
    assert stats.holm_verdict({"diff": -0.1, "p_holm": None}, alpha) == "undefined"
    assert stats.holm_verdict({"diff": -0.1, "p_value": 0.001}, alpha) == "undefined"
    assert stats.holm_verdict(None, alpha) == "undefined"


# --- pooled differences ---------------------------------------------------------------------


def test_min_clusters_is_the_sign_bound():
    for level in (0.5, 0.8, 0.9, 0.95, 0.99):
        n = stats.min_clusters(level)
        # All n clusters of one sign has probability 2^(1-n) under a symmetric null.
        assert 2.0 ** (1 - n) <= 1 - level + 1e-12
        assert n == 2 or 2.0 ** (2 - n) > 1 - level


def test_expanded_level_follows_the_t_quantile():
    for n in (3, 6, 9, 45):
        cover = stats.expanded_level(0.95, n)
        z = sps.norm.ppf((1 + cover) / 2)
        assert z == pytest.approx(math.sqrt(n / (n - 1)) * sps.t.ppf(0.975, n - 1), rel=1e-9)
    assert stats.expanded_level(0.95, 6) > stats.expanded_level(0.95, 9) > 0.95
    assert stats.expanded_level(0.95, 10_000) == pytest.approx(0.95, abs=1e-3)


def _numpy_pooled(values, clusters, key, num_samples, level):
    """The documented cluster bootstrap rebuilt: sample i resamples the clusters (in order of
    first appearance) with the multiplicities of the first n of B = 64 draws
    randint(fold_in(key, i), (B,), 0, n); its value is the mean over the comparisons of the
    drawn clusters."""
    labels = list(dict.fromkeys(clusters))
    n = len(labels)
    samples = []
    for i in range(num_samples):
        draw = np.asarray(jax.random.randint(jax.random.fold_in(key, i), (64,), 0, n))[:n]
        w = np.bincount(draw, minlength=n)
        num = sum(w[labels.index(c)] * v for v, c in zip(values, clusters, strict=True))
        den = sum(w[labels.index(c)] for c in clusters)
        samples.append(num / den)
    t = sps.t.ppf((1 + level) / 2, n - 1)
    cover = 1 - 2 * sps.norm.sf(math.sqrt(n / (n - 1)) * t)
    return float(np.mean(values)), list(
        np.percentile(samples, [50 * (1 - cover), 50 * (1 + cover)])
    )


def test_pooled_difference_matches_a_numpy_recomputation():
    rng = np.random.default_rng(1)
    clusters = [c for c in "abcdefg" for _ in range(1 + "abcdefg".index(c) % 3)]  # sizes 1-3
    values = list(rng.normal(-0.01, 0.02, len(clusters)))
    key = jax.random.key(5)
    got = stats.pooled_difference(values, clusters, key, num_samples=60, level=0.95)
    diff, ci = _numpy_pooled(values, clusters, key, 60, 0.95)
    assert got["diff"] == pytest.approx(diff, rel=1e-12)
    np.testing.assert_allclose(got["ci"], ci, rtol=1e-10)
    assert got["num_comparisons"] == len(values) and got["num_clusters"] == 7
    assert got["percentile_level"] == pytest.approx(stats.expanded_level(0.95, 7))
    # Undefined values are left out, as if absent; equal inputs give equal bits.
    with_none = stats.pooled_difference(
        values + [None, math.nan], clusters + ["a", "h"], key, num_samples=60, level=0.95
    )
    assert with_none == got
    other = stats.pooled_difference(values, clusters, jax.random.key(6), num_samples=60, level=0.95)
    assert other["diff"] == got["diff"] and other["ci"] != got["ci"]


def test_pooled_difference_needs_enough_clusters():
    key = jax.random.key(0)
    five = stats.pooled_difference([-1.0] * 10, list("aabbccddee"), key, num_samples=50, level=0.95)
    assert five["diff"] == -1.0 and all(math.isnan(v) for v in five["ci"])
    assert render.verdict(five["ci"]) == "undefined"
    assert "no interval (groups: 5; it needs 6): no verdict" in render.pooled_text(
        five, unit="groups"
    )
    six = stats.pooled_difference([-1.0, -2.0] * 3, list("abcdef"), key, num_samples=50, level=0.95)
    assert six["ci"][1] < 0 and render.pooled_text(six).endswith(": lower")
    with pytest.raises(ValueError, match="cluster labels"):
        stats.pooled_difference([1.0], ["a", "b"], key, num_samples=10, level=0.95)


def test_cluster_counts_do_not_depend_on_the_number_of_samples():
    key = jax.random.key(4)
    w = stats.cluster_counts(key, 9, 40)
    assert w.shape == (40, 9) and (w.sum(axis=1) == 9).all()
    np.testing.assert_array_equal(stats.cluster_counts(key, 9, 25), w[:25])
    big = stats.cluster_counts(key, 100, 3)  # beyond 64 clusters: 128 draws per sample
    first = np.asarray(jax.random.randint(jax.random.fold_in(key, 0), (128,), 0, 100))[:100]
    np.testing.assert_array_equal(big[0], np.bincount(first, minlength=100))


def test_pooled_verdict_moves_continuously_with_a_cell():
    """The property the verdicts rest on: a last-bit change of one cell moves the pooled
    difference and its interval by about as much, so the verdict cannot flip unless an
    interval end sits within that distance of 0 (a count of significant cells can flip)."""
    key = jax.random.key(2)
    values = [-0.004, -0.006, 0.001, -0.003, -0.005, -0.002, 0.002, -0.004, -0.001]
    cells = [f"c{i}" for i in range(9)]
    kw = dict(num_samples=200, level=0.95)
    base = stats.pooled_difference(values, cells, key, **kw)
    nudged = list(values)
    nudged[2] = np.nextafter(nudged[2], 1.0)
    moved = stats.pooled_difference(nudged, cells, key, **kw)
    assert abs(moved["diff"] - base["diff"]) < 1e-15
    np.testing.assert_allclose(moved["ci"], base["ci"], rtol=0, atol=1e-15)
    assert render.verdict(moved["ci"]) == render.verdict(base["ci"]) == "lower"


# --- Wilcoxon -------------------------------------------------------------------------------


def _probs(seed, r, n, c):
    return np.random.default_rng(seed).dirichlet(np.ones(c), size=(r, n)).astype(np.float32)


def test_per_example_differences_against_a_pair_loop():
    p = _probs(0, 5, 30, 4)
    mask = np.array([True, True, False, True, True])
    got = stats.per_example(p, mask)
    kept = p[mask].astype(np.float64)
    pairs = list(itertools.combinations(range(len(kept)), 2))
    tv = np.mean([0.5 * np.abs(kept[r] - kept[s]).sum(-1) for r, s in pairs], axis=0)
    yhat = kept.argmax(-1)
    dis = np.mean([yhat[r] != yhat[s] for r, s in pairs], axis=0)
    np.testing.assert_allclose(got["pd_abs"], tv, atol=1e-6)
    np.testing.assert_array_equal(got["churn"], dis)  # exact fractions: ties stay ties
    # Their means over examples are the metrics of the kept replicas.
    ref = metrics.compare(p, np.zeros(30, int), mask=mask)
    assert got["pd_abs"].mean() == pytest.approx(ref["pd_abs"], abs=1e-6)
    assert got["churn"].mean() == pytest.approx(ref["churn"], abs=1e-6)
    churns = stats.pairwise_churn(p, mask)
    np.testing.assert_array_equal(churns, [np.mean(yhat[r] != yhat[s]) for r, s in pairs])


def test_wilcoxon_is_scipys_and_zero_differences_give_p_one():
    rng = np.random.default_rng(3)
    x, y = rng.random(60), rng.random(60)
    y[:7] = x[:7]  # zero differences are dropped (scipy's default)
    got = stats.wilcoxon(x, y)
    ref = sps.wilcoxon(x, y)
    assert (got["statistic"], got["p_value"]) == (float(ref.statistic), float(ref.pvalue))
    assert got["n"] == 60 and got["num_nonzero"] == 53
    assert got["median_diff"] == float(np.median(x - y))
    one = stats.wilcoxon(x - 0.25)
    assert one["p_value"] == float(sps.wilcoxon(x - 0.25).pvalue)
    same = stats.wilcoxon(x, x)
    assert same == {"statistic": 0.0, "p_value": 1.0, "n": 60, "num_nonzero": 0, "median_diff": 0.0}
