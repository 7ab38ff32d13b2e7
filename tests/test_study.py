"""The study runner: configs and flags, workdir checks, atomic files, progress, checkpoints,
saved predictions and bitwise resume, diverged replicas, and the layering (the core imports no
study)."""

import dataclasses
import io
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from jaxrepro import engine, plots, study
from jaxrepro.studies import irreproducibility, irreproducibility_report, render

# Two trials (the control and every source) of the quick main job, 3 epochs: shared by the
# checkpoint, resume and divergence tests so they compile once.
CFG = study.IrreproducibilityConfig.quick(epochs=3)
ALL = "relu/all"


@pytest.fixture(scope="module")
def trial():
    return {t.name: t for t in irreproducibility.trials(CFG)}[ALL]


def _bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


# --- configs and flags --------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(study.CONFIGS.values()))
def test_configs_round_trip_through_json(cls):
    for config in (cls(), cls.quick()):
        again = cls.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config


@pytest.mark.parametrize(
    "cls, changes, field",
    [
        (study.IrreproducibilityConfig, dict(replicas=1), "replicas"),
        (study.IrreproducibilityConfig, dict(activations=("relu", "nope")), "activations"),
        (study.IrreproducibilityConfig, dict(settings=("init", "weather")), "settings"),
        (study.IrreproducibilityConfig, dict(dataset="cifar"), "dataset"),
        (study.IrreproducibilityConfig, dict(learning_rate=-1.0), "learning_rate"),
        (
            study.SyntheticConfig,
            dict(grid_activations=("relu", "smelu(beta=0)")),
            "grid_activations",
        ),
        (study.SyntheticConfig, dict(teacher="cubic"), "teacher"),
        (study.SyntheticConfig, dict(teacher_hidden=0), "teacher_hidden"),
        (study.SyntheticConfig, dict(window_vary=("shuffle",)), "window_vary"),
        (study.SyntheticConfig, dict(replicas=0), "replicas"),
        (study.TestSetVarianceConfig, dict(datasets=("mnist1d", "imagenet")), "datasets"),
        (study.TestSetVarianceConfig, dict(binary_classes=(3, 3)), "binary_classes"),
        (study.TestSetVarianceConfig, dict(bootstrap_over="pairs"), "bootstrap_over"),
    ],
)
def test_bad_config_names_the_field(cls, changes, field):
    with pytest.raises(study.ConfigError) as e:
        cls(**changes)
    assert e.value.fields == (field,)
    assert f"--{field}" in e.value.as_flags()


def _flags(cls, argv):
    fv = flags.FlagValues()
    study.define_flags(cls, fv)
    fv(["prog", *argv])
    return fv


def test_flags_give_the_config_and_quick_keeps_explicit_flags():
    cls = study.IrreproducibilityConfig
    assert study.config_from_flags(cls, _flags(cls, [])) == cls()
    fv = _flags(
        cls,
        [
            "--quick",
            "--replicas=6",
            "--activations=gelu,smelu(0.5)",
            "--widths=8,4",
            "--workdir=/tmp/x",
        ],
    )
    config = study.config_from_flags(cls, fv)
    assert config == cls.quick(replicas=6, activations=("gelu", "smelu(0.5)"), widths=(8, 4))
    assert fv["workdir"].value == "/tmp/x"


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--replicas=1"], "replicas"),
        (["--activations=relu,softmaxx"], "activations"),
        (["--widths=8,x"], "widths"),
    ],
)
def test_bad_flags_are_config_errors_naming_the_flag(argv, field):
    cls = study.IrreproducibilityConfig
    with pytest.raises(study.ConfigError) as e:
        study.config_from_flags(cls, _flags(cls, argv))
    assert e.value.fields == (field,)


