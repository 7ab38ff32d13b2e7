"""The perturbation at a chosen global step (``FitConfig.perturb_step``, methods.md section 1):
what the state is before and after it, one compilation for every step, replica r among R equal
to replica r alone, resume across it, and its bad inputs. The chaos study's binary is tested
end to end in ``tests/test_experiments.py``."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from absl import app

from jaxrepro import data, engine, metrics, models, plots, portable, randomness, study
from jaxrepro.studies import chaos

STEPS = 4  # 64 examples in batches of 16
EPS = 1e-2


@pytest.fixture(scope="module")
def ds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 8)).astype(np.float32)
    y = rng.integers(0, 3, 80).astype(np.int32)
    return data.Dataset(x[:64], y[:64], x[64:], y[64:], num_classes=3, name="tiny")


TASK = engine.Task(models.MLP(widths=(16,), num_classes=3), optax.adam(1e-2))


def _run(ds, *, replicas=3, epochs=2, **kw):
    """Trains and returns ({epochs done: params after them}, run)."""
    kw.setdefault("strategy", "map")
    cfg = engine.FitConfig(replicas=replicas, batch_size=16, epochs=epochs, seed=3, **kw)
    after = {}

    def keep(done, state, history):
        after[done] = jax.tree.map(np.asarray, state.params)

    run = engine.Engine(TASK, ds, cfg).run(callback=keep)
    return after, run


def _equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def control(ds):
    """Every replica identical (nothing varied, nothing perturbed)."""
    return _run(ds, vary=())[0]


def _noise(params_R, replica, perturb_replica, seed=3):
    """The draws the perturbation makes for one replica: ``normal(split(perturb key))``."""
    key = randomness.replica_key(seed, "perturb", perturb_replica, varied=True)
    leaves = jax.tree.leaves(jax.tree.map(lambda a: a[replica], params_R))
    keys = jax.random.split(key, len(leaves))
    return [
        np.asarray(jax.random.normal(k, a.shape, a.dtype))
        for k, a in zip(keys, leaves, strict=True)
    ]


def test_state_before_step_t_is_the_unperturbed_run_bitwise(ds, control):
    # t = 6: the sixth update is step 1 of epoch 1, so after epoch 0 nothing has happened yet.
    after, _ = _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=6)
    assert _equal(after[1], control[1])
    assert not _equal(after[2], control[2])
    # t = 4 is right after epoch 0's last update: epoch 0's state is already perturbed.
    after4, _ = _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=4)
    assert not _equal(after4[1], control[1])


def test_perturbation_after_the_last_step_has_the_stated_size(ds, control):
    """t = epochs * steps perturbs the final weights: w + eps * rms(w) * N(0, 1) with the
    replica's perturb key, each replica its own draw."""
    after, _ = _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=2 * STEPS)
    for r in range(3):
        final = [a[r] for a in jax.tree.leaves(after[2])]
        plain = [a[r] for a in jax.tree.leaves(control[2])]
        for got, w, z in zip(final, plain, _noise(after[2], r, r), strict=True):
            rms = np.sqrt(np.mean(np.square(w))) or 1.0
            np.testing.assert_allclose((got - w) / (EPS * rms), z, rtol=1e-3, atol=1e-3)


def test_initial_perturbation_is_step_zero_and_later_steps_leave_init_alone(ds, control):
    """t = 0 is the perturbation of the initial weights (as before ``perturb_step`` existed);
    t >= 1 leaves initialisation alone."""
    cfg0 = engine.FitConfig(replicas=2, vary=("perturb",), perturb_scale=EPS, batch_size=16)
    cfg5 = engine.FitConfig(
        replicas=2, vary=("perturb",), perturb_scale=EPS, batch_size=16, perturb_step=5
    )
    plain = engine.Engine(TASK, ds, engine.FitConfig(replicas=2, vary=(), batch_size=16)).init()
    assert not _equal(engine.Engine(TASK, ds, cfg0).init().params, plain.params)
    assert _equal(engine.Engine(TASK, ds, cfg5).init().params, plain.params)


def test_one_compilation_serves_every_step(ds):
    _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=1)  # compiled here (if not yet)
    before = engine.TRACE_COUNTS["train_epochs"]
    outs = [
        _run(ds, vary=("perturb",), perturb_scale=eps, perturb_step=t)[0][2]
        for t in (2, 3, 7, 8)
        for eps in (1e-6, 1e-3)
    ]
    assert engine.TRACE_COUNTS["train_epochs"] == before
    assert not _equal(outs[0], outs[2])  # and the steps really differ


def test_vmap_perturbs_at_the_same_step(ds):
    """Under ``vmap`` (the accelerators' strategy) the step test stays a ``lax.cond`` on a
    value shared by the replicas: before step t the state is the vmap control's, bitwise."""
    control = _run(ds, vary=(), strategy="vmap")[0]
    after = _run(ds, vary=("perturb",), perturb_scale=EPS, perturb_step=6, strategy="vmap")[0]
    assert _equal(after[1], control[1]) and not _equal(after[2], control[2])


