"""Portable mode: results bitwise identical on any x86-64 CPU, and a record of the machine.

XLA's CPU backend compiles for the host it runs on, so the same program rounds differently on
two CPUs, and training (chaotic) turns a last-bit difference into a different model. Portable
mode pins everything that was found to depend on the host (each measured on an AMD EPYC with
AVX2 and FMA, MLP and CNN1D on MNIST-1D; BUILD_NOTES.md, "Portable results"):

- ``--xla_cpu_max_isa=AVX``: XLA's generated code (elementwise fusions, reductions, exp, log,
  tanh, the logistic function) uses AVX at most, whatever the host has: no fused multiply-add
  contraction (FMA arrived with AVX2), no 512-bit vectors. AVX is what jaxlib itself requires,
  so every CPU that runs JAX can honour it.
- ``--xla_cpu_experimental_ynn_fusion_type=`` (empty) and ``--xla_cpu_use_xnnpack=false``:
  matrix products go to XLA's Eigen runtime rather than to YNNPACK (or XNNPACK), which choose
  their kernels from the host's CPU features at run time and ignore the cap above.
- ``ONEDNN_MAX_CPU_ISA=AVX`` (environment): the Eigen runtime's matrix products call oneDNN's
  sgemm, which likewise picks AVX2, AVX-512 or AMX kernels at run time; this caps it.
- ``--xla_cpu_multi_thread_eigen=false``: matrix products run on one thread, so how they are
  split does not depend on the host's core count (replicas still run in parallel, one block per
  CPU device: ``jaxrepro.use_cpu_devices``).
- ``--xla_cpu_enable_fast_math=false`` and ``--xla_cpu_use_onednn=false``: the defaults,
  pinned so that a flag of the user's cannot undo the rest.

These are settings of the process, read when JAX starts its CPU backend (a per-compilation
``compiler_options={"xla_cpu_max_isa": ...}`` is accepted and silently ignored: measured), so
portable mode is switched on before JAX's first computation: ``jaxrepro.portable.enable()``
right after ``import jaxrepro``, or ``fit(..., portable=True)`` as the process's first
computation, or the study binaries (``--portable``, on by default), or from the shell::

    eval "$(python -m jaxrepro.portable)"   # exports XLA_FLAGS and ONEDNN_MAX_CPU_ISA

What it does not pin: another jax/jaxlib version (results record the versions), a GPU or TPU
(it concerns the CPU backend only), a CPU that is not x86-64 (``enable`` refuses), and the
cache blocking of matrix products whose inner dimension exceeds Eigen's block (a few hundred;
Eigen sizes its blocks from the host's cache sizes, and no flag was found to fix them).

Synopsis::

    import jaxrepro
    jaxrepro.portable.enable()          # before any JAX computation
    run = jaxrepro.fit(model, tx, data, replicas=8, portable=True)
    jaxrepro.portable.machine()         # what results.json records under "machine"
"""

from __future__ import annotations

import os
import platform
import shlex

XLA_FLAGS: dict[str, str] = {
    "xla_cpu_max_isa": "AVX",
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_use_xnnpack": "false",
    "xla_cpu_multi_thread_eigen": "false",
    "xla_cpu_enable_fast_math": "false",
    "xla_cpu_use_onednn": "false",
}
"""The XLA flags portable mode sets (``--name=value`` in ``XLA_FLAGS``)."""

ENV: dict[str, str] = {"ONEDNN_MAX_CPU_ISA": "AVX"}
"""The environment variables portable mode sets besides ``XLA_FLAGS``."""

CPU_FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
"""The CPU features ``machine()`` reports (those XLA, oneDNN or YNNPACK can choose by)."""

_X86_64 = ("x86_64", "amd64")


def _backend_started() -> bool:
    """Whether JAX has started a backend in this process (its XLA flags are fixed then).

    ``jax._src.xla_bridge.backends_are_initialized`` is private; if it moves, JAX counts as
    started, which makes ``enable`` refuse rather than set flags too late.
    """
    try:
        from jax._src import xla_bridge
    except ImportError:
        return True
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return True if check is None else bool(check())


def _parse(flags: str) -> list[tuple[str, str]]:
    """``XLA_FLAGS`` as ``[(name, token)]`` (name without dashes or value)."""
    out = []
    for token in shlex.split(flags):
        name = token.lstrip("-").split("=", 1)[0]
        out.append((name, token))
    return out


