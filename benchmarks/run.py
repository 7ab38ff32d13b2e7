"""The benchmark suite: the replica engine against every way a user would train R replicas instead.

Run (from the repository root; PyTorch is optional: ``pip install torch==2.13.0``)::

    python benchmarks/run.py                                  # W1-W3, R in {1, 8, 32, 128}
    python benchmarks/run.py --workloads W1 --replicas 32 --out bench_results/w1.json

For each workload (``benchmarks/workloads.py``) and replica count R, in one run:

- ``engine``: ``jaxrepro.fit`` with the automatic strategy, the CPU split into one JAX device
  per core (``jaxrepro.use_cpu_devices``), as the experiment binaries run it;
- ``loop``: R separately jitted single-replica trainings of the same code (each replica's whole
  training in one dispatch), on JAX's default device;
- ``torch eager``: a PyTorch loop of R trainings;
- ``torch.func``: PyTorch with ``stack_module_state``, ``functional_call`` and ``vmap``, one
  optimizer over the stacked parameters (Adam and SGD act elementwise, so per replica);
- ``peak``: the best FLOP/s of a jitted float32 2048x2048 matmul on JAX's default device.

Every method sees the same number of examples: R x epochs x (N // batch) x batch. Each method
runs in its own subprocess (JAX fixes its devices at start-up, and the baselines get JAX's
default configuration). Times are medians of ``--repeats`` runs after a warm-up run (the
warm-up minus the median estimates compilation). Loops beyond ``--loop-max-replicas`` are not
run but extrapolated linearly from the largest measured R (marked ``*``): a loop of R runs costs
R times one run. FLOPs are 3x the forward pass's FLOPs from XLA's cost analysis (forward 1,
backward 2). Ratios, not absolute seconds, are the result: machines are shared and noisy.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import WORKLOADS  # noqa: E402

METHODS = ("engine", "loop", "torch eager", "torch.func")


def _timed(fn, repeats: int) -> dict:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return dict(seconds=sec, compile_seconds=max(first - sec, 0.0), runs=times)


# --- parts, each run in a child process ------------------------------------------------------


def part_peak(args) -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return dict(flops_per_second=2 * n**3 / best, device=str(jax.devices()[0]))


def part_flops(args) -> dict:
    import jax
    import numpy as np

    out = {}
    for name in args.workloads:
        w = WORKLOADS[name]
        ds, model = w.load(), w.model()
        x = np.asarray(ds.x_train[: w.batch_size])
        variables = model.init({"params": jax.random.key(0)}, x, train=False)
        cost = (
            jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
            .lower(variables, x)
            .compile()
            .cost_analysis()
        )
        cost = cost[0] if isinstance(cost, list) else cost
        out[name] = dict(
            flops_per_example=3.0 * float(cost["flops"]) / w.batch_size, num_train=ds.num_train
        )
    return out


def part_engine(args) -> dict:
    import jax

    from jaxrepro import engine

    w = WORKLOADS[args.workload]
    ds, model, tx = w.load(), w.model(), w.tx()
    out = {}
    for r in args.replicas:

        def fn(r=r):
            run = engine.fit(
                model,
                tx,
                ds,
                replicas=r,
                seed=0,
                vary=("init", "order"),
                batch_size=w.batch_size,
                epochs=w.epochs,
                strategy=args.strategy,
            )
            jax.block_until_ready(run.device_state)

        out[r] = _timed(fn, args.repeats)
        out[r]["devices"] = len(engine.replica_mesh(r).devices) if engine.replica_mesh(r) else 1
    return out


def part_loop(args) -> dict:
    import jax

    from jaxrepro import engine

    w = WORKLOADS[args.workload]
    ds, model, tx = w.load(), w.model(), w.tx()
    out = {}
    for r in args.replicas:

        def fn(r=r):
            for i in range(r):
                run = engine.fit(
                    model,
                    tx,
                    ds,
                    replicas=(i,),
                    seed=0,
                    vary=("init", "order"),
                    batch_size=w.batch_size,
                    epochs=w.epochs,
                    epochs_per_call=w.epochs,
                    strategy="map",
                )
                jax.block_until_ready(run.device_state)

        out[r] = _timed(fn, args.loop_repeats)
    return out


def _torch_data(w):
    import torch

    ds = w.load()
    x = w.torch_input(torch.from_numpy(ds.x_train))
    y = torch.from_numpy(ds.y_train.astype("int64"))
    return x, y


def part_torch_eager(args) -> dict:
    import torch

    w = WORKLOADS[args.workload]
    x, y = _torch_data(w)
    n, b = x.shape[0], w.batch_size
    steps = n // b

    def train(seed):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = w.torch_model()
        opt = w.torch_optimizer(model.parameters())
        for _ in range(w.epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(steps):
                idx = perm[s * b : (s + 1) * b]
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()

    out = {}
    for r in args.replicas:
        out[r] = _timed(lambda r=r: [train(i) for i in range(r)], args.loop_repeats)
    return dict(out, threads=torch.get_num_threads())


def part_torch_func(args) -> dict:
    import torch
    from torch.func import functional_call, stack_module_state

    w = WORKLOADS[args.workload]
    x, y = _torch_data(w)
    n, b = x.shape[0], w.batch_size
    steps = n // b

    def train(r):
        torch.manual_seed(0)
        replicas = [w.torch_model() for _ in range(r)]
        params, buffers = stack_module_state(replicas)
        base = w.torch_model().to("meta")
        leaves = list(params.values())
        opt = w.torch_optimizer(leaves)
        g = torch.Generator().manual_seed(0)

        def one(p, bu, xb):
            return functional_call(base, (p, bu), (xb,))

        batched = torch.func.vmap(one)
        for _ in range(w.epochs):
            perms = torch.stack([torch.randperm(n, generator=g) for _ in range(r)])
            for s in range(steps):
                idx = perms[:, s * b : (s + 1) * b]  # [R, B]
                logits = batched(params, buffers, x[idx])  # [R, B, C]
                loss = (
                    torch.nn.functional.cross_entropy(
                        logits.reshape(r * b, -1), y[idx].reshape(-1), reduction="sum"
                    )
                    / b
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()  # sum over replicas of each replica's mean loss
                opt.step()

    out = {}
    for r in args.replicas:
        out[r] = _timed(lambda r=r: train(r), args.loop_repeats)
    return out


PARTS = {
    "peak": part_peak,
    "flops": part_flops,
    "engine": part_engine,
    "loop": part_loop,
    "torch eager": part_torch_eager,
    "torch.func": part_torch_func,
}


# --- the parent ------------------------------------------------------------------------------


def _child(part: str, args, *, workload: str = "", replicas=(), cpu_devices: int = 1) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--part",
        part,
        "--cpu-devices",
        str(cpu_devices),
        "--repeats",
        str(args.repeats),
        "--loop-repeats",
        str(args.loop_repeats),
        "--strategy",
        args.strategy,
        "--workloads",
        ",".join(args.workloads),
    ]
    if workload:
        cmd += ["--workload", workload]
    if replicas:
        cmd += ["--replicas", ",".join(map(str, replicas))]
    print(f"  running {part} {workload} R={list(replicas)} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"part {part} {workload} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--replicas", default="1,8,32,128")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the engine")
    parser.add_argument(
        "--loop-repeats",
        type=int,
        default=1,
        help="timed runs of each loop baseline (a loop already averages R runs)",
    )
    parser.add_argument(
        "--loop-max-replicas",
        type=int,
        default=32,
        help="loops above this R are extrapolated, not run",
    )
    parser.add_argument("--strategy", default="auto")
    parser.add_argument(
        "--cpu-devices", type=int, default=0, help="CPU devices for the engine (0: one per core)"
    )
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=None, help="write all figures as JSON here")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workloads = args.workloads.split(",")
    args.replicas = [int(r) for r in args.replicas.split(",")]

    if args.part:  # child: devices first, then one measurement, printed as JSON
        if args.part in ("engine",) and args.cpu_devices != 1:
            import jaxrepro

            jaxrepro.use_cpu_devices(args.cpu_devices or None)
        print(json.dumps(PARTS[args.part](args)))
        return {}

    import jax

    cpu_devices = args.cpu_devices or os.cpu_count()
    methods = ["engine", "loop"] + (
        [] if args.no_torch or not _have_torch() else ["torch eager", "torch.func"]
    )
    peak = _child("peak", args)["flops_per_second"]
    flops = _child("flops", args)
    report = dict(
        peak_gflops=peak / 1e9,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        backend=jax.default_backend(),
        jax=jax.__version__,
        engine_cpu_devices=cpu_devices,
        strategy=args.strategy,
        workloads={},
    )
    for name in args.workloads:
        w = WORKLOADS[name]
        measured = {}
        for method in methods:
            rs = args.replicas
            if method != "engine":
                rs = [r for r in rs if r <= args.loop_max_replicas] or [min(rs)]
            res = _child(
                method,
                args,
                workload=name,
                replicas=rs,
                cpu_devices=cpu_devices if method == "engine" else 1,
            )
            measured[method] = {int(k): v for k, v in res.items() if k.isdigit()}
        examples_per_replica = w.epochs * (flops[name]["num_train"] // w.batch_size) * w.batch_size
        rows = []
        for r in args.replicas:
            row = dict(replicas=r, examples=r * examples_per_replica)
            for method in methods:
                m = measured[method]
                if r in m:
                    sec, est = m[r]["seconds"], False
                else:
                    largest = max(m)
                    sec, est = m[largest]["seconds"] * r / largest, True
                row[method] = dict(
                    seconds=sec,
                    extrapolated=est,
                    compile_seconds=m.get(r, {}).get("compile_seconds"),
                )
                row[method]["examples_per_second"] = row["examples"] / sec
                work = row["examples"] * flops[name]["flops_per_example"]
                row[method]["gflops"] = work / sec / 1e9
                row[method]["fraction_of_peak"] = row[method]["gflops"] * 1e9 / peak
            for method in methods:
                row[method]["ratio_to_engine"] = row[method]["seconds"] / row["engine"]["seconds"]
            rows.append(row)
        # The target: engine time per replica falls monotonically from R = 1 up to R = 32
        # (beyond, with every core busy, it is flat).
        per_replica = [
            row["engine"]["seconds"] / row["replicas"] for row in rows if row["replicas"] <= 32
        ]
        falls = all(a > b for a, b in zip(per_replica[:-1], per_replica[1:], strict=True))
        report["workloads"][name] = dict(
            description=w.description,
            epochs=w.epochs,
            batch_size=w.batch_size,
            flops_per_example=flops[name]["flops_per_example"],
            rows=rows,
            engine_time_per_replica_falls=falls,
        )
        _print_table(name, w, report["workloads"][name], methods, peak)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.out)
    return report


def _print_table(name, w, res, methods, peak):
    print(
        f"\n{name}: {w.description}, batch {w.batch_size}, {w.epochs} epochs "
        f"({res['flops_per_example'] / 1e6:.2f} MFLOP per example); matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s"
    )
    head = f"{'R':>4s} {'engine s':>9s} {'ex/s':>9s} {'GFLOP/s':>8s} {'of peak':>7s} "
    head += " ".join(f"{m + ' x':>14s}" for m in methods[1:])
    print(head)
    for row in res["rows"]:
        e = row["engine"]
        line = (
            f"{row['replicas']:>4d} {e['seconds']:9.3f} {e['examples_per_second']:9.0f} "
            f"{e['gflops']:8.1f} {e['fraction_of_peak']:7.2f} "
        )
        line += " ".join(
            f"{row[m]['ratio_to_engine']:13.2f}{'*' if row[m]['extrapolated'] else ' '}"
            for m in methods[1:]
        )
        print(line)
    print(
        f"(method x: its time / the engine's time; * extrapolated. Engine time per replica "
        f"falls monotonically up to R = 32: {res['engine_time_per_replica_falls']})"
    )


if __name__ == "__main__":
    main()