def test_replica_among_r_equals_replica_alone(ds):
    together = _run(ds, replicas=(0, 1, 2), vary=("perturb",), perturb_step=5)[0][2]
    alone = _run(ds, replicas=(2,), vary=("perturb",), perturb_step=5)[0][2]
    assert _equal(jax.tree.map(lambda a: a[2:], together), alone)
    # Replica 0 of a run varying perturb is perturbed too (it is not the control).
    assert not _equal(jax.tree.map(lambda a: a[:1], together), _run(ds, vary=())[0][2])


@pytest.mark.parametrize("t", [3, 4, 5])
def test_resume_across_the_perturbation(ds, t):
    """Resumed after epoch 1 (the perturbation before, at or after the boundary), the run ends
    bitwise where the uninterrupted one does."""
    cfg = engine.FitConfig(
        replicas=2,
        vary=("perturb",),
        perturb_scale=EPS,
        perturb_step=t,
        batch_size=16,
        epochs=2,
        strategy="map",
    )
    eng = engine.Engine(TASK, ds, cfg)
    saved = {}
    whole = eng.run(
        callback=lambda done, state, hist: saved.setdefault(
            done, (jax.tree.map(np.asarray, state), hist)
        )
    )
    state, hist = saved[1]
    resumed = engine.Engine(TASK, ds, cfg).run(state, first_epoch=1, history=hist)
    assert _equal(resumed.state.params, whole.state.params)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(perturb_step=-1), "perturb_step must be"),
        (dict(perturb_step=1.5), "perturb_step must be"),
        (dict(perturb_step="3"), "perturb_step must be"),
        (dict(perturb_step=True), "perturb_step must be"),
        (dict(perturb_step=2, vary=("init",)), "nothing is perturbed"),
    ],
)
def test_bad_perturb_step(kw, message):
    with pytest.raises(ValueError, match=message):
        engine.FitConfig(**kw)


def test_perturb_step_after_the_last_step_is_refused(ds):
    cfg = engine.FitConfig(vary=("perturb",), perturb_step=2 * STEPS + 1, batch_size=16, epochs=2)
    with pytest.raises(ValueError, match="after the last step: 2 epochs of 4 steps make 8"):
        engine.Engine(TASK, ds, cfg)


# ---------------------------------------------------------------------------------------------
# The chaos study (experiments/chaos.py).


def test_step_grid_is_log_spaced_from_zero_to_the_last_step():
    assert chaos.step_grid(620, 7) == [0, 1, 4, 13, 47, 171, 620]
    assert chaos.step_grid(8, 3) == [0, 1, 8]
    assert chaos.step_grid(2, 6) == [0, 1, 2]  # duplicates dropped


def _rec(act, step, eps, churn, ci):
    return {
        "info": {
            "activation": act,
            "setting": "perturb",
            "step": step,
            "epoch": step / 4,
            "eps": eps,
            "steps_per_epoch": 4,
        },
        "metrics": {"churn": churn, "churn_ci": ci},
    }


def test_summary_finds_the_step_from_which_a_perturbation_stops_mattering():
    config = study.ChaosConfig.quick(scales=(1e-6, 1e-2), steps=(0, 1, 4, 8))
    records = {
        "relu/all": {
            "info": {"activation": "relu", "setting": "all"},
            "metrics": {"churn": 0.5, "churn_ci": [0.4, 0.6]},
        }
    }
    # eps 1e-6: matters at 0 and 1, not at 4 or 8.
    for t, ci in zip(
        (0, 1, 4, 8), ([0.1, 0.2], [0.01, 0.05], [0.0, 0.01], [0.0, 0.0]), strict=True
    ):
        records[f"relu/t={t}/eps=1e-06"] = _rec("relu", t, 1e-6, ci[1] / 2, ci)
    # eps 1e-2: matters everywhere, the last step included.
    for t in (0, 1, 4, 8):
        records[f"relu/t={t}/eps=0.01"] = _rec("relu", t, 1e-2, 0.3, [0.2, 0.4])
    s = chaos.summarise(config, records)["relu"]
    assert s["reference_churn"] == 0.5
    small, large = s["scales"]["1e-06"], s["scales"]["0.01"]
    assert small["matters"] == [0, 1] and small["stops_at"] == 4 and small["stops_at_epoch"] == 1
    assert small["noise"] == [4] and small["zero"] == [8] and not small["never"]
    assert large["matters"] == [0, 1, 4, 8] and large["stops_at"] is None
    # A step that matters after one that did not moves the verdict past it.
    records["relu/t=4/eps=1e-06"]["metrics"]["churn_ci"] = [0.001, 0.01]
    records["relu/t=1/eps=1e-06"]["metrics"]["churn_ci"] = [0.0, 0.05]
    small = chaos.summarise(config, records)["relu"]["scales"]["1e-06"]
    assert small["matters"] == [0, 4] and small["stops_at"] == 8
    # A step without metrics (its replicas diverged) is neither: no verdict past it.
    records["relu/t=8/eps=1e-06"]["metrics"] = None
    small = chaos.summarise(config, records)["relu"]["scales"]["1e-06"]
    assert small["undefined"] == [8] and small["stops_at"] is None and not small["never"]
    # Nothing measurable anywhere: "never", and no step to stop at.
    for t in (0, 1, 4, 8):
        records[f"relu/t={t}/eps=1e-06"]["metrics"] = {"churn": 0.0, "churn_ci": [0.0, 0.0]}
    small = chaos.summarise(config, records)["relu"]["scales"]["1e-06"]
    assert small["never"] and small["stops_at"] is None and small["zero"] == [0, 1, 4, 8]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--scales=0"], "--scales"),
        (["--scales=1e-6,1e-6"], "--scales"),
        (["--steps=-1"], "--steps"),
        (["--steps=9"], "--steps"),  # quick: 2 epochs of 4 steps make 8
        (["--grid_points=2"], "--grid_points"),
        (["--scales=1e-6,1.0000001e-6"], "--scales"),  # the same trial name
    ],
)
def test_bad_chaos_flags_are_usage_errors(tmp_path, binary_body, argv, flag):
    with pytest.raises(app.UsageError, match=flag):
        binary_body(study.ChaosConfig, ["--quick", f"--workdir={tmp_path}", *argv])
    assert not (tmp_path / "config.json").exists()


