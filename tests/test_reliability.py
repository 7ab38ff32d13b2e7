"""Reliability: bad inputs are refused with an error naming the problem, never coerced; damaged
checkpoints, stale workdirs and exploding replicas are handled without losing results.

``test_bad_input_is_a_clear_error`` is one table of bad inputs across the Python API (fit and
its config, predict, data, metrics) and the five study binaries: each row asserts the
exception type and that the message names the argument (a binary's flag)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from absl import app, flags

from jaxrepro import checks, data, engine, metrics, models, study
from jaxrepro.studies import runner
from jaxrepro.studies import workdir as wd

MLP = models.MLP(widths=(8,), num_classes=3)
TX = optax.adam(1e-2)


@pytest.fixture(scope="module")
def trained(ds):
    return engine.fit(MLP, TX, ds, replicas=2, epochs=1, batch_size=64)


def _probs(r=3, n=20, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return np.asarray(jax.nn.softmax(3 * rng.normal(size=(r, n, c)), -1), np.float32)


LABELS = np.arange(20) % 3


def _npz(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    if kind == "renamed_npy":
        np.save(tmp_path / "a.npy", np.zeros((4, 3)))
        os.replace(tmp_path / "a.npy", path)
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "object":
        objs = np.array([1, "a", None], dtype=object)
        np.savez(path, x_train=objs, y_train=np.zeros(3), x_test=np.zeros((3, 2)), y_test=[0, 1, 0])
    return path


def _binary(config_cls, tmp_path, *argv, workdir=None):
    fv = flags.FlagValues()
    study.define_flags(config_cls, fv)
    workdir = str(tmp_path / "w") if workdir is None else workdir
    fv(["prog", f"--workdir={workdir}", *argv])
    return study.main(config_cls, ["prog"], flag_values=fv)


IRR, SYN, TSV = study.IrreproducibilityConfig, study.SyntheticConfig, study.TestSetVarianceConfig
AD, REG = study.AntiDistillationConfig, study.RegularizersConfig
BAD_TYPE, VALUE = checks.BadType, ValueError
USAGE = app.UsageError


def _fit(ds, **kw):
    args = dict(model=MLP, tx=TX, data=ds)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    kw = {"epochs": 1, "batch_size": 64, **kw}
    return engine.fit(args["model"], args["tx"], args["data"], **kw)


# (id, call(ds, trained, tmp_path), exception type, regex the message must match)
CASES = [
    # --- counts, indices and seeds are integers: never truncated, never read from a str or bool
    ("replicas str", lambda d, t, p: engine.FitConfig(replicas="4"), BAD_TYPE, "replicas"),
    ("replicas str 12", lambda d, t, p: engine.FitConfig(replicas="12"), BAD_TYPE, "replicas"),
    (
        "replicas floats",
        lambda d, t, p: engine.FitConfig(replicas=(1.7, 2.2)),
        BAD_TYPE,
        "replicas.*1.7",
    ),
    ("replicas bool", lambda d, t, p: engine.FitConfig(replicas=True), BAD_TYPE, "replicas.*True"),
    ("replicas None", lambda d, t, p: engine.FitConfig(replicas=None), BAD_TYPE, "replicas"),
    ("replicas 2.5", lambda d, t, p: engine.FitConfig(replicas=2.5), BAD_TYPE, "replicas.*2.5"),
    ("replicas 0", lambda d, t, p: engine.FitConfig(replicas=0), VALUE, "replicas.*>= 1"),
    ("replicas empty", lambda d, t, p: engine.FitConfig(replicas=()), VALUE, "replicas.*empty"),
    (
        "replica index >= 2**31",
        lambda d, t, p: engine.FitConfig(replicas=(0, 2**31)),
        VALUE,
        "replicas.*2147483648",
    ),
    (
        "replica index < 0",
        lambda d, t, p: engine.FitConfig(replicas=(1, -1)),
        VALUE,
        "replicas.*-1",
    ),
    ("epochs 1.5", lambda d, t, p: engine.FitConfig(epochs=1.5), BAD_TYPE, "epochs.*1.5"),
    ("epochs str", lambda d, t, p: engine.FitConfig(epochs="2"), BAD_TYPE, "epochs"),
    ("epochs 0", lambda d, t, p: engine.FitConfig(epochs=0), VALUE, "epochs"),
    ("batch_size 2.5", lambda d, t, p: engine.FitConfig(batch_size=2.5), BAD_TYPE, "batch_size"),
    (
        "epochs_per_call 0",
        lambda d, t, p: engine.FitConfig(epochs_per_call=0),
        VALUE,
        "epochs_per_call",
    ),
    ("seed 1.5", lambda d, t, p: engine.FitConfig(seed=1.5), BAD_TYPE, "seed.*1.5"),
    ("seed -1", lambda d, t, p: engine.FitConfig(seed=-1), VALUE, "seed"),
    ("seed 2**40", lambda d, t, p: engine.FitConfig(seed=2**40), VALUE, "seed"),
    ("seed str", lambda d, t, p: engine.FitConfig(seed="abc"), BAD_TYPE, "seed"),
    ("seed bool", lambda d, t, p: engine.FitConfig(seed=True), BAD_TYPE, "seed"),
    ("window 2.7", lambda d, t, p: engine.FitConfig(window=2.7), BAD_TYPE, "window.*2.7"),
    ("window 0", lambda d, t, p: engine.FitConfig(window=0), VALUE, "window"),
    ("vary None", lambda d, t, p: engine.FitConfig(vary=None), BAD_TYPE, "vary"),
    (
        "vary unknown",
        lambda d, t, p: engine.FitConfig(vary=("init", "shuffle")),
        VALUE,
        "'shuffle' in vary",
    ),
    (
        "perturb_scale < 0",
        lambda d, t, p: engine.FitConfig(perturb_scale=-1.0),
        VALUE,
        "perturb_scale",
    ),
    (
        "perturb_scale str",
        lambda d, t, p: engine.FitConfig(perturb_scale="big"),
        BAD_TYPE,
        "perturb_scale",
    ),
    (
        "strategy unknown",
        lambda d, t, p: engine.FitConfig(strategy="pmap"),
        VALUE,
        "strategy 'pmap'",
    ),
    ("strategy int", lambda d, t, p: engine.FitConfig(strategy=3), BAD_TYPE, "strategy"),
    ("devices 1.5", lambda d, t, p: engine.FitConfig(devices=1.5), BAD_TYPE, "devices"),
    (
        "deterministic str",
        lambda d, t, p: engine.FitConfig(deterministic="yes"),
        BAD_TYPE,
        "deterministic",
    ),
    ("divergence 0", lambda d, t, p: engine.FitConfig(divergence=0.0), VALUE, "divergence"),
    # --- fit's other arguments
    ("loss_fn str", lambda d, t, p: _fit(d, loss_fn="ce"), BAD_TYPE, "loss_fn.*'ce'"),
    ("tx str", lambda d, t, p: _fit(d, tx="adam"), BAD_TYPE, "tx"),
    ("model not a module", lambda d, t, p: _fit(d, model=len), BAD_TYPE, "model"),
    ("data dict", lambda d, t, p: _fit(d, data={"x": 1}), BAD_TYPE, "data"),
    ("hparams list", lambda d, t, p: _fit(d, hparams=[1e-3]), BAD_TYPE, "hparams"),
    (
        "hparams strings",
        lambda d, t, p: _fit(d, hparams={"learning_rate": ["a", "b"]}),
        VALUE,
        "hparams.*learning_rate",
    ),
    (
        "batch larger than data",
        lambda d, t, p: _fit(d, batch_size=10_000),
        VALUE,
        "batch_size 10000",
    ),
    (
        "wrong class count",
        lambda d, t, p: _fit(d, model=models.MLP((4,), 5)),
        VALUE,
        "5 logits.*3 classes",
    ),
    # --- predict
    (
        "predict features",
        lambda d, t, p: t.predict(d.x_test[:, :5]),
        VALUE,
        r"predict: x must be \[N, 12\]",
    ),
    ("predict empty", lambda d, t, p: t.predict(d.x_test[:0]), VALUE, "predict: x is empty"),
    (
        "predict reshaped",
        lambda d, t, p: t.predict(d.x_test.reshape(-1, 6, 2)),
        VALUE,
        r"predict: x .*\(6, 2\)",
    ),
    ("predict 1-D", lambda d, t, p: t.predict(d.x_test[0]), VALUE, "predict: x"),
    (
        "predict strings",
        lambda d, t, p: t.predict(d.x_test.astype(str)),
        BAD_TYPE,
        "predict: x .*dtype",
    ),
    (
        "predict NaN",
        lambda d, t, p: t.predict(np.full((2, 12), np.nan)),
        VALUE,
        "predict: x holds 24 NaN",
    ),
    (
        "predict chunk_size",
        lambda d, t, p: t.predict(d.x_test, chunk_size=0.5),
        BAD_TYPE,
        "chunk_size",
    ),
    # --- data
    (
        "load renamed .npy",
        lambda d, t, p: data.load(_npz(p, "renamed_npy")),
        VALUE,
        "single .npy array",
    ),
    ("load garbage", lambda d, t, p: data.load(_npz(p, "garbage")), VALUE, "not a readable .npz"),
    (
        "load object dtype",
        lambda d, t, p: data.load(_npz(p, "object")),
        VALUE,
        "'x_train' cannot be read without pickle",
    ),
    ("load missing file", lambda d, t, p: data.load(p / "none.npz"), FileNotFoundError, "none.npz"),
    (
        "load unknown name",
        lambda d, t, p: data.load("cifar100"),
        VALUE,
        "unknown dataset 'cifar100'",
    ),
    ("load int", lambda d, t, p: data.load(3), BAD_TYPE, "name_or_path"),
    (
        "labels out of range",
        lambda d, t, p: data.Dataset(d.x_train, d.y_train + 1, d.x_test, d.y_test, 3),
        VALUE,
        "y_train has labels outside",
    ),
    (
        "NaN inputs",
        lambda d, t, p: data.Dataset(d.x_train * np.nan, d.y_train, d.x_test, d.y_test, 3),
        VALUE,
        "x_train has .* non-finite",
    ),
    (
        "num_classes float",
        lambda d, t, p: data.Dataset(d.x_train, d.y_train, d.x_test, d.y_test, 3.0),
        VALUE,
        "num_classes",
    ),
    # --- metrics
    ("compare [N, C]", lambda d, t, p: metrics.compare(_probs()[0], LABELS), VALUE, "replica axis"),
    (
        "compare class ids",
        lambda d, t, p: metrics.compare(_probs().argmax(-1), LABELS),
        BAD_TYPE,
        "class ids",
    ),
    (
        "compare key=0",
        lambda d, t, p: metrics.compare(_probs(), LABELS, key=0),
        BAD_TYPE,
        "key must be",
    ),
    (
        "compare complex",
        lambda d, t, p: metrics.compare(_probs().astype(complex), LABELS),
        BAD_TYPE,
        "dtype complex",
    ),
    (
        "compare strings",
        lambda d, t, p: metrics.compare(_probs().astype(str), LABELS),
        BAD_TYPE,
        "dtype <U",
    ),
    (
        "compare ensemble_size 2.5",
        lambda d, t, p: metrics.compare(_probs(4), LABELS, ensemble_size=2.5),
        BAD_TYPE,
        "ensemble_size",
    ),
    (
        "compare atol < 0",
        lambda d, t, p: metrics.compare(_probs(), LABELS, atol=-1e-3),
        VALUE,
        "atol",
    ),
    (
        "compare probs as logits",
        lambda d, t, p: metrics.compare(_probs(), LABELS, from_logits=True),
        VALUE,
        "from_logits",
    ),
    (
        "compare from_logits str",
        lambda d, t, p: metrics.compare(_probs(), LABELS, from_logits="yes"),
        BAD_TYPE,
        "from_logits",
    ),
    (
        "compare labels range",
        lambda d, t, p: metrics.compare(_probs(), LABELS + 1),
        VALUE,
        "labels out of range",
    ),
    (
        "compare labels float",
        lambda d, t, p: metrics.compare(_probs(), LABELS + 0.5),
        VALUE,
        "labels must be integers",
    ),
    (
        "compare mask shape",
        lambda d, t, p: metrics.compare(_probs(), LABELS, mask=[1, 0]),
        VALUE,
        "mask",
    ),
    (
        "compare num_samples 0",
        lambda d, t, p: metrics.compare(_probs(), LABELS, key=jax.random.key(0), num_samples=0),
        VALUE,
        "num_samples",
    ),
    (
        "compare level",
        lambda d, t, p: metrics.compare(_probs(), LABELS, key=jax.random.key(0), level=95),
        VALUE,
        "level",
    ),
    (
        "compare one replica",
        lambda d, t, p: metrics.compare(_probs(1), LABELS),
        VALUE,
        "at least 2 replicas",
    ),
    # --- the five binaries: a usage error naming the flag, before anything is written
    (
        "main --num_train too large",
        lambda d, t, p: _binary(IRR, p, "--quick", "--num_train=100000"),
        USAGE,
        "--num_train: asks for 100000 examples.*has 4000",
    ),
    (
        "main batch > num_train",
        lambda d, t, p: _binary(IRR, p, "--quick", "--num_train=64", "--batch_size=128"),
        USAGE,
        "--batch_size.*128.*64 examples",
    ),
    (
        "main --num_test too large",
        lambda d, t, p: _binary(IRR, p, "--quick", "--num_test=5000"),
        USAGE,
        "--num_test",
    ),
    (
        "main empty workdir",
        lambda d, t, p: _binary(IRR, p, "--quick", workdir=""),
        USAGE,
        "--workdir: must name a directory",
    ),
    (
        "main workdir is a file",
        lambda d, t, p: _binary(IRR, p, "--quick", workdir=str(_file(p))),
        USAGE,
        "--workdir: .* is not a directory",
    ),
    (
        "main workdir under a file",
        lambda d, t, p: _binary(IRR, p, "--quick", workdir=str(_file(p) / "run")),
        USAGE,
        "--workdir: .* which is a file",
    ),
    (
        "main bad activation",
        lambda d, t, p: _binary(IRR, p, "--quick", "--activations=relu,softmaxx"),
        USAGE,
        "--activations",
    ),
    (
        "tsv batch > num_train",
        lambda d, t, p: _binary(TSV, p, "--quick", "--num_train=64", "--batch_size=128"),
        USAGE,
        "--batch_size",
    ),
    (
        "tsv --num_train too large",
        lambda d, t, p: _binary(TSV, p, "--quick", "--num_train=100000"),
        USAGE,
        "--num_train",
    ),
    (
        "synthetic one replica",
        lambda d, t, p: _binary(SYN, p, "--quick", "--replicas=1"),
        USAGE,
        "--replicas",
    ),
    (
        "synthetic bad teacher",
        lambda d, t, p: _binary(SYN, p, "--quick", "--teacher=cubic"),
        USAGE,
        "--teacher",
    ),
    ("ad bad K", lambda d, t, p: _binary(AD, p, "--quick", "--ks=1"), USAGE, "--ks"),
    (
        "ad --num_train too large",
        lambda d, t, p: _binary(AD, p, "--quick", "--datasets=mnist1d", "--num_train=100000"),
        USAGE,
        "--num_train",
    ),
    (
        "regularizers unknown arm",
        lambda d, t, p: _binary(REG, p, "--quick", "--regularizers=dropout,magic"),
        USAGE,
        "--regularizers",
    ),
    (
        "regularizers batch > num_train",
        lambda d, t, p: _binary(REG, p, "--quick", "--num_train=64", "--batch_size=128"),
        USAGE,
        "--batch_size",
    ),
    (
        "list flag of ints",
        lambda d, t, p: _binary(IRR, p, "--quick", "--widths=32,1.5"),
        USAGE,
        "--widths",
    ),
]


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(case, ds, trained, tmp_path):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call(ds, trained, tmp_path)
    # Nothing was written for a refused binary run.
    assert not (tmp_path / "w" / "config.json").exists()


def test_the_table_covers_at_least_fifty_bad_inputs_across_api_and_binaries():
    assert len(CASES) >= 50
    used = " ".join(c[0] for c in CASES)
    for prefix in ("main", "tsv", "synthetic", "ad", "regularizers"):
        assert f"{prefix} " in used, prefix


def test_bad_type_is_both_a_type_error_and_a_value_error():
    for exc in (TypeError, ValueError):
        with pytest.raises(exc, match="epochs"):
            engine.FitConfig(epochs=1.5)


def test_numpy_integers_are_accepted_where_integers_are_asked(ds):
    config = engine.FitConfig(
        replicas=np.int64(3), seed=np.uint32(5), epochs=np.int32(2), window=np.int16(4)
    )
    assert (config.replicas, config.seed, config.epochs, config.window) == (3, 5, 2, 4)
    assert type(config.replicas) is int and type(config.seed) is int
    ids = engine.FitConfig(replicas=np.arange(2, 5)).replicas
    assert ids == (2, 3, 4) and all(type(i) is int for i in ids)


def test_read_only_workdir_is_a_usage_error(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        target = parent / "run"
        if os.access(parent, os.W_OK):  # root writes anywhere: a place nobody can write
            if not os.path.isdir("/proc/self"):
                pytest.skip("no unwritable directory to try on this machine")
            target = Path("/proc/self/jaxrepro-run")
        with pytest.raises(app.UsageError, match="--workdir: cannot create"):
            _binary(IRR, tmp_path, "--quick", workdir=str(target))
        assert not target.exists()
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize("stale", ["results.json", "checkpoints", "predictions"])
def test_a_workdir_holding_a_run_without_config_json_is_refused(tmp_path, stale):
    workdir = tmp_path / "w"
    (workdir / stale).parent.mkdir(parents=True, exist_ok=True)
    if stale.endswith(".json"):
        (workdir / stale).write_text("{}")
    else:
        (workdir / stale / "trial").mkdir(parents=True)
    with pytest.raises(app.UsageError, match=f"--workdir: .* holds files of a run .*{stale}"):
        _binary(IRR, tmp_path, "--quick", workdir=str(workdir))
    assert not (workdir / "config.json").exists()


# --------------------------------------------------------------------------------------------
# Faults: damaged checkpoints recover to the uninterrupted result.


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The quick main job run through, with a checkpoint after every epoch (two per trial)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    runner.run(IRR.quick(), workdir, checkpoint_every=1, progress=False)
    return workdir


def _damage(directory: Path, how: str) -> None:
    step = directory / "2"
    if how == "flip":  # 64 flipped bytes in the largest array data file
        target = max(
            (p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
            key=lambda p: p.stat().st_size,
        )
        payload = bytearray(target.read_bytes())
        mid = len(payload) // 2
        payload[mid : mid + 64] = bytes(b ^ 0xFF for b in payload[mid : mid + 64])
        target.write_bytes(bytes(payload))
    elif how == "truncate":  # every file of both checkpoints cut in half: train from the start
        for p in directory.rglob("*"):
            if p.is_file():
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "delete":  # the latest checkpoint's state directory removed
        shutil.rmtree(step / "state")
    else:
        raise AssertionError(how)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_damaged_checkpoints_recover_to_the_uninterrupted_results(uninterrupted, tmp_path, how):
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted, workdir)
    (workdir / "results.json").unlink()
    shutil.rmtree(workdir / "predictions")  # every trial restores from its checkpoints again
    trials = sorted((workdir / "checkpoints").iterdir())
    _damage(trials[0], how)
    out = runner.run(IRR.quick(), workdir, checkpoint_every=1, progress=False)
    log = (workdir / "progress.log").read_text()
    assert "checkpoint at epoch 2 skipped" in log
    if how == "truncate":  # both skipped: the trial trained from the start
        assert "checkpoint at epoch 1 skipped" in log and "resumed at epoch 1/2" not in log
    else:  # the one before it was used
        assert "resumed at epoch 1/2" in log and "checkpoint at epoch 1 skipped" not in log
    assert len(list((workdir / "checkpoints").glob("*.skipped/*"))) == (
        2 if how == "truncate" else 1
    )
    assert out["complete"]
    assert (workdir / "results.json").read_bytes() == (uninterrupted / "results.json").read_bytes()


def test_checkpoint_checksum_catches_a_changed_state(tmp_path):
    state = {"w": np.arange(12_000, dtype=np.float32).reshape(3, 4000)}  # the largest file
    history = {"loss": np.zeros((3, 1)), "accuracy": np.zeros((3, 1))}
    wd.save_checkpoint(tmp_path, 1, state, history)
    state2 = {"w": state["w"] + 1}
    history2 = {"loss": np.zeros((3, 2)), "accuracy": np.zeros((3, 2))}
    wd.save_checkpoint(tmp_path, 2, state2, history2)
    assert wd.state_digest(state) != wd.state_digest(state2)
    _damage(tmp_path, "flip")
    skips = []
    restored, epoch, hist = wd.restore_checkpoint(
        tmp_path, state, on_skip=lambda e, why: skips.append((e, why))
    )
    assert epoch == 1 and hist["loss"].shape == (3, 1)
    np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
    assert skips and skips[0][0] == 2 and "checksum" in skips[0][1]
    assert not (tmp_path / "2").exists()  # moved aside, so the epoch can be written again
    assert len(list(tmp_path.parent.glob(f"{tmp_path.name}.skipped/2-*"))) == 1


# --------------------------------------------------------------------------------------------
# A replica that blows up while staying finite.


def test_an_exploding_replica_is_flagged_frozen_and_excluded(ds):
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    kw = dict(epochs=3, batch_size=64, vary=("init", "order"))
    run = engine.fit(
        MLP, tx, ds, replicas=(0, 1, 2), hparams={"learning_rate": [1e-2, 1e6, 1e-2]}, **kw
    )
    alone = engine.fit(MLP, tx, ds, replicas=(0, 2), hparams={"learning_rate": [1e-2, 1e-2]}, **kw)
    assert run.diverged.tolist() == [False, True, False]
    assert run.diverged_epoch.tolist() == [-1, 0, -1]
    # Frozen at its state before epoch 0 (its initial state): finite predictions.
    init = engine.Engine(engine.Task(MLP, tx), ds, engine.FitConfig(replicas=(1,), **kw)).init()
    for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(init.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b)[0])
    assert run.history["loss"][1, 0] > 1e6 and np.isnan(run.history["loss"][1, 1:]).all()
    # The others are bitwise the replicas trained without it.
    probs = run.predict(ds.x_test)
    np.testing.assert_array_equal(probs[[0, 2]], alone.predict(ds.x_test))
    np.testing.assert_array_equal(run.history["loss"][[0, 2]], alone.history["loss"])
    # A study records it as excluded, with the epoch.
    trial = runner.Trial("t", engine.Task(MLP, tx), ds, run.config)
    record = runner.record(runner.predict(trial, run))
    assert record["diverged"] == [1] and record["diverged_epochs"] == [0]
    assert record["metrics"]["num_replicas"] == 2 and record["metrics"]["num_excluded"] == 1


def test_divergence_none_flags_only_non_finite_values(ds):
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    kw = dict(epochs=2, batch_size=64, replicas=2)
    hp = {"learning_rate": [0.1, 1e3]}
    loose = engine.fit(MLP, tx, ds, hparams=hp, divergence=None, **kw)
    strict = engine.fit(MLP, tx, ds, hparams=hp, divergence=1.0, **kw)
    blown = loose.history["loss"][1]
    assert np.isfinite(blown).all() and blown.max() > 10 * loose.history["loss"][0].max()
    assert not loose.diverged[1] and strict.diverged.tolist() == [False, True]
