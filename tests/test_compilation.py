"""Compile once: equal optimizers, traced loss weights, the persistent cache, compile time."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrepro import compilation, engine, losses, models

ROOT = Path(__file__).resolve().parents[1]

MODEL = models.MLP(widths=(8,), num_classes=3)
ENSEMBLE = models.Ensemble(models.MLP(widths=(8,), num_classes=3), num_components=2)
BASE = dict(epochs=2, batch_size=32, vary=("init", "order"), seed=3, strategy="map")


def _equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _params(shapes=((12, 8), (8,))):
    return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]


# --- equal optimizers ------------------------------------------------------------------------


def test_fresh_equal_optimizers_share_one_canonical_object():
    p = _params()
    a = compilation.canonical_optimizer(optax.adam(3.1e-3), p)
    assert compilation.canonical_optimizer(optax.adam(3.1e-3), p) is a
    assert compilation.canonical_optimizer(optax.adam(3.2e-3), p) is not a
    assert compilation.canonical_optimizer(optax.sgd(3.1e-3), p) is not a
    assert compilation.canonical_optimizer(optax.adam(3.1e-3, b1=0.8), p) is not a
    # Other parameter shapes: another computation.
    assert compilation.canonical_optimizer(optax.adam(3.1e-3), _params(((4,),))) is not a


def test_schedules_and_chains_are_compared_by_value():
    p = _params()

    def make(steps, decay):
        schedule = optax.cosine_decay_schedule(1e-3, steps)
        return optax.chain(optax.add_decayed_weights(decay), optax.adamw(schedule))

    a = compilation.canonical_optimizer(make(100, 1e-4), p)
    assert compilation.canonical_optimizer(make(100, 1e-4), p) is a
    inject = lambda lr: optax.inject_hyperparams(optax.adam)(learning_rate=lr)  # noqa: E731
    b = compilation.canonical_optimizer(inject(1e-3), p)
    assert compilation.canonical_optimizer(inject(1e-3), p) is b
    assert compilation.canonical_optimizer(inject(2e-3), p) is not b
    assert compilation.canonical_optimizer(make(200, 1e-4), p) is not a
    assert compilation.canonical_optimizer(make(100, 2e-4), p) is not a


def test_an_optimizer_holding_a_host_callback_keeps_its_identity():
    def scale_by_callback():
        def update(updates, state, params=None):
            cb = lambda u: np.asarray(u) * 0.5  # noqa: E731
            out = jax.tree.map(
                lambda u: jax.pure_callback(cb, jax.ShapeDtypeStruct(u.shape, u.dtype), u),
                updates,
            )
            return out, state

        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

    p = _params()
    tx = scale_by_callback()
    assert compilation.optimizer_fingerprint(tx, p) is None
    assert compilation.canonical_optimizer(tx, p) is tx
    other = scale_by_callback()
    assert compilation.canonical_optimizer(other, p) is other


def test_a_refit_with_fresh_optimizer_and_model_objects_does_not_trace_again(ds):
    def fit():
        model = models.MLP(widths=(8,), num_classes=3, activation="smelu")  # fresh, equal
        return engine.fit(model, optax.adam(2.7e-3), ds, replicas=2, **BASE)

    first = fit()
    traces = dict(engine.TRACE_COUNTS)
    second = fit()
    assert engine.TRACE_COUNTS == traces
    assert _equal(first.state, second.state)
    assert second.compile_seconds < first.compile_seconds
    # Another learning rate is another computation: traced and compiled again.
    engine.fit(MODEL, optax.adam(2.8e-3), ds, replicas=2, **BASE)
    assert engine.TRACE_COUNTS["train_epochs"] == traces["train_epochs"] + 1


# --- loss weights ----------------------------------------------------------------------------


def test_weights_names_and_rebuild():
    base = losses.softmax_cross_entropy()
    loss = losses.min_entropy(losses.anti_distillation(losses.label_smoothing(base, 0.1), 0.5), 0.2)
    assert losses.weights(loss) == {
        "min_entropy": 0.2,
        "anti_distillation": 0.5,
        "label_smoothing": pytest.approx(0.1),
    }
    other = losses.with_weights(loss, {"anti_distillation": 3.0})
    assert losses.weights(other)["anti_distillation"] == 3.0
    assert losses.weights(loss)["anti_distillation"] == 0.5  # the original is unchanged
    assert losses.canonical(loss) == losses.canonical(
        losses.min_entropy(losses.anti_distillation(losses.label_smoothing(base, 0.3), 9.0), 1.0)
    )
    assert losses.canonical(loss) != losses.canonical(
        losses.min_entropy(losses.codistillation(losses.label_smoothing(base, 0.3), 9.0), 1.0)
    )
    twice = losses.min_entropy(losses.min_entropy(base, 0.1), 0.2)
    assert losses.weights(twice) == {"min_entropy": 0.2, "min_entropy:2": 0.1}
    with pytest.raises(ValueError, match="no weight 'codistillation'"):
        losses.with_weights(loss, {"codistillation": 1.0})


def test_anchor_losses_with_equal_anchors_are_equal():
    base = losses.softmax_cross_entropy()
    anchor = np.full((10, 3), 1 / 3, np.float32)
    a = losses.anchor_distillation(base, 0.5, anchor)
    assert a == losses.anchor_distillation(base, 0.5, anchor.copy())
    assert hash(a) == hash(losses.anchor_distillation(base, 0.5, anchor.copy()))
    assert a != losses.anchor_distillation(base, 0.4, anchor)
    changed = anchor.copy()
    changed[0] = [1.0, 0.0, 0.0]
    assert a != losses.anchor_distillation(base, 0.5, changed)


@pytest.mark.parametrize(
    "name, make, sweep",
    [
        (
            "anti_distillation",
            lambda w: losses.anti_distillation(losses.softmax_cross_entropy(), w),
            [0.0, 0.3, 3.0],
        ),
        (
            "codistillation",
            lambda w: losses.codistillation(losses.softmax_cross_entropy(), w),
            [0.0, 0.5, 2.0],
        ),
        (
            "label_smoothing",
            lambda w: losses.label_smoothing(losses.softmax_cross_entropy(), w),
            [0.0, 0.1, 0.4],
        ),
    ],
)
def test_a_weight_sweep_equals_the_separate_runs_replica_for_replica(ds, name, make, sweep):
    loss = make(1.0)
    traces = engine.TRACE_COUNTS["train_epochs"]
    run = engine.fit(
        ENSEMBLE, optax.adam(1e-2), ds, loss_fn=loss, replicas=3, hparams={name: sweep}, **BASE
    )
    assert engine.TRACE_COUNTS["train_epochs"] <= traces + 1
    traces = engine.TRACE_COUNTS["train_epochs"]
    probs = run.predict(ds.x_test)
    for r, w in enumerate(sweep):
        alone = engine.fit(ENSEMBLE, optax.adam(1e-2), ds, loss_fn=make(w), replicas=(r,), **BASE)
        assert _equal(alone.state, jax.tree.map(lambda a, r=r: a[r : r + 1], run.state))
        assert np.array_equal(alone.predict(ds.x_test)[0], probs[r])
        if r == 0:  # one replica is another shape: traced once for all the separate runs
            traces = engine.TRACE_COUNTS["train_epochs"]
    # The separate runs, each with its own weight, shared one compilation.
    assert engine.TRACE_COUNTS["train_epochs"] == traces
    # The weights change the training: the sweep's replicas are not the weight-0 run's.
    assert not np.array_equal(probs[0], probs[2])


def test_loss_weight_hparams_are_checked(ds):
    loss = losses.label_smoothing(losses.softmax_cross_entropy(), 0.1)
    fit = lambda **kw: engine.fit(  # noqa: E731
        MODEL, optax.adam(1e-2), ds, loss_fn=loss, replicas=2, **BASE, **kw
    )
    with pytest.raises(ValueError, match=r"hparams\['label_smoothing'\].*\[0, 1.0\]"):
        fit(hparams={"label_smoothing": [0.1, 1.5]})
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        fit(hparams={"label_smoothing": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="its weights: label_smoothing"):
        fit(hparams={"min_entropy": [0.1, 0.2]})
    with pytest.raises(ValueError, match="must be numbers"):
        fit(hparams={"label_smoothing": ["a", "b"]})
    with pytest.raises(TypeError, match="hparams must be a mapping"):
        fit(hparams=[0.1, 0.2])
    with pytest.raises(ValueError, match="one number per replica"):
        fit(hparams={"label_smoothing": [0.1, [0.2, 0.3]]})


def test_optimizer_and_loss_hparams_together(ds):
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    loss = losses.min_entropy(losses.softmax_cross_entropy(), 0.0)
    run = engine.fit(
        MODEL,
        tx,
        ds,
        loss_fn=loss,
        replicas=(1, 1),  # one replica's keys, two arms
        hparams={"learning_rate": [1e-2, 3e-2], "min_entropy": [0.0, 0.5]},
        **BASE,
    )
    assert not _equal(run.replica(0).params, run.replica(1).params)
    assert run.state.opt_state.hyperparams["learning_rate"].tolist() == pytest.approx([1e-2, 3e-2])
    alone = engine.fit(
        MODEL,
        optax.inject_hyperparams(optax.adam)(learning_rate=3e-2),
        ds,
        loss_fn=losses.min_entropy(losses.softmax_cross_entropy(), 0.5),
        replicas=(1,),
        **BASE,
    )
    assert _equal(alone.state.params, jax.tree.map(lambda a: a[1:], run.state.params))


# --- the persistent cache --------------------------------------------------------------------

_CHILD = r"""
import json, sys, warnings
warnings.simplefilter("always")
import jax, optax, numpy as np
from jaxrepro import compilation, data, engine, models
mode = sys.argv[1]
if mode != "off":
    compilation.enable_cache(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.normal(size=(320, 12)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)
ds = data.Dataset(x[:256], y[:256], x[256:], y[256:], 3)
hits = []
jax.monitoring.register_event_listener(
    lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None
)
with warnings.catch_warnings(record=True) as caught:
    run = engine.fit(models.MLP(widths=(8,), num_classes=3), optax.adam(1e-2), ds,
                     replicas=2, epochs=1, batch_size=64, strategy="map")
    probs = run.predict(ds.x_test)
weights = np.arange(probs.size).reshape(probs.shape)
print(json.dumps({"hits": len(hits), "digest": float(np.sum(probs * weights)),
                  "warnings": [str(w.message)[:200] for w in caught],
                  "compile_seconds": run.compile_seconds}))
"""


def _child(mode: str, directory: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(directory)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "JAXREPRO_TEST_PORTABLE": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_persistent_cache_is_read_by_a_new_process_and_survives_corruption(tmp_path):
    first = _child("on", tmp_path)
    entries = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert entries, "nothing was written to the cache directory"
    assert all(p.parent.name == compilation.machine_tag() for p in entries)
    second = _child("on", tmp_path)
    assert second["hits"] >= 3 and first["hits"] == 0
    assert second["digest"] == first["digest"]
    # Corrupt every entry: the run compiles again, warns, and gives the same result.
    for p in entries:
        p.write_bytes(b"\0garbage" * 16)
    third = _child("on", tmp_path)
    assert third["digest"] == first["digest"]
    assert third["hits"] == 0
    assert any("persistent compilation cache" in w for w in third["warnings"])


def test_enable_disable_and_another_directory(tmp_path):
    try:
        d = compilation.enable_cache(tmp_path / "a")
        assert d == tmp_path / "a" / compilation.machine_tag()
        assert compilation.cache_dir() == d
        f = jax.jit(lambda x: jnp.sin(x) * 4.25 + 0.125)  # a program compiled nowhere else
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            f(jnp.arange(3.0)).block_until_ready()
        assert any(p.is_file() for p in d.iterdir())
        compilation.disable_cache()
        assert compilation.cache_dir() is None
        g = jax.jit(lambda x: jnp.cos(x) * 4.25 + 0.125)
        before = sorted(p.name for p in d.iterdir())
        g(jnp.arange(3.0)).block_until_ready()
        assert sorted(p.name for p in d.iterdir()) == before
    finally:
        compilation.disable_cache()


def test_the_cache_directory_defaults_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "env"))
    assert compilation.default_cache_dir() == tmp_path / "env"
    monkeypatch.setenv(compilation.CACHE_ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.default_cache_dir() == tmp_path / "xdg" / "jaxrepro" / "xla"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        compilation.enable_cache(blocker)
    assert compilation.cache_dir() is None


# --- studies: sweep trials and released programs ---------------------------------------------


def test_a_sweep_trial_saves_its_parts_and_long_studies_release_programs(ds, tmp_path, monkeypatch):
    from jaxrepro.studies import runner

    fit = engine.FitConfig(replicas=(0, 1) * 2, epochs=1, batch_size=32, strategy="map")
    loss = losses.label_smoothing(losses.softmax_cross_entropy(), 0.0)
    sweep = runner.Trial(
        "sweep",
        engine.Task(MODEL, optax.adam(1e-2), loss),
        ds,
        fit,
        hparams={"label_smoothing": (0.0, 0.0, 0.2, 0.2)},
        parts=(
            runner.Part("eps-0", 0, 2, {"eps": 0.0}),
            runner.Part("eps-0.2", 2, 4, {"eps": 0.2}),
        ),
    )
    other = runner.Trial(
        "other",
        engine.Task(models.MLP(widths=(4,), num_classes=3), optax.adam(1e-2)),
        ds,
        engine.FitConfig(replicas=2, epochs=1, batch_size=32, strategy="map"),
    )
    with pytest.raises(ValueError, match="non-overlapping blocks of its 4 replicas"):
        dataclasses.replace(sweep, parts=(runner.Part("a", 0, 3), runner.Part("b", 2, 4)))
    with pytest.raises(ValueError, match="non-overlapping"):
        dataclasses.replace(sweep, parts=(runner.Part("a", 0, 5),))
    cleared = []
    monkeypatch.setattr(runner, "KEEP_PROGRAMS", 1)
    monkeypatch.setattr(runner.jax, "clear_caches", lambda: cleared.append(len(cleared)))
    again = dataclasses.replace(sweep, name="again", parts=(runner.Part("again-0", 0, 4, {}),))
    preds = runner.train_trials([sweep, again, other], tmp_path, progress=None)
    assert list(preds) == ["eps-0", "eps-0.2", "again-0", "other"]
    assert runner.record_infos([sweep, other]) == {
        "eps-0": {"eps": 0.0},
        "eps-0.2": {"eps": 0.2},
        "other": {},
    }
    # The first sweep's task is used again by the second: released after the second, then other.
    assert cleared == [0, 1]
    assert preds["eps-0.2"].replica_ids.tolist() == [0, 1]
    # The arms' replica 0 share keys but not weights; the repeated sweep gives the same bits.
    assert np.array_equal(preds["again-0"].probs[2:], preds["eps-0.2"].probs)
    assert not np.array_equal(preds["eps-0"].probs, preds["eps-0.2"].probs)
    alone = engine.fit(
        MODEL, optax.adam(1e-2), ds,
        loss_fn=losses.label_smoothing(losses.softmax_cross_entropy(), 0.2),
        replicas=(1,), epochs=1, batch_size=32, strategy="map",
    )  # fmt: skip
    assert np.array_equal(alone.predict(ds.x_test)[0], preds["eps-0.2"].probs[1])
    again = runner.train_trials([sweep], tmp_path, progress=None)  # saved: nothing trained
    assert np.array_equal(again["eps-0"].probs, preds["eps-0"].probs)


@pytest.mark.skipif(compilation.map_limit() is None, reason="the system does not report mappings")
def test_programs_are_released_near_the_limit_on_memory_mappings(ds, monkeypatch):
    """XLA's JIT code is held in memory mappings of its own; past the fraction of the kernel's
    limit, ``release_near_map_limit`` drops the compiled programs and their mappings with them,
    and ``Engine.run`` asks before every run."""
    fns = [jax.jit(lambda x, i=i: jnp.tanh(x * i).sum()) for i in range(12)]
    base = compilation.mapped_regions()
    for f in fns:
        f(jnp.ones(5)).block_until_ready()
    held = compilation.mapped_regions()
    assert held > base + 12  # each program holds mappings of its own
    assert compilation.release_near_map_limit(1.0) is False  # far below the limit: kept
    assert fns[0]._cache_size() == 1
    assert compilation.release_near_map_limit(held / compilation.map_limit() / 2) is True
    assert fns[0]._cache_size() == 0
    assert compilation.mapped_regions() < held - 12
    with pytest.raises(ValueError, match="fraction"):
        compilation.release_near_map_limit(1.5)
    calls = []
    monkeypatch.setattr(compilation, "release_near_map_limit", lambda: calls.append(1) or False)
    eng = engine.Engine(
        engine.Task(MODEL, optax.sgd(0.1)),
        ds,
        engine.FitConfig(replicas=2, epochs=1, batch_size=32),
    )
    eng.run()
    assert calls == [1]


def test_a_refit_traces_the_users_loss_once(ds):
    """chex counts the traces of the user's own loss: an equal refit (fresh optimizer and model
    objects) reuses the compiled step, so the loss is traced once in all."""
    import chex

    @chex.assert_max_traces(n=1)
    def loss(logits_KxBxC, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits_KxBxC[0], batch.labels).mean()

    def fit():
        return engine.fit(
            models.MLP(widths=(8,), num_classes=3), optax.sgd(0.1), ds, loss_fn=loss, **BASE
        )

    first, second = fit(), fit()  # a second trace would raise chex's AssertionError
    assert _equal(first.state, second.state)
    with pytest.raises(AssertionError, match="traced"):  # another computation: traced again
        engine.fit(models.MLP(widths=(8,), num_classes=3), optax.sgd(0.2), ds, loss_fn=loss, **BASE)
    chex.clear_trace_counter()
