"""The cost of portable mode (``jaxrepro.portable``): the engine on W1-W3, host mode against
portable mode, in the same run.

Run (from the repository root)::

    python benchmarks/bench_portable.py                       # W1-W3, R in {1, 8, 32}
    python benchmarks/bench_portable.py --workloads W1 --replicas 32 --rounds 2

Portable mode is a setting of the process (XLA reads its CPU flags when JAX starts), so each
mode runs in its own child process, the CPU split into one device per core as the study
binaries run it; the children alternate (host, portable, host, portable, ... for ``--rounds``)
so that a slow spell of the machine hits both. Each child times ``jaxrepro.fit`` as
``benchmarks/run.py`` does (median of ``--repeats`` runs after a warm-up) and records a digest
of the trained parameters: the table says whether the two portable children agree bitwise and
whether portable mode changed the result. Ratios, not absolute seconds, are the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import WORKLOADS  # noqa: E402


def child(args) -> dict:
    import jaxrepro
    from jaxrepro import engine, portable

    if args.child == "portable":
        portable.enable()
    jaxrepro.use_cpu_devices()
    import jax
    import numpy as np

    out = {"portable": portable.active()}
    for name in args.workloads:
        w = WORKLOADS[name]
        ds, model, tx = w.load(), w.model(), w.tx()
        for r in args.replicas:
            runs = []

            def fit(r=r, w=w, ds=ds, model=model, tx=tx, runs=runs):
                run = engine.fit(
                    model,
                    tx,
                    ds,
                    replicas=r,
                    seed=0,
                    vary=("init", "order"),
                    batch_size=w.batch_size,
                    epochs=w.epochs,
                )
                jax.block_until_ready(run.device_state)
                runs.append(run)

            t = time.perf_counter()
            fit()
            first = time.perf_counter() - t
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fit()
                times.append(time.perf_counter() - t)
            leaves = jax.tree.leaves(runs[-1].state.params)
            digest = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in leaves))
            out[f"{name}/{r}"] = dict(
                seconds=statistics.median(times),
                compile_seconds=max(first - statistics.median(times), 0.0),
                digest=digest.hexdigest()[:16],
            )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3"])
    p.add_argument("--replicas", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--child", choices=["host", "portable"], default=None)
    args = p.parse_args()
    if args.child:
        print("RESULT" + json.dumps(child(args)))
        return
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA")}
    results = {"host": [], "portable": []}
    for _ in range(args.rounds):
        for mode in ("host", "portable"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode]
            cmd += ["--workloads", *args.workloads, "--replicas", *map(str, args.replicas)]
            cmd += ["--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
            got = json.loads(line[len("RESULT") :])
            assert got.pop("portable") == (mode == "portable"), mode
            results[mode].append(got)
            print(f"{mode} child done", file=sys.stderr)
    print(
        "| workload | R | host s | portable s | portable / host | compile host / portable s "
        "| same bits as host | portable runs agree |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = {}
    for key in results["host"][0]:
        h = [r[key] for r in results["host"]]
        q = [r[key] for r in results["portable"]]
        hs = statistics.median(x["seconds"] for x in h)
        qs = statistics.median(x["seconds"] for x in q)
        rows[key] = dict(
            host_seconds=hs,
            portable_seconds=qs,
            ratio=qs / hs,
            host_compile=statistics.median(x["compile_seconds"] for x in h),
            portable_compile=statistics.median(x["compile_seconds"] for x in q),
            same_bits=h[0]["digest"] == q[0]["digest"],
            portable_agree=len({x["digest"] for x in q}) == 1,
        )
        w, r = key.split("/")
        row = rows[key]
        print(
            f"| {w} | {r} | {hs:.3f} | {qs:.3f} | {row['ratio']:.2f} | "
            f"{row['host_compile']:.1f} / {row['portable_compile']:.1f} | "
            f"{'yes' if row['same_bits'] else 'no'} | {'yes' if row['portable_agree'] else 'no'} |"
        )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "raw": results}, f, indent=1)


if __name__ == "__main__":
    main()
