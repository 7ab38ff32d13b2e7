"""Property-based tests (hypothesis) of jaxrepro.metrics: bounds of every figure of
``compare``, invariance to the order of replicas and to a relabelling of the classes,
agreement of ``compare`` and the per-metric functions with an explicit loop over replica pairs
(methods.md sections 4-5, 9-10), the ``from_logits`` guard, and ``finite_replicas`` as a mask.

``compare`` compiles one block function per input shape, so shapes come from the small fixed
set ``SHAPES`` and values from a drawn seed; every test is derandomized (the same examples on
every run) and keeps ``max_examples`` small.
"""

import itertools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import metrics

# (R, N, C): C None is a binary [R, N] input; C = 2 is a two-class [R, N, C] input.
SHAPES = ((2, 5, 3), (3, 12, 2), (5, 12, 3), (3, 1, 3), (2, 12, None), (5, 5, None))
# Spread of the logits the probabilities come from: near uniform (0.1) to one-hot rows with
# exact zeros and ones in float32 (30).
SCALES = (0.1, 1.0, 4.0, 30.0)
REPORT_KEYS = metrics.METRIC_KEYS + ("var_cal",)
EPS = 1e-6  # rounding slack of float32 sums on the bounds of continuous metrics


def _settings(max_examples):
    return hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _logits(seed, shape, scale):
    return scale * np.random.default_rng(seed).normal(size=shape)


@st.composite
def predictions(draw, shapes=SHAPES):
    """``(x, labels)``: float32 probabilities ``[R, N, C]`` with rows on the simplex (or binary
    ``[R, N]`` in [0, 1]), replicas 1..copies copies of replica 0, and integer labels."""
    r, n, c = draw(st.sampled_from(shapes))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from(SCALES))
    copies = draw(st.integers(0, r - 1))
    z = _logits(seed, (r, n) if c is None else (r, n, c), scale)
    x = (1.0 / (1.0 + np.exp(-z)) if c is None else _softmax(z)).astype(np.float32)
    x[1 : copies + 1] = x[0]
    labels = np.random.default_rng(seed + 1).integers(0, 2 if c is None else c, n)
    return x, labels


def _top_margin(x):
    """Smallest gap between the largest and second largest probability of any row."""
    p = np.stack([1 - x, x], -1) if x.ndim == 2 else x
    top = np.sort(p.astype(np.float64), axis=-1)
    return float(np.min(top[..., -1] - top[..., -2]))


def _vote_tied(x):
    """Whether the plurality vote of some example ties between classes."""
    p = np.stack([1 - x, x], -1) if x.ndim == 2 else x
    counts = np.eye(p.shape[-1], dtype=int)[np.argmax(p, -1)].sum(0)  # [N, C]
    return bool(((counts == counts.max(-1, keepdims=True)).sum(-1) > 1).any())


def assert_reports_equal(got, want, rtol, atol, keys=REPORT_KEYS):
    assert set(got) == set(want)
    for key in ("num_replicas", "num_examples", "num_excluded"):
        assert got[key] == want[key], key
    for key in keys:
        if key in want:
            np.testing.assert_allclose(
                got[key], want[key], rtol=rtol, atol=atol, equal_nan=True, err_msg=key
            )


# --------------------------------------------------------------------------------------------
# Reference: methods.md sections 4-5 with an explicit loop over pairs r < s, float64.


