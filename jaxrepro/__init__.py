"""jaxrepro: train many replicas of a model at once and measure how irreproducible they are.

Synopsis (a doctest; the README's notebook example is the same at full size)::

    >>> import jaxrepro
    >>> data = jaxrepro.data.load("digits")      # or jaxrepro.data.mnist1d()
    >>> model = jaxrepro.models.MLP(widths=(32,), num_classes=10, activation="smelu")
    >>> tx = jaxrepro.optim.optimizer("adam", 1e-3)  # or any optax transformation
    >>> run = jaxrepro.fit(model, tx, data, replicas=4, seed=0, vary=("init", "order"),
    ...                    batch_size=128, epochs=2)
    >>> probs = run.predict(data.x_test)
    >>> probs.shape                                 # [R, N, C]
    (4, 360, 10)
    >>> report = jaxrepro.metrics.compare(probs, data.y_test)
    >>> 0 < report["churn"] < 1
    True

    Ensembles inside a replica and loss transforms (``models.Ensemble``,
    ``losses.anti_distillation``, ...) train the same way; the README shows them.

Shape letters in names (``probs_RxNxC``): R replicas, K ensemble members (an ensemble's
components, or the k replicas of a group), G groups of replicas, N examples, B batch, C
classes (channels in a CNN), D input features, H and W image height and width (W also a hidden
layer's width), L sequence length, A shifted axes, E epochs, T steps, S bootstrap samples, P
replica pairs, M flattened example-class columns, V sources of randomness.

The study machinery (``jaxrepro.study``, ``jaxrepro.studies``) and ``jaxrepro.plots`` are
imported on first use: ``import jaxrepro`` loads neither them nor orbax nor matplotlib.
"""

from jaxrepro import (
    activations,
    augment,
    compilation,
    data,
    distributed,
    engine,
    files,
    losses,
    metrics,
    models,
    nnx_models,
    optim,
    portable,
    randomness,
    synthetic,
)
from jaxrepro.data import Dataset
from jaxrepro.engine import Engine, FitConfig, Run, Task, TrainState, fit, use_cpu_devices
from jaxrepro.randomness import SOURCES

__version__ = "0.1.0"

_LAZY = ("plots", "studies", "study")
"""Submodules imported on first use (``jaxrepro.study``, ...): the core never imports the study
machinery, plotting or checkpoint code."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"jaxrepro.{name}")
    raise AttributeError(f"module 'jaxrepro' has no attribute {name!r}")


__all__ = [
    "SOURCES",
    "Dataset",
    "Engine",
    "FitConfig",
    "Run",
    "Task",
    "TrainState",
    "activations",
    "augment",
    "compilation",
    "data",
    "distributed",
    "engine",
    "files",
    "fit",
    "losses",
    "metrics",
    "models",
    "nnx_models",
    "optim",
    "portable",
    "plots",
    "randomness",
    "studies",
    "study",
    "synthetic",
    "use_cpu_devices",
]
