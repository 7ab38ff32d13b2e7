"""Benchmark of jaxrepro.metrics.compare against an explicit loop over replica pairs.

Run:

    python benchmarks/bench_metrics.py [--out results.json] [--skip-big] [--skip-bootstrap]

Case 1 (R = 128, N = 10,000, C = 10): ``compare`` after a warm-up compile against the pair
loop that robustness_metrics-style code runs (NumPy vectorised over examples, a Python loop
over the R(R-1)/2 pairs); both give the same numbers. Target: at least 20x faster and under
2 s on a 2-core CPU. Also times the bootstrap intervals (1000 samples, replicas and examples).

Case 2 (R = 256, N = 100,000, C = 100, 10.2 GB of float32 logits): runs in a child process so
that its peak resident memory (``ru_maxrss``) is its own. The predictions are never held
whole: ``compare`` streams them block by block from a lazy source (an object with ``.shape``
whose ``obj[:, a:b]`` computes that block), or with ``--source memmap`` from an ``np.memmap``
written block by block to a temporary file (10 GB of disk; mapped pages the process touched
then count in ``ru_maxrss`` although the kernel can drop them).

Measured on the project's 2-core CPU (shared, load average 3-5): case 1 compare 0.27-0.40 s
against a 8.8-12.6 s pair loop (31-33x), compile about 1.2-2 s, bootstrap with 1000 samples
12-19 s (replicas) and 1.3-2 s (examples); case 2 45-60 s wall (14-21 s of it generating the
input) with a peak RSS of 0.5-0.65 GiB. Those figures predate the multiplicity measures in
``compare`` (issue 13); measured beside the previous code in one process afterwards (BUILD_NOTES
"Metrics"), case 1's compare costs 1.15-1.2x and its example bootstrap about 5-6x (3-4 s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from jaxrepro import metrics


def realistic_logits(r, n, c, seed=0):
    """Replicas that share most of their logits, as trained models do."""
    rng = np.random.default_rng(seed)
    base = 2.0 * rng.standard_normal((n, c), dtype=np.float32)
    labels = np.argmax(base + rng.gumbel(size=(n, c)).astype(np.float32), -1)
    noise = 0.7 * rng.standard_normal((r, n, c), dtype=np.float32)
    return base[None] + noise, labels


def pair_loop(probs, labels):
    """Every pairwise metric by its definition: NumPy over examples, Python over pairs."""
    r, n, _ = probs.shape
    logp = np.log(np.maximum(probs, metrics.LOG_FLOOR))
    yhat = probs.argmax(-1)
    correct = yhat == labels[None, :]
    q = np.take_along_axis(probs, labels[None, :, None], -1)[..., 0]
    sums = dict(churn=0.0, pd_abs=0.0, sq=0.0, kl=0.0, churn_correctness=0.0)
    rel = np.zeros(n)
    for a, b in itertools.combinations(range(r), 2):
        d = probs[a] - probs[b]
        sums["churn"] += np.mean(yhat[a] != yhat[b])
        sums["pd_abs"] += np.mean(0.5 * np.abs(d).sum(-1))
        rel += np.abs(q[a] - q[b])
        sums["sq"] += np.mean((d * d).sum(-1))
        sums["kl"] += np.mean((probs[a] * (logp[a] - logp[b])).sum(-1))
        sums["kl"] += np.mean((probs[b] * (logp[b] - logp[a])).sum(-1))
        sums["churn_correctness"] += np.mean(correct[a] != correct[b])
    m = r * (r - 1) / 2
    qbar = q.mean(0)
    rel = np.where(qbar < 1e-7, 0.0, rel / m / np.maximum(qbar, 1e-7))
    return {
        "churn": sums["churn"] / m,
        "pd_abs": sums["pd_abs"] / m,
        "pd_rel": rel.mean(),
        "pd_l2": np.sqrt(sums["sq"] / m),
        "kl_pairwise": sums["kl"] / (2 * m),
        "churn_correctness": sums["churn_correctness"] / m,
    }


def case_small(skip_bootstrap):
    r, n, c = 128, 10_000, 10
    logits, labels = realistic_logits(r, n, c)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    t = time.perf_counter()
    metrics.compare(probs, labels)
    first = time.perf_counter() - t
    warm = []
    for _ in range(3):
        t = time.perf_counter()
        report = metrics.compare(probs, labels)
        warm.append(time.perf_counter() - t)
    t = time.perf_counter()
    loop = pair_loop(probs, labels)
    loop_s = time.perf_counter() - t
    out = {
        "R": r,
        "N": n,
        "C": c,
        "compare_first_call_s": first,
        "compare_warm_s": float(np.median(warm)),
        "pair_loop_s": loop_s,
        "max_abs_diff_vs_loop": max(abs(report[k] - float(loop[k])) for k in loop),
    }
    out["compile_s"] = first - out["compare_warm_s"]
    out["speedup"] = loop_s / out["compare_warm_s"]
    if not skip_bootstrap:
        for over in ("replicas", "examples"):
            key = jax.random.key(0)
            metrics.compare(probs[:, :512], labels[:512], key=key, num_samples=1000, over=over)
            t = time.perf_counter()
            metrics.compare(probs, labels, key=key, num_samples=1000, over=over)
            out[f"bootstrap_{over}_1000_s"] = time.perf_counter() - t
    return out


class LazyLogits:
    """[R, N, C] logits computed block by block (deterministic per block); never stored."""

    def __init__(self, r, n, c, seed=0):
        rng = np.random.default_rng(seed)
        self.shape = (r, n, c)
        self.base = 2.0 * rng.standard_normal((n, c), dtype=np.float32)
        self.labels = np.argmax(self.base + rng.gumbel(size=(n, c)).astype(np.float32), -1)
        self.seconds = 0.0

    def __getitem__(self, item):
        t = time.perf_counter()
        cols = item[1]
        a, b = cols.start, cols.stop
        rng = np.random.default_rng([1, a])  # uniform noise: much cheaper than normal
        block = rng.random((self.shape[0], b - a, self.shape[2]), dtype=np.float32)
        block -= 0.5
        block *= 2.4  # standard deviation 0.7
        block += self.base[None, a:b]
        self.seconds += time.perf_counter() - t
        return block


def case_big(n, source):
    r, c = 256, 100
    lazy = LazyLogits(r, n, c)
    probs, gen_s, path = lazy, None, None
    if source == "memmap":
        fd, path = tempfile.mkstemp(suffix=".f32")
        os.close(fd)
        mm = np.memmap(path, np.float32, "w+", shape=(r, n, c))
        for a in range(0, n, 2048):
            mm[:, a : a + 2048] = lazy[:, a : min(a + 2048, n)]
        mm.flush()
        del mm
        probs = np.memmap(path, np.float32, "r", shape=(r, n, c))
    t = time.perf_counter()
    report = metrics.compare(probs, lazy.labels, from_logits=True)
    wall = time.perf_counter() - t
    if source == "lazy":
        gen_s = lazy.seconds
    if path:
        os.remove(path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "R": r,
        "N": n,
        "C": c,
        "source": source,
        "input_gb": r * n * c * 4 / 1e9,
        "compare_wall_s": wall,
        "of_which_generating_s": gen_s,
        "peak_rss_gib": peak / 2**30,
        "churn": report["churn"],
        "pd_abs": report["pd_abs"],
        "var_ratio": report["var_ratio"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--skip-big", action="store_true", help="skip the R=256 case")
    parser.add_argument("--skip-bootstrap", action="store_true")
    parser.add_argument("--big-n", type=int, default=100_000, help="N of the big case")
    parser.add_argument("--source", choices=("lazy", "memmap"), default="lazy")
    parser.add_argument("--only-big", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_big:
        print(json.dumps(case_big(args.big_n, args.source)))
        return
    results = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    results["case1"] = small = case_small(args.skip_bootstrap)
    print(f"case 1: R={small['R']} N={small['N']} C={small['C']}")
    print(f"  {'compare (warm, median of 3)':32s} {small['compare_warm_s']:8.3f} s")
    print(f"  {'compile (first call - warm)':32s} {small['compile_s']:8.3f} s")
    print(f"  {'pair loop (NumPy, 8128 pairs)':32s} {small['pair_loop_s']:8.3f} s")
    print(f"  {'speedup':32s} {small['speedup']:8.1f} x")
    print(f"  {'max |compare - loop|':32s} {small['max_abs_diff_vs_loop']:8.1e}")
    for over in ("replicas", "examples"):
        if f"bootstrap_{over}_1000_s" in small:
            print(
                f"  {'compare + 1000 bootstrap ' + over:32s} "
                f"{small[f'bootstrap_{over}_1000_s']:8.3f} s"
            )
    if not args.skip_big:
        cmd = [
            sys.executable,
            __file__,
            "--only-big",
            "--big-n",
            str(args.big_n),
            "--source",
            args.source,
        ]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results["case2"] = big = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"case 2: R={big['R']} N={big['N']} C={big['C']} ({big['input_gb']:.1f} GB of "
            f"float32 logits, streamed from a {big['source']} source)"
        )
        print(f"  {'compare wall time':32s} {big['compare_wall_s']:8.1f} s")
        if big["of_which_generating_s"] is not None:
            print(f"  {'of which generating the input':32s} {big['of_which_generating_s']:8.1f} s")
        print(f"  {'peak RSS (ru_maxrss)':32s} {big['peak_rss_gib']:8.2f} GiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