def pair_loop(x, labels):
    """Every metric of ``compare`` for probability inputs (logs clipped at ``LOG_FLOOR`` as
    the library does), looping over the pairs r < s of replicas."""
    x32 = np.asarray(x, np.float32)
    p32 = np.stack([1 - x32, x32], -1) if x32.ndim == 2 else x32
    yhat = np.argmax(p32, axis=-1)  # first maximum, on the float32 values compare sees
    p = p32.astype(np.float64)
    logp = np.log(np.maximum(p, metrics.LOG_FLOOR))
    r, n, c = p.shape
    q = p[..., 1] if c == 2 else p[:, np.arange(n), labels]
    correct = yhat == np.asarray(labels)[None, :]
    churn = tv = sq = kl = cc = 0.0
    rel = np.zeros(n)
    pairs = list(itertools.combinations(range(r), 2))
    for a, b in pairs:
        churn += np.mean(yhat[a] != yhat[b])
        tv += np.mean(0.5 * np.abs(p[a] - p[b]).sum(-1))
        rel += np.abs(q[a] - q[b])
        sq += np.mean(((p[a] - p[b]) ** 2).sum(-1))
        kl += np.mean((p[a] * (logp[a] - logp[b])).sum(-1))  # KL(a || b)
        kl += np.mean((p[b] * (logp[b] - logp[a])).sum(-1))  # KL(b || a)
        cc += np.mean(correct[a] != correct[b])
    m = len(pairs)
    qbar = q.mean(0)
    rel = np.where(qbar < metrics.PBAR_FLOOR, 0.0, rel / m / np.maximum(qbar, metrics.PBAR_FLOOR))
    pbar = p.mean(0)
    neg_entropy = (p * logp).sum(-1)  # -H(P_r), 0 log 0 = 0 through the clip
    acc = correct.mean(1)
    phat = correct.mean(0)
    var_ind = np.sum(phat * (1 - phat)) / n**2 * r / (r - 1)
    vote = [np.bincount(yhat[:, i], minlength=c).argmax() for i in range(n)]  # lowest on ties
    return {
        "churn": churn / m,
        "pd_abs": tv / m,
        "pd_rel": rel.mean(),
        "pd_l2": math.sqrt(sq / m),
        "kl_pairwise": kl / (2 * m),  # mean over ordered pairs r != s
        "js_ensemble": np.mean(
            neg_entropy.mean(0) - (pbar * np.log(np.maximum(pbar, metrics.LOG_FLOOR))).sum(-1)
        ),
        "churn_correctness": cc / m,
        "acc": acc,
        "acc_mean": acc.mean(),
        "eta": acc.mean() - churn / m,
        "var_obs": acc.var(ddof=1),
        "var_ind": var_ind,
        "var_dist": n / (n - 1) * (acc.var(ddof=1) - var_ind) if n > 1 else math.nan,
        "ambiguity": np.mean([len(set(yhat[:, i])) > 1 for i in range(n)]),
        "discrepancy": max(np.mean(yhat[a] != vote) for a in range(r)),
        "churn_max": max(np.mean(yhat[a] != yhat[b]) for a, b in pairs),
        "pred_range": np.mean(q.max(0) - q.min(0)),
    }


@jax.jit
def pure_metrics(x, labels):
    """The per-metric functions, in one jitted program (one compile per shape)."""
    return {
        "churn": metrics.churn(x),
        "pd_abs": metrics.pd_abs(x),
        "pd_rel": metrics.pd_rel(x, labels),
        "pd_l2": metrics.pd_l2(x),
        "kl_pairwise": metrics.kl_pairwise(x),
        "js_ensemble": metrics.js_ensemble(x),
        "churn_correctness": metrics.churn_correctness(x, labels),
        "acc": metrics.accuracy(x, labels),
        "eta": metrics.eta(x, labels),
        "var_obs": metrics.var_obs(x, labels),
        "var_ind": metrics.var_ind(x, labels),
        "var_dist": metrics.var_dist(x, labels),
        "ambiguity": metrics.ambiguity(x),
        "discrepancy": metrics.discrepancy(x),
        "churn_max": metrics.churn_max(x),
        "pred_range": metrics.pred_range(x, labels),
    }


# --------------------------------------------------------------------------------------------
# Properties.


