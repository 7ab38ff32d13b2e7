"""jaxrepro: train many replicas of a model at once and measure how irreproducible they are.

Synopsis (a doctest; the README's notebook example is the same at full size)::

    >>> import jaxrepro, optax
    >>> data = jaxrepro.data.load("digits")      # or jaxrepro.data.mnist1d()
    >>> model = jaxrepro.models.MLP(widths=(32,), num_classes=10, activation="smelu")
    >>> run = jaxrepro.fit(model, optax.adam(1e-3), data, replicas=4, seed=0,
    ...                    vary=("init", "order"), batch_size=128, epochs=2)
    >>> probs = run.predict(data.x_test)
    >>> probs.shape                                 # [R, N, C]
    (4, 360, 10)
    >>> report = jaxrepro.metrics.compare(probs, data.y_test)
    >>> 0 < report["churn"] < 1
    True

    Replicas of a 4-component anti-distilled ensemble, in one training step:

    >>> ens = jaxrepro.models.Ensemble(model, num_components=4)
    >>> loss = jaxrepro.losses.anti_distillation(jaxrepro.losses.softmax_cross_entropy(), 0.1)
    >>> run = jaxrepro.fit(ens, optax.adam(1e-3), data, loss_fn=loss, replicas=2, epochs=1)
    >>> run.predict(data.x_test, components=True).shape    # [R, K, N, C]
    (2, 4, 360, 10)

Shape letters in names (``probs_RxNxC``): R replicas, K ensemble members (an ensemble's
components, or the k replicas of a group), G groups of replicas, N examples, B batch, C
classes, D input features, T steps, S bootstrap samples, P replica pairs, M flattened
example-class columns, V sources of randomness.

The study machinery (``jaxrepro.study``, ``jaxrepro.studies``) and ``jaxrepro.plots`` are
imported on first use: ``import jaxrepro`` loads neither them nor orbax nor matplotlib.
"""

from jaxrepro import (
    activations,
    augment,
    data,
    distributed,
    engine,
    files,
    losses,
    metrics,
    models,
    optim,
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
    "data",
    "distributed",
    "engine",
    "files",
    "fit",
    "losses",
    "metrics",
    "models",
    "optim",
    "plots",
    "randomness",
    "studies",
    "study",
    "synthetic",
    "use_cpu_devices",
]
