"""Tests of jaxrepro.metrics.difference: the bootstrap of the difference between two arms,
against an explicit loop over samples, replica pairs and weighted examples."""

import itertools
import math

import jax
import numpy as np
import pytest

from jaxrepro import metrics

FLOOR = metrics.LOG_FLOOR
R, N, C = 4, 12, 3  # shared shapes keep the number of compilations small
S = 40
CHUNK = 5  # several blocks per pass (the last one padded), shared by every test: few compiles
CHECKED = (
    "churn",
    "pd_abs",
    "pd_rel",
    "pd_l2",
    "kl_pairwise",
    "js_ensemble",
    "churn_correctness",
    "acc_mean",
    "acc_std",
    "eta",
    "var_obs",
    "var_ind",
    "var_ratio",
    "var_cal",
)


def make(r, n, c, seed):
    """Random probabilities [R, N, C] (c an int) or binary [R, N] (c None), and labels."""
    rng = np.random.default_rng(seed)
    if c is None:
        x = rng.random((r, n))
    else:
        x = rng.dirichlet(np.ones(c), size=(r, n))
    return x.astype(np.float32), rng.integers(0, 2 if c is None else c, n)


# --------------------------------------------------------------------------------------------
# Plain NumPy reference: one bootstrap sample from the definitions, with explicit loops over
# replica pairs i < j weighted by w_i w_j and over examples weighted by v_n (float64).


def reference_sample(x, labels, w, v):
    x = np.asarray(x, np.float64)
    p = np.stack([1 - x, x], -1) if x.ndim == 2 else x
    logp = np.log(np.maximum(p, FLOOR))
    r, n, c = p.shape
    w, v = np.asarray(w, np.float64), np.asarray(v, np.float64)
    yhat = np.argmax(p, -1)
    correct = (yhat == np.asarray(labels)[None, :]).astype(np.float64)
    q = p[..., 1] if c == 2 else p[:, np.arange(n), labels]
    tot = w.sum()
    pairs = churn = tv = sq = kl = cc = var_pairs = 0.0
    rel = np.zeros(n)
    for i, j in itertools.combinations(range(r), 2):
        ww = w[i] * w[j]
        pairs += ww
        d = correct[i] - correct[j]
        # (a_i - a_j)^2 over the resampled test set, without the products of distinct copies
        # of one example (v_n (v_n - 1) d_n^2): copies are not independent examples.
        var_pairs += ww * ((v @ d) ** 2 - np.sum(v * (v - 1) * d * d)) / n**2
        for e in range(n):
            churn += ww * v[e] * (yhat[i, e] != yhat[j, e])
            tv += ww * v[e] * 0.5 * np.abs(p[i, e] - p[j, e]).sum()
            sq += ww * v[e] * ((p[i, e] - p[j, e]) ** 2).sum()
            kl += (
                ww
                * v[e]
                * (
                    (p[i, e] * (logp[i, e] - logp[j, e])).sum()
                    + (p[j, e] * (logp[j, e] - logp[i, e])).sum()
                )
            )
            cc += ww * v[e] * d[e] ** 2
            rel[e] += ww * abs(q[i, e] - q[j, e])
    with np.errstate(divide="ignore", invalid="ignore"):
        qbar = w @ q / tot
        rel = np.where(
            qbar < metrics.PBAR_FLOOR, 0.0, rel / pairs / np.maximum(qbar, metrics.PBAR_FLOOR)
        )
        pbar = np.einsum("r,rnc->nc", w, p) / tot
        js = np.einsum("r,rnc->n", w, p * logp) / tot - (
            pbar * np.log(np.maximum(pbar, FLOOR))
        ).sum(-1)
        js_factor = (1 - 1 / r) / (1 - (w * w).sum() / tot**2)  # 1 without replica draws
        acc = correct @ v / n
        acc_mean = w @ acc / tot
        var_obs = max(var_pairs / (2 * pairs), 0.0) if pairs > 0 else math.nan
        out = {
            "churn": churn / (n * pairs),
            "pd_abs": tv / (n * pairs),
            "pd_rel": v @ rel / n,
            "pd_l2": math.sqrt(sq / (n * pairs)) if pairs > 0 else math.nan,
            "kl_pairwise": kl / (2 * n * pairs),
            "js_ensemble": v @ js / n * js_factor,
            "churn_correctness": cc / (n * pairs),
            "acc_mean": acc_mean,
            "acc_std": math.sqrt(var_obs),
            "eta": acc_mean - churn / (n * pairs),
            "var_obs": var_obs,
            "var_ind": cc / (n * n * 2 * pairs),
        }
        out["var_ratio"] = out["var_obs"] / out["var_ind"]
    if c == 2:
        out["var_cal"] = (1 - acc_mean) / (2 * n)
    return out