@_settings(25)
@hypothesis.given(predictions())
def test_bounds_of_every_metric(case):
    x, labels = case
    r, n = x.shape[:2]
    c = 2 if x.ndim == 2 else x.shape[2]
    rep = metrics.compare(x, labels)
    for key in ("churn", "churn_correctness", "acc_mean", "acc_min", "acc_max"):
        assert 0.0 <= rep[key] <= 1.0, (key, rep[key])
    assert rep["acc_min"] <= rep["acc_mean"] + EPS and rep["acc_mean"] <= rep["acc_max"] + EPS
    # Exactly one of r, s correct implies that r and s disagree.
    assert rep["churn_correctness"] <= rep["churn"]
    # eta = acc_mean - churn lies in [-1, 1] (all wrong and all disagreeing gives -1).
    assert -1.0 <= rep["eta"] <= 1.0
    assert rep["eta"] == pytest.approx(rep["acc_mean"] - rep["churn"], abs=1e-12)
    # TV distance is at most 1; a pair mean of |q_r - q_s| is at most twice the replica mean.
    assert 0.0 <= rep["pd_abs"] <= 1.0 + EPS
    assert 0.0 <= rep["pd_rel"] <= 2.0 + EPS
    # ||P_r - P_s||^2 <= ||P_r - P_s||_1 = 2 TV <= 2.
    assert 0.0 <= rep["pd_l2"] <= math.sqrt(2.0) + EPS
    assert rep["pd_l2"] ** 2 <= 2.0 * rep["pd_abs"] + EPS
    # KL >= 0 and Pinsker: (KL(r||s) + KL(s||r)) / 2 >= 2 TV^2, so kl >= 2 pd_abs^2 (Jensen).
    assert rep["kl_pairwise"] >= 0.0
    assert rep["kl_pairwise"] >= 2.0 * rep["pd_abs"] ** 2 - EPS
    # JS to the ensemble: 0 <= H(mean) - mean H <= log min(R, C), and by convexity of KL in
    # its second argument js <= (1 - 1/R) kl_pairwise.
    assert -EPS <= rep["js_ensemble"] <= math.log(min(r, c)) + EPS
    assert rep["js_ensemble"] <= (1.0 - 1.0 / r) * rep["kl_pairwise"] + EPS
    assert rep["var_obs"] >= 0.0 and rep["var_ind"] >= 0.0
    assert rep["var_obs"] <= r / (4.0 * (r - 1)) + EPS  # variance of values in [0, 1], ddof=1
    assert rep["var_ind"] <= r / (4.0 * n * (r - 1)) + EPS
    assert rep["var_ind"] == pytest.approx(rep["churn_correctness"] / (2 * n), rel=1e-12)
    assert rep["acc_std"] == pytest.approx(math.sqrt(rep["var_obs"]), rel=1e-12, abs=1e-15)
    if c == 2:
        assert rep["var_cal"] == pytest.approx((1 - rep["acc_mean"]) / (2 * n), rel=1e-12)
    if n > 1:
        gap = rep["var_obs"] - rep["var_ind"]
        assert rep["var_dist"] == pytest.approx(n / (n - 1) * gap, rel=1e-12, abs=1e-18)
    else:
        assert math.isnan(rep["var_dist"])
    # Multiplicity (methods.md section 9): a pair that disagrees makes the example ambiguous,
    # the worst pair churns at least as much as the mean pair, and every ambiguous example has
    # a replica off the vote (exact counts: no rounding slack).
    assert 0.0 <= rep["churn"] <= rep["churn_max"] <= rep["ambiguity"] <= 1.0
    assert rep["ambiguity"] / r <= rep["discrepancy"] + 1e-12
    assert rep["discrepancy"] <= rep["ambiguity"]
    assert 0.0 <= rep["pred_range"] <= 1.0 + EPS
    if c == 2:  # |q_r - q_s| <= max q - min q, and TV = |q_r - q_s| for two classes
        assert rep["pd_abs"] <= rep["pred_range"] + EPS


@_settings(20)
@hypothesis.given(predictions(), st.data())
def test_replica_order_changes_nothing(case, data):
    x, labels = case
    perm = np.array(data.draw(st.permutations(range(x.shape[0])), label="perm"))
    got = metrics.compare(x[perm], labels)
    want = metrics.compare(x, labels)
    assert_reports_equal(got, want, rtol=1e-6, atol=1e-6)
    # Per-replica extremes and counts do not round at all.
    counts = ("churn", "churn_correctness", "acc_mean", "acc_min", "acc_max", "var_ind")
    for key in counts + ("ambiguity", "discrepancy", "churn_max"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=0), key


