"""The replica axis sharded over several (fake CPU) devices gives the same result as one device.

JAX fixes its device count when its backend starts, so the check runs in a subprocess that asks
for 4 CPU devices. R need not be a multiple of the device count: the replica axis is padded,
and the padding never shows.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

# (replicas, devices) cells of the padding grid: padded and unpadded, 2, 3 and 4 devices and
# the default; chosen so that they need four compiled programs, (padded R, devices) = (4, 2),
# (6, 3), (8, 4) and (3, 3), the other cells sharing them.
GRID = [(3, 2), (4, 2), (4, 3), (6, 3), (5, 4), (3, None), (5, None), (6, 4)]

SCRIPT = textwrap.dedent("""
    import json, jax
    import jaxrepro
    jaxrepro.use_cpu_devices(4)
    import numpy as np, optax
    from jaxrepro import data, engine, models
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    ds = data.Dataset(x[:160], y[:160], x[160:], y[160:], num_classes=2)
    model = models.MLP(widths=(8,), num_classes=2, dropout_rate=0.1)
    tx = optax.adam(1e-2)
    out = {"num_devices": len(jax.devices())}

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    # vmap: R = 4 on 1 and 4 devices (map is the grid below).
    runs = {d: engine.fit(model, tx, ds, replicas=4, epochs=2, batch_size=32, devices=d,
                          strategy="vmap", vary=("init", "order", "dropout"))
            for d in (1, 4)}
    out["vmap"] = max_diff(runs[1].state, runs[4].state)
    out["vmap_pred"] = float(np.max(np.abs(runs[4].predict(ds.x_test)
                                           - runs[1].predict(ds.x_test))))
    out["vmap_sharded"] = len(jax.tree.leaves(runs[4].device_state)[0].sharding.device_set)
    # R not a multiple of the device count: padded, bitwise the one-device result (map).
    # The reference: 6 replicas on one device; its first r are the r-replica run (replica r
    # among R is replica r alone, bitwise under map: test_engine.py).
    grid = {}
    ref6 = engine.fit(model, tx, ds, replicas=6, epochs=2, batch_size=32, devices=1,
                      strategy="map", vary=("init", "order", "dropout"))
    ref6_probs = ref6.predict(ds.x_test)
    for r, d in GRID:
        ref_state = jax.tree.map(lambda a, r=r: np.asarray(a)[:r], ref6.state)
        ref_loss, ref_probs = ref6.history["loss"][:r], ref6_probs[:r]
        run = engine.fit(model, tx, ds, replicas=r, epochs=2, batch_size=32, devices=d,
                         strategy="map", vary=("init", "order", "dropout"))
        probs = run.predict(ds.x_test)
        lead = jax.tree.leaves(run.device_state)[0]
        grid[f"{r}/{d}"] = {
            "state": max_diff(ref_state, run.state),
            "history": float(np.max(np.abs(ref_loss - run.history["loss"]))),
            "probs": float(np.max(np.abs(ref_probs - probs))),
            "shapes": [probs.shape[0], run.history["loss"].shape[0],
                       int(run.diverged.shape[0]),
                       int(jax.tree.leaves(run.state)[0].shape[0])],
            "padded": run.placement.num_padded, "device_rows": int(lead.shape[0]),
            "devices": len(lead.sharding.device_set),
        }
    out["grid"] = grid
    out["components"] = list(run.predict(ds.x_test, components=True).shape)  # R = 6, 4 devices
    # A checkpoint holds [R, ...] whatever the placement: saved from 4 devices (R = 5 padded
    # to 8), resumed on 1 and on 3, it ends where an uninterrupted run (2 devices) does.
    import tempfile
    from jaxrepro import study
    task = engine.Task(model, tx)
    cfg = dict(replicas=5, epochs=2, batch_size=32, strategy="map",
               vary=("init", "order", "dropout"))
    on4 = engine.Engine(task, ds, engine.FitConfig(devices=4, **cfg))
    state, hist = on4.train(on4.init(), 0, 1)
    ckpt = tempfile.mkdtemp()
    study.save_checkpoint(ckpt, 1, state, hist)
    full = engine.fit(model, tx, ds, devices=2, **cfg)
    out["resume"] = {}
    for d in (1, 3):
        eng = engine.Engine(task, ds, engine.FitConfig(devices=d, **cfg))
        restored, epoch, history = study.restore_checkpoint(ckpt, eng.abstract_state)
        run = eng.run(restored, first_epoch=epoch, history=history)
        out["resume"][str(d)] = [max_diff(full.state, run.state),
                                 float(np.max(np.abs(full.history["loss"]
                                                     - run.history["loss"]))), epoch]
    # Replicas of a 2-component ensemble, plain and anti-distilled, over 1 and 4 devices.
    from jaxrepro import losses
    ens = models.Ensemble(models.MLP(widths=(8,), num_classes=2), num_components=2)
    base = losses.softmax_cross_entropy()
    for name, loss in (("ensemble", base), ("anti_distilled", losses.anti_distillation(base, 0.5))):
        pair = [engine.fit(ens, tx, ds, loss_fn=loss, replicas=4, epochs=2, batch_size=32,
                           devices=d, strategy="map") for d in (1, 4)]
        out[name] = max_diff(pair[0].state, pair[1].state)
    print("RESULT" + json.dumps(out))
""").replace("GRID", repr(GRID))


@pytest.fixture(scope="module")
def out():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_result_does_not_depend_on_the_number_of_devices(out):
    assert out["num_devices"] == 4
    assert out["vmap_sharded"] == 4  # the state really is spread over 4 devices
    # "map" (the CPU default) runs each replica as the same program whatever the placement:
    # bitwise the same (the grid below). "vmap" batches a different number of replicas per
    # device, which moves float rounding by an ulp or so.
    assert out["vmap"] <= 1e-6 and out["vmap_pred"] <= 1e-6, out
    assert out["components"] == [6, 1, 40, 2]  # components=True drops the padding too
    assert out["ensemble"] == 0.0  # bitwise, like any model under "map"
    # The decorrelation penalty's gradient (centring then normalising over the batch) compiles
    # to a different rounding inside shard_map than on one device: about 1 ulp per step.
    assert out["anti_distilled"] <= 1e-6


def test_a_checkpoint_resumes_on_another_device_count(out):
    assert out["resume"] == {"1": [0.0, 0.0, 1], "3": [0.0, 0.0, 1]}


@pytest.mark.parametrize("r, d", GRID)
def test_any_replica_count_on_any_device_count_is_padded_invisibly(out, r, d):
    cell = out["grid"][f"{r}/{d}"]
    d = str(d)
    # State, history and probabilities: bitwise those of one device.
    assert cell["state"] == 0.0 and cell["history"] == 0.0 and cell["probs"] == 0.0, cell
    # Nothing returned holds a padding replica.
    assert cell["shapes"] == [r] * 4, cell
    devices = min(r, 4) if d == "None" else int(d)
    padded = -(-r // devices) * devices
    assert cell["devices"] == devices, cell  # every device is used
    assert cell["padded"] == padded and cell["device_rows"] == padded, cell