def explicit_counts(key, size, rows):
    """The documented draws of samples ``rows``: sample i is the bincount of
    randint(fold_in(key, i), (size,), 0, size)."""
    return np.stack(
        [
            np.bincount(
                np.asarray(jax.random.randint(jax.random.fold_in(key, i), (size,), 0, size)),
                minlength=size,
            )
            for i in rows
        ]
    )


def difference(*args, **kw):
    return metrics.difference(*args, **{"chunk_size": CHUNK, **kw})


def samples(xa, xb, y, key, **kw):
    kw = {"paired": True, "mask": None, "mask_b": None, **kw}
    scans = metrics._difference_scans(
        xa,
        xb,
        y,
        paired=kw["paired"],
        mask=kw["mask"],
        mask_b=kw["mask_b"],
        from_logits=False,
        atol=metrics.DEFAULT_ATOL,
        chunk_size=CHUNK,
    )
    return metrics._difference_samples(
        *scans, key, over=kw["over"], paired=kw["paired"], num_samples=kw["num_samples"]
    )


# --------------------------------------------------------------------------------------------
# Draws.


def test_draws_follow_the_documented_scheme():
    key = jax.random.key(5)
    gb = R - 1  # an unpaired arm b of another size (sizes shared with the tests below)
    w_a, w_b, v = metrics._difference_draws(key, "replicas", True, S, R, R, N)
    assert v is None and w_b is w_a and w_a.shape == (S, R)
    np.testing.assert_array_equal(w_a[[0, 39]], explicit_counts(key, R, [0, 39]))
    w_a2, w_b2, v2 = metrics._difference_draws(key, "both", False, S, R, gb, N)
    np.testing.assert_array_equal(w_a2, w_a)  # arm a: the draws of bootstrap(over=replicas)
    np.testing.assert_array_equal(
        w_b2[[0, 39]], explicit_counts(jax.random.fold_in(key, 0x80000001), gb, [0, 39])
    )
    np.testing.assert_array_equal(
        v2[[0, 39]], explicit_counts(jax.random.fold_in(key, 0x80000002), N, [0, 39])
    )
    np.testing.assert_array_equal(
        metrics._difference_draws(key, "replicas", False, S, R, gb, N)[1], w_b2
    )
    no_a, no_b, v = metrics._difference_draws(key, "examples", False, 70, R, gb, N)
    assert no_a is None and no_b is None and v.shape == (70, N)
    # Both sides of the batches of 64: the draws of bootstrap(over="examples").
    np.testing.assert_array_equal(v[[0, 63, 64, 69]], explicit_counts(key, N, [0, 63, 64, 69]))
    # Sample i depends only on (key, i), not on how many samples are drawn.
    long = metrics._difference_draws(key, "both", False, 70, R, gb, N)
    for a, b in zip((w_a2, w_b2, v2), long, strict=True):
        np.testing.assert_array_equal(a, b[:S])
    np.testing.assert_array_equal(
        v, metrics._difference_draws(key, "examples", True, 70, R, R, N)[2]
    )


# --------------------------------------------------------------------------------------------
# Against the reference.