@pytest.mark.slow
def test_chaos_binary_quick_end_to_end(tmp_path, binary_body):
    proc = binary_body(study.ChaosConfig, ["--quick", f"--workdir={tmp_path}"])
    results = json.loads((tmp_path / "results.json").read_text())
    config = results["config"]
    assert results["study"] == "chaos" and results["complete"] is True
    steps = [0, 1, 8]  # 2 epochs of 512 // 128 = 4 steps: 0 and 2 log-spaced points to 8
    names = ["relu/all"] + [f"relu/t={t}/eps={e:g}" for t in steps for e in config["scales"]]
    assert list(results["results"]) == names
    for name, rec in results["results"].items():
        m = rec["metrics"]
        for key in ("churn", "pd_abs", *metrics.MULTIPLICITY_KEYS, "var_dist"):
            assert key in m, (name, key)
        lo, hi = m["churn_ci"]
        assert lo <= m["churn"] <= hi, name
        assert m["num_replicas"] == config["replicas"]
    by = results["results"]
    # The reference (every source varied) disagrees far more than any perturbation, and a 1e-2
    # perturbation of the initial weights changes predictions measurably.
    assert by["relu/all"]["metrics"]["churn"] > by["relu/t=0/eps=0.01"]["metrics"]["churn"] > 0
    summary = results["summary"]["relu"]
    assert set(summary["scales"]) == {"1e-06", "0.01"}
    assert 0 in summary["scales"]["0.01"]["matters"]
    report = (tmp_path / "report.md").read_text()
    assert "## When a perturbation stops mattering" in report
    assert "| t | epoch | eps 1e-06 | eps 0.01 |" in proc.stdout
    assert plots.is_png(tmp_path / "churn_vs_step.png")
    assert plots.is_png(tmp_path / "churn_vs_eps.png")
    # One record recomputed from the documented recipe without the study code: the quick MLP on
    # the first num_train / num_test MNIST-1D examples, perturb varied alone with eps 1e-2
    # after step 1, compared with the same bootstrap.
    full = data.load("mnist1d")
    n_tr, n_te = config["num_train"], config["num_test"]
    ds = data.Dataset(
        full.x_train[:n_tr],
        full.y_train[:n_tr],
        full.x_test[:n_te],
        full.y_test[:n_te],
        num_classes=10,
    )
    model = models.MLP(
        widths=tuple(config["widths"]),
        num_classes=10,
        activation="relu",
        dropout_rate=config["dropout_rate"],
    )
    run = engine.fit(
        model,
        optax.adam(config["learning_rate"]),
        ds,
        replicas=config["replicas"],
        seed=config["seed"],
        vary=("perturb",),
        perturb_scale=1e-2,
        perturb_step=1,
        batch_size=config["batch_size"],
        epochs=config["epochs"],
        strategy="map",
        portable=portable.active(),
    )
    want = metrics.compare(run.predict(ds.x_test), ds.y_test)
    got = by["relu/t=1/eps=0.01"]["metrics"]
    for key in ("churn", "pd_abs", "ambiguity", "churn_max", "pred_range"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), key


def test_a_workdir_written_before_a_field_existed_resumes(tmp_path):
    """A field added to a study later (absent from an older config.json) matches when asked for
    at its default; asked for at another value, it is refused by name."""
    config = study.IrreproducibilityConfig.quick(num_samples=1000)
    study.prepare_workdir(tmp_path, config)
    path = tmp_path / "config.json"
    held = json.loads(path.read_text())
    for field in ("num_samples", "bootstrap_over", "level"):
        del held["config"][field]
    path.write_text(json.dumps(held))
    study.prepare_workdir(tmp_path, config)  # accepted
    with pytest.raises(study.ConfigError, match="num_samples"):
        study.prepare_workdir(tmp_path, config.replace(num_samples=100))
