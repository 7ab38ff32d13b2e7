"""W1 at many replica counts, by strategy and deterministic mode, on whatever JAX runs on.

Run (from the repository root)::

    python benchmarks/accelerator.py                       # on a GPU: R in {1, 8, 64, 256, 1024}
    python benchmarks/accelerator.py --replicas 1,8 --epochs 2         # a quick CPU run
    python benchmarks/accelerator.py --cpu_devices 2 --replicas 8      # 1 process x 2 devices
    python benchmarks/accelerator.py --processes 2 --cpu_devices 1 --replicas 8
                                                           # 2 processes x 1 device (CPU, gloo)

W1 is MNIST-1D, MLP 40-256-256-10 ReLU, Adam 1e-3, batch 128, 20 epochs (``workloads.py``).
For each strategy (``vmap``, ``map``, ``chunked:n``, ``auto``), deterministic mode off and on,
and each R, it times ``jaxrepro.fit`` twice: the first call includes compilation, the second
is the figure. It prints seconds, replicas per second, seconds per replica and the wall time
relative to R = 1 of the same strategy, and writes them as JSON with ``--out``. A run that
fails (out of memory, say) is recorded as such, and larger R of that strategy are skipped; so
are larger R once one run took longer than ``--max_seconds``.

``--processes N`` starts N processes of this script on 127.0.0.1 joined by
``jaxrepro.distributed`` (the collectives' cost against one process with as many devices);
process 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GPU_REPLICAS = (1, 8, 64, 256, 1024)
CPU_REPLICAS = (1, 8, 64)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--replicas",
        default="",
        help="comma-separated R (default: 1,8,64,256,1024 on an accelerator, 1,8,64 on CPU)",
    )
    p.add_argument("--strategies", default="vmap,map,chunked:64,auto")
    p.add_argument("--deterministic", default="off,on", help="off, on or off,on")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--max_seconds",
        type=float,
        default=300.0,
        help="skip larger R of a strategy once one run took longer",
    )
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=0,
        help="JAX CPU devices per process (0: JAX's default of one)",
    )
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--coordinator_address", default=None, help=argparse.SUPPRESS)
    p.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def _launch(args) -> int:
    """Starts ``--processes`` copies of this script joined on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    argv = [
        f"--{k}={v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("coordinator_address", "process_id")
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                *argv,
                f"--coordinator_address={address}",
                f"--process_id={i}",
            ],
            stdout=None if i == 0 else subprocess.DEVNULL,
        )
        for i in range(args.processes)
    ]
    try:
        return max(p.wait() for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main(argv=None) -> int:
    args = _parse(argv)
    if args.processes > 1 and args.coordinator_address is None:
        return _launch(args)
    import jaxrepro

    if args.coordinator_address is not None:
        jaxrepro.distributed.initialize(
            args.coordinator_address,
            args.processes,
            args.process_id,
            cpu_devices=args.cpu_devices or None,
        )
    elif args.cpu_devices:
        jaxrepro.use_cpu_devices(args.cpu_devices)
    import jax
    from workloads import WORKLOADS

    from jaxrepro import engine

    w = WORKLOADS["W1"]
    ds, model, tx = w.load(), w.model(), w.tx()
    backend = jax.default_backend()
    replicas = (
        [int(r) for r in args.replicas.split(",")]
        if args.replicas
        else list(CPU_REPLICAS if backend == "cpu" else GPU_REPLICAS)
    )
    writer = jax.process_index() == 0
    say = (lambda *a: print(*a, flush=True)) if writer else (lambda *a: None)
    say(
        f"W1 x {args.epochs} epochs on {jax.device_count()} {backend} device(s) "
        f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es); jax "
        f"{jax.__version__}"
    )
    say(
        f"{'strategy':>12} {'det':>3} {'R':>5} {'seconds':>8} {'compile':>8} {'rep/s':>8} "
        f"{'s/rep':>8} {'vs R=1':>7} {'devices':>7} chosen"
    )
    rows = []
    for strategy in args.strategies.split(","):
        for det in args.deterministic.split(","):
            deterministic = {"off": False, "on": True}[det]
            base = None
            for r in replicas:
                config = engine.FitConfig(
                    replicas=r,
                    seed=0,
                    vary=("init", "order"),
                    batch_size=w.batch_size,
                    epochs=args.epochs,
                    strategy=strategy,
                    deterministic=deterministic,
                )
                row = dict(
                    strategy=strategy,
                    deterministic=deterministic,
                    replicas=r,
                    backend=backend,
                    devices=jax.device_count(),
                    processes=jax.process_count(),
                )
                try:
                    t0 = time.perf_counter()
                    run = engine.fit(model, tx, ds, config=config)
                    jax.block_until_ready(run.device_state)
                    first = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    run = engine.fit(model, tx, ds, config=config)
                    jax.block_until_ready(run.device_state)
                    sec = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - out of memory and the like: recorded
                    row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    rows.append(row)
                    say(f"{strategy:>12} {det:>3} {r:>5} failed: {row['error']}")
                    break
                base = sec if base is None else base
                kind, chunk = run.placement.strategy
                row.update(
                    seconds=sec,
                    compile_seconds=max(first - sec, 0.0),
                    replicas_per_second=r / sec,
                    seconds_per_replica=sec / r,
                    relative_to_r1=sec / base,
                    chosen=f"{kind}" + (f":{chunk}" if chunk else ""),
                    padded=run.placement.num_padded,
                )
                rows.append(row)
                say(
                    f"{strategy:>12} {det:>3} {r:>5} {sec:8.2f} {row['compile_seconds']:8.2f} "
                    f"{r / sec:8.1f} {sec / r:8.4f} {sec / base:7.2f} "
                    f"{run.placement.num_devices:>7} {row['chosen']}"
                )
                if jaxrepro.distributed.from_writer(sec) > args.max_seconds:  # all agree
                    say(
                        f"{'':>12} {'':>3} larger R of {strategy} skipped (over "
                        f"{args.max_seconds:.0f} s)"
                    )
                    break
    if args.out and writer:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