@pytest.mark.parametrize(
    "over,paired,binary,masked",
    [
        ("replicas", True, False, False),
        ("replicas", False, False, True),
        ("examples", True, False, True),
        ("examples", False, True, False),
        ("both", True, False, False),
        ("both", False, False, True),
        ("both", True, True, True),
    ],
)
def test_samples_and_intervals_match_reference(over, paired, binary, masked):
    c = None if binary else C
    xa, y = make(R, N, c, seed=1)
    xb, _ = make(R if paired else R + 1, N, c, seed=2)
    key = jax.random.key(3)
    mask = mask_b = None
    if masked:
        mask = np.array([True, False, True, True] + [True] * (len(xa) - 4))
        mask_b = None if paired else np.array([True, True, False, True, True])
    ka = np.ones(len(xa), bool) if mask is None else mask
    kb = ka if paired else (np.ones(len(xb), bool) if mask_b is None else mask_b)
    kw = {"over": over, "paired": paired, "mask": mask, "mask_b": mask_b, "num_samples": S}
    point_a, point_b, values_a, values_b = samples(xa, xb, y, key, **kw)
    w_a, w_b, v = metrics._difference_draws(key, over, paired, S, int(ka.sum()), int(kb.sum()), N)
    want_a, want_b = [], []
    for i in range(S):
        wa = np.ones(ka.sum()) if w_a is None else w_a[i]
        wb = np.ones(kb.sum()) if w_b is None else w_b[i]
        vi = np.ones(N) if v is None else v[i]
        want_a.append(reference_sample(xa[ka], y, wa, vi))
        want_b.append(reference_sample(xb[kb], y, wb, vi))
    keys = [k for k in CHECKED if k in want_a[0]]
    assert ("var_cal" in keys) == binary
    for name in keys:
        for got, want in ((values_a, want_a), (values_b, want_b)):
            want = np.array([s[name] for s in want])
            # Samples without a pair (one replica drawn every time) are undefined: NaN in the
            # reference, NaN or +-inf (0 / 0 after float32 rounding) in metrics.
            np.testing.assert_array_equal(np.isfinite(got[name]), np.isfinite(want), name)
            ok = np.isfinite(want)
            np.testing.assert_allclose(got[name][ok], want[ok], rtol=1e-5, atol=1e-8, err_msg=name)
    # The report: points, intervals and p-values of the reference differences.
    report = difference(
        xa, xb, y, key, over=over, paired=paired, mask=mask, mask_b=mask_b, num_samples=S
    )
    ones_a, ones_b = np.ones(ka.sum()), np.ones(kb.sum())
    point_ref_a = reference_sample(xa[ka], y, ones_a, np.ones(N))
    point_ref_b = reference_sample(xb[kb], y, ones_b, np.ones(N))
    assert report["num_replicas"] == [int(ka.sum()), int(kb.sum())]
    assert report["num_excluded"] == [int((~ka).sum()), int((~kb).sum())]
    assert report["num_examples"] == N
    for name in keys:
        entry = report[name]
        np.testing.assert_allclose(
            [entry["a"], entry["b"]],
            [point_ref_a[name], point_ref_b[name]],
            rtol=1e-5,
            atol=1e-8,
            err_msg=name,
        )
        assert entry["diff"] == entry["a"] - entry["b"]
        da = np.array([s[name] for s in want_a])
        db = np.array([s[name] for s in want_b])
        finite = np.isfinite(da) & np.isfinite(db)
        d = da[finite] - db[finite]
        lo, hi = np.percentile(d, [2.5, 97.5])
        np.testing.assert_allclose(entry["ci"], [lo, hi], rtol=1e-5, atol=1e-8, err_msg=name)
        assert entry["significant"] == bool(entry["ci"][0] > 0 or entry["ci"][1] < 0)
        if np.all(np.abs(d) > 1e-6):  # no difference within rounding of 0: exact p-value
            p = min(1, 2 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / (len(d) + 1))
            assert entry["p_value"] == pytest.approx(p), name


# --------------------------------------------------------------------------------------------
# Known answers.


