"""Portable mode (``jaxrepro.portable``): golden results that must be the same bits on any
x86-64 CPU, the switch's rules, and what results record about the machine.

The suite runs in portable mode (the repository's ``conftest.py`` switches it on before JAX
starts), so the golden digests below are checked on whatever machine runs the suite: CI on
another CPU checks that the numbers are the same bits, not only that a rerun here agrees with
itself. They were computed on an AMD EPYC (Zen 3: AVX2 and FMA, no AVX-512), jax/jaxlib 0.10.2,
with ``python tests/test_portable.py``; they change with another JAX version (or a change of the
engine), and then are recomputed the same way and the change said in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jaxrepro import data, engine, metrics, models, portable

ROOT = Path(__file__).resolve().parents[1]

# What golden_run() gives in portable mode (see the module docstring).
GOLDEN = {
    "mlp_params": "508ebb3d524aebae",
    "mlp_probs": "2aa5fa38b0675653",
    "mlp_loss": [
        1.0834769010543823,
        0.8327359557151794,
        1.078654170036316,
        0.7960866689682007,
        1.1579173803329468,
        0.8375253677368164,
    ],
    "mlp_metrics": {
        "churn": 0.4666666666666667,
        "pd_abs": 0.23500184727211793,
        "pd_l2": 0.34482189261588986,
        "acc_mean": 0.5666666666666667,
        "eta": 0.09999999999999998,
    },
    "cnn_params": "a39816cbbfc4e2bc",
    "cnn_probs": "7597328c8de61713",
    "cnn_loss": [
        1.1048455238342285,
        1.028863787651062,
        1.1231732368469238,
        1.0407612323760986,
        1.1002848148345947,
        1.0569247007369995,
    ],
    "cnn_metrics": {
        "churn": 0.2,
        "pd_abs": 0.0844512486209472,
        "pd_l2": 0.1251978720733372,
        "acc_mean": 0.43333333333333335,
        "eta": 0.23333333333333334,
    },
}


def _dataset() -> data.Dataset:
    """Exactly representable inputs (multiples of 1/64) and labels from an integer teacher: the
    data are the same bits on any machine (no libm, no float rounding in their making)."""
    rng = np.random.default_rng(7)
    x = (rng.integers(-128, 128, size=(200, 12)) / 64.0).astype(np.float32)
    w = rng.integers(-3, 4, size=(12, 3))
    y = np.argmax(x.astype(np.float64) @ w, axis=1).astype(np.int32)
    return data.Dataset(x[:160], y[:160], x[160:], y[160:], num_classes=3, name="golden")


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


def golden_run() -> dict:
    """Two small fits that touch every kind of computation the engine compiles (dense and
    convolution products, GELU's tanh, softmax's exp and log, dropout, the window, the
    perturbation, Adam's square root, LayerNorm), their parameters' digest, the predictions'
    digest and the metrics."""
    ds = _dataset()
    out = {}
    fits = {
        "mlp": models.MLP(
            widths=(16, 16), num_classes=3, activation="gelu", dropout_rate=0.1, norm="layer"
        ),
        "cnn": models.CNN1D(features=(4, 4), kernel_size=3, num_classes=3, activation="smelu"),
    }
    for name, model in fits.items():
        run = engine.fit(
            model,
            optax.adam(1e-2),
            ds,
            replicas=3,
            seed=11,
            vary="all",
            window=8,
            perturb_scale=1e-3,
            batch_size=16,
            epochs=2,
            strategy="map",
        )
        probs = run.predict(ds.x_test)
        out[f"{name}_params"] = _digest(*jax.tree.leaves(run.state.params))
        out[f"{name}_probs"] = _digest(probs)
        out[f"{name}_loss"] = [float(v) for v in run.history["loss"].ravel()]
        report = metrics.compare(probs, ds.y_test)
        out[f"{name}_metrics"] = {
            k: float(report[k]) for k in ("churn", "pd_abs", "pd_l2", "acc_mean", "eta")
        }
    return out


@pytest.fixture(scope="module")
def golden():
    if not portable.active():
        pytest.skip("the session is not in portable mode (JAXREPRO_TEST_PORTABLE=0 or not x86-64)")
    return golden_run()


def test_golden_results_are_the_same_bits_on_this_machine(golden):
    machine = portable.describe()
    for key, want in GOLDEN.items():
        assert golden[key] == want, f"{key}: {golden[key]!r} != {want!r}\n{machine}"
    assert set(golden) == set(GOLDEN)


def _subprocess_golden(env_extra: dict, prefix: list[str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA")}
    env.update(env_extra)
    env["JAXREPRO_TEST_PORTABLE"] = "0"  # nothing but env_extra decides the mode
    proc = subprocess.run(
        [*(prefix or []), sys.executable, str(Path(__file__))],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_shell_recipe_and_two_devices_give_the_golden_bits(golden):
    # Portable mode from the environment (what `eval "$(python -m jaxrepro.portable)"` sets),
    # with the CPU split into two devices: the same bits.
    env = {"XLA_FLAGS": portable.merged_xla_flags(None), **portable.ENV, "GOLDEN_DEVICES": "2"}
    got = _subprocess_golden(env)
    assert got == golden


@pytest.mark.slow
def test_portable_flag_set_after_jax_started_is_refused():
    code = (
        "import jax, jax.numpy as jnp; jnp.ones(1).block_until_ready()\n"
        "import jaxrepro\n"
        "try:\n"
        "    jaxrepro.portable.enable()\n"
        "except RuntimeError as e:\n"
        "    print('REFUSED', e)\n"
        "print('ACTIVE', jaxrepro.portable.active())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED portable mode must be switched on before JAX's first computation" in (
        proc.stdout
    )
    assert "ACTIVE False" in proc.stdout
    # FitConfig(portable=True) in such a process says the same, before any training.
    code2 = code.replace(
        "    jaxrepro.portable.enable()\n",
        "    jaxrepro.fit(jaxrepro.models.MLP(widths=(), num_classes=2), None, None,"
        " portable=True)\n",
    )
    proc = subprocess.run(
        [sys.executable, "-c", code2], capture_output=True, text=True, env=env, timeout=120
    )
    assert "REFUSED portable mode must be switched on" in proc.stdout, proc.stderr[-2000:]


def test_merged_flags_keep_the_users_other_flags_and_replace_ours():
    merged = portable.merged_xla_flags(
        "--xla_force_host_platform_device_count=4 --xla_cpu_max_isa=AVX512 "
        "--xla_cpu_enable_fast_math=true --xla_dump_to=/tmp/d"
    )
    tokens = merged.split()
    assert tokens[:2] == ["--xla_force_host_platform_device_count=4", "--xla_dump_to=/tmp/d"]
    assert "--xla_cpu_max_isa=AVX" in tokens and "--xla_cpu_max_isa=AVX512" not in tokens
    assert "--xla_cpu_enable_fast_math=false" in tokens
    assert "--xla_cpu_enable_fast_math=true" not in tokens
    assert "--xla_cpu_experimental_ynn_fusion_type=" in tokens
    # One of each of portable mode's flags, and the environment check agrees.
    assert len(tokens) == 2 + len(portable.XLA_FLAGS)
    assert portable._env_holds({"XLA_FLAGS": merged, **portable.ENV})
    assert not portable._env_holds({"XLA_FLAGS": merged})  # oneDNN's cap missing
    assert not portable._env_holds({"XLA_FLAGS": "--xla_cpu_max_isa=AVX", **portable.ENV})


def test_shell_exports_round_trip():
    lines = portable.shell_exports({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}).splitlines()
    assert lines[0].startswith("export XLA_FLAGS='--xla_dump_to=/tmp/x --xla_cpu_max_isa=AVX")
    assert lines[1:] == [f"export {k}={v}" for k, v in portable.ENV.items()]


def test_machine_record():
    info = portable.machine()
    assert set(info) == {
        "portable",
        "backend",
        "architecture",
        "cpu",
        "cpu_features",
        "xla_flags",
        "onednn_max_cpu_isa",
    }
    assert info["portable"] == portable.active()
    assert set(info["cpu_features"]) <= set(portable.CPU_FEATURES)
    if portable.active():
        assert "--xla_cpu_max_isa=AVX" in info["xla_flags"].split()
        assert info["onednn_max_cpu_isa"] == "AVX"
    line = portable.describe(info)
    assert line.startswith("Machine: ") and info["cpu"] in line


def test_fit_config_portable_is_a_bool():
    with pytest.raises(ValueError, match="portable must be True or False"):
        engine.FitConfig(portable="yes")
    assert engine.FitConfig(portable=True).to_dict()["portable"] is True


if __name__ == "__main__":  # prints golden_run() as JSON (recomputing GOLDEN, or a subprocess)
    if os.environ.get("GOLDEN_DEVICES"):
        engine.use_cpu_devices(int(os.environ["GOLDEN_DEVICES"]))
    print(json.dumps(golden_run()))
