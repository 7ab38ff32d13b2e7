"""Multiplicity measures (methods.md sections 9 and 10) against explicit loops over replicas,
pairs and examples: several R, N and C, binary stacks, and ties in the vote; the pure functions
and the streamed report (``compare`` with masks, ensembles, logits, blocks and lazy sources),
and their bootstrap intervals against a plain resampling."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import metrics


def _stack(r, n, c, seed, *, binary=False, scale=3.0):
    rng = np.random.default_rng(seed)
    if binary:
        return np.asarray(jax.nn.sigmoid(scale * rng.normal(size=(r, n))), np.float32)
    return np.asarray(jax.nn.softmax(scale * rng.normal(size=(r, n, c)), -1), np.float32)


def _yhat(p):
    return (p > 0.5).astype(int) if p.ndim == 2 else np.argmax(p, -1)


def _loops(p, labels):
    """Every measure by its definition, one replica, pair and example at a time."""
    r, n = p.shape[0], p.shape[1]
    c = 2 if p.ndim == 2 else p.shape[2]
    yhat = _yhat(p)
    ambiguous, vote = 0, []
    for i in range(n):
        column = [int(yhat[k, i]) for k in range(r)]
        ambiguous += len(set(column)) > 1
        counts = [column.count(cls) for cls in range(c)]
        vote.append(counts.index(max(counts)))  # the lowest class among the most voted
    discrepancy = max(sum(yhat[k, i] != vote[i] for i in range(n)) / n for k in range(r))
    churn_max = max(
        sum(yhat[a, i] != yhat[b, i] for i in range(n)) / n
        for a, b in itertools.combinations(range(r), 2)
    )
    q = p if p.ndim == 2 else p[:, np.arange(n), labels]
    pred_range = (
        sum(max(q[k, i] for k in range(r)) - min(q[k, i] for k in range(r)) for i in range(n)) / n
    )
    correct = yhat == labels[None, :]
    acc = correct.mean(axis=1)
    var_obs = sum((a - acc.mean()) ** 2 for a in acc) / (r - 1)
    phat = correct.mean(axis=0)
    var_ind = sum(ph * (1 - ph) for ph in phat) / n**2 * r / (r - 1)
    var_dist = n / (n - 1) * (var_obs - var_ind) if n > 1 else np.nan
    return dict(
        ambiguity=ambiguous / n,
        discrepancy=discrepancy,
        churn_max=churn_max,
        pred_range=pred_range,
        var_dist=var_dist,
    )


CASES = [(2, 7, 3, False), (3, 12, 2, False), (5, 20, 4, False), (8, 9, 10, False)]
CASES += [(4, 15, 2, True), (6, 1, 2, True)]


@pytest.mark.parametrize("r, n, c, binary", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_multiplicity_measures_equal_their_loops(r, n, c, binary, seed):
    p = _stack(r, n, c, seed, binary=binary)
    labels = np.random.default_rng(seed + 10).integers(0, c, n)
    want = _loops(p, labels)
    got = dict(
        ambiguity=metrics.ambiguity(p),
        discrepancy=metrics.discrepancy(p),
        churn_max=metrics.churn_max(p),
        pred_range=metrics.pred_range(p, labels),
        var_dist=metrics.var_dist(p, labels),
    )
    for key, value in want.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_ties_in_the_vote_go_to_the_lowest_class():
    # Four replicas on one example: two vote class 2, two vote class 1. The vote is class 1, so
    # the replicas voting 2 differ from it on every example.
    p = np.zeros((4, 1, 3), np.float32)
    p[[0, 1], 0, 2] = 1.0
    p[[2, 3], 0, 1] = 1.0
    assert float(metrics.discrepancy(p)) == 1.0
    assert float(metrics.ambiguity(p)) == 1.0 and float(metrics.churn_max(p)) == 1.0
    # Identical replicas: nothing is ambiguous, no pair churns, no range, no variance.
    same = np.repeat(_stack(1, 30, 4, 3), 5, axis=0)
    labels = np.arange(30) % 4
    for fn in (metrics.ambiguity, metrics.discrepancy, metrics.churn_max):
        assert float(fn(same)) == 0.0
    assert float(metrics.pred_range(same, labels)) == 0.0
    assert float(metrics.var_dist(same, labels)) == 0.0


def test_whole_runs_that_differ_have_distribution_variance_and_independent_errors_little():
    # Replicas right on all of one half or the other: correlated errors (var_dist > 0).
    n = 40
    labels = np.zeros(n, int)
    p = np.zeros((4, n, 2), np.float32)
    p[:, :, 1] = 1.0
    p[0, :, :] = [1.0, 0.0]
    p[1, :, :] = [1.0, 0.0]
    assert float(metrics.var_dist(p, labels)) > 0.2
    # Independent per-example errors: var_dist is near 0 (here, within sampling error).
    rng = np.random.default_rng(0)
    correct = rng.random((64, 2000)) < 0.7
    q = np.where(correct, 0.9, 0.1).astype(np.float32)
    v = float(metrics.var_dist(q, np.ones(2000, int)))
    assert abs(v) < 3e-5 < float(metrics.var_ind(q, np.ones(2000, int)))


# --------------------------------------------------------------------------------------------
# The streamed report: compare, bootstrap, ensemble_curve.

KEYS = ("ambiguity", "discrepancy", "churn_max", "pred_range", "var_dist")
COUNTS = ("ambiguity", "discrepancy", "churn_max")  # exact counts / N


def _assert_measures(report, want, *, rtol=1e-5):
    for key in KEYS:
        tol = 1e-12 if key in COUNTS else rtol
        np.testing.assert_allclose(report[key], want[key], rtol=tol, atol=1e-7, err_msg=key)


def _votes_to_probs(ids, c):
    """Probabilities [R, N, C] whose top-1 predictions are ``ids`` [R, N]."""
    p = np.full(ids.shape + (c,), 0.2 / (c - 1), np.float32)
    np.put_along_axis(p, ids[..., None], np.float32(0.8), axis=-1)
    return p


def test_constants_and_keys():
    assert metrics.MULTIPLICITY_KEYS == ("ambiguity", "discrepancy", "churn_max", "pred_range")
    acc = metrics.ACC_KEYS
    assert acc[acc.index("var_ratio") + 1] == "var_dist"
    assert set(metrics.MULTIPLICITY_KEYS) <= set(metrics.METRIC_KEYS)
    assert "var_dist" in metrics.CI_KEYS
    assert not set(metrics.MULTIPLICITY_KEYS) & set(metrics.CI_KEYS)  # not in difference
    assert 2 <= metrics._AGREE_ONEHOT_MAX_C < 40  # both ways to the agreement matrix are tested


# C = 40: the agreement matrix by comparing pairs instead of the one-hot product.
@pytest.mark.parametrize("r, n, c, binary", CASES + [(3, 9, 40, False)])
def test_compare_equals_the_loops(r, n, c, binary):
    p = _stack(r, n, c, 2, binary=binary)
    labels = np.random.default_rng(12).integers(0, c, n)
    report = metrics.compare(p, labels, chunk_size=4)  # several blocks, the last one padded
    assert set(KEYS) <= set(report)
    _assert_measures(report, _loops(p, labels))


def test_compare_with_ties_in_the_vote_and_padded_blocks():
    # R = 4, C = 3, N = 37 read in blocks of 8 (the last one padded with 3 rows): examples
    # where two classes are voted twice each (the vote is the lower class), 3-1 splits,
    # unanimous examples and 2-1-1 splits, in a shuffled order.
    rng = np.random.default_rng(0)
    patterns = [(2, 2, 1, 1), (0, 0, 2, 2), (1, 2, 2, 1), (0, 1, 0, 1), (1, 1, 1, 0)]
    patterns += [(2, 2, 2, 2), (0, 1, 2, 0), (1, 1, 1, 1)]
    ids = np.array([patterns[i % len(patterns)] for i in rng.permutation(37)]).T
    ids = np.array([rng.permutation(col) if j % 3 else col for j, col in enumerate(ids.T)]).T
    p = _votes_to_probs(ids, 3)
    labels = rng.integers(0, 3, 37)
    _assert_measures(metrics.compare(p, labels, chunk_size=8), _loops(p, labels))
    # Ties alone: on (2, 2, 1, 1) the vote is 1, so replicas 0 and 1 are off it everywhere.
    tied = _votes_to_probs(np.array([[2, 2], [2, 2], [1, 1], [1, 1]]), 3)
    report = metrics.compare(tied, np.zeros(2, int))
    assert report["discrepancy"] == 1.0 and report["churn_max"] == 1.0
    assert report["ambiguity"] == 1.0 and report["churn"] == pytest.approx(4 / 6)


def test_compare_with_mask_equals_the_loops_on_the_kept_replicas():
    p = _stack(6, 37, 3, 3)  # the kept blocks have the shapes of the other tests: one compile
    labels = np.random.default_rng(3).integers(0, 3, 37)
    keep = np.array([True, False, True, True, False, True])
    p_bad = p.copy()
    p_bad[~keep] = np.nan  # excluded replicas are never read
    report = metrics.compare(p_bad, labels, mask=keep, chunk_size=8)
    assert report["num_replicas"] == 4 and report["num_excluded"] == 2
    _assert_measures(report, _loops(p[keep], labels))
    jax_report = metrics.compare(jnp.asarray(p_bad), labels, mask=keep, chunk_size=8)
    _assert_measures(jax_report, _loops(p[keep], labels))


@pytest.mark.parametrize("binary", [False, True])
def test_compare_of_ensembles_equals_the_loops_on_the_groups(binary):
    p = _stack(9, 23, 3, 4, binary=binary)  # 4 groups of 2, the last replica left out
    labels = np.random.default_rng(4).integers(0, 3 if not binary else 2, 23)
    report = metrics.compare(p, labels, ensemble_size=2, chunk_size=8)
    assert report["num_replicas"] == 4
    _assert_measures(report, _loops(np.asarray(metrics.ensemble(p, 2)), labels))
    if not binary:  # the rows of the curve are the same reports
        curve = metrics.ensemble_curve(p, labels, ks=[1, 2], chunk_size=8)
        _assert_measures(curve[0], _loops(p, labels))
        _assert_measures(curve[1], report)


@pytest.mark.parametrize("binary", [False, True])
def test_compare_of_logits_equals_the_loops_on_probabilities(binary):
    rng = np.random.default_rng(5)
    z = 2.0 * rng.normal(size=(5, 31) if binary else (5, 31, 4)).astype(np.float32)
    labels = rng.integers(0, 2 if binary else 4, 31)
    probs = np.asarray(jax.nn.sigmoid(z) if binary else jax.nn.softmax(z, -1), np.float32)
    report = metrics.compare(z, labels, from_logits=True, chunk_size=8)
    _assert_measures(report, _loops(probs, labels))


class _Blocks:
    """A block-readable source: ``.shape``, ``.dtype`` and ``obj[:, a:b]`` only."""

    def __init__(self, x):
        self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, []

    def __getitem__(self, item):
        block = self.x[item]
        self.reads.append(block.shape[1])
        return block


def test_compare_reads_block_sources_and_jax_arrays():
    p = _stack(4, 37, 3, 6)
    labels = np.random.default_rng(6).integers(0, 3, 37)
    want = _loops(p, labels)
    source = _Blocks(p)
    _assert_measures(metrics.compare(source, labels, chunk_size=8), want)
    assert max(source.reads) == 8 and sum(source.reads) == 37
    _assert_measures(metrics.compare(jnp.asarray(p), labels, chunk_size=8), want)


# --------------------------------------------------------------------------------------------
# Intervals against a plain resampling.

S = 50


def _percentiles(values, level=0.95):
    finite = values[np.isfinite(values)]
    return np.percentile(finite, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])


def _example_reference(p, labels, key):
    """Each sample's measures by the loops on the examples repeated as drawn (sample i:
    ``_resample_counts(key, i)``, M = N)."""
    n = p.shape[1]
    rows = []
    for i in range(S):
        v = np.asarray(metrics._resample_counts(key, i, size=n, count=1))[0]
        index = np.repeat(np.arange(n), v)
        rows.append(_loops(p[:, index], labels[index]))
    return {k: np.array([row[k] for row in rows], np.float64) for k in rows[0]}


def _var_dist_replicas(p, labels, w):
    """var_dist of a replica sample by the weighted-pairs definition of ``bootstrap``: the
    pairs of resampled replicas that are not copies of one replica."""
    n = p.shape[1]
    correct = (_yhat(p) == labels[None, :]).astype(np.float64)
    origin = np.repeat(np.arange(p.shape[0]), w)
    pairs = [(a, b) for a, b in itertools.combinations(origin, 2) if a != b]
    if not pairs:
        return np.nan
    acc = correct.mean(1)
    var_obs = np.mean([(acc[a] - acc[b]) ** 2 / 2 for a, b in pairs])
    var_ind = np.mean([np.mean((correct[a] - correct[b]) ** 2) / (2 * n) for a, b in pairs])
    return n / (n - 1) * (var_obs - var_ind)


def test_intervals_equal_a_plain_resampling():
    r, n, c = 4, 37, 3  # R = 4: some replica samples have no pair (left out of var_dist's)
    p = _stack(r, n, c, 7, scale=1.5)
    labels = np.random.default_rng(7).integers(0, c, n)
    key = jax.random.key(7)  # its first S replica draws include two of a single replica
    want = _example_reference(p, labels, key)
    reports = {
        over: metrics.compare(p, labels, key=key, num_samples=S, over=over, chunk_size=8)
        for over in ("replicas", "examples")
    }
    for over, report in reports.items():
        assert report["multiplicity_ci_over"] == "examples" and report["ci_over"] == over
        point = _loops(p, labels)
        _assert_measures(report, point)
        for key_name in metrics.MULTIPLICITY_KEYS:
            np.testing.assert_allclose(
                report[f"{key_name}_ci"],
                _percentiles(want[key_name]),
                rtol=1e-6,
                atol=1e-7,
                err_msg=(over, key_name),
            )
    # Over examples whatever over says: the same draws, the same program.
    for key_name in metrics.MULTIPLICITY_KEYS:
        ci = f"{key_name}_ci"
        assert reports["replicas"][ci] == reports["examples"][ci], key_name
    # var_dist over examples: the loops' var_obs has the self-products of copied examples
    # (bootstrap removes them), so only the replica interval is checked here, against the
    # weighted-pairs definition (tests/test_bootstrap.py checks both against its reference).
    w = np.asarray(metrics._resample_counts(key, 0, size=r, count=S))
    samples = np.array([_var_dist_replicas(p, labels, wi) for wi in w])
    np.testing.assert_allclose(
        reports["replicas"]["var_dist_ci"], _percentiles(samples), rtol=1e-6, atol=1e-9
    )
    assert np.isnan(samples).any() and np.isfinite(samples).sum() > S // 2
    # bootstrap returns the same intervals.
    ci = metrics.bootstrap(p, labels, key, num_samples=S, over="replicas", chunk_size=8)
    for key_name in metrics.MULTIPLICITY_KEYS + ("var_dist",):
        assert ci[key_name] == reports["replicas"][f"{key_name}_ci"], key_name
