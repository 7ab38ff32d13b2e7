"""The replica axis sharded over several (fake CPU) devices gives the same result as one device.

JAX fixes its device count when its backend starts, so the check runs in a subprocess that asks
for 4 CPU devices.
"""

import json
import os
import subprocess
import sys
import textwrap

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
    for strategy in ("map", "vmap"):
        runs = {d: engine.fit(model, tx, ds, replicas=4, epochs=2, batch_size=32, devices=d,
                              strategy=strategy, vary=("init", "order", "dropout"))
                for d in (1, 2, 4)}
        ref = runs[1]
        out[strategy] = {
            str(d): max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                        for a, b in zip(jax.tree.leaves(ref.state), jax.tree.leaves(r.state)))
            for d, r in runs.items()}
        out[strategy + "_pred"] = float(np.max(np.abs(runs[4].predict(ds.x_test)
                                                      - ref.predict(ds.x_test))))
        out[strategy + "_sharded"] = len(jax.tree.leaves(runs[4].state)[0].sharding.device_set)
    # Replicas of a 2-component ensemble, plain and anti-distilled, over 1 and 4 devices.
    from jaxrepro import losses
    ens = models.Ensemble(models.MLP(widths=(8,), num_classes=2), num_components=2)
    base = losses.softmax_cross_entropy()
    for name, loss in (("ensemble", base), ("anti_distilled", losses.anti_distillation(base, 0.5))):
        pair = [engine.fit(ens, tx, ds, loss_fn=loss, replicas=4, epochs=2, batch_size=32,
                           devices=d, strategy="map") for d in (1, 4)]
        out[name] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                        zip(jax.tree.leaves(pair[0].state), jax.tree.leaves(pair[1].state)))
    print("RESULT" + json.dumps(out))
""")


def test_result_does_not_depend_on_the_number_of_devices():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    assert out["num_devices"] == 4
    for strategy in ("map", "vmap"):
        assert out[strategy + "_sharded"] == 4      # the state really is spread over 4 devices
    # "map" (the CPU default) runs each replica as the same program whatever the placement:
    # bitwise the same. "vmap" batches a different number of replicas per device, which moves
    # float rounding by an ulp or so.
    for d in ("2", "4"):
        assert out["map"][d] == 0.0, (d, out)
        assert out["vmap"][d] <= 1e-6, (d, out)
    assert out["map_pred"] == 0.0
    assert out["vmap_pred"] <= 1e-6
    assert out["ensemble"] == 0.0  # bitwise, like any model under "map"
    # The decorrelation penalty's gradient (centring then normalising over the batch) compiles
    # to a different rounding inside shard_map than on one device: about 1 ulp per step.
    assert out["anti_distilled"] <= 1e-6