def merged_xla_flags(current: str | None) -> str:
    """``current`` (an ``XLA_FLAGS`` value) with portable mode's flags: any flag of the same
    name is replaced, every other flag kept in its order.

    >>> flags = "--xla_force_host_platform_device_count=4 --xla_cpu_max_isa=AVX2"
    >>> merged_xla_flags(flags).split()[:2]
    ['--xla_force_host_platform_device_count=4', '--xla_cpu_max_isa=AVX']
    """
    kept = [tok for name, tok in _parse(current or "") if name not in XLA_FLAGS]
    ours = [f"--{k}={v}" for k, v in XLA_FLAGS.items()]
    return " ".join(kept + ours)


def _env_holds(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    given = {}
    for name, token in _parse(environ.get("XLA_FLAGS", "")):
        given[name] = token.split("=", 1)[1] if "=" in token else "true"
    flags_ok = all(given.get(k) == v for k, v in XLA_FLAGS.items())
    return flags_ok and all(environ.get(k) == v for k, v in ENV.items())


# Whether JAX had already started without portable mode's settings when this module was first
# imported: then no later change to the environment can make the process portable.
_STARTED_WITHOUT = _backend_started() and not _env_holds()


def is_x86_64() -> bool:
    return platform.machine().lower() in _X86_64


def active() -> bool:
    """Whether this process computes in portable mode: the settings are in the environment and
    JAX's backend was not started without them."""
    return is_x86_64() and _env_holds() and not _STARTED_WITHOUT


def enable() -> None:
    """Switches portable mode on for this process (idempotent).

    Raises:
      RuntimeError: JAX has already started its backend without portable mode (its XLA flags
        are fixed then: restart the Python process and call this first), or the CPU is not
        x86-64.
    """
    global _STARTED_WITHOUT
    if not is_x86_64():
        raise RuntimeError(
            f"portable mode pins x86-64 CPU features; this machine is {platform.machine()!r}"
        )
    if active():
        return
    if _STARTED_WITHOUT or _backend_started():
        _STARTED_WITHOUT = True
        raise RuntimeError(
            "portable mode must be switched on before JAX's first computation (XLA reads its "
            "CPU flags when the backend starts, and this process's has started): restart the "
            "Python process and call jaxrepro.portable.enable() right after importing "
            'jaxrepro, or start Python under eval "$(python -m jaxrepro.portable)"'
        )
    os.environ["XLA_FLAGS"] = merged_xla_flags(os.environ.get("XLA_FLAGS"))
    os.environ.update(ENV)


def require() -> None:
    """What ``FitConfig(portable=True)`` calls: ``enable()`` unless already active."""
    if not active():
        enable()


def cpu_model_and_features() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``CPU_FEATURES`` it has (Linux: /proc/cpuinfo;
    elsewhere the model from ``platform`` and no features)."""
    model, features = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    features = set(value.split())
                if key == "" and features:  # end of the first processor's block
                    break
    except OSError:
        pass
    return model, [f for f in CPU_FEATURES if f in features]


def machine() -> dict:
    """What a result was computed with, beside the library versions: ``portable`` (bool),
    ``backend`` (JAX's default backend), ``architecture``, ``cpu`` (model name),
    ``cpu_features`` (of ``CPU_FEATURES``), ``xla_flags`` and ``onednn_max_cpu_isa`` (the
    environment's, or null). Starts JAX's backend if it has not started."""
    import jax

    model, features = cpu_model_and_features()
    return {
        "portable": active(),
        "backend": jax.default_backend(),
        "architecture": platform.machine(),
        "cpu": model,
        "cpu_features": features,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def describe(info: dict | None = None) -> str:
    """One line for a report: the mode, the CPU, its features and the XLA flags."""
    info = machine() if info is None else info
    mode = "portable" if info.get("portable") else "host-specific (not portable)"
    flags = info.get("xla_flags") or "none"
    feats = ", ".join(info.get("cpu_features") or []) or "unknown"
    return (
        f"Machine: {mode} mode; {info.get('backend')} backend; {info.get('cpu')} "
        f"({info.get('architecture')}; {feats}); XLA_FLAGS: {flags}; "
        f"ONEDNN_MAX_CPU_ISA: {info.get('onednn_max_cpu_isa') or 'unset'}"
    )


def shell_exports(environ=None) -> str:
    """``export`` lines that put this shell in portable mode (``python -m jaxrepro.portable``)."""
    environ = os.environ if environ is None else environ
    lines = [f"export XLA_FLAGS={shlex.quote(merged_xla_flags(environ.get('XLA_FLAGS')))}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in ENV.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(shell_exports())
