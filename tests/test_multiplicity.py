"""Multiplicity measures (methods.md sections 9 and 10) against explicit loops over replicas,
pairs and examples: several R, N and C, binary stacks, and ties in the vote."""

from __future__ import annotations

import itertools

import jax
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
