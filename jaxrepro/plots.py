"""Figures for study reports, written as PNG files with matplotlib's Agg canvas.

Synopsis::

    >>> import os, tempfile
    >>> from jaxrepro import plots
    >>> out = tempfile.mkdtemp()
    >>> path = plots.grouped_bars(os.path.join(out, "churn.png"), ["init", "order"],
    ...                           {"relu": [0.3, 0.2], "smelu": [0.2, 0.1]}, ylabel="churn")
    >>> plots.is_png(path)
    True
    >>> path = plots.metric_panels(os.path.join(out, "pd.png"), ["1", "10", "N"],
    ...                            {"pd_abs": [0.0, 0.1, 0.2]}, kind="line")

matplotlib is imported when a figure is drawn, never at ``import jaxrepro``. Figures are built
on ``matplotlib.figure.Figure`` with the Agg canvas directly, so the global pyplot backend (a
notebook's inline backend, say) is left alone. Each file is written to a temporary name and
renamed: a reader never sees a half-written PNG. Undefined values (None, NaN) are left out of
a plot rather than drawn as zero.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxrepro import files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 110


def figure(ncols: int = 1, *, nrows: int = 1, width: float = 6.4, height: float = 4.0):
    """A constrained-layout figure of ``nrows x ncols`` panels of ``width x height`` inches each,
    on the Agg canvas (no display needed).

    Returns:
      ``(fig, axes)``: ``axes`` a list of the ``ncols`` panels when ``nrows == 1``, else a
      ``[nrows, ncols]`` array.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, (list(axes[0]) if nrows == 1 else axes)