@pytest.mark.parametrize("over", ["replicas", "examples", "both"])
def test_identical_arms_give_exactly_zero(over):
    x, y = make(R, N, C, seed=4)
    report = difference(x, x.copy(), y, jax.random.key(0), over=over, num_samples=S)
    keys = [k for k in metrics.CI_KEYS if k != "var_cal"]
    assert set(keys) <= set(report) and "var_cal" not in report
    for name in keys:
        entry = report[name]
        assert entry["diff"] == 0.0, name
        assert entry["ci"] == [0.0, 0.0], name
        assert entry["p_value"] == 1.0 and entry["significant"] is False, name


@pytest.mark.parametrize("over", ["replicas", "examples", "both"])
def test_reproducible_arm_is_significantly_better(over):
    rng = np.random.default_rng(5)
    base = rng.dirichlet(np.ones(C), size=(1, N))
    agree = (base + 0.01 * rng.dirichlet(np.ones(C), size=(R, N))) / 1.01
    noisy = rng.dirichlet(np.ones(C), size=(R, N))
    y = rng.integers(0, C, N)
    report = difference(
        agree.astype(np.float32),
        noisy.astype(np.float32),
        y,
        jax.random.key(1),
        over=over,
        num_samples=S,
    )
    for name in ("churn", "pd_abs"):
        entry = report[name]
        assert entry["diff"] < 0 and entry["ci"][1] < 0, (name, entry)
        assert entry["significant"] and entry["p_value"] < 0.1, (name, entry)
    flipped = difference(
        noisy.astype(np.float32),
        agree.astype(np.float32),
        y,
        jax.random.key(1),
        over=over,
        num_samples=S,
    )
    assert flipped["pd_abs"]["ci"][0] > 0 and flipped["pd_abs"]["significant"]


@pytest.mark.parametrize("over", ["replicas", "examples"])
def test_each_arm_matches_compare_intervals(over):
    xa, y = make(R, N, C, seed=6)
    xb, _ = make(R, N, C, seed=7)
    key = jax.random.key(8)
    num = 256  # bitwise equal from 256 replica samples on (bootstrap's batch of 256)
    for paired in (True, False):
        point_a, point_b, values_a, values_b = samples(
            xa, xb, y, key, over=over, paired=paired, num_samples=num
        )
        own = [(xa, point_a, values_a)] + ([(xb, point_b, values_b)] if paired else [])
        for x, point, values in own:  # arm b shares arm a's draws when paired
            want = metrics.compare(x, y, key=key, over=over, num_samples=num, chunk_size=CHUNK)
            for name in metrics.CI_KEYS:
                if name == "var_cal":
                    continue
                assert metrics._interval(values[name], 0.95) == want[f"{name}_ci"], name
                assert point[name] == want[name], name
    report = difference(xa, xb, y, key, over=over, num_samples=S)
    plain_a = metrics.compare(xa, y, chunk_size=CHUNK)
    plain_b = metrics.compare(xb, y, chunk_size=CHUNK)
    for name in metrics.CI_KEYS:
        if name != "var_cal":
            assert report[name]["a"] == plain_a[name] and report[name]["b"] == plain_b[name]


def test_deterministic_and_independent_of_batching():
    xa, y = make(R, N, C, seed=9)
    xb, _ = make(R, N, C, seed=10)
    key = jax.random.key(11)
    for over in ("replicas", "both"):
        a = difference(xa, xb, y, key, over=over, num_samples=S)
        b = difference(xa, xb, y, key, over=over, num_samples=S)
        assert a == b
        assert a != difference(xa, xb, y, jax.random.key(12), over=over, num_samples=S)
    for over in ("replicas", "examples", "both"):
        short = samples(xa, xb, y, key, over=over, paired=False, num_samples=64)
        long = samples(xa, xb, y, key, over=over, paired=False, num_samples=200)
        for got, want in ((short[2], long[2]), (short[3], long[3])):
            for name, values in got.items():
                np.testing.assert_array_equal(values, want[name][:64], err_msg=(over, name))


