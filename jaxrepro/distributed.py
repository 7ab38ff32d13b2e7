"""Runs of several processes: JAX's own distributed runtime, and who writes the files.

Synopsis (the same script on every process)::

    import jaxrepro
    jaxrepro.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # or 1
    run = jaxrepro.fit(model, optax.adam(1e-3), data, replicas=64)   # sharded over all devices
    probs = run.predict(data.x_test)            # [64, N, C] on every process
    if jaxrepro.distributed.is_writer():        # process 0
        np.save("probs.npy", probs)

After ``initialize`` the replica axis spans every device of every process (``jax.devices()``
is global) and each process trains its own block of replicas; the training itself needs no
communication (replicas are independent), only reading results back gathers them. Every
process must make the same calls in the same order (the usual JAX multi-controller rule): run
the same script everywhere (and read results, such as ``run.predict``, on every process: the
reads are collective). The results are bitwise those of one process with the same devices
(``map`` strategy): where a replica is computed never changes what it computes. The training
steps exchange nothing between processes; results read back are gathered (``run.history``
after each dispatch, ``run.state`` and ``run.predict`` when called).

Files: a study (``jaxrepro.study``) writes its workdir from process 0 only; orbax writes the
checkpoints with its multi-process support (the workdir must be on a file system every process
sees, such as a shared disk on a cluster, or the local disk for processes on one machine).
"""

from __future__ import annotations

import os

import jax

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def cluster_processes() -> int:
    """How many processes the cluster JAX's auto-detection recognises (Slurm, Open MPI,
    Kubernetes, Cloud TPU) says this job has; 0 when it recognises none.

    Reads JAX's private registry of cluster environments (``jax._src.clusters``), the one
    private JAX name the project uses; any failure there counts as no cluster.
    """
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # a JAX without the cluster registry: no auto-detection
        return 0
    try:
        for env in ClusterEnv._cluster_types:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                return int(env.get_process_count())
    except Exception:  # noqa: BLE001 - a detector that fails means no cluster
        return 0
    return 0


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool | None = None,
    cpu_devices: int | None = None,
) -> bool:
    """Joins this process to a run of several processes, before JAX's first computation.

    Which run: the arguments; else the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (the address is JAX's own variable, the other
    two this project's); else a cluster JAX detects by itself, no arguments at all:
    ``auto=None`` joins one whose job has more than one process (a single-task Slurm job
    stays a process of its own, with all its devices), ``True`` joins whatever JAX detects,
    ``False`` never. With none of these the process stays a run of its own and nothing is
    initialised.

    Collectives between CPU processes use ``jax_cpu_collectives_implementation``: gloo unless
    the user chose another (``"mpi"``); GPU and TPU processes use their own.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 .. num_processes - 1``.
      auto: use JAX's cluster auto-detection (see above).
      cpu_devices: split this process's CPU into that many devices first
        (``jaxrepro.use_cpu_devices``; 0 or None leaves JAX's default of one).

    Returns:
      True when this process is part of a multi-process run.

    Raises:
      ValueError: an incomplete or inconsistent set of arguments.
      RuntimeError: JAX already ran a computation (it fixes its devices then).
    """
    from jaxrepro import engine

    if cpu_devices:
        engine.use_cpu_devices(cpu_devices)
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    explicit = address is not None or num_processes is not None or process_id is not None
    if not explicit:
        if auto is False or (auto is None and cluster_processes() < 2):
            return False
    elif auto is not True and None in (address, num_processes, process_id):
        missing = [
            name
            for name, v in (
                ("coordinator_address", address),
                ("num_processes", num_processes),
                ("process_id", process_id),
            )
            if v is None
        ]
        raise ValueError(
            f"a multi-process run needs the coordinator address, the number of "
            f"processes and this process's id; missing: {', '.join(missing)}"
        )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if (
        num_processes is not None
        and process_id is not None
        and not (0 <= process_id < num_processes)
    ):
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    try:  # gloo for CPU collectives where JAX has none chosen (its default in recent JAX)
        if getattr(jax.config, "jax_cpu_collectives_implementation", None) in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - older JAX: CPU collectives are not configurable
        pass
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes shared files: process 0 (and any single-process run).

    Asks nothing of JAX's backend unless the distributed runtime is up, so writing a file
    never starts a GPU."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def from_writer(value):
    """``value`` as process 0 has it, on every process (JSON-ready values: process 0 decides
    what all processes do, such as which trials are finished or whether a checkpoint exists,
    so they never take different paths into a collective). Itself in a single process."""
    if jax.process_count() == 1:
        return value
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(value).encode() if is_writer() else b"", np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(payload.size)))
    buffer = np.zeros(size, np.uint8)
    buffer[: payload.size] = payload[:size]
    data = multihost_utils.broadcast_one_to_all(buffer)
    return json.loads(np.asarray(data, np.uint8).tobytes().decode())


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name``; nothing in a single process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
