"""Tests of jaxrepro.metrics: every metric against an explicit loop over replica pairs."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp, xlogy

from jaxrepro import metrics

FLOOR = metrics.LOG_FLOOR
DIFF_KEYS = (
    "churn",
    "pd_abs",
    "pd_rel",
    "pd_l2",
    "kl_pairwise",
    "js_ensemble",
    "churn_correctness",
)


# --------------------------------------------------------------------------------------------
# Plain NumPy reference: definitions of methods.md, explicit loops over pairs, float64.


def _np_probs(x, from_logits):
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        if from_logits:  # log(1 - p), log p with p = sigmoid(x)
            logp = np.stack([-np.logaddexp(0, x), -np.logaddexp(0, -x)], axis=-1)
            return np.exp(logp), logp
        p = np.stack([1 - x, x], axis=-1)
    elif from_logits:
        logp = x - logsumexp(x, axis=-1, keepdims=True)
        return np.exp(logp), logp
    else:
        p = x
    return p, np.log(np.maximum(p, FLOOR))


def reference(x, labels, from_logits=False, weights=None):
    """Every metric, looping over replica pairs. ``weights`` (replica multiplicities) expand
    the replicas with copies, and pairs of copies of one replica are skipped (the bootstrap's
    distinct-pairs convention)."""
    p, logp = _np_probs(x, from_logits)
    labels = np.asarray(labels)
    origin = np.arange(p.shape[0])
    if weights is not None:
        origin = np.repeat(origin, weights)
        p, logp = p[origin], logp[origin]
    r, n, c = p.shape
    yhat = np.argmax(logp if from_logits else p, axis=-1)
    correct = yhat == labels[None, :]
    q = p[..., 1] if c == 2 else p[:, np.arange(n), labels]
    pairs = [(a, b) for a, b in itertools.combinations(range(r), 2) if origin[a] != origin[b]]
    churn = tv = sq = cc = 0.0
    rel = np.zeros(n)
    for a, b in pairs:
        churn += np.mean(yhat[a] != yhat[b])
        tv += np.mean(0.5 * np.abs(p[a] - p[b]).sum(-1))
        rel += np.abs(q[a] - q[b])
        sq += np.mean(((p[a] - p[b]) ** 2).sum(-1))
        cc += np.mean(correct[a] != correct[b])
    kl = 0.0
    for a, b in pairs:
        kl += np.mean((p[a] * (logp[a] - logp[b])).sum(-1))
        kl += np.mean((p[b] * (logp[b] - logp[a])).sum(-1))
    m = len(pairs)
    qbar = q.mean(0)
    rel = np.where(qbar < 1e-7, 0.0, rel / m / np.maximum(qbar, 1e-7))

    def entropy(d):
        return -xlogy(d, d).sum(-1)

    acc = correct.mean(1)
    if weights is None:
        var_obs = acc.var(ddof=1)
    else:  # pairwise form of the ddof=1 variance, over distinct-origin pairs
        var_obs = np.mean([(acc[a] - acc[b]) ** 2 / 2 for a, b in pairs])
    var_ind = np.mean([np.mean(correct[a] != correct[b]) for a, b in pairs]) / (2 * n)
    out = {
        "churn": churn / m,
        "pd_abs": tv / m,
        "pd_rel": rel.mean(),
        "pd_l2": math.sqrt(sq / m),
        "kl_pairwise": kl / (2 * m),
        "js_ensemble": np.mean(entropy(p.mean(0)) - entropy(p).mean(0)),
        "churn_correctness": cc / m,
        "acc_mean": acc.mean(),
        "acc_std": math.sqrt(var_obs),
        "acc_min": acc.min(),
        "acc_max": acc.max(),
        "eta": acc.mean() - churn / m,
        "var_obs": var_obs,
        "var_ind": var_ind,
        "var_ratio": var_obs / var_ind if var_ind > 0 else math.nan,
        "var_dist": n / (n - 1) * (var_obs - var_ind) if n > 1 else math.nan,
    }
    # Predictive multiplicity (methods.md section 9), one example and one pair at a time.
    vote = [np.bincount(yhat[:, i], minlength=c).argmax() for i in range(n)]  # lowest on ties
    out.update(
        ambiguity=np.mean([len(set(yhat[:, i])) > 1 for i in range(n)]),
        discrepancy=max(np.mean(yhat[a] != vote) for a in range(r)),
        churn_max=max(np.mean(yhat[a] != yhat[b]) for a, b in pairs),
        pred_range=np.mean([q[:, i].max() - q[:, i].min() for i in range(n)]),
    )
    if c == 2:
        out["var_cal"] = (1 - acc.mean()) / (2 * n)
    return out


def _var_ind_by_definition(x, labels, from_logits=False):
    p, logp = _np_probs(x, from_logits)
    r, n = p.shape[:2]
    ph = (np.argmax(logp if from_logits else p, -1) == np.asarray(labels)).mean(0)
    return np.sum(ph * (1 - ph)) / n**2 * r / (r - 1)


def make(r, n, c, from_logits, seed=0):
    """Random predictions: [R, N, C] (c an int) or binary [R, N] (c None), and labels."""
    rng = np.random.default_rng(seed)
    shape = (r, n) if c is None else (r, n, c)
    if from_logits:
        x = 2.0 * rng.normal(size=shape)
    elif c is None:
        x = rng.random(shape)
    else:
        x = rng.dirichlet(np.ones(c), size=(r, n))
        x[0, 0] = np.eye(c)[0]  # exact zeros: the clipped logs must agree
    labels = rng.integers(0, 2 if c is None else c, n)
    return x.astype(np.float32), labels


# (R, N, C or None for binary [R, N], from_logits): R in {2, 3, 8, 17}, binary included.
CASES = [
    (2, 13, 3, False),
    (3, 20, None, False),
    (8, 24, 5, True),
    (17, 31, 4, False),
    (17, 10, None, True),
    (8, 9, 2, False),
    (3, 16, 10, True),
]


def assert_report_close(got, want, keys=None, rtol=2e-5, atol=1e-6):
    for key in keys or want:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


# --------------------------------------------------------------------------------------------
# Against the pair loop.


@pytest.mark.parametrize("r,n,c,from_logits", CASES)
def test_compare_matches_pair_loop(r, n, c, from_logits):
    x, y = make(r, n, c, from_logits)
    report = metrics.compare(x, y, from_logits=from_logits, chunk_size=8)  # several blocks
    want = reference(x, y, from_logits)
    assert_report_close(report, want)
    assert set(report) == set(want) | {"num_replicas", "num_examples", "num_excluded"}
    assert (report["num_replicas"], report["num_examples"], report["num_excluded"]) == (r, n, 0)
    assert ("var_cal" in report) == (c in (None, 2))
    np.testing.assert_allclose(
        report["var_ind"], _var_ind_by_definition(x, y, from_logits), rtol=1e-9
    )


@pytest.mark.parametrize("r,n,c,from_logits", CASES[:5])
def test_pure_functions_match_pair_loop(r, n, c, from_logits):
    x, y = make(r, n, c, from_logits, seed=1)
    want = reference(x, y, from_logits)

    @jax.jit
    def everything(x, y):
        kw = {"from_logits": from_logits}
        out = {
            "churn": metrics.churn(x, **kw),
            "pd_abs": metrics.pd_abs(x, **kw),
            "pd_rel": metrics.pd_rel(x, y, **kw),
            "pd_l2": metrics.pd_l2(x, **kw),
            "kl_pairwise": metrics.kl_pairwise(x, **kw),
            "js_ensemble": metrics.js_ensemble(x, **kw),
            "churn_correctness": metrics.churn_correctness(x, y, **kw),
            "acc": metrics.accuracy(x, y, **kw),
            "phat": metrics.phat(x, y, **kw),
            "eta": metrics.eta(x, y, **kw),
            "var_obs": metrics.var_obs(x, y, **kw),
            "var_ind": metrics.var_ind(x, y, **kw),
            "var_ratio": metrics.var_ratio(x, y, **kw),
        }
        if c is None:
            out["var_cal"] = metrics.var_cal(x, y, **kw)
        return out

    got = everything(jnp.asarray(x), jnp.asarray(y))
    assert_report_close(got, want, [k for k in want if k in got], rtol=1e-4, atol=1e-6)
    p, logp = _np_probs(x, from_logits)
    correct = np.argmax(logp if from_logits else p, -1) == y
    np.testing.assert_allclose(got["acc"], correct.mean(1), rtol=1e-6)
    np.testing.assert_allclose(got["phat"], correct.mean(0), rtol=1e-6)


class JitVariants(chex.TestCase):
    """The metrics compiled and run op by op (chex's variants: ``self.variant`` is ``jax.jit``
    in one, the plain function in the other) agree, and both agree with the loops."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_jitted_and_not_jitted_agree(self):
        x, y = make(5, 6, 3, False, seed=2)
        fns = {
            "churn": (metrics.churn, (x,)),
            "pd_abs": (metrics.pd_abs, (x,)),
            "pd_rel": (metrics.pd_rel, (x, y)),
            "pd_l2": (metrics.pd_l2, (x,)),
            "kl_pairwise": (metrics.kl_pairwise, (x,)),
            "js_ensemble": (metrics.js_ensemble, (x,)),
            "churn_correctness": (metrics.churn_correctness, (x, y)),
            "eta": (metrics.eta, (x, y)),
            "var_ratio": (metrics.var_ratio, (x, y)),
        }
        got = self.variant(lambda: {k: fn(*a) for k, (fn, a) in fns.items()})()
        with jax.disable_jit():
            plain = {k: fn(*a) for k, (fn, a) in fns.items()}
        assert_report_close(plain, got, rtol=1e-6, atol=0)
        assert_report_close(plain, reference(x, y), fns, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# Known values.


@pytest.mark.parametrize(
    "from_logits,binary,k",
    [(False, False, 1), (True, False, 1), (False, True, 1), (True, False, 2)],
)
def test_identical_replicas_give_exactly_zero(from_logits, binary, k):
    x, y = make(1, 20, None if binary else 6, from_logits, seed=3)
    x = np.repeat(x, 6, axis=0)
    report = metrics.compare(x, y, from_logits=from_logits, ensemble_size=k)
    for key in DIFF_KEYS + ("var_obs", "var_ind"):
        assert report[key] == 0.0, key
    assert math.isnan(report["var_ratio"])
    assert report["eta"] == report["acc_mean"]
    fns = (metrics.churn, metrics.pd_abs, metrics.pd_l2, metrics.kl_pairwise, metrics.js_ensemble)
    values = jax.jit(lambda x: [fn(x, from_logits=from_logits) for fn in fns])(x)
    assert [float(v) for v in values] == [0.0] * len(fns)


def test_total_disagreement_gives_churn_one():
    probs = np.zeros((2, 7, 3), np.float32)
    probs[0, :, 0] = 1.0
    probs[1, :, 2] = 1.0
    report = metrics.compare(probs, np.zeros(7, int))
    assert report["churn"] == 1.0
    assert report["pd_abs"] == 1.0
    assert report["churn_correctness"] == 1.0  # replica 0 is always right, replica 1 never
    assert report["eta"] == 0.5 - 1.0


def test_effective_test_accuracy_worked_example():
    # yhat per replica, labels [0, 1, 2, 0]: accuracies 1, 0.75, 0.5 (mean 0.75); pairwise
    # differences 1, 2, 3 of 4 examples (churn 6/12 = 0.5); ETA = 0.75 - 0.5 = 0.25.
    yhat = np.array([[0, 1, 2, 0], [0, 1, 1, 0], [1, 1, 2, 2]])
    labels = np.array([0, 1, 2, 0])
    probs = np.full((3, 4, 3), 0.1, np.float32)
    np.put_along_axis(probs, yhat[..., None], 0.8, axis=-1)
    report = metrics.compare(probs, labels)
    # apurvakokate/Reproducibility ex_mlp.py: (mean(acc * total) - mean(pair diffs)) / total.
    total = len(labels)
    accs = [(yhat[r] == labels).sum() / total for r in range(3)]
    diffs = [(yhat[a] != yhat[b]).sum() for a, b in itertools.combinations(range(3), 2)]
    seed_eta = (np.mean(np.array(accs) * total) - np.mean(diffs)) / total
    assert seed_eta == 0.25
    assert report["eta"] == pytest.approx(0.25, abs=1e-12)
    assert report["acc_mean"] == pytest.approx(0.75) and report["churn"] == pytest.approx(0.5)
    assert report["churn_correctness"] == pytest.approx(0.5)
    # phat = [2/3, 1, 2/3, 2/3]: var_ind = (1/16)(3 * 2/9)(3/2) = 1/16 = var([1, .75, .5]).
    assert report["var_ind"] == pytest.approx(1 / 16) and report["var_obs"] == pytest.approx(1 / 16)
    assert report["var_ratio"] == pytest.approx(1.0)
    assert float(metrics.eta(probs, labels)) == pytest.approx(0.25, abs=1e-6)


def test_binary_hand_values():
    p = np.array([[0.2, 0.6, 0.9], [0.4, 0.6, 0.3]], np.float32)  # [R=2, N=3]
    report = metrics.compare(p, np.array([0, 1, 1]))
    assert report["pd_abs"] == pytest.approx((0.2 + 0 + 0.6) / 3, rel=1e-6)
    assert report["pd_rel"] == pytest.approx((0.2 / 0.3 + 0 + 0.6 / 0.6) / 3, rel=1e-6)
    assert report["pd_l2"] == pytest.approx(math.sqrt(2 * (0.04 + 0.36) / 3), rel=1e-6)
    assert report["churn"] == pytest.approx(1 / 3)  # only example 2 flips (0.9 vs 0.3)


# --------------------------------------------------------------------------------------------
# Invariances.


def test_permuting_replicas_changes_nothing():
    x, y = make(8, 40, 5, False, seed=4)
    perm = np.random.default_rng(0).permutation(8)
    assert_report_close(metrics.compare(x[perm], y), metrics.compare(x, y), rtol=1e-6)


@pytest.mark.parametrize("from_logits", [False, True])
def test_relabelling_classes_changes_nothing(from_logits):
    x, y = make(8, 40, 5, from_logits, seed=5)
    perm = np.random.default_rng(1).permutation(5)  # new class j is old class perm[j]
    inverse = np.argsort(perm)
    got = metrics.compare(x[..., perm], inverse[y], from_logits=from_logits)
    want = metrics.compare(x, y, from_logits=from_logits)
    # discrepancy's vote breaks ties by the lowest class index, which a relabelling changes by
    # design (8 replicas on 5 classes tie often); every other figure is unchanged.
    keys = [k for k in want if k != "discrepancy"]
    assert_report_close(got, want, keys, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Calibration (Jordan): labels drawn from the predicted probabilities.


def test_calibrated_binary_ensemble_matches_var_cal():
    rng = np.random.default_rng(6)
    r, n = 100, 2000
    pi = rng.random(n)  # the ensemble's (calibrated) probability of class 1
    labels = (rng.random(n) < pi).astype(int)
    votes = rng.random((r, n)) < pi  # each replica predicts class 1 with probability pi
    probs = np.where(votes, 0.9, 0.1).astype(np.float32)
    report = metrics.compare(probs, labels)
    # var_ind is averaged over 2000 examples: a few percent of sampling error.
    assert report["var_ind"] / report["var_cal"] == pytest.approx(1.0, abs=0.1)
    # var_obs is a variance over 100 replicas: relative standard error sqrt(2 / 99) = 0.14.
    assert abs(report["var_obs"] / report["var_cal"] - 1) < 3 * math.sqrt(2 / (r - 1))
    # Control: a per-replica skill shift (whole runs better or worse) breaks independence.
    p_correct = np.where(labels == 1, pi, 1 - pi) + rng.normal(0, 0.1, (r, 1))
    right = rng.random((r, n)) < np.clip(p_correct, 0, 1)
    votes = np.where(right, labels, 1 - labels) == 1
    correlated = metrics.compare(np.where(votes, 0.9, 0.1).astype(np.float32), labels)
    assert correlated["var_ratio"] > 5


# --------------------------------------------------------------------------------------------
# Ensembles.


def test_ensemble_curve_matches_explicit_groups():
    x, y = make(8, 30, 4, False, seed=7)
    curve = metrics.ensemble_curve(x, y)
    assert [(row["k"], row["num_groups"]) for row in curve] == [(1, 8), (2, 4), (4, 2)]
    for row in curve:
        k = row["k"]
        grouped = x.astype(np.float64).reshape(8 // k, k, 30, 4).mean(1)
        assert_report_close(row, reference(grouped, y), DIFF_KEYS + ("acc_mean", "var_obs"))
    assert curve[2]["pd_abs"] < curve[1]["pd_abs"] < curve[0]["pd_abs"]
    # Consecutive groups, remainder dropped: R = 7 with k = 2 uses replicas 0..5.
    grouped = x[:6].astype(np.float64).reshape(3, 2, 30, 4).mean(1)
    assert_report_close(metrics.compare(x[:7], y, ensemble_size=2), reference(grouped, y))


def test_ensemble_of_logits_averages_probabilities():
    x, y = make(6, 25, 3, True, seed=8)
    got = metrics.compare(x, y, from_logits=True, ensemble_size=3)
    p = np.asarray(metrics.ensemble(x, 3, from_logits=True))
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-6)
    assert_report_close(got, metrics.compare(p, y), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Streaming sources and bounded memory.


class _LazyPredictions:
    """Computes blocks on demand and records the largest block requested."""

    def __init__(self, x):
        self.x, self.shape, self.largest = x, x.shape, 0

    def __getitem__(self, item):
        block = self.x[item]
        self.largest = max(self.largest, block.shape[1])
        return block


def test_memmap_and_lazy_sources_stream_in_blocks(tmp_path):
    x, y = make(5, 50, 3, False, seed=9)
    mm = np.memmap(tmp_path / "p.f32", np.float32, "w+", shape=x.shape)
    mm[:] = x
    want = metrics.compare(x, y)
    assert_report_close(metrics.compare(mm, y, chunk_size=16), want, rtol=1e-6)
    lazy = _LazyPredictions(x)
    assert_report_close(metrics.compare(lazy, y, chunk_size=16), want, rtol=1e-6)
    assert lazy.largest == 16  # never more than one block of examples at a time


# --------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
    "probs,labels,match",
    [
        (np.full((3,), 0.5), np.zeros(3, int), "rank"),
        (np.full((2, 3, 4, 5), 0.2), np.zeros(3, int), "rank"),
        (np.full((2, 3, 1), 1.0), np.zeros(3, int), "classes"),
        (np.full((2, 3, 2), 0.5), np.zeros(4, int), "labels must have shape"),
        (np.full((2, 3, 2), 0.5), np.array([0, 1, 2]), "labels out of range"),
        (np.full((2, 3, 2), 0.5), np.array([0, 1, -1]), "labels out of range"),
        (np.full((2, 3, 2), 0.5), np.array([0.0, 1.0, 1.0]), "labels must be integers"),
        (np.full((2, 3, 2), 0.6), np.zeros(3, int), "do not sum to 1"),
        (np.full((2, 3), 1.5), np.zeros(3, int), r"outside \[0, 1\]"),
        (np.full((1, 3, 2), 0.5), np.zeros(3, int), "at least 2 replicas"),
        (np.zeros((2, 0, 2)), np.zeros(0, int), "no examples"),
    ],
)
def test_invalid_inputs_raise_named_errors(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.compare(probs.astype(np.float32), labels)


def test_other_invalid_arguments():
    x, y = make(4, 10, 3, False)
    with pytest.raises(ValueError, match="mask must be"):
        metrics.compare(x, y, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="masked out"):
        metrics.compare(x, y, mask=np.array([True, False, False, False]))
    with pytest.raises(ValueError, match="ensemble_size=4"):
        metrics.compare(x, y, ensemble_size=4)
    with pytest.raises(ValueError, match="over must be"):
        metrics.bootstrap(x, y, jax.random.key(0), over="pairs")
    with pytest.raises(ValueError, match="at least 2 replicas"):
        metrics.churn(x[:1])
    with pytest.raises(ValueError, match="needs labels"):
        metrics.pd_rel(x)
    with pytest.raises(ValueError, match="binary"):
        metrics.var_cal(x, y)
    metrics.compare(x * 5, y, from_logits=True)  # logits need not sum to 1


def test_nan_replica_raises_and_mask_excludes_it():
    x, y = make(6, 20, 3, False, seed=10)
    x[2, 5] = np.nan  # one NaN row: a diverged replica
    x[4] = np.inf
    with pytest.raises(ValueError, match=r"non-finite.*replicas \[2, 4\].*finite_replicas"):
        metrics.compare(x, y)
    keep = metrics.finite_replicas(x)
    assert keep.tolist() == [True, True, False, True, False, True]
    assert np.asarray(metrics.finite_replicas(jnp.asarray(x))).tolist() == keep.tolist()
    report = metrics.compare(x, y, mask=keep)
    assert (report["num_replicas"], report["num_excluded"]) == (4, 2)
    assert_report_close(report, reference(x[keep], y))
    jax_report = metrics.compare(jnp.asarray(x), y, mask=keep)  # device arrays too
    assert_report_close(jax_report, report, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Bootstrap.


def _realistic(r, n, c, seed):
    """Replicas that share most of their logits (as trained models do)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 2, (1, n, c))
    labels = np.argmax(base[0] + rng.gumbel(size=(n, c)), -1)
    return (base + rng.normal(0, 0.7, (r, n, c))).astype(np.float32), labels


def test_bootstrap_is_deterministic_given_key():
    x, y = _realistic(16, 300, 3, seed=11)  # shapes shared with the next test: one compile
    a = metrics.bootstrap(x, y, jax.random.key(3), num_samples=300, from_logits=True)
    b = metrics.bootstrap(x, y, jax.random.key(3), num_samples=300, from_logits=True)
    c = metrics.bootstrap(x, y, jax.random.key(4), num_samples=300, from_logits=True)
    assert a == b
    assert a != c
    assert set(a) == set(metrics.CI_KEYS + metrics.MULTIPLICITY_KEYS) - {"var_cal"}
    d = [
        metrics.bootstrap(
            x, y, jax.random.key(3), num_samples=300, from_logits=True, over="examples"
        )
        for _ in range(2)
    ]
    assert d[0] == d[1] != a


@pytest.mark.parametrize("over", ["replicas", "examples"])
def test_bootstrap_intervals_contain_point_estimate(over):
    x, y = _realistic(16, 300, 3, seed=12)
    report = metrics.compare(
        x, y, from_logits=True, key=jax.random.key(0), num_samples=300, over=over
    )
    assert report["ci_over"] == over and report["ci_num_samples"] == 300
    for key in metrics.CI_KEYS:
        if key == "var_cal":
            continue
        lo, hi = report[f"{key}_ci"]
        assert lo <= report[key] <= hi, (key, lo, report[key], hi)
        assert lo < hi, key
    assert report["var_ratio_ci"][1] > report["var_ratio_ci"][0] >= 0


def test_replica_bootstrap_uses_distinct_pairs():
    x, y = make(5, 18, 3, False, seed=13)
    w = np.array([[2, 0, 1, 2, 0], [1, 1, 1, 1, 1]], np.float32)
    scan = metrics._Scan(x, y, from_logits=False, mask=None, atol=1e-3, chunk_size=8)
    res = scan.run(boot_w=w)[1]
    values = metrics._finalize(
        res["boot"], res["correct"][None, :] / 18, 18, w.astype(np.float64), False
    )
    for i in range(2):
        want = reference(x, y, weights=w[i].astype(int))
        for key in (
            "churn",
            "pd_abs",
            "pd_rel",
            "pd_l2",
            "kl_pairwise",
            "churn_correctness",
            "acc_mean",
            "var_obs",
            "var_ind",
            "var_ratio",
        ):
            np.testing.assert_allclose(values[key][i], want[key], rtol=2e-5, err_msg=key)
