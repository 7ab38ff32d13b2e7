"""Benchmark: R replicas of a K-component ensemble in one training step.

Run (from the repository root)::

    python benchmarks/bench_ensemble.py [--replicas 8] [--components 4] [--epochs 5] [--out F]

On MNIST-1D with the W1 network (MLP 40-256-256-10, Adam 1e-3, batch 128), all in one process
on the same JAX devices (one per core, as the experiment binaries run), each timed as the median
of ``--repeats`` runs after a warm-up run (compilation excluded; the warm-up minus the median
estimates it):

- ``ensemble``: R replicas of ``models.Ensemble(mlp, K)`` with the plain ensemble loss;
- ``anti-distilled``: the same with ``losses.anti_distillation(..., 0.1)``: the cost of the
  decorrelation penalty;
- ``plain R*K``: R * K replicas of the single model: the same arithmetic (equal compute);
- ``loop of R``: R single-replica fits of the ensemble, one after another: what a user without
  the replica axis would run.

Targets: the anti-distilled ensemble costs at most 1.5x the equal-compute plain replicas (the
penalty and the component axis add little), and training the R replicas together is faster
than the loop over them. Ratios, not seconds, are the result: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _timed  # noqa: E402  (the suite's timer: warm-up, then the median)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jaxrepro

    jaxrepro.use_cpu_devices()
    import jax

    from jaxrepro import data, engine, losses, models, optim

    ds = data.mnist1d()
    mlp = models.MLP(widths=(256, 256), num_classes=10)
    ens = models.Ensemble(mlp, args.components)
    tx = optim.optimizer("adam", 1e-3)
    r, k = args.replicas, args.components
    common = dict(seed=0, vary=("init", "order"), batch_size=128, epochs=args.epochs)
    plain_loss = losses.softmax_cross_entropy()
    ad_loss = losses.anti_distillation(plain_loss, 0.1)

    def fit(model, loss, replicas, **kw):
        run = engine.fit(model, tx, ds, loss_fn=loss, replicas=replicas, **common, **kw)
        jax.block_until_ready(run.device_state)

    cases = {
        "ensemble": lambda: fit(ens, plain_loss, r),
        "anti-distilled": lambda: fit(ens, ad_loss, r),
        "plain R*K": lambda: fit(mlp, plain_loss, r * k),
        "loop of R": lambda: [
            fit(ens, ad_loss, (i,), epochs_per_call=args.epochs) for i in range(r)
        ],
    }
    results = {name: _timed(fn, args.repeats) for name, fn in cases.items()}
    base = results["plain R*K"]["seconds"]
    print(
        f"R = {r} replicas of K = {k} components, {args.epochs} epochs of MNIST-1D, W1 MLP, "
        f"{len(jax.devices())} JAX devices"
    )
    print(f"{'case':<16}{'seconds':>10}{'compile':>10}{'/ plain R*K':>13}")
    for name, res in results.items():
        print(
            f"{name:<16}{res['seconds']:>10.2f}{res['compile_seconds']:>10.1f}"
            f"{res['seconds'] / base:>13.2f}"
        )
    speedup = results["loop of R"]["seconds"] / results["anti-distilled"]["seconds"]
    print(f"anti-distilled R together vs loop of R: {speedup:.2f}x faster")
    out = dict(
        results=results,
        replicas=r,
        components=k,
        epochs=args.epochs,
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        speedup_vs_loop=speedup,
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
