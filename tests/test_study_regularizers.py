"""The regulariser study: the binary end to end with --quick, determinism and resumption,
config validation, the arms' tasks, and the paired two-way test (``metrics.difference``) on
inputs whose answer is known."""

import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import app, flags

from jaxrepro import engine, files, losses, metrics, optim, plots, randomness, study
from jaxrepro.studies import regularizers as reg
from jaxrepro.studies import regularizers_report, render, stats
from jaxrepro.studies.regularizers import RegularizersConfig

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, binary_body):
    """The binary's --quick run, in this process (shared: it is the slow part of this file;
    tests/test_experiments.py runs the binary files themselves)."""
    workdir = tmp_path_factory.mktemp("regularizers") / "quick"
    return workdir, binary_body(RegularizersConfig, ["--quick", f"--workdir={workdir}"])


@pytest.mark.slow
def test_binary_quick_end_to_end(quick_run):
    workdir, proc = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["study"] == "regularizers" and results["complete"] is True
    assert json.loads((workdir / "config.json").read_text())["config"] == results["config"]
    records = results["results"]
    assert list(records) == ["d2/adam/none", "d2/adam/dropout", "d2/adam/layernorm"]
    # The verdict numbers are in results.json, and are what summarise gives from the records.
    config = reg.RegularizersConfig.from_dict(results["config"])
    assert results["summary"] == files.to_json(reg.summarise(config, records))
    assert set(results["summary"]) >= {"overall"}
    base = records["d2/adam/none"]
    assert "paired" not in base
    for name, rec in records.items():
        assert rec["diverged"] == [], name
        m = rec["metrics"]
        assert m["num_replicas"] == 4 and m["num_examples"] == 256
        for key in ("acc_mean", "churn", "eta", "pd_abs"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key)
            lo, hi = m[key + "_ci"]
            assert lo <= hi, (name, key)
        if rec["info"]["regularizer"] == "none":
            continue
        paired = rec["paired"]
        assert paired["num_replicas"] == [4, 4] and paired["excluded"] == []
        assert paired["paired"] is True and paired["over"] == "both"
        for key in reg.PAIRED_METRICS:
            p = paired[key]
            # No replica was excluded, so each arm's point estimate is its trial's metric.
            assert p["a"] == pytest.approx(m[key], abs=1e-6), (name, key)
            assert p["b"] == pytest.approx(base["metrics"][key], abs=1e-6), (name, key)
            assert p["ci"][0] <= p["ci"][1] and 0 < p["p_value"] <= 1
            assert p["significant"] == (p["ci"][0] > 0 or p["ci"][1] < 0)
            assert p["p_value"] <= p["p_holm"] <= 1
        assert set(rec["wilcoxon"]) == {"test", "pd_abs", "churn"}
    for name, rec in records.items():  # the source repository's test of every arm
        w = rec["source_wilcoxon"]
        assert w["n"] == 6 and 0 < w["p_value"] <= w["p_holm"] <= 1, name
    assert "| optimizer | regularizer | acc_mean | churn | eta |" in proc.stdout
    assert "config 3/3 d2/adam/layernorm epoch 2/2" in proc.stderr
    report = (workdir / "report.md").read_text()
    assert report.startswith("# Do regularisers improve reproducibility?")
    assert "paired two-way bootstrap" in report and "Findings:" in report
    # One (depth, optimizer) cell: a pooled difference but no interval, hence no verdict.
    assert "(cells: 1; it needs 6): no verdict" in report
    assert "Wilcoxon pd_abs: W, p / p Holm" in report
    for png in ("churn_eta.png", "pd_difference.png"):
        assert plots.is_png(workdir / png), png
        assert f"({png})" in report


