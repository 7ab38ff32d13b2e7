"""Placement of the replica axis: padding, the accelerator strategy rule, deterministic mode,
and the multi-process entry point's argument checks (one process, one CPU device here; the
device-count and multi-process equalities are in test_sharding.py and test_multiprocess.py)."""

import jax
import numpy as np
import optax
import pytest

from jaxrepro import distributed, engine, models

MODEL = models.MLP(widths=(8,), num_classes=3, dropout_rate=0.1)
TX = optax.adam(1e-2)
# "map": the bitwise equalities below need it on an accelerator ("auto" is "vmap" there).
BASE = dict(replicas=3, epochs=2, batch_size=16, vary=("init", "order", "dropout"), strategy="map")


def test_pad_host_repeats_the_last_replica_and_unpad_drops_it():
    pl = engine.Placement(("map", 0), None, num_replicas=3, num_padded=5)
    x = np.arange(6).reshape(3, 2)
    padded = pl.pad_host(x)
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(pl.to_host({"a": padded})["a"], x)
    assert pl.num_pad == 2 and pl.num_devices == 1


@pytest.mark.parametrize(
    "per_device, per_replica, free, expected",
    [
        (64, 1_000, None, ("vmap", 0)),  # free memory unknown: vmap
        (64, 1_000, 1_000_000, ("vmap", 0)),  # 64 kB of 800 kB usable: all at once
        (1024, 10_000, 1_000_000, ("chunked", 80)),  # 80 fit in 0.8 of the free memory
        (1024, 10**9, 10**6, ("chunked", 1)),  # not even one: one at a time, never zero
    ],
)
def test_accelerator_strategy_rule(per_device, per_replica, free, expected):
    assert engine.choose_strategy(per_device, per_replica, free) == expected


def test_replica_memory_estimate_covers_the_state(ds):
    x = ds.x_train[:1]
    est = engine.replica_memory_bytes(engine.Task(MODEL, TX), x.shape[1:], 16)
    params = MODEL.init(jax.random.key(0), x, train=False)["params"]
    param_bytes = sum(a.size * 4 for a in jax.tree.leaves(params))
    # Parameters, Adam's two moments, the new state and the step's buffers.
    assert est >= 4 * param_bytes
    bigger = engine.replica_memory_bytes(engine.Task(MODEL, TX), x.shape[1:], 4096)
    assert bigger > est + 4096 * 12 * 4  # a bigger batch's inputs and activations count


def test_deterministic_mode_changes_nothing_on_cpu(ds):
    plain = engine.fit(MODEL, TX, ds, **BASE)
    det = engine.fit(MODEL, TX, ds, deterministic=True, **BASE)
    for a, b in zip(jax.tree.leaves(plain.state), jax.tree.leaves(det.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(plain.predict(ds.x_test), det.predict(ds.x_test))
    assert det.config.to_dict()["deterministic"] is True
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        engine.FitConfig(deterministic="yes")


def test_one_device_means_no_mesh_and_no_padding(ds):
    run = engine.fit(MODEL, TX, ds, **BASE)
    assert run.placement.mesh is None and run.placement.num_padded == 3
    assert jax.tree.leaves(run.device_state)[0].shape[0] == 3
    assert run.diverged.shape == (3,) and not run.diverged.any()


def test_assigning_a_state_is_what_predict_and_diverged_use(ds):
    run = engine.fit(MODEL, TX, ds, **BASE)
    before = run.predict(ds.x_test)
    zeroed = jax.tree.map(lambda a: np.zeros_like(np.asarray(a)), run.state)
    other = run.with_state(zeroed)
    np.testing.assert_array_equal(run.predict(ds.x_test), before)  # the original is kept
    np.testing.assert_allclose(other.predict(ds.x_test), 1 / 3)  # zero weights: uniform
    nan = jax.tree.map(lambda a: np.full_like(np.asarray(a), np.nan), run.state.params)
    run.state = run.state._replace(params=nan)
    assert run.diverged.all() and np.isnan(np.asarray(run.state.params["dense_0"]["kernel"])).all()


def test_callback_gets_the_state_only_when_it_asks(ds):
    seen = []
    eng = engine.Engine(engine.Task(MODEL, TX), ds, engine.FitConfig(**dict(BASE, epochs=3)))
    eng.run(
        callback=lambda done, state, hist: seen.append((done, state is None, hist["loss"].shape)),
        callback_state=lambda done: done == 2,
    )
    assert seen == [(1, True, (3, 1)), (2, False, (3, 2)), (3, True, (3, 3))]


def test_abstract_state_matches_init(ds):
    eng = engine.Engine(engine.Task(MODEL, TX), ds, engine.FitConfig(**BASE))
    abstract, state = eng.abstract_state(), eng.init()
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert a.shape == s.shape and a.dtype == s.dtype


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coordinator_address="127.0.0.1:1"), "missing: num_processes, process_id"),
        (dict(num_processes=2, process_id=0), "missing: coordinator_address"),
        (
            dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2),
            r"process_id must be in \[0, 2\)",
        ),
        (
            dict(coordinator_address="127.0.0.1:1", num_processes=0, process_id=0),
            "num_processes must be >= 1",
        ),
    ],
)
def test_distributed_initialize_names_what_is_missing(kwargs, match, monkeypatch):
    for name in (
        distributed.ENV_ADDRESS,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_cluster_detection_joins_only_a_job_of_several_processes(monkeypatch):
    for name in (
        "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "OMPI_MCA_orte_hnp_uri",
        "KUBERNETES_SERVICE_HOST",
        distributed.ENV_ADDRESS,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.cluster_processes() == 0
    # A single-task Slurm job: detected, but not a multi-process run, so not joined.
    for name, value in (
        ("SLURM_JOB_ID", "7"),
        ("SLURM_STEP_NODELIST", "node1"),
        ("SLURM_NTASKS", "1"),
        ("SLURM_PROCID", "0"),
        ("SLURM_LOCALID", "0"),
    ):
        monkeypatch.setenv(name, value)
    assert distributed.cluster_processes() == 1
    assert distributed.initialize() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_processes() == 4


def test_distributed_initialize_without_a_run_is_a_single_process(monkeypatch):
    for name in (
        distributed.ENV_ADDRESS,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize(auto=False) is False
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()
    assert distributed.is_writer() and jax.process_count() == 1
    distributed.barrier("nothing to wait for")
    assert distributed.from_writer({"a": [1, 2]}) == {"a": [1, 2]}


def test_a_state_with_the_wrong_replica_count_is_refused(ds):
    eng = engine.Engine(engine.Task(MODEL, TX), ds, engine.FitConfig(**BASE))
    wrong = jax.tree.map(lambda a: a[:2], eng.init())
    with pytest.raises(ValueError, match="leading replica axis of 3.*2"):
        eng.train(wrong, 0, 1)
