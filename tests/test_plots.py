"""Plots: PNG files, and axes that show every point."""

from unittest import mock

import pytest

from jaxrepro import plots


@pytest.fixture
def axes():
    """Records the axes of the next figure a plot function draws."""
    seen = []
    real_figure = plots.figure

    def spy(*args, **kwargs):
        fig, ax = real_figure(*args, **kwargs)
        seen.extend(ax)
        return fig, ax

    with mock.patch.object(plots, "figure", spy):
        yield seen


def test_scatter_intervals_axes_include_negative_values(tmp_path, axes):
    points = [
        {"x": -0.2, "y": 0.5, "label": "a"},
        {"x": 0.3, "y": -0.4, "y_ci": [-0.6, -0.1], "label": "b"},
    ]
    path = plots.scatter_intervals(tmp_path / "s.png", points, xlabel="x", ylabel="y")
    assert plots.is_png(path)
    lo, hi = axes[0].get_xlim()
    assert lo < -0.6 and hi > 0.5
    assert axes[0].get_ylim() == (lo, hi)


def test_scatter_intervals_non_negative_start_at_zero(tmp_path, axes):
    plots.scatter_intervals(
        tmp_path / "s.png", [{"x": 1.0, "y": 2.0, "label": "a"}], xlabel="x", ylabel="y"
    )
    lo, hi = axes[0].get_xlim()
    assert lo == 0.0 and hi > 2.0
