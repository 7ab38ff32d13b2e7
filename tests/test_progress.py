"""Progress where people wait: ``fit(progress=...)`` draws a tqdm bar; study logs stay lines."""

import io

import numpy as np
import optax
import pytest

from jaxrepro import checks, engine, models
from jaxrepro.studies import workdir

MODEL = models.MLP(widths=(8,), num_classes=3)
BASE = dict(replicas=2, epochs=3, batch_size=64, strategy="map")


def test_fit_draws_a_bar_with_epochs_replicas_and_loss(ds, capsys):
    run = engine.fit(MODEL, optax.adam(1e-2), ds, progress=True, **BASE)
    err = capsys.readouterr().err
    assert "2 replicas" in err and "3/3" in err and "epoch" in err, err
    shown = float(err.rsplit("loss=", 1)[1][:6])
    assert shown == pytest.approx(float(np.mean(run.history["loss"][:, -1])), abs=1e-4)
    quiet = engine.fit(MODEL, optax.adam(1e-2), ds, **BASE)
    assert capsys.readouterr().err == ""  # off by default
    np.testing.assert_array_equal(quiet.history["loss"], run.history["loss"])  # no change
    engine.fit(MODEL, optax.adam(1e-2), ds, progress="sweep 1/4", **dict(BASE, epochs=1))
    assert "sweep 1/4" in capsys.readouterr().err
    with pytest.raises(checks.BadType, match="progress"):
        engine.fit(MODEL, optax.adam(1e-2), ds, progress=1, **BASE)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_study_progress_lines_gain_a_bar_on_a_terminal_only():
    plain = workdir.Progress(10.0, stream=io.StringIO())
    assert plain.bar is False  # a log file or captured output: lines alone
    term = _Terminal()
    shown = workdir.Progress(10.0, stream=term)
    assert shown.bar is True
    shown.write("config 1/2 a epoch 1/3")
    assert "config 1/2 a epoch 1/3\n" in term.getvalue()
    assert workdir.Progress(10.0, stream=term, echo=False).bar is False