def test_workdir_with_another_config_is_refused_naming_the_fields(tmp_path):
    config = study.IrreproducibilityConfig.quick()
    study.prepare_workdir(tmp_path, config)
    study.prepare_workdir(tmp_path, config)  # the same config: fine
    with pytest.raises(study.ConfigError) as e:
        study.prepare_workdir(tmp_path, config.replace(replicas=6, epochs=9))
    assert e.value.fields == ("epochs", "replicas")
    assert "--epochs" in e.value.as_flags() and "--replicas" in e.value.as_flags()
    with pytest.raises(study.ConfigError, match="synthetic"):
        study.prepare_workdir(tmp_path, study.SyntheticConfig.quick())
    # run() refuses before training: nothing is written besides the original config.json.
    with pytest.raises(study.ConfigError):
        study.run(config.replace(seed=1), tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    # A run in deterministic mode is not resumed in the other mode, nor the reverse.
    with pytest.raises(study.ConfigError) as e:
        study.prepare_workdir(tmp_path, config, deterministic=True)
    assert e.value.fields == ("deterministic",)
    assert json.loads((tmp_path / "config.json").read_text())["deterministic"] is False
    # Nor a run in portable mode in the host's mode, nor the reverse; a workdir written
    # before portable mode existed (no key) counts as host mode.
    with pytest.raises(study.ConfigError, match="portable=False") as e:
        study.prepare_workdir(tmp_path, config, portable=True)
    assert e.value.fields == ("portable",) and "--portable" in e.value.as_flags()
    held = json.loads((tmp_path / "config.json").read_text())
    assert held["portable"] is False
    del held["portable"]
    (tmp_path / "config.json").write_text(json.dumps(held))
    study.prepare_workdir(tmp_path, config)
    with pytest.raises(study.ConfigError, match="portable"):
        study.prepare_workdir(tmp_path, config, portable=True)


# --- files and progress -------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    study.atomic_write_json(path, {"a": 1})

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        study.atomic_write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_json_is_strict_and_undefined_values_are_null():
    out = study.to_json(
        {
            "x": np.float32(0.5),
            "n": np.int64(3),
            "bad": math.nan,
            "arr": np.arange(2),
            "t": (1, math.inf),
        }
    )
    assert out == {"x": 0.5, "n": 3, "bad": None, "arr": [0, 1], "t": [1, None]}
    json.dumps(out, allow_nan=False)


def test_progress_lines_with_an_injected_clock(tmp_path):
    now = [100.0]
    stream = io.StringIO()
    progress = study.Progress(
        100, clock=lambda: now[0], stream=stream, log_path=tmp_path / "progress.log"
    )
    progress.skip(20)  # done in an earlier session
    now[0] = 110.0
    line = progress.step(2, 3, "relu/init", 1, 4, 20)
    # 20 units in 10 s; 60 left -> 30 s.
    assert line == "config 2/3 relu/init epoch 1/4 elapsed 10s eta 30s"
    now[0] = 250.0
    assert progress.step(2, 3, "relu/init", 2, 4, 20).endswith("elapsed 2m30s eta 2m30s")
    assert stream.getvalue().splitlines() == progress.lines
    assert (tmp_path / "progress.log").read_text().splitlines() == progress.lines


def test_markdown_table_and_cells():
    assert study.fmt(None) == "-" and study.fmt(math.nan) == "-"
    assert study.fmt(0.12345) == "0.123" and study.fmt(2.5e-5) == "2.50e-05"
    assert study.fmt([0.1, 0.2]) == "[0.100, 0.200]"
    assert study.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


# --- checkpoints, resume, divergence ------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_round_trip_is_bitwise(trial, tmp_path):
    eng = engine.Engine(trial.task, trial.data, trial.fit)
    state, metrics = eng.train(eng.init(), 0, 1)
    study.save_checkpoint(tmp_path, 1, state, metrics)
    restored, epoch, history = study.restore_checkpoint(tmp_path, eng.init())
    assert epoch == 1
    assert _bitwise_equal(restored, state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    np.testing.assert_array_equal(history["loss"], metrics["loss"])
    assert study.restore_checkpoint(tmp_path / "none", state) is None


class _Interrupt(Exception):
    pass


def _interrupt_at(name, epoch):
    def hook(trial_name, done):
        if (trial_name, done) == (name, epoch):
            raise _Interrupt

    return hook


@pytest.mark.slow
def test_interrupted_run_resumes_to_bitwise_the_same_results(tmp_path):
    whole = study.run(CFG, tmp_path / "whole", checkpoint_every=1, progress=False)
    first = irreproducibility.trials(CFG)[0].name
    parts = tmp_path / "parts"
    # Interrupted at the first checkpoint (trial 1, epoch 1), then during trial 2.
    with pytest.raises(_Interrupt):
        study.run(
            CFG, parts, checkpoint_every=1, progress=False, on_checkpoint=_interrupt_at(first, 1)
        )
    assert not (parts / "results.json").exists()
    with pytest.raises(_Interrupt):
        study.run(
            CFG, parts, checkpoint_every=1, progress=False, on_checkpoint=_interrupt_at(ALL, 2)
        )
    # Only the finished trial left its predictions; results.json waits for the analysis.
    assert not (parts / "results.json").exists()
    assert sorted(p.name for p in (parts / "predictions").iterdir()) == [study.slug(first) + ".npz"]
    stream = io.StringIO()
    resumed = study.run(CFG, parts, checkpoint_every=1, stream=stream)
    log = stream.getvalue()
    assert f"{ALL} resumed at epoch 2/3" in log and first not in log  # trial 1 not retrained
    assert (parts / "results.json").read_bytes() == (tmp_path / "whole/results.json").read_bytes()
    assert resumed["results"] == whole["results"]
    # The control is exactly reproducible; varying every source is not.
    control, varied = (whole["results"][n]["metrics"] for n in (first, ALL))
    assert control["churn"] == 0.0 and control["pd_abs"] == 0.0 and control["var_ratio"] is None
    assert varied["churn"] > 0.0
    assert plots.is_png(parts / "churn.png")
    assert "| relu | all |" in (parts / "report.md").read_text()


@pytest.mark.slow
def test_diverged_replicas_are_reported_and_excluded(trial, tmp_path):
    run = study.train_trial(dataclasses.replace(trial), tmp_path, checkpoint_every=10)
    nan_at = lambda a, rows: a.at[rows].set(np.nan)  # noqa: E731
    bad_params = jax.tree.map(lambda a: nan_at(a, 1), run.state.params)
    one_bad = run.with_state(run.state._replace(params=bad_params))
    record = study.record(study.predict(trial, one_bad))
    assert record["diverged"] == [1]
    assert record["metrics"]["num_excluded"] == 1 and record["metrics"]["num_replicas"] == 3
    assert math.isfinite(record["metrics"]["churn"])

    all_bad = run.with_state(
        run.state._replace(params=jax.tree.map(lambda a: nan_at(a, slice(None)), run.state.params))
    )
    pred = study.predict(trial, all_bad)
    assert study.Predictions.from_bytes(pred.to_bytes()).diverged == [0, 1, 2, 3]
    record = study.record(pred)
    assert record["metrics"] is None and "0 of 4 replicas" in record["error"]
    # The report shows the rows as undefined and lists the diverged replicas.
    records = {ALL: study.to_json({"info": {"activation": "relu", "setting": "all"}, **record})}
    config = CFG.replace(settings=("all",))
    analysis = study.Analysis(records=records)
    report = "\n".join(irreproducibility_report.render(config, analysis, tmp_path))
    assert "\n| relu | all | - | - | - |" in report
    assert "diverged" in "\n".join(render.diverged_note(records))


@pytest.mark.slow
def test_a_finished_study_reruns_only_the_analysis(tmp_path):
    """A rerun of a finished study trains nothing and rewrites the same bytes; the saved
    predictions round-trip bitwise; an unreadable predictions file is made again from the
    trial's final checkpoint (no training step), to the same results."""
    first = study.run(CFG, tmp_path, progress=False)
    before = (tmp_path / "results.json").read_bytes()
    stream = io.StringIO()
    again = study.run(CFG, tmp_path, stream=stream)
    assert "epoch" not in stream.getvalue()  # no trial trained
    assert (tmp_path / "results.json").read_bytes() == before
    assert again["results"] == first["results"]
    for t in irreproducibility.trials(CFG):
        pred = study.load_predictions(tmp_path, t.name)
        assert pred.probs.dtype == np.float32 and pred.probs.shape == (4, 256, 10)
        assert study.Predictions.from_bytes(pred.to_bytes()).probs.tobytes() == pred.probs.tobytes()
    study.predictions_path(tmp_path, ALL).write_bytes(b"not an npz")
    stream = io.StringIO()
    study.run(CFG, tmp_path, stream=stream)
    assert f"{ALL} resumed at epoch 3/3" in stream.getvalue()
    assert (tmp_path / "results.json").read_bytes() == before


@pytest.mark.slow
def test_import_jaxrepro_imports_no_study_plotting_or_checkpoint_code():
    code = (
        "import sys, jaxrepro, jaxrepro.engine, jaxrepro.metrics; "
        "bad = sorted(m for m in sys.modules if m.startswith(('jaxrepro.stud', "
        "'jaxrepro.plots', 'orbax', 'matplotlib'))); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # The notebook API is still there, loaded on first use.
    code = "import jaxrepro; print(jaxrepro.study.IrreproducibilityConfig.STUDY)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "irreproducibility"
