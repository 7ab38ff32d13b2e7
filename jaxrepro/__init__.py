"""jaxrepro: train many replicas of a model at once and measure how irreproducible they are.

Synopsis::

    import jaxrepro, optax
    data = jaxrepro.data.mnist1d()
    model = jaxrepro.models.MLP(widths=(256, 256), num_classes=10, activation="smelu")
    run = jaxrepro.fit(model, optax.adam(1e-3), data, replicas=32, seed=0,
                       vary=("init", "order"), batch_size=128, epochs=20)
    probs = run.predict(data.x_test)                  # [32, 1000, 10]

    # 16 replicas of a 4-component anti-distilled ensemble, in one training step:
    ens = jaxrepro.models.Ensemble(model, num_components=4)
    loss = jaxrepro.losses.anti_distillation(jaxrepro.losses.softmax_cross_entropy(), 0.1)
    run = jaxrepro.fit(ens, optax.adam(1e-3), data, loss_fn=loss, replicas=16)
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
