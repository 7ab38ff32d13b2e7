"""Compile once: what a re-fit and a rerun cost, against the same computation already compiled.

Run (from the repository root)::

    python benchmarks/bench_compile.py                 # both parts
    python benchmarks/bench_compile.py --parts refit --replicas 32 --epochs 20   # W1 size

Parts (each in its own child process, so every measurement starts from a fresh JAX):

- ``refit``: the notebook user's second ``fit``. MNIST-1D, MLP 256x2, Adam 1e-3, R = 8,
  3 epochs (the figures of the compile-once issue). In one process: a first fit (it compiles),
  then ``--repeats`` fits reusing the model and optimizer objects, then ``--repeats`` fits with
  fresh objects (``optax.adam(1e-3)`` and a new ``models.MLP``, as a re-run notebook cell
  builds them). Goal: fresh / reused at most 1.3. The trace counters say whether the fresh fits
  traced the training step again.
- ``rerun``: the quick main job (``experiments/irreproducibility.py --quick``), each run a new
  process with a new workdir: twice with the persistent compilation cache in an empty
  directory, then twice with the cache off. Goal: the second cached run at most 0.6x the first.

Ratios, not absolute seconds, are the result: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_refit(args) -> dict:
    import jax
    import optax

    from jaxrepro import data, engine, models

    ds = data.load("mnist1d")

    def fit(model, tx):
        t = time.perf_counter()
        run = engine.fit(
            model,
            tx,
            ds,
            replicas=args.replicas,
            seed=0,
            vary=("init", "order"),
            batch_size=128,
            epochs=args.epochs,
        )
        jax.block_until_ready(run.device_state)
        return time.perf_counter() - t, run.compile_seconds

    make_model = lambda: models.MLP(widths=(256, 256), num_classes=10)  # noqa: E731
    model, tx = make_model(), optax.adam(1e-3)
    first, first_compile = fit(model, tx)
    reused = [fit(model, tx)[0] for _ in range(args.repeats)]
    traces = dict(engine.TRACE_COUNTS)
    fresh = [fit(make_model(), optax.adam(1e-3)) for _ in range(args.repeats)]
    return {
        "first": first,
        "first_compile": first_compile,
        "reused": statistics.median(reused),
        "fresh": statistics.median(t for t, _ in fresh),
        "fresh_compile": max(c for _, c in fresh),
        "retraced": engine.TRACE_COUNTS != traces,
        "devices": len(jax.devices()),
    }


def _main_job(workdir: str, cache: str) -> float:
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "irreproducibility.py"),
            "--quick",
            f"--workdir={workdir}",
            f"--compilation_cache={cache}",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    return time.perf_counter() - t


def part_rerun(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        on = [_main_job(os.path.join(tmp, f"on{i}"), cache) for i in range(2)]
        off = [_main_job(os.path.join(tmp, f"off{i}"), "off") for i in range(2)]
        files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
        size = sum(os.path.getsize(f) for f in files)
    return {"cache_on": on, "cache_off": off, "entries": len(files), "cache_mb": size / 2**20}


def part_refit(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "refit"]
    cmd += ["--replicas", str(args.replicas), "--epochs", str(args.epochs)]
    cmd += ["--repeats", str(args.repeats)]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="refit,rerun")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_refit(args)))
        return
    results = {}
    for part in args.parts.split(","):
        results[part] = {"refit": part_refit, "rerun": part_rerun}[part](args)
    if "refit" in results:
        r = results["refit"]
        print(
            f"refit (R={args.replicas}, {args.epochs} epochs, {r['devices']} device(s)): first "
            f"{r['first']:.2f} s (compiling {r['first_compile']:.2f}), reused objects "
            f"{r['reused']:.2f} s, fresh objects {r['fresh']:.2f} s (compiling "
            f"{r['fresh_compile']:.2f}): fresh/reused {r['fresh'] / r['reused']:.2f} "
            f"(goal <= 1.3); the fresh fits traced again: {r['retraced']}"
        )
    if "rerun" in results:
        r = results["rerun"]
        on, off = r["cache_on"], r["cache_off"]
        print(
            f"quick main job, new process each: cache on {on[0]:.1f} s then {on[1]:.1f} s "
            f"({on[1] / on[0]:.2f}x, goal <= 0.6); cache off {off[0]:.1f} s then {off[1]:.1f} s; "
            f"{r['entries']} cache entries, {r['cache_mb']:.1f} MiB"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
