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

import pytest
from absl import app, flags

from jaxrepro import metrics, plots, study

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"info", "diverged", "train_loss", "train_accuracy", "metrics"}


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
        control = record["info"].get("setting") == "nothing"
        for key in keys:
            if control and key == "var_ratio":
                assert m[key] is None  # 0 / 0: identical replicas
            else:
                assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key, m[key])
        assert m["num_replicas"] == results["config"]["replicas"]
    assert (workdir / "report.md").read_text().startswith("# ")
    assert (workdir / "progress.log").read_text().count("epoch") > 0
    return results


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
    assert any((workdir / "checkpoints").iterdir())
    assert not [p for p in workdir.rglob("*.tmp")]


@pytest.mark.parametrize(
    "name, flag",
    [
        ("synthetic", "--grid_windows"),
        ("test_set_variance", "--bootstrap_over"),
        ("anti_distillation", "--lambdas"),
        ("regularizers", "--regularizers"),
    ],
)
def test_every_binary_starts_and_lists_its_flags(name, flag):
    # The other binaries' bodies run in-process in their study's tests (study.main); here the
    # files themselves: they import, define their flags and answer --help.
    proc = _binary(name, "--help", timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # absl's --help exits with 1
    assert flag in proc.stdout and "--workdir" in proc.stdout and "--quick" in proc.stdout


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


def test_synthetic_study_quick(tmp_path):
    config = study.SyntheticConfig.quick()
    out = study.run(config, tmp_path, progress=False)
    results = _check_results(tmp_path, "synthetic", binary=True)
    assert out["results"] == results["results"]
    # Trials shared by several grids are trained once: the base student appears once.
    assert len(results["results"]) == 3
    report = (tmp_path / "report.md").read_text()
    for grid in ("activation", "source", "window", "width", "depth"):
        assert plots.is_png(tmp_path / f"synthetic_{grid}.png"), grid
        assert f"![{grid}](synthetic_{grid}.png)" in report
    assert "| shuffling window w | pd_abs | pd_rel | churn |" in report


def test_test_set_variance_study_quick(tmp_path):
    config = study.TestSetVarianceConfig.quick()
    study.run(config, tmp_path, progress=False)
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
