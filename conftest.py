"""The test session computes in portable mode (``jaxrepro.portable``), switched on here, before
JAX's first computation, so the golden results in the suite are the same bits on any x86-64
CPU. ``JAXREPRO_TEST_PORTABLE=0`` runs the suite in the host's own mode instead (the golden
tests then skip).

The study binaries' default persistent compilation cache is off for the session (and the
subprocesses it starts): tests that use the cache name their own directory."""

import os

from jaxrepro import portable

os.environ.setdefault("JAXREPRO_COMPILATION_CACHE", "off")

if os.environ.get("JAXREPRO_TEST_PORTABLE", "1") != "0" and portable.is_x86_64():
    portable.enable()
