"""Several processes joined by JAX's distributed runtime give what one process gives.

Real processes on 127.0.0.1 (a free port, gloo collectives, 2 CPU devices each), started and
always stopped by the test, under a hard time limit. The reference is one process with the
same 4 devices in all. Slow (a few processes that each compile): deselect with
``-m "not slow"``.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrepro import portable

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"
LIMIT_S = 420

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    for name in (
        "XLA_FLAGS",
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "JAX_PLATFORMS",
    ):
        env.pop(name, None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONWARNINGS"] = "ignore"
    if portable.active():  # the processes compute in the session's mode
        env["XLA_FLAGS"] = portable.merged_xla_flags(None)
        env.update(portable.ENV)
    return env


def _run_all(commands: list[list[str]], logs: Path) -> None:
    """Runs the commands at once; fails (after stopping every one) when any fails or the
    time limit passes."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for i, cmd in enumerate(commands):
            f = open(logs / f"process-{i}.log", "w")
            files.append(f)
            procs.append(
                subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
            )
        deadline = time.monotonic() + LIMIT_S
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the others would wait for it forever
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        tails = "\n".join(
            f"--- process {i} (exit {c}) ---\n" + (logs / f"process-{i}.log").read_text()[-2500:]
            for i, c in enumerate(codes)
        )
        pytest.fail(f"processes exited with {codes}:\n{tails}")


def _worker(mode: str, out: Path, num_processes: int = 1) -> None:
    base = [sys.executable, str(WORKER), mode, str(out)]
    if num_processes == 1:
        _run_all([base], out / f"logs-{mode}")
        return
    address = f"127.0.0.1:{_free_port()}"
    _run_all(
        [base + [address, str(num_processes), str(i)] for i in range(num_processes)],
        out / f"logs-{mode}",
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference: fit outputs and the quick main job's results.json."""
    out = tmp_path_factory.mktemp("single")
    _worker("fit+study", out)
    return out


def test_fit_and_predict_over_two_processes_equal_one_process(single, tmp_path):
    _worker("fit", tmp_path, num_processes=2)
    ref = np.load(single / "fit-0.npz")
    assert int(ref["num_devices"]) == 4 and int(ref["num_processes"]) == 1
    for pid in (0, 1):
        got = np.load(tmp_path / f"fit-{pid}.npz")
        assert int(got["num_devices"]) == 4 and int(got["num_processes"]) == 2
        for key in ref.files:
            if key in ("num_processes",):
                continue
            # Every process holds the whole result, bitwise the one-process one; R = 5 on 4
            # devices is padded to 8 and the padding never shows.
            assert got[key].shape == ref[key].shape, key
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{key}, process {pid}")
        assert got["r5_probs"].shape[0] == 5 and got["r5_kernel"].shape[0] == 5
        np.testing.assert_array_equal(got["hp_lr"], np.float32([0.0, 0.1, 0.3]))
        assert int(got["r5_devices"]) == 4


def test_main_job_binary_as_two_processes_writes_the_same_results(single, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    workdir = tmp_path / "irr"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "irreproducibility.py"),
        "--quick",
        f"--workdir={workdir}",
        "--cpu_devices=2",
        f"--coordinator_address={address}",
        "--num_processes=2",
        "--portable" if portable.active() else "--noportable",  # the session's mode
    ]
    _run_all([cmd + [f"--process_id={i}"] for i in range(2)], tmp_path / "logs")
    assert (workdir / "results.json").read_bytes() == (
        single / "study" / "results.json"
    ).read_bytes()
    # Only process 0 wrote: one copy of each progress line and of the printed report.
    log = (workdir / "progress.log").read_text()
    assert log.count("done: 2 configs") == 1
    assert log.count("relu/all epoch 2/2") == 1
    printed = [(tmp_path / "logs" / f"process-{i}.log").read_text() for i in range(2)]
    assert "churn" in printed[0] and "| relu" in printed[0]
    assert "| relu" not in printed[1]
    assert not list(workdir.glob(".*.tmp"))
    assert (workdir / "churn.png").stat().st_size > 0


def test_two_process_run_interrupted_and_resumed_ends_where_one_process_does(single, tmp_path):
    _worker("resume", tmp_path, num_processes=2)
    workdir = tmp_path / "study"
    assert (workdir / "results.json").read_bytes() == (
        single / "study" / "results.json"
    ).read_bytes()
    assert "relu/all resumed at epoch 1/2" in (workdir / "progress.log").read_text()
    results = json.loads((workdir / "results.json").read_text())
    assert results["complete"] is True and results["deterministic"] is False
