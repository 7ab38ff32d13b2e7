"""Shared fixtures."""

import numpy as np
import pytest

from jaxrepro import data


@pytest.fixture(scope="session")
def ds():
    """A tiny learnable 3-class dataset: 266 training and 64 test examples of 12 features."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(330, 12)).astype(np.float32)
    w = rng.normal(size=(12, 3))
    y = np.argmax(x @ w + 0.3 * rng.normal(size=(330, 3)), axis=1)
    return data.Dataset(x[:266], y[:266], x[266:], y[266:], num_classes=3, name="tiny")
