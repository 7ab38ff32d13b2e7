"""The regulariser study: the binary end to end with --quick, determinism and resumption,
config validation, the arms' tasks, and the paired two-way test (``metrics.difference``) on
inputs whose answer is known."""

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import app, flags

from jaxrepro import engine, losses, metrics, optim, plots, study
from jaxrepro.studies import regularizers as reg
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
    assert "| optimizer | regularizer | acc_mean | churn | eta |" in proc.stdout
    assert "config 3/3 d2/adam/layernorm epoch 2/2" in proc.stderr
    report = (workdir / "report.md").read_text()
    assert report.startswith("# Do regularisers improve reproducibility?")
    assert "paired two-way bootstrap" in report and "Findings:" in report
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
