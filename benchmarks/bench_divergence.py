"""What a per-epoch or per-step addition to the training step costs on the hot path: the
divergence rule (``FitConfig.divergence``) or the check for a perturbation at a chosen step
(``FitConfig.perturb_step``).

Run (from the repository root)::

    python benchmarks/bench_divergence.py                      # W1 and W3, R = 32
    python benchmarks/bench_divergence.py --workloads W3 --replicas 8 --rounds 5
    python benchmarks/bench_divergence.py --feature perturb_step

In one process, for each workload: the engine as it is against the same engine with the
feature replaced by the identity (``--feature divergence``: ``engine._apply_divergence_rule``
returning the epoch's new state unchanged, the engine before the rule; ``--feature
perturb_step``: ``engine._perturb_after`` returning the parameters unchanged, the engine before
the ``lax.cond`` that applies a perturbation after step t; both run with ``perturb_step=0``,
the default, where the condition is never true). Both are compiled first; then ``--rounds``
alternating timed fits of each. The figure is the ratio of their medians (with / without):
ratios in one process, because the machines are shared and noisy. The CPU is split into one
device per core, as the binaries run.
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
    parser.add_argument("--feature", choices=("divergence", "perturb_step"), default="divergence")
    args = parser.parse_args(argv)

    import jaxrepro

    jaxrepro.use_cpu_devices()
    import jax
    from workloads import WORKLOADS

    from jaxrepro import engine

    hook = {"divergence": "_apply_divergence_rule", "perturb_step": "_perturb_after"}[args.feature]
    with_rule = getattr(engine, hook)

    def without_rule(*a):
        if args.feature == "divergence":  # (old, new, metrics, step_metrics, epoch, divergence)
            return a[1], a[2]
        return a[0]  # (params, step, key, perturb_step, perturb_scale)

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
            setattr(engine, hook, with_rule if variant == "with" else without_rule)
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
                setattr(engine, hook, with_rule)

        runs = {v: fit(v)[1] for v in tasks}  # compile both
        same = bool((runs["with"].predict(ds.x_test) == runs["without"].predict(ds.x_test)).all())
        times = {v: [] for v in tasks}
        for _ in range(args.rounds):
            for v in tasks:
                times[v].append(fit(v)[0])
        med = {v: statistics.median(t) for v, t in times.items()}
        out[name] = dict(seconds=med, ratio=med["with"] / med["without"], same_result=same)
        print(
            f"{name} R={args.replicas} ({args.feature}): with {med['with']:.3f} s, without "
            f"{med['without']:.3f} s, ratio {out[name]['ratio']:.3f}; same predictions: {same} "
            f"(runs: with {[round(t, 3) for t in times['with']]}, "
            f"without {[round(t, 3) for t in times['without']]})",
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