@_settings(20)
@hypothesis.given(predictions(), st.data())
def test_relabelling_classes_changes_nothing(case, data):
    x, labels = case
    # Ties for the top class would be broken differently after relabelling.
    hypothesis.assume(_top_margin(x) > 1e-6)
    c = 2 if x.ndim == 2 else x.shape[2]
    perm = np.array(data.draw(st.permutations(range(c)), label="perm"))  # new j = old perm[j]
    new_labels = np.argsort(perm)[labels]
    if x.ndim == 2:  # binary: the only relabelling other than identity swaps p and 1 - p
        x_new = x if perm[0] == 0 else (1 - x).astype(np.float32)
    else:
        x_new = x[..., perm]
    got = metrics.compare(x_new, new_labels)
    want = metrics.compare(x, labels)
    # pd_rel of a two-class task uses the positive class (class 1), not the label's class, so
    # swapping the classes changes it by design (pred_range, a range, stays); so does
    # discrepancy where the vote ties (broken by the lowest class index); every other figure
    # is unchanged.
    positive = ("pd_rel",) if c == 2 else ()
    tied = ("discrepancy",) if _vote_tied(x) else ()
    keys = [k for k in REPORT_KEYS if k not in positive + tied]
    assert_reports_equal(got, want, rtol=1e-6, atol=1e-6, keys=keys)
    if c > 2:
        assert got["pd_rel"] == pytest.approx(want["pd_rel"], rel=1e-6, abs=1e-6)


@_settings(25)
@hypothesis.given(predictions())
def test_compare_and_pure_functions_match_pair_loop(case):
    x, labels = case
    want = pair_loop(x, labels)
    rep = metrics.compare(x, labels)
    pure = jax.device_get(pure_metrics(jnp.asarray(x), jnp.asarray(labels)))
    for key, value in want.items():
        for name, got in (("compare", rep), ("pure", pure)):
            if key in got:
                np.testing.assert_allclose(
                    got[key], value, rtol=1e-5, atol=1e-5, err_msg=f"{name}: {key}"
                )
    # Top-1 counts are exact: no rounding beyond float32 k / N.
    np.testing.assert_allclose(pure["acc"], want["acc"], rtol=1e-6, atol=0)
    assert rep["acc_min"] == pytest.approx(want["acc"].min(), rel=1e-7)
    assert rep["acc_max"] == pytest.approx(want["acc"].max(), rel=1e-7)


@_settings(15)
@hypothesis.given(predictions(shapes=[s for s in SHAPES if s[2] is not None]))
def test_from_logits_rejects_probabilities(case):
    x, labels = case
    with pytest.raises(ValueError, match="from_logits"):
        metrics.compare(x, labels, from_logits=True)


@_settings(15)
@hypothesis.given(st.sampled_from(SHAPES), st.integers(0, 2**32 - 1))
def test_from_logits_accepts_logits_and_matches_probabilities(shape, seed):
    r, n, c = shape
    z = _logits(seed, (r, n) if c is None else (r, n, c), 3.0)
    labels = np.random.default_rng(seed + 1).integers(0, 2 if c is None else c, n)
    hypothesis.assume(np.min(np.abs(z)) > 1e-3 if c is None else _top_margin(z) > 1e-3)
    probs = (1.0 / (1.0 + np.exp(-z)) if c is None else _softmax(z)).astype(np.float32)
    got = metrics.compare(z.astype(np.float32), labels, from_logits=True)
    want = metrics.compare(probs, labels)
    assert_reports_equal(got, want, rtol=1e-5, atol=1e-5)


@_settings(10)
@hypothesis.given(predictions(shapes=[(3, 12, 2), (3, 1, 3)]), st.data())
def test_finite_replicas_masks_exactly_the_diverged_replicas(case, data):
    x, labels = case
    r = x.shape[0]
    # At most one diverged replica of three: the masked shapes stay few (one compile each).
    bad = data.draw(st.sets(st.integers(0, r - 1), max_size=r - 2), label="bad")
    x = x.copy()
    for b in sorted(bad):
        where = data.draw(st.integers(0, x[b].size - 1), label="where")
        x[b].reshape(-1)[where] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    keep = np.array([i not in bad for i in range(r)])
    chunk = data.draw(st.sampled_from([None, 1, 2, 7]), label="chunk_size")
    np.testing.assert_array_equal(metrics.finite_replicas(x, chunk_size=chunk), keep)
    np.testing.assert_array_equal(np.asarray(metrics.finite_replicas(jnp.asarray(x))), keep)
    got = metrics.compare(x, labels, mask=metrics.finite_replicas(x))
    want = metrics.compare(x[keep], labels)
    assert got["num_excluded"] == len(bad)
    want["num_excluded"] = len(bad)
    assert_reports_equal(got, want, rtol=0, atol=0)  # the same program on the same data
    if bad:
        with pytest.raises(ValueError, match="non-finite"):
            metrics.compare(x, labels)
