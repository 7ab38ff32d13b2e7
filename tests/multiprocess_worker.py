"""One process of a multi-process test run (started by tests/test_multiprocess.py).

Usage: python multiprocess_worker.py MODE[+MODE] OUT_DIR [ADDRESS NUM_PROCESSES PROCESS_ID]

Without the last three arguments it runs as a single process. Every process writes what it
read back to OUT_DIR/<mode>-<process id>.npz, so the test can check that each process holds
the whole result, bitwise equal to a single-process run's.

Modes:
  fit      R = 4 and R = 5 (padded) replicas of a small MLP with dropout: parameters,
           history, diverged flags, probabilities and logits.
  study    the quick main job in OUT_DIR/study (results.json).
  resume   the same, interrupted by an exception after the second trial's first checkpoint,
           then run again to the end in the same process.
"""

import sys

DEVICES_PER_PROCESS = 2


def main(argv):
    mode, out_dir = argv[1], argv[2]
    import jaxrepro

    if len(argv) > 3:
        address, num, pid = argv[3], int(argv[4]), int(argv[5])
        assert jaxrepro.distributed.initialize(address, num, pid, cpu_devices=DEVICES_PER_PROCESS)
    else:
        jaxrepro.use_cpu_devices(2 * DEVICES_PER_PROCESS)
        pid = 0
    import jax
    import numpy as np
    import optax

    from jaxrepro import data, engine, models, study

    out = {
        "num_devices": np.int32(len(jax.devices())),
        "num_processes": np.int32(jax.process_count()),
    }
    modes = mode.split("+")
    if "fit" in modes:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(200, 6)).astype(np.float32)
        y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int32)
        ds = data.Dataset(x[:160], y[:160], x[160:], y[160:], num_classes=2)
        model = models.MLP(widths=(8,), num_classes=2, dropout_rate=0.1)
        for r in (4, 5):
            run = engine.fit(
                model,
                optax.adam(1e-2),
                ds,
                replicas=r,
                epochs=2,
                batch_size=32,
                strategy="map",
                vary=("init", "order", "dropout"),
            )
            out[f"r{r}_probs"] = run.predict(ds.x_test)
            out[f"r{r}_logits"] = run.predict(ds.x_test, logits=True, chunk_size=16)
            out[f"r{r}_loss"] = run.history["loss"]
            out[f"r{r}_diverged"] = run.diverged
            out[f"r{r}_kernel"] = np.asarray(run.state.params["dense_0"]["kernel"])
            out[f"r{r}_devices"] = np.int32(run.placement.num_devices)
        # A learning rate per replica: the hyperparameters are sharded (and padded) too.
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        run = engine.fit(
            model,
            tx,
            ds,
            replicas=3,
            epochs=1,
            batch_size=32,
            strategy="map",
            hparams={"learning_rate": [0.0, 0.1, 0.3]},
            vary=("init",),
        )
        out["hp_kernel"] = np.asarray(run.state.params["dense_0"]["kernel"])
        out["hp_lr"] = np.asarray(run.state.opt_state.hyperparams["learning_rate"])
    if "study" in modes or "resume" in modes:
        config = study.IrreproducibilityConfig.quick()
        workdir = f"{out_dir}/study"
        mode_kw = {"portable": jaxrepro.portable.active()}  # the test session's mode

        class Interrupt(Exception):
            pass

        def interrupt(name, epoch):
            if name == "relu/all" and epoch == 1:
                raise Interrupt

        if "resume" in modes:
            try:
                study.run(
                    config,
                    workdir,
                    checkpoint_every=1,
                    progress=False,
                    on_checkpoint=interrupt,
                    **mode_kw,
                )
                raise AssertionError("the run was not interrupted")
            except Interrupt:
                pass
        study.run(config, workdir, checkpoint_every=1, progress=False, **mode_kw)
    for m in modes:
        np.savez(f"{out_dir}/{m}-{pid}.npz", **out)
    print("WORKER DONE", mode, pid, flush=True)


if __name__ == "__main__":
    main(sys.argv)
