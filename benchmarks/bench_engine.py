"""Benchmark W1: the replica engine against a loop of separately jitted single-replica runs.

Run:  python benchmarks/bench_engine.py [--replicas 32] [--epochs 20] [--repeats 3] [--out f.json]

Workload W1: MNIST-1D, MLP 40-256-256-10 with ReLU, Adam 1e-3, batch 128, R replicas varying
init and order. In one process it times, after a warm-up compile of each:
- the engine (``jaxrepro.fit`` with each strategy given by ``--strategies``);
- the loop: R separately jitted trainings of one replica each (the same code, ``replicas=(r,)``,
  all epochs in one dispatch: the best a user writing the loop by hand would get);
- the machine's peak: a large jitted float32 matmul.
Each is reported as seconds (median of ``--repeats``), GFLOP/s (6 x multiply-adds of the
matmuls x examples seen: forward 2, backward 4) and fraction of the matmul peak, with the
loop/engine ratio. Ratios matter, not absolute seconds: machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrepro import data, engine, models


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` FLOP/s of a jitted float32 ``[n, n] @ [n, n]``."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def mlp_flops_per_example(in_dim: int, widths, num_classes: int) -> float:
    dims = [in_dim, *widths, num_classes]
    macs = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return 6.0 * macs


def _time(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` further calls)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def w1(replicas: int, epochs: int, strategies, repeats: int) -> dict:
    ds = data.mnist1d()
    model = models.MLP(widths=(256, 256), num_classes=10, activation="relu")
    tx = optax.adam(1e-3)
    cfg = dict(seed=0, vary=("init", "order"), batch_size=128, epochs=epochs)
    examples = replicas * epochs * (ds.num_train // 128) * 128
    flops = examples * mlp_flops_per_example(40, (256, 256), 10)
    results = {}
    for strategy in strategies:
        def run_engine(strategy=strategy):
            run = engine.fit(model, tx, ds, replicas=replicas, strategy=strategy, **cfg)
            jax.block_until_ready(run.state)
        first, sec = _time(run_engine, repeats)
        results[f"engine[{strategy}]"] = dict(seconds=sec, compile_seconds=first - sec)

    def run_loop():
        for r in range(replicas):
            run = engine.fit(model, tx, ds, replicas=(r,), strategy="map",
                             epochs_per_call=epochs, **{k: v for k, v in cfg.items()})
            jax.block_until_ready(run.state)
    first, sec = _time(run_loop, repeats)
    results["loop of jitted single runs"] = dict(seconds=sec, compile_seconds=first - sec)
    for r in results.values():
        r["gflops"] = flops / r["seconds"] / 1e9
    return dict(workload="W1", replicas=replicas, epochs=epochs, examples=examples,
                flops=flops, results=results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategies", default="auto,vmap")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    peak = matmul_peak_flops()
    out = w1(args.replicas, args.epochs, args.strategies.split(","), args.repeats)
    out.update(peak_gflops=peak / 1e9, backend=jax.default_backend(),
               device=str(jax.devices()[0]), machine=platform.machine(),
               cpu_count=__import__("os").cpu_count(), jax=jax.__version__)
    loop = out["results"]["loop of jitted single runs"]["seconds"]
    print(f"W1: MNIST-1D MLP 40-256-256-10, Adam, batch 128, R={args.replicas}, "
          f"{args.epochs} epochs; peak {peak / 1e9:.1f} GFLOP/s ({out['device']})")
    print(f"{'method':32s} {'seconds':>9s} {'compile s':>9s} {'GFLOP/s':>9s} {'of peak':>8s} "
          f"{'loop/this':>9s}")
    for name, r in out["results"].items():
        r["fraction_of_peak"] = r["gflops"] * 1e9 / peak
        r["loop_over_this"] = loop / r["seconds"]
        print(f"{name:32s} {r['seconds']:9.3f} {r['compile_seconds']:9.2f} {r['gflops']:9.1f} "
              f"{r['fraction_of_peak']:8.2f} {r['loop_over_this']:9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