def save(fig, path: str | os.PathLike) -> Path:
    """Writes ``fig`` as a PNG at ``DPI``, atomically (a temporary file renamed into place)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return files.atomic_write_bytes(path, buf.getvalue())


def _num(v) -> float:
    return math.nan if v is None else float(v)


def grouped_bars(
    path: str | os.PathLike,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    ylabel: str,
    xlabel: str = "",
    title: str = "",
    errors: Mapping[str, Sequence[Sequence[float | None] | None]] | None = None,
) -> Path:
    """Bars of each series side by side per category (e.g. churn per setting, per activation).

    Args:
      path: the PNG file to write.
      categories: labels of the groups along x.
      series: ``{name: one value per category}``.
      ylabel, xlabel, title: axis labels and title.
      errors: optional ``{name: one interval [lo, hi] (or None) per category}``, drawn as
        error bars (e.g. bootstrap intervals).

    Returns:
      The path written.
    """
    fig, (ax,) = figure(width=max(6.4, 1.1 * len(categories) + 2))
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(categories))]
        ys = [_num(v) for v in values]
        ax.bar(xs, ys, width=width, label=str(name))
        cis = (errors or {}).get(name)
        if cis is not None:
            for x, y, ci in zip(xs, ys, cis, strict=True):
                bar = error_bar(y, ci)
                if bar is not None:
                    ax.errorbar([x], [y], yerr=bar, fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save(fig, path)


def metric_panels(
    path: str | os.PathLike,
    labels: Sequence[str],
    panels: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str = "",
    kind: str = "line",
    title: str = "",
) -> Path:
    """One panel per metric against a grid (one value per label), as bars or a line.

    Args:
      path: the PNG file to write.
      labels: grid values along x, in order (drawn as evenly spaced categories).
      panels: ``{metric name: one value per label}``.
      xlabel: the grid's name.
      kind: ``"line"`` (ordered grids) or ``"bar"`` (unordered ones).
      title: a title over all panels.
    """
    if kind not in ("line", "bar"):
        raise ValueError(f"kind must be 'line' or 'bar', got {kind!r}")
    fig, axes = figure(len(panels), width=max(3.6, 0.4 * len(labels) + 1.4), height=3.4)
    xs = list(range(len(labels)))
    for ax, (metric, values) in zip(axes, panels.items(), strict=True):
        ys = [_num(v) for v in values]
        if kind == "bar":
            ax.bar(xs, ys, color="tab:blue")
        else:
            ax.plot(xs, ys, marker="o")
        ax.set_xticks(
            xs,
            [str(v) for v in labels],
            rotation=45 if kind == "bar" else 0,
            ha="right" if kind == "bar" else "center",
        )
        ax.set_title(metric)
        ax.set_xlabel(xlabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def histograms(
    path: str | os.PathLike,
    edges: Sequence[float],
    counts: Mapping[str, Mapping[str, Sequence[int]]],
    *,
    xlabel: str = "",
    title: str = "",
) -> Path:
    """Pre-binned histograms: one panel per group, one step line per series.

    Args:
      path: the PNG file to write.
      edges: the ``B + 1`` bin edges shared by every histogram.
      counts: ``{panel: {series: B counts}}`` (e.g. dataset -> source -> phat counts).
      xlabel, title: axis label and title.
    """
    groups = list(counts.items()) or [("(no data)", {})]
    fig, axes = figure(len(groups), width=4.6, height=3.6)
    for ax, (group, series) in zip(axes, groups, strict=True):
        for name, c in series.items():
            ax.stairs([int(v) for v in c], list(edges), label=str(name))
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(str(group))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test examples")
        if series:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def scatter_intervals(
    path: str | os.PathLike,
    points: Sequence[Mapping[str, Any]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    diagonal: bool = True,
) -> Path:
    """Points with optional interval bars, and the diagonal y = x.

    Args:
      path: the PNG file to write.
      points: dicts with ``x``, ``y``, optional ``x_ci``, ``y_ci`` = [lo, hi], and either a
        ``label`` or a ``group`` and ``series``: points of one series share a colour, points of
        one group a marker (e.g. group = dataset, series = source).
      xlabel, ylabel, title: axis labels and title.
      diagonal: draw y = x (where observed equals predicted).
    """
    fig, (ax,) = figure(width=6.4, height=5.2)
    colors, markers = {}, {}
    palette, shapes = [f"C{i}" for i in range(10)], "osD^vP*Xph"
    top, bottom = 0.0, 0.0
    for p in points:
        x, y = _num(p.get("x")), _num(p.get("y"))
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        series, group = str(p.get("series", p.get("label", ""))), str(p.get("group", ""))
        color = colors.setdefault(series, palette[len(colors) % len(palette)])
        marker = markers.setdefault(group, shapes[len(markers) % len(shapes)])
        label = p.get("label") or "/".join(v for v in (group, series) if v)
        ax.errorbar(
            [x],
            [y],
            xerr=error_bar(x, p.get("x_ci")),
            yerr=error_bar(y, p.get("y_ci")),
            fmt=marker,
            color=color,
            capsize=3,
            label=label,
        )
        values = [x, y, *(p.get("x_ci") or [0.0]), *(p.get("y_ci") or [0.0])]
        values = [v for v in map(_num, values) if math.isfinite(v)]
        top, bottom = max(top, *values), min(bottom, *values)
    if diagonal:
        # From 0 (or below it, when a value is negative, e.g. a correlation) to the largest.
        span = (top - bottom) or 1.0
        lo, hi = (bottom - 0.05 * span if bottom < 0 else 0.0), top + 0.1 * span
        ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", linewidth=1, label="y = x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize="x-small", ncols=2)
    return save(fig, path)


def band_panels(
    path: str | os.PathLike,
    panels: Mapping[str, Mapping[str, Sequence[Sequence[float | None]]]],
    *,
    xlabel: str,
    ylabel: str,
    xscale: str = "linear",
    references: Mapping[str, Sequence[Any]] | None = None,
    title: str = "",
) -> Path:
    """One panel per group, one line per series with its interval drawn as a shaded band.

    Args:
      path: the PNG file to write.
      panels: ``{panel title: {series name: [(x, y, lo, hi), ...]}}``; ``lo``/``hi`` may be
        None (no band at that point). Points with an undefined x or y are left out.
      xlabel, ylabel: axis labels (shared by the panels).
      xscale: ``"linear"``, ``"log"`` or ``"symlog"`` (log with a linear stretch around 0, so
        x = 0 can be drawn; its linear range is [-1, 1]).
      references: optional ``{panel title: (label, y, lo, hi)}``: a horizontal line with its
        band (e.g. the figure of a reference trial).
      title: a title over all panels.
    """
    if xscale not in ("linear", "log", "symlog"):
        raise ValueError(f"xscale must be 'linear', 'log' or 'symlog', got {xscale!r}")
    fig, axes = figure(max(len(panels), 1), width=5.2, height=4.0)
    references = references or {}
    for ax, (name, series) in zip(axes, panels.items(), strict=False):
        for i, (label, points) in enumerate(series.items()):
            pts = [
                tuple(map(_num, (p[0], p[1], p[2], p[3])))
                for p in points
                if p[0] is not None and p[1] is not None
            ]
            pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts, strict=True)
            color = f"C{i % 10}"
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=str(label))
            band = [(x, a, b) for x, a, b in zip(xs, lo, hi, strict=True) if math.isfinite(a + b)]
            if band:
                bx, blo, bhi = zip(*band, strict=True)
                ax.fill_between(bx, blo, bhi, color=color, alpha=0.2, linewidth=0)
        ref = references.get(name)
        if ref is not None and ref[1] is not None and math.isfinite(_num(ref[1])):
            label, y, lo, hi = ref[0], _num(ref[1]), _num(ref[2]), _num(ref[3])
            ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=str(label))
            if math.isfinite(lo + hi):
                ax.axhspan(lo, hi, color="gray", alpha=0.15, linewidth=0)
        if xscale == "symlog":
            ax.set_xscale("symlog", linthresh=1.0)
        else:
            ax.set_xscale(xscale)
        ax.set_title(str(name))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def error_bar(center, ci) -> list[list[float]] | None:
    """matplotlib's ``yerr`` ``[[below], [above]]`` of an interval ``ci`` = [lo, hi] around
    ``center``; None when either is undefined (no bar is drawn)."""
    if center is None or not ci or any(v is None for v in ci) or not math.isfinite(center):
        return None
    lo, hi = float(ci[0]), float(ci[1])
    return [[max(center - lo, 0.0)], [max(hi - center, 0.0)]]


def is_png(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a non-empty file starting with the PNG signature."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size <= len(PNG_SIGNATURE):
        return False
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
