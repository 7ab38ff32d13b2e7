"""Rendering shared by the study reports: table cells, Markdown tables, intervals, verdicts
and the parts every report.md has (head, diverged replicas, versions).

Pure text functions; the plots are ``jaxrepro.plots``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxrepro import engine, files


def fmt(value, digits: int = 3) -> str:
    """A table cell: fixed-point for ordinary numbers, scientific for tiny ones, '-' for
    undefined (None / NaN).

    Example:
      >>> fmt(0.12345), fmt(2.5e-5), fmt(None), fmt([0.1, 0.2])
      ('0.123', '2.50e-05', '-', '[0.100, 0.200]')
    """
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    value = float(value)
    if not math.isfinite(value):
        return "-"
    if value == 0 or 10**-digits <= abs(value) < 10**5:
        return f"{value:.{digits}f}"
    return f"{value:.{digits - 1}e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells are converted with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric(record: Mapping[str, Any], key: str) -> float:
    """A trial record's metric, NaN when undefined (no metrics, or a null value)."""
    v = (record.get("metrics") or {}).get(key)
    return math.nan if v is None else float(v)


def with_ci(m: Mapping[str, Any] | None, key: str) -> str:
    """``value [lo, hi]``: a metric of a ``metrics.compare`` dict with its interval."""
    if not m:
        return "-"
    ci = m.get(key + "_ci")
    return fmt(m.get(key)) + ("" if ci is None else " " + fmt(ci))


def verdict(ci: Sequence[float | None] | None) -> str:
    """Where an interval of a difference lies: ``lower`` (below 0), ``higher`` (above 0),
    ``no difference`` (holds 0) or ``undefined``."""
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return "undefined"
    lo, hi = ci
    return "lower" if hi < 0 else "higher" if lo > 0 else "no difference"


def pooled_text(p: Mapping[str, Any], digits: int = 4, unit: str = "clusters") -> str:
    """A pooled difference (``stats.pooled_difference``) and what its interval says: below 0
    ``lower``, above 0 ``higher``, holding 0 ``no consistent effect``; without an interval
    (too few clusters, or no finite value) no verdict. ``unit`` names the clusters.

    Example:
      >>> pooled_text({"diff": -0.004, "ci": [-0.007, -0.001]})
      'pooled difference -0.0040 [-0.0070, -0.0010]: lower'
      >>> pooled_text({"diff": 0.001, "ci": [-0.002, 0.004]})
      'pooled difference +0.0010 [-0.0020, 0.0040]: interval holds 0, no consistent effect'
      >>> pooled_text({"diff": -0.004, "ci": [None, None], "num_clusters": 2, "min_clusters": 6})
      'pooled difference -0.0040, no interval (clusters: 2; it needs 6): no verdict'
    """
    d = p.get("diff")
    head = "pooled difference " + ("-" if d is None or not math.isfinite(d) else f"{d:+.{digits}f}")
    v = verdict(p.get("ci"))
    if v == "undefined":
        n, need = p.get("num_clusters"), p.get("min_clusters")
        why = f" ({unit}: {n}; it needs {need})" if n is not None and need and n < need else ""
        return f"{head}, no interval{why}: no verdict"
    ci = fmt(p["ci"], digits)
    if v == "no difference":
        return f"{head} {ci}: interval holds 0, no consistent effect"
    return f"{head} {ci}: {v}"


def diff_text(d: Mapping[str, Any] | None, key: str, digits: int = 4) -> str:
    """``diff [lo, hi]`` of the metric ``key`` of a ``metrics.difference`` result."""
    if not d or not d.get(key):
        return "-"
    return f"{fmt(d[key]['diff'], digits)} {fmt(d[key]['ci'], digits)}"


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def head(title: str, config, seconds: float, compile_seconds: float | None = None) -> list[str]:
    """The first lines of a report: title, config, time (and the part spent compiling)."""
    compiling = ""
    if compile_seconds is not None:
        share = f" ({100 * compile_seconds / seconds:.0f}%)" if seconds > 0 else ""
        compiling = (
            f", of which tracing and compiling at most {fmt_seconds(compile_seconds)}{share}"
        )
    return [
        f"# {title}",
        "",
        f"Config: `{json.dumps(files.to_json(config.to_dict()), separators=(',', ':'))}`",
        "",
        f"Training and evaluation time of the trials: {fmt_seconds(seconds)}{compiling} "
        "(timings.json, per trial; a resumed trial counts its last session only).",
        "",
    ]


def diverged_note(records: Mapping[str, dict]) -> list[str]:
    """A section listing the trials whose replicas diverged (none: no section)."""
    lines = []
    for name, rec in records.items():
        if rec.get("diverged"):
            epochs = rec.get("diverged_epochs") or [-1] * len(rec["diverged"])
            when = ", ".join(
                f"{r} (epoch {e + 1})" if e >= 0 else f"{r} (non-finite predictions)"
                for r, e in zip(rec["diverged"], epochs, strict=True)
            )
            lines.append(
                f"- {name}: replicas {when} diverged and are excluded"
                + (f" ({rec['error']})" if rec.get("error") else "")
                + "."
            )
    if not lines:
        return []
    rule = (
        "A replica diverges when an epoch's mean training loss is NaN or infinite, or exceeds "
        f"its first batch's loss L0 by more than {engine.DEFAULT_DIVERGENCE:g} max(|L0|, 1), "
        "or an epoch leaves a "
        "parameter non-finite; it is frozen at its state before that epoch (epoch numbers "
        "count from 1)."
    )
    return ["## Diverged replicas", "", rule, ""] + lines + [""]


def versions_note() -> list[str]:
    return ["Versions: " + ", ".join(f"{k} {v}" for k, v in files.versions().items()), ""]
