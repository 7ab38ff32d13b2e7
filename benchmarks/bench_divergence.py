"""What the divergence rule costs on the hot path (``FitConfig.divergence``).

Run (from the repository root)::

    python benchmarks/bench_divergence.py                      # W1 and W3, R = 32
    python benchmarks/bench_divergence.py --workloads W3 --replicas 8 --rounds 5

In one process, for each workload: the engine as it is (the rule applied after every epoch)
against the same engine with the rule replaced by the identity (``engine._apply_divergence_rule``
returning the epoch's new state unchanged: the engine before the rule). Both are compiled
first; then ``--rounds`` alternating timed fits of each. The figure is the ratio of their
medians (with the rule / without): ratios in one process, because the machines are shared and
noisy. The CPU is split into one device per core, as the binaries run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W3")
    parser.add_argument("--replicas", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import jaxrepro

    jaxrepro.use_cpu_devices()
    import jax
    from workloads import WORKLOADS

    from jaxrepro import engine

    with_rule = engine._apply_divergence_rule

    def without_rule(old, new, metrics, step_metrics, epoch, divergence):
        return new, metrics

    out = {}
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        ds, model = w.load(), w.model()
        config = engine.FitConfig(
            replicas=args.replicas,
            vary=("init", "order"),
            batch_size=w.batch_size,
            epochs=w.epochs,
        )
        # Each variant is its own task (the rule is part of the traced step): a fresh optax
        # object per variant keeps the compiled programs apart.
        tasks = {"with": w.tx(), "without": w.tx()}

        def fit(variant, model=model, tasks=tasks, ds=ds, config=config):
            engine._apply_divergence_rule = with_rule if variant == "with" else without_rule
            try:
                task = engine.Task(model, tasks[variant])
                eng = engine.Engine(task, ds, config)
                eng._compiled_task = engine.dataclasses.replace(
                    eng._compiled_task, tx=tasks[variant]
                )
                start = time.perf_counter()
                run = eng.run()
                jax.block_until_ready(run.device_state)
                return time.perf_counter() - start, run
            finally:
                engine._apply_divergence_rule = with_rule

        runs = {v: fit(v)[1] for v in tasks}  # compile both
        same = bool((runs["with"].predict(ds.x_test) == runs["without"].predict(ds.x_test)).all())
        times = {v: [] for v in tasks}
        for _ in range(args.rounds):
            for v in tasks:
                times[v].append(fit(v)[0])
        med = {v: statistics.median(t) for v, t in times.items()}
        out[name] = dict(seconds=med, ratio=med["with"] / med["without"], same_result=same)
        print(
            f"{name} R={args.replicas}: with the rule {med['with']:.3f} s, without "
            f"{med['without']:.3f} s, ratio {out[name]['ratio']:.3f}; same predictions: {same} "
            f"(runs: with {[round(t, 3) for t in times['with']]}, "
            f"without {[round(t, 3) for t in times['without']]})",
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
