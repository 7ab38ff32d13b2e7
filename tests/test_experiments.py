"""The experiment binaries end to end with --quick: results, reports, plots and usage errors.

The main binary runs as a real subprocess; the other two studies run in-process through the
library entry point the binaries call (``study.run``), which is faster and shares compilation.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest
from absl import app, flags

from jaxrepro import data, engine, metrics, models, plots, portable, study

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"info", "diverged", "diverged_epochs", "train_loss", "train_accuracy", "metrics"}


def _binary(name, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _check_results(workdir: Path, study_name: str, *, binary: bool = False) -> dict:
    results = json.loads((workdir / "results.json").read_text())
    assert results["study"] == study_name and results["complete"] is True
    assert {"jax", "flax", "optax"} <= set(results["versions"])
    assert json.loads((workdir / "config.json").read_text())["config"] == results["config"]
    for name, record in results["results"].items():
        assert RECORD_KEYS <= set(record), name
        assert record["diverged"] == []
        m = record["metrics"]
        keys = set(metrics.METRIC_KEYS) | ({"var_cal"} if binary else set())
        assert keys <= set(m), (name, keys - set(m))
        # Identical replicas (the control, or window 1 with only the order varied): no
        # variance predicted, so no ratio (0 / 0).
        identical = m["var_ind"] == 0.0
        assert identical == (record["info"].get("setting") == "nothing" or m["pd_abs"] == 0.0)
        for key in keys:
            if identical and key == "var_ratio":
                assert m[key] is None
            else:
                assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key, m[key])
        assert m["num_replicas"] == results["config"]["replicas"]
    report = (workdir / "report.md").read_text()
    assert report.startswith("# ")
    assert (workdir / "progress.log").read_text().count("epoch") > 0
    # What the numbers were computed with: the mode asked for and the machine. Every caller
    # runs a binary, which computes in portable mode by default (on x86-64).
    assert results["portable"] is portable.is_x86_64()
    machine = results["machine"]
    assert machine["portable"] is portable.active() and machine["backend"] == "cpu"
    assert machine["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert portable.describe(machine) in report
    return results


@pytest.mark.slow
def test_main_binary_quick_end_to_end(tmp_path):
    workdir = tmp_path / "irr"
    proc = _binary("irreproducibility", "--quick", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _check_results(workdir, "irreproducibility")
    assert list(results["results"]) == ["relu/nothing", "relu/all"]
    control, varied = (results["results"][k]["metrics"] for k in ("relu/nothing", "relu/all"))
    assert control["churn"] == 0.0 and control["pd_abs"] == 0.0
    assert varied["churn"] > 0.0
    # The table is printed at the end; progress goes to stderr.
    assert "| activation | setting | acc_mean | acc_std | churn |" in proc.stdout
    assert "config 2/2 relu/all epoch 2/2" in proc.stderr
    assert plots.is_png(workdir / "churn.png")
    # Intervals on the table's churn, pd_abs, eta and var_ratio, and the multiplicity section.
    m = varied
    lo, hi = m["churn_ci"]
    assert lo <= m["churn"] <= hi
    assert f"{m['churn']:.3f} [{lo:.3f}, {hi:.3f}]" in proc.stdout
    assert "## Multiplicity and the variance of accuracy" in proc.stdout
    for key in ("eta", "var_ratio", "var_dist", "ambiguity", "churn_max"):
        assert len(m[f"{key}_ci"]) == 2, key
    assert any((workdir / "checkpoints").iterdir())
    assert not [p for p in workdir.rglob("*.tmp")]
    # One record recomputed here from the documented recipe, without the study code: the
    # config's MLP with Adam on the first num_train / num_test MNIST-1D examples, every source
    # varied, compared on the test split.
    cfg = results["config"]
    full = data.load("mnist1d")
    ds = data.Dataset(
        full.x_train[: cfg["num_train"]],
        full.y_train[: cfg["num_train"]],
        full.x_test[: cfg["num_test"]],
        full.y_test[: cfg["num_test"]],
        num_classes=10,
    )
    model = models.MLP(
        widths=tuple(cfg["widths"]),
        num_classes=10,
        activation="relu",
        dropout_rate=cfg["dropout_rate"],
    )
    run = engine.fit(
        model,
        optax.adam(cfg["learning_rate"]),
        ds,
        replicas=cfg["replicas"],
        seed=cfg["seed"],
        vary="all",
        batch_size=cfg["batch_size"],
        epochs=cfg["epochs"],
        perturb_scale=cfg["perturb_scale"],
        strategy="map",
    )
    want = metrics.compare(run.predict(ds.x_test), ds.y_test)
    for key in metrics.METRIC_KEYS:
        assert varied[key] == pytest.approx(want[key], rel=1e-7, abs=1e-12), key
    assert results["results"]["relu/all"]["train_loss"] == pytest.approx(
        float(np.mean(run.history["loss"][:, -1])), rel=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, flag",
    [
        ("synthetic", "--grid_windows"),
        ("test_set_variance", "--bootstrap_over"),
        ("anti_distillation", "--lambdas"),
        ("regularizers", "--regularizers"),
        ("chaos", "--scales"),
    ],
)
def test_every_binary_starts_and_lists_its_flags(name, flag):
    # The other binaries' bodies run in-process in their study's tests (study.main); here the
    # files themselves: they import, define their flags and answer --help.
    proc = _binary(name, "--help", timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # absl's --help exits with 1
    assert flag in proc.stdout and "--workdir" in proc.stdout and "--quick" in proc.stdout


@pytest.mark.slow
def test_main_binary_bad_flag_is_a_usage_error_before_training(tmp_path):
    proc = _binary(
        "irreproducibility",
        "--quick",
        "--activations=relu,softmaxx",
        f"--workdir={tmp_path / 'w'}",
        timeout=120,
    )
    assert proc.returncode == 1
    assert "--activations" in proc.stderr and "softmaxx" in proc.stderr
    assert not (tmp_path / "w").exists()


def _main_in_process(cls, argv):
    fv = flags.FlagValues()
    study.define_flags(cls, fv)
    fv(["prog", *argv])
    return study.main(cls, ["prog"], flag_values=fv)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--replicas=1"], "--replicas"),
        (["--settings=init,everything"], "--settings"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(tmp_path, argv, flag):
    with pytest.raises(app.UsageError, match=flag):
        _main_in_process(study.IrreproducibilityConfig, ["--quick", f"--workdir={tmp_path}", *argv])
    assert not (tmp_path / "config.json").exists()


def test_workdir_holding_another_config_is_a_usage_error(tmp_path):
    study.prepare_workdir(tmp_path, study.IrreproducibilityConfig.quick())
    with pytest.raises(app.UsageError, match="--epochs"):
        _main_in_process(
            study.IrreproducibilityConfig, ["--quick", "--epochs=3", f"--workdir={tmp_path}"]
        )
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


@pytest.mark.slow
def test_synthetic_binary_quick(tmp_path, binary_body):
    proc = binary_body(study.SyntheticConfig, ["--quick", f"--workdir={tmp_path}"])
    results = _check_results(tmp_path, "synthetic", binary=True)
    assert "| shuffling window w |" in proc.stdout
    # Trials shared by several grids are trained once: the base student appears once, and the
    # window grid (order varied alone) adds w = 1 and w = N.
    assert len(results["results"]) == 4
    by_window = {
        r["info"]["window"]: r["metrics"]
        for r in results["results"].values()
        if r["info"]["vary"] == ["order"]
    }
    # The documented row: window 1 with only the order varied gives identical replicas, so
    # every difference is exactly 0; the full shuffle (w = N) does not.
    assert set(by_window) == {1, results["config"]["num_train"]}
    for key in ("pd_abs", "pd_rel", "pd_l2", "churn"):
        assert by_window[1][key] == 0.0, key
        assert by_window[results["config"]["num_train"]][key] > 0.0, key
    report = (tmp_path / "report.md").read_text()
    for grid in ("activation", "source", "window", "width", "depth"):
        assert plots.is_png(tmp_path / f"synthetic_{grid}.png"), grid
        assert f"![{grid}](synthetic_{grid}.png)" in report
    assert "| shuffling window w | pd_abs | pd_rel | churn |" in report


@pytest.mark.slow
def test_test_set_variance_binary_quick(tmp_path, binary_body):
    config = study.TestSetVarianceConfig.quick()
    binary_body(study.TestSetVarianceConfig, ["--quick", f"--workdir={tmp_path}"])
    results = _check_results(tmp_path, "test_set_variance")
    binary = results["results"]["mnist1d_binary/all"]["metrics"]
    assert math.isfinite(binary["var_cal"]) and binary["var_cal"] > 0
    for record in results["results"].values():
        m = record["metrics"]
        for key in ("var_obs", "var_ind", "var_ratio", "acc_mean"):
            lo, hi = m[f"{key}_ci"]
            assert lo <= hi, key
        assert sum(record["phat_hist"]) == record["info"]["num_test"]
        assert len(record["acc_replicas"]) == config.replicas
    report = (tmp_path / "report.md").read_text()
    assert "var_cal" in report and "errors" in report
    assert plots.is_png(tmp_path / "phat_hist.png")
    assert plots.is_png(tmp_path / "std_observed_vs_predicted.png")


def test_main_job_compares_activations_with_a_paired_bootstrap():
    """The main job's analysis: each trial's intervals, and for the second activation in each
    setting but the control, the paired difference against the first over the replicas kept
    in both (a diverged replica of either arm leaves the pair out)."""
    from jaxrepro import randomness
    from jaxrepro.studies import irreproducibility

    config = study.IrreproducibilityConfig.quick(
        activations=("relu", "smelu"), settings=("nothing", "all"), num_samples=50
    )
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 60).astype(np.int32)

    def pred(act, setting, keep):
        probs = rng.dirichlet(np.ones(10), (4, 60)).astype(np.float32)
        return study.Predictions(
            info={"activation": act, "setting": setting},
            probs=probs,
            labels=labels,
            replica_ids=np.arange(4, dtype=np.int32),
            keep=np.asarray(keep),
            train_loss=np.zeros(4, np.float32),
            train_accuracy=np.zeros(4, np.float32),
            measures={},
            diverged_epoch=np.full(4, -1, np.int32),
        )

    preds = {
        "relu/nothing": pred("relu", "nothing", [True] * 4),
        "relu/all": pred("relu", "all", [True, True, False, True]),
        "smelu/nothing": pred("smelu", "nothing", [True] * 4),
        "smelu/all": pred("smelu", "all", [True, True, True, False]),
    }
    records = irreproducibility.analyse(config, preds).records
    assert "churn_ci" in records["relu/all"]["metrics"]
    assert "ambiguity_ci" in records["relu/all"]["metrics"]
    assert all("difference" not in records[k] for k in ("relu/nothing", "relu/all"))
    assert "difference" not in records["smelu/nothing"]
    got = records["smelu/all"]["difference"]
    want = metrics.difference(
        preds["smelu/all"].probs,
        preds["relu/all"].probs,
        labels,
        randomness.bootstrap_key(config.seed, irreproducibility.DIFFERENCE_STREAM, 3),
        paired=True,
        num_samples=50,
        mask=np.asarray([True, True, False, False]),
    )
    assert got["against"] == "relu" and got["num_replicas"] == [2, 2]
    for key in ("churn", "pd_abs", "acc_mean", "var_dist"):
        assert got[key]["diff"] == want[key]["diff"] and got[key]["ci"] == want[key]["ci"], key
