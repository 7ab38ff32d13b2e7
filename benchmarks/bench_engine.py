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

Each part runs in its own subprocess, because JAX fixes its device layout at start-up: the
baselines (loop, matmul peak) with JAX's default single CPU device, which uses every core; the
engine with ``--cpu-devices`` devices (default: one per core, ``jaxrepro.use_cpu_devices``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrepro import data, engine, models, use_cpu_devices


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
    macs = sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
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


W1_MODEL = dict(widths=(256, 256), num_classes=10, activation="relu")


def part(name: str, replicas: int, epochs: int, strategy: str, repeats: int) -> dict:
    """One measurement, in this process: ``peak``, ``loop`` or ``engine``."""
    if name == "peak":
        return dict(flops_per_second=matmul_peak_flops())
    ds = data.mnist1d()
    model = models.MLP(**W1_MODEL)
    tx = optax.adam(1e-3)
    cfg = dict(seed=0, vary=("init", "order"), batch_size=128, epochs=epochs)
    if name == "engine":
        def fn():
            run = engine.fit(model, tx, ds, replicas=replicas, strategy=strategy, **cfg)
            jax.block_until_ready(run.state)
    else:
        def fn():
            for r in range(replicas):
                run = engine.fit(model, tx, ds, replicas=(r,), strategy="map",
                                 epochs_per_call=epochs, **cfg)
                jax.block_until_ready(run.state)
    first, sec = _time(fn, repeats)
    return dict(seconds=sec, compile_seconds=first - sec, num_devices=len(jax.devices()))


def _subprocess(name: str, args, cpu_devices: int, strategy: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--part", name, "--cpu-devices", str(cpu_devices),
           "--replicas", str(args.replicas), "--epochs", str(args.epochs),
           "--repeats", str(args.repeats), "--strategies", strategy]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategies", default="auto,vmap")
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="CPU devices for the engine (0: one per core)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    if args.part:  # a child process: configure devices first, measure one thing, print JSON
        if args.cpu_devices != 1:
            use_cpu_devices(args.cpu_devices or None)
        print(json.dumps(part(args.part, args.replicas, args.epochs, args.strategies,
                              args.repeats)))
        return None

    cpu_devices = args.cpu_devices or os.cpu_count()
    peak = _subprocess("peak", args, 1)["flops_per_second"]
    examples = args.replicas * args.epochs * (4000 // 128) * 128
    flops = examples * mlp_flops_per_example(40, W1_MODEL["widths"], 10)
    results = {}
    for strategy in args.strategies.split(","):
        results[f"engine[{strategy}] {cpu_devices} dev"] = _subprocess(
            "engine", args, cpu_devices, strategy)
    if cpu_devices != 1:
        results["engine[auto] 1 dev"] = _subprocess("engine", args, 1)
    results["loop of jitted single runs"] = _subprocess("loop", args, 1)
    for r in results.values():
        r["gflops"] = flops / r["seconds"] / 1e9
    out = dict(workload="W1", replicas=args.replicas, epochs=args.epochs, examples=examples,
               flops=flops, results=results, peak_gflops=peak / 1e9,
               backend=jax.default_backend(), machine=platform.machine(),
               cpu_count=os.cpu_count(), jax=jax.__version__)
    loop = out["results"]["loop of jitted single runs"]["seconds"]
    print(f"W1: MNIST-1D MLP 40-256-256-10, Adam, batch 128, R={args.replicas}, "
          f"{args.epochs} epochs; matmul peak {peak / 1e9:.1f} GFLOP/s on "
          f"{os.cpu_count()} cores ({jax.default_backend()})")
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
