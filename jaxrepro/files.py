"""Files of a run: atomic writes, strict JSON, and the library versions a result depends on.

Synopsis::

    >>> import os, tempfile
    >>> from jaxrepro import files
    >>> path = os.path.join(tempfile.mkdtemp(), "results.json")
    >>> _ = files.atomic_write_json(path, {"churn": np.float32(0.25), "var_ratio": np.nan})
    >>> files.read_json(path)                       # None when missing or unreadable
    {'churn': 0.25, 'var_ratio': None}

Every file is written to a temporary name beside its target and renamed over it, so an
interruption never leaves a truncated file. In a run of several processes only process 0 writes
(``distributed.is_writer``): every process computes the same results, and one copy of each
file is wanted on shared storage.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxrepro import distributed


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Writes ``payload`` to a temporary file beside ``path``, then renames it over ``path``
    (process 0 only in a multi-process run)."""
    path = Path(path)
    if not distributed.is_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_json(value):
    """``value`` with NumPy scalars/arrays made Python, tuples made lists and NaN/inf made
    ``None`` (strict JSON: an undefined metric, e.g. the control's ``var_ratio``, is null).

    Example:
      >>> to_json({"x": np.float32(0.5), "t": (1, math.inf)})
      {'x': 0.5, 't': [1, None]}
    """
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def dumps(obj) -> str:
    """The strict, indented JSON text of ``to_json(obj)`` as the workdir files hold it."""
    return json.dumps(to_json(obj), indent=1, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, dumps(obj))


def read_json(path: str | os.PathLike):
    """The JSON value in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    out = {"python": sys.version.split()[0]}
    for name in ("jaxrepro", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out