@pytest.mark.slow
def test_interrupted_run_retrains_to_the_same_bytes(quick_run, tmp_path, binary_body):
    # An interruption after the baseline and dropout arms: a rerun trains the layernorm
    # arm again from scratch (the baseline's predictions are read back from the workdir, not
    # retrained); results.json comes out byte for byte as in the uninterrupted run.
    workdir, proc = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = (workdir / "results.json").read_bytes()
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    (resumed / "results.json").unlink()
    study.predictions_path(resumed, "d2/adam/layernorm").unlink()
    shutil.rmtree(resumed / "checkpoints" / study.slug("d2/adam/layernorm"))
    again = binary_body(RegularizersConfig, ["--quick", f"--workdir={resumed}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "config 3/3 d2/adam/layernorm epoch 1/2" in again.stderr
    assert "d2/adam/none" not in again.stderr  # the baseline is not trained again
    assert (resumed / "results.json").read_bytes() == first


@pytest.mark.slow
def test_wilcoxon_and_holm_recomputed_from_saved_predictions(quick_run):
    """The per-cell Wilcoxon test and the Holm-adjusted p-values of results.json, recomputed
    from the run's saved predictions with scipy and explicit pair loops."""
    from scipy import stats as sps

    workdir, proc = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((workdir / "results.json").read_text())["results"]
    report = (workdir / "report.md").read_text()
    config = RegularizersConfig.quick()
    preds = {t.name: study.load_predictions(workdir, t.name) for t in reg.trials(config)}
    base = preds["d2/adam/none"]
    for name in ("d2/adam/dropout", "d2/adam/layernorm"):
        arm, w = preds[name], records[name]["wilcoxon"]
        both = arm.keep & base.keep
        for metric, term in (("pd_abs", _pair_tv), ("churn", _pair_disagree)):
            a, b = term(arm.probs[both]), term(base.probs[both])
            ref = sps.wilcoxon(a, b)
            assert w[metric]["p_value"] == pytest.approx(ref.pvalue, rel=1e-4), (name, metric)
            assert w[metric]["statistic"] == pytest.approx(ref.statistic, abs=1), (name, metric)
            assert w[metric]["median_diff"] == pytest.approx(np.median(a - b), abs=1e-6)
        row = next(
            line for line in report.splitlines() if line.startswith(f"| adam | {name[8:]} |")
        )
        assert f"{w['pd_abs']['statistic']:g}, {render.fmt(w['pd_abs']['p_value'], 3)}" in row
    for name, rec in records.items():  # ex_mlp.py's test: wilcoxon(pairwise churns)
        keep = preds[name].keep
        yhat = preds[name].probs[keep].argmax(-1)
        churns = [np.mean(yhat[r] != yhat[s]) for r, s in itertools.combinations(range(4), 2)]
        assert rec["source_wilcoxon"]["p_value"] == pytest.approx(sps.wilcoxon(churns).pvalue)
    # Holm over the two comparisons of each family, by hand: the smaller p doubled, the larger
    # p raised to that (capped at 1).
    for family in [("paired", m) for m in reg.PAIRED_METRICS] + [("wilcoxon", "pd_abs")]:
        lo, hi = sorted(
            (records[n][family[0]][family[1]] for n in ("d2/adam/dropout", "d2/adam/layernorm")),
            key=lambda e: e["p_value"],
        )
        assert lo["p_holm"] == pytest.approx(min(1.0, 2 * lo["p_value"]), rel=1e-12), family
        want = min(1.0, max(2 * lo["p_value"], hi["p_value"]))
        assert hi["p_holm"] == pytest.approx(want, rel=1e-12), family


def _pair_tv(probs):
    """Per example, the mean over replica pairs of the total variation (float64 pair loop)."""
    p = np.asarray(probs, np.float64)
    pairs = itertools.combinations(range(len(p)), 2)
    return np.mean([0.5 * np.abs(p[r] - p[s]).sum(-1) for r, s in pairs], axis=0)


def _pair_disagree(probs):
    yhat = np.asarray(probs).argmax(-1)
    pairs = itertools.combinations(range(len(yhat)), 2)
    return np.mean([yhat[r] != yhat[s] for r, s in pairs], axis=0)


# ---------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize(
    "field, value",
    [
        ("depths", (2, 0)),
        ("depths", (2, 2)),
        ("width", 0),
        ("regularizers", ("none",)),
        ("regularizers", ("dropout", "l1")),
        ("regularizers", ()),
        ("optimizers", ("adam", "rmsprop")),
        ("sgd_learning_rate", 0.0),
        ("adam_learning_rate", math.nan),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("dropout_rate", 1.0),
        ("label_smoothing", -0.1),
        ("vary", ("init", "bogus")),
        ("replicas", 1),
        ("epochs", 0),
        ("dataset", "cifar10"),
        ("num_samples", 0),
        ("level", 1.0),
        ("seed", -1),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(study.ConfigError) as e:
        RegularizersConfig(**{field: value})
    assert e.value.fields == (field,)


def test_batch_larger_than_training_set_names_batch_size():
    with pytest.raises(study.ConfigError) as e:
        reg.trials(RegularizersConfig.quick(num_train=64, batch_size=128))
    assert e.value.fields == ("batch_size",)


def test_bad_flag_is_a_usage_error_before_training(tmp_path):
    fv = flags.FlagValues()
    study.define_flags(RegularizersConfig, fv)
    fv(["prog", "--quick", "--optimizers=sgd,rmsprop", f"--workdir={tmp_path}"])
    with pytest.raises(app.UsageError, match="--optimizers"):
        study.main(RegularizersConfig, ["prog"], flag_values=fv)
    assert not (tmp_path / "config.json").exists()


def test_config_round_trips_and_empty_vary_is_the_control():
    config = RegularizersConfig(vary=())
    assert RegularizersConfig.from_dict(config.to_dict()) == config
    assert study.CONFIGS["regularizers"] is RegularizersConfig


def test_each_arm_switches_on_one_regulariser():
    config = RegularizersConfig()
    base = reg._task(config, 10, 6, "momentum", "none")
    assert base == reg._task(config, 10, 6, "momentum", "none")  # shared compilations
    assert base.model.widths == (128,) * 6
    assert (base.model.dropout_rate, base.model.norm, base.model.residual) == (0.0, None, False)
    assert base.loss_fn == engine.DEFAULT_LOSS
    assert base.tx is optim.optimizer("momentum", 0.03, momentum=0.9)
    arm = {r: reg._task(config, 10, 6, "momentum", r) for r in reg.REGULARIZERS}
    assert arm["dropout"].model.dropout_rate == 0.1
    assert arm["layernorm"].model.norm == "layer" and arm["batchnorm"].model.norm == "batch"
    assert arm["residual"].model.residual
    assert arm["label_smoothing"].loss_fn == losses.label_smoothing(engine.DEFAULT_LOSS, 0.1)
    assert arm["weight_decay"].tx is optim.optimizer(
        "momentum", 0.03, momentum=0.9, weight_decay=5e-4
    )
    for name, task in arm.items():  # everything else is the baseline's
        assert (task.model == base.model) == (name in ("weight_decay", "label_smoothing"))
        assert (task.tx is base.tx) == (name != "weight_decay")
        assert (task.loss_fn == base.loss_fn) == (name != "label_smoothing")


def test_arms_share_the_initial_weights_of_replica_r():
    # The pairing: with the same init key, every arm starts from the baseline's Dense weights
    # (a norm layer or a skip connection adds no draw that shifts them).
    import jax
    import jax.numpy as jnp

    config = RegularizersConfig(width=16)
    x, key = jnp.zeros((1, 40)), jax.random.key(3)

    def params(arm):
        model = reg._task(config, 10, 3, "adam", arm).model
        return model.init({"params": key}, x, train=False)["params"]

    base = params("none")
    for arm in ("layernorm", "batchnorm", "residual"):  # the others keep the baseline's model
        p = params(arm)
        for layer in ("dense_0", "dense_1", "dense_2", "head"):
            np.testing.assert_array_equal(p[layer]["kernel"], base[layer]["kernel"])


# ---------------------------------------------------------------------------------------------
# The paired test: metrics.difference as the study calls it (paired, replicas and examples).


def paired_bootstrap(a, b, labels, *, seed=0, **kwargs):
    return metrics.difference(
        a, b, labels, jax.random.key(seed), paired=True, over="both", **kwargs
    )


def _probs(seed, r, n, c=4, *, same=False):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(c), size=(1 if same else r, n))
    return np.broadcast_to(p, (r, n, c)).astype(np.float32)


def test_identical_arms_are_not_significant():
    p = _probs(0, 8, 200)  # the tests of the paired test share shapes (and compilations)
    labels = np.random.default_rng(1).integers(0, 4, 200)
    out = paired_bootstrap(p, p.copy(), labels, num_samples=300)
    for key in reg.PAIRED_METRICS:
        r = out[key]
        assert r["diff"] == 0.0 and r["ci"] == [0.0, 0.0], key
        assert r["p_value"] == 1.0 and r["significant"] is False, key


def test_clearly_different_arms_are_significant():
    # Arm a: independent random replicas (high PD); arm b: identical replicas (PD exactly 0).
    a, b = _probs(0, 8, 200), _probs(1, 8, 200, same=True)
    labels = np.random.default_rng(2).integers(0, 4, 200)
    out = paired_bootstrap(a, b, labels, num_samples=400, seed=3)
    for key in ("pd_abs", "churn"):
        r = out[key]
        assert r["b"] == 0.0 and r["diff"] == r["a"] > 0.2, key
        assert 0 < r["ci"][0] <= r["diff"] <= r["ci"][1], key
        assert r["significant"] is True and r["p_value"] <= 2 / 401, key
    assert out["eta"]["significant"] and out["eta"]["diff"] < 0
    assert out["num_replicas"] == [8, 8] and out["num_examples"] == 200


def test_paired_point_estimates_match_compare_and_mask():
    a, b = _probs(4, 6, 120), _probs(5, 6, 120)
    labels = np.random.default_rng(6).integers(0, 4, 120)
    mask = np.array([True, True, False, True, True, True])
    out = paired_bootstrap(a, b, labels, mask=mask, num_samples=50)
    for arm, probs in (("a", a), ("b", b)):
        ref = metrics.compare(probs, labels, mask=mask)
        for key in reg.PAIRED_METRICS:
            assert out[key][arm] == pytest.approx(ref[key], abs=1e-6), (arm, key)
    unmasked = paired_bootstrap(a[mask], b[mask], labels, num_samples=50)
    assert out["num_excluded"] == [1, 1] and unmasked["num_excluded"] == [0, 0]
    assert {**out, "num_excluded": None} == {**unmasked, "num_excluded": None}
    again = paired_bootstrap(a, b, labels, mask=mask, num_samples=50)
    other = paired_bootstrap(a, b, labels, mask=mask, num_samples=50, seed=1)
    assert again == out and other["pd_abs"]["ci"] != out["pd_abs"]["ci"]


def test_pairing_narrows_the_interval():
    # Arm a is arm b plus a small shift on every replica: the replica-to-replica spread is
    # shared, so the paired difference is known far more precisely than either arm's PD.
    b = _probs(7, 8, 200)
    a = 0.9 * b + 0.1 / 4
    labels = np.zeros(200, int)
    out = paired_bootstrap(a, b, labels, num_samples=300)
    r = out["pd_abs"]
    assert r["diff"] == pytest.approx(-0.1 * r["b"], rel=1e-5)
    assert r["significant"] and r["ci"][1] < 0
    assert r["ci"][1] - r["ci"][0] < 0.2 * abs(r["diff"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(b_shape=(4, 11, 3)), "shape"),
        (dict(mask=np.array([True, False, False, False])), "at least 2"),
        (dict(nan=True), "finite"),
        (dict(num_samples=0), "num_samples"),
        (dict(level=1.5), "level"),
    ],
)
def test_paired_bootstrap_rejects_bad_inputs(kwargs, match):
    a = _probs(0, 4, 10, 3)
    b = _probs(1, *kwargs.pop("b_shape", (4, 10, 3)))
    if kwargs.pop("nan", False):
        a = a.copy()
        a[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, np.zeros(10, int), **kwargs)


def test_analysis_pairs_each_arm_with_its_baseline():
    """The pure analysis on hand-made predictions: the baseline has no paired test; a
    regularised arm whose replicas agree more is significantly lower; a replica that diverged
    in an arm is left out of that arm's comparison, in both arms."""
    config = RegularizersConfig.quick()
    info = {t.name: t.info for t in reg.trials(config)}
    labels = np.random.default_rng(1).integers(0, 4, 200)
    base = _probs(0, 8, 200)
    closer = (0.5 * base + 0.5 * base.mean(axis=0, keepdims=True)).astype(np.float32)
    other = _probs(2, 8, 200).copy()
    other[3] = np.nan

    def pred(name, probs):
        keep = np.isfinite(probs).all(axis=(1, 2))
        zeros = np.zeros(8, np.float32)
        return study.Predictions(info[name], probs, labels, np.arange(8), keep, zeros, zeros)

    names = ["d2/adam/none", "d2/adam/dropout", "d2/adam/layernorm"]
    preds = {n: pred(n, p) for n, p in zip(names, (base, closer, other), strict=True)}
    records = reg.analyse(config, preds).records
    assert list(records) == names and "paired" not in records["d2/adam/none"]
    lower = records["d2/adam/dropout"]["paired"]
    assert lower["pd_abs"]["significant"] and lower["pd_abs"]["diff"] < 0
    assert lower["excluded"] == [] and lower["over"] == "both"
    masked = records["d2/adam/layernorm"]
    assert masked["diverged"] == [3] and masked["metrics"]["num_replicas"] == 7
    assert masked["paired"]["excluded"] == [3] and masked["paired"]["num_replicas"] == [7, 7]
    ref = metrics.compare(base, labels, mask=np.arange(8) != 3)
    assert masked["paired"]["pd_abs"]["b"] == pytest.approx(ref["pd_abs"], abs=1e-6)
    # The per-example Wilcoxon test over the replicas finite in both arms: the arm whose
    # replicas agree more is lower on (nearly) every example; the unrelated arm is not.
    from scipy import stats as sps

    keep = np.arange(8) != 3
    w = masked["wilcoxon"]["pd_abs"]
    ref = sps.wilcoxon(_pair_tv(other[keep]), _pair_tv(base[keep]))
    assert w["p_value"] == pytest.approx(ref.pvalue, rel=1e-4) and w["n"] == 200
    closer_w = records["d2/adam/dropout"]["wilcoxon"]["pd_abs"]
    assert closer_w["median_diff"] < 0 and closer_w["p_value"] < 1e-20
    # Holm over the two comparisons (hand formula), and the baseline's source test.
    p = sorted(records[n]["paired"]["pd_abs"]["p_value"] for n in names[1:])
    holm = sorted(records[n]["paired"]["pd_abs"]["p_holm"] for n in names[1:])
    assert holm == pytest.approx([min(1, 2 * p[0]), min(1, max(2 * p[0], p[1]))], rel=1e-12)
    assert records["d2/adam/none"]["source_wilcoxon"]["n"] == 28
    assert masked["source_wilcoxon"]["n"] == 21  # pairs of the 7 finite replicas


# ---------------------------------------------------------------------------------------------
# Verdicts from pooled differences (hand-made records: no training, no bootstrap of predictions).

GRID = dict(
    depths=(2, 4, 6), optimizers=("sgd", "momentum", "adam"), regularizers=("dropout", "layernorm")
)


def _records(config, diffs, p_holm, acc=None):
    """Records as results.json holds them, with the given paired differences (the same for
    every metric) and Holm-adjusted p-values per regularised trial; ``acc`` overrides a
    trial's mean accuracy (default 0.8, 10 classes)."""
    acc = acc or {}
    out = {}
    for depth in config.depths:
        for optimizer in config.optimizers:
            for arm in reg.arms(config):
                name = reg.trial_name(depth, optimizer, arm)
                a = acc.get(name, 0.8)
                values = {"acc_mean": a, "churn": 0.1, "eta": a - 0.1, "pd_abs": 0.05}
                m = {**values, **{f"{k}_ci": [v - 0.01, v + 0.01] for k, v in values.items()}}
                info = dict(depth=depth, optimizer=optimizer, regularizer=arm, num_classes=10)
                rec = {
                    "info": {**info, "num_test": 100},
                    "diverged": [],
                    "metrics": m,
                    "source_wilcoxon": {"statistic": 0.0, "p_value": 1e-5, "p_holm": 1e-4},
                }
                if arm != reg.BASELINE:
                    d = diffs[name]
                    entry = {"diff": d, "ci": [d - 0.002, d + 0.002], "p_value": 0.5}
                    rec["paired"] = {
                        k: {**entry, "p_holm": p_holm.get(name, 1.0)} for k in reg.PAIRED_METRICS
                    }
                    w = {"statistic": 10.0, "p_value": 0.5, "p_holm": 1.0}
                    rec["wilcoxon"] = {"pd_abs": w, "churn": w}
                out[name] = rec
    return out


def _section_row(lines, depth, start):
    """The first table row of the '## Depth d' section that starts with ``start``."""
    i = lines.index(f"## Depth {depth}")
    return next(x for x in lines[i:] if x.startswith(start))


def test_verdicts_rest_on_the_pooled_interval_not_on_counts(tmp_path):
    """The issue's case: the regularised - baseline differences of nine cells, one cell moving
    by a last bit across the Holm threshold. The count of significant cells changes; the
    pooled differences, their intervals and the verdict words do not."""
    config = RegularizersConfig.quick(**GRID)
    cells = [f"d{d}/{o}" for d in config.depths for o in config.optimizers]
    dropout = [-0.004, -0.006, 0.001, -0.003, -0.005, -0.002, 0.002, -0.004, -0.001]
    layernorm = [0.004, -0.006, 0.001, -0.003, 0.005, -0.002, 0.002, -0.004, 0.003]
    diffs = {f"{c}/dropout": x for c, x in zip(cells, dropout, strict=True)}
    diffs |= {f"{c}/layernorm": x for c, x in zip(cells, layernorm, strict=True)}
    acc = {"d6/adam/layernorm": 0.1}  # did not learn: left out of the pooled differences
    edge = "d4/sgd/dropout"
    before = _records(config, diffs, {edge: 0.0499, "d2/sgd/dropout": 0.001}, acc)
    nudged = dict(diffs, **{edge: float(np.nextafter(diffs[edge], 0.0))})
    after = _records(config, nudged, {edge: 0.0501, "d2/sgd/dropout": 0.001}, acc)

    s = reg.summarise(config, before)
    key = randomness.bootstrap_key(config.seed, stats.POOLED_STREAM)
    kw = dict(num_samples=config.num_samples, level=config.level)
    want = stats.pooled_difference(dropout, cells, key, **kw)
    assert want["ci"][1] < 0  # the nine dropout cells: lower
    assert s["regularizers"]["dropout"]["pd_abs"] == {
        **want,
        "lower": ["d2/sgd", "d4/sgd"],
        "higher": [],
    }
    want_ln = stats.pooled_difference(layernorm[:8], cells[:8], key, **kw)
    assert s["regularizers"]["layernorm"]["churn"] == {**want_ln, "lower": [], "higher": []}
    assert want_ln["num_comparisons"] == 8 and want_ln["ci"][0] < 0 < want_ln["ci"][1]
    want_all = stats.pooled_difference(dropout + layernorm[:8], cells + cells[:8], key, **kw)
    assert s["overall"]["pd_abs"] == want_all and want_all["num_clusters"] == 9
    assert s["left_out"] == ["d6/adam/layernorm"] and s["family"] == 18

    lines = [
        "\n".join(regularizers_report.render(config, study.Analysis(records=r), tmp_path))
        for r in (before, after)
    ]
    lines = [t.splitlines() for t in lines]
    drop = [next(x for x in ls if x.startswith("- dropout")) for ls in lines]
    pd_text = render.pooled_text(want, unit="cells")
    assert f"pd_abs {pd_text}; Holm: lower in d2/sgd, d4/sgd; churn" in drop[0]
    assert f"pd_abs {pd_text}; Holm: lower in d2/sgd; churn" in drop[1]  # the count moved,
    verdicts = [[x for x in ls if x.startswith(("- Overall", "- layernorm"))] for ls in lines]
    assert verdicts[0] == verdicts[1]  # the verdicts did not
    assert f"churn {render.pooled_text(want_ln, unit='cells')}" in verdicts[0][0]
    assert "interval holds 0, no consistent effect" in verdicts[0][0]
    overall = verdicts[0][1]
    assert overall.startswith("- Overall pd_abs, all regularisers (17 comparisons in 9 cells")
    assert render.pooled_text(want_all, unit="cells") in overall
    # The per-cell flags follow p_holm: d4/sgd/dropout is 'lower' before, 'n.s.' after.
    flags_ = [_section_row(ls, 4, "| sgd | dropout |").split(" | ")[8] for ls in lines]
    assert flags_ == ["lower", "n.s."]


def test_holm_out_of_reach_is_named():
    # 18 comparisons at 95% need p <= 0.05 / 18; 200 bootstrap samples give p >= 2 / 201.
    config = RegularizersConfig.quick(**GRID)
    names = [
        reg.trial_name(d, o, r)
        for d in config.depths
        for o in config.optimizers
        for r in config.regularizers
    ]
    records = _records(config, dict.fromkeys(names, -0.001), {})
    note = regularizers_report._floor_note(reg.summarise(config, records))
    assert "so over 18 comparisons no cell can be significant after Holm" in note
    assert f"num_samples >= {math.ceil(2 * 18 / 0.05 - 1)} would allow it" in note
    enough = dataclasses.replace(config, num_samples=800)  # 2 / 801 <= 0.05 / 18
    assert regularizers_report._floor_note(reg.summarise(enough, records)) == ""