def test_report_format():
    x, y = make(R, N, None, seed=13)
    report = difference(
        x,
        x[::-1].copy(),
        y,
        jax.random.key(0),
        paired=False,
        over="examples",
        num_samples=S,
        level=0.9,
    )
    assert {
        k: report[k]
        for k in (
            "paired",
            "over",
            "num_samples",
            "level",
            "num_replicas",
            "num_examples",
            "num_excluded",
        )
    } == {
        "paired": False,
        "over": "examples",
        "num_samples": S,
        "level": 0.9,
        "num_replicas": [R, R],
        "num_examples": N,
        "num_excluded": [0, 0],
    }
    assert set(report) - {
        "paired",
        "over",
        "num_samples",
        "level",
        "num_replicas",
        "num_examples",
        "num_excluded",
    } == set(metrics.CI_KEYS)
    for name in metrics.CI_KEYS:
        entry = report[name]
        assert set(entry) == {"a", "b", "diff", "ci", "p_value", "significant"}
        assert all(type(entry[k]) is float for k in ("a", "b", "diff", "p_value"))
        assert isinstance(entry["ci"], list) and type(entry["significant"]) is bool
    # Unpaired over examples, replica order does not matter (churn counts votes: exact).
    assert report["churn"]["diff"] == 0.0 and report["churn"]["ci"] == [0.0, 0.0]


def test_no_finite_sample_gives_nan_interval():
    # Samples where either arm is undefined (NaN or inf: no pair) are left out.
    summary = metrics._paired_summary(
        0.1, 0.2, np.array([np.nan, 0.3]), np.array([0.2, np.inf]), 0.95
    )
    assert math.isnan(summary["ci"][0]) and math.isnan(summary["ci"][1])
    assert math.isnan(summary["p_value"]) and summary["significant"] is False
    summary = metrics._paired_summary(
        0.3, 0.1, np.array([0.3, 0.4, np.nan]), np.array([0.1, 0.1, 0.0]), 0.95
    )
    assert summary["ci"][0] > 0 and summary["significant"]
    assert summary["p_value"] == pytest.approx(min(1, 2 * (0 + 1) / 3))


# --------------------------------------------------------------------------------------------
# Validation.


def test_invalid_inputs_raise_named_errors():
    x, y = make(R, N, C, seed=14)
    key = jax.random.key(0)

    def raises(match, xa=x, xb=x, labels=y, **kw):
        with pytest.raises(ValueError, match=match):
            difference(xa, xb, labels, key, **{"num_samples": S, **kw})

    raises("same shape", xb=x[:3])
    raises("same shape", xb=np.concatenate([x, x[:1]]))
    raises("same N examples", xb=x[:, :5], paired=False)
    raises("same N examples", xb=x[..., :2] / x[..., :2].sum(-1, keepdims=True), paired=False)
    raises("labels must have shape", labels=y[:5])
    raises("labels out of range", labels=np.full(N, C))
    raises("labels must be integers", labels=y.astype(float))
    raises("over must be 'replicas', 'examples' or 'both'", over="pairs")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        difference(x, x, y, key, num_samples=0)
    with pytest.raises(ValueError, match="num_samples must be an integer"):
        difference(x, x, y, key, num_samples=10.0)
    raises(r"level must lie in \(0, 1\)", level=1.0)
    raises(r"level must lie in \(0, 1\)", level=0.0)
    raises("mask_b must be None when paired", mask_b=np.ones(R, bool))
    raises("probs_a: .*at least 2 replicas.*masked out", mask=np.array([True] + [False] * 3))
    raises("probs_b: .*at least 2 replicas", xb=x[:1], paired=False)
    raises("probs_b: mask must be", paired=False, mask_b=np.ones(3, bool))
    raises("probs_a: probs must have rank", xa=x[0, 0])
    bad = x.copy()
    bad[1, 2] = np.nan
    raises(r"probs_b: probs has non-finite values .*replicas \[1\]", xb=bad)
    raises(r"probs_b: probs has non-finite values", xb=bad, over="both")
    difference(x, bad, y, key, num_samples=S, mask=np.array([True, False, True, True]))
