"""Shared fixtures."""

import numpy as np
import pytest

from jaxrepro import compilation, data


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Before each test, drops JAX's compiled programs once the process holds 30% of the kernel's
    limit on memory mappings (``compilation.release_near_map_limit``). The suite compiles
    thousands of programs in one process; kept, their JIT code passes Linux's 65,530 mappings
    about 19 minutes in and the next compilation aborts the process. 30%, below the engine's own
    50%, so that a test that counts its compilations is not cut in two by a release."""
    compilation.release_near_map_limit(0.3)


@pytest.fixture(scope="session")
def ds():
    """A tiny learnable 3-class dataset: 266 training and 64 test examples of 12 features."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(330, 12)).astype(np.float32)
    w = rng.normal(size=(12, 3))
    y = np.argmax(x @ w + 0.3 * rng.normal(size=(330, 3)), axis=1)
    return data.Dataset(x[:266], y[:266], x[266:], y[266:], num_classes=3, name="tiny")


@pytest.fixture(scope="session")
def binary_body():
    """``run_binary_body``, as a fixture for the study tests."""
    return run_binary_body


def run_binary_body(config_cls, argv):
    """What an experiment binary does (``study.main`` over its flags), in this process so that
    later tests share its compiled functions: returns an object with ``returncode``, ``stdout``
    (the printed report) and ``stderr`` (the progress lines), as ``subprocess.run`` would."""
    import contextlib
    import io
    import types

    from absl import flags

    from jaxrepro import study

    fv = flags.FlagValues()
    study.define_flags(config_cls, fv)
    fv(["prog", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        study.main(config_cls, ["prog"], flag_values=fv)
    return types.SimpleNamespace(returncode=0, stdout=out.getvalue(), stderr=err.getvalue())
