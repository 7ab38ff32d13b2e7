#!/usr/bin/env bash
# Proves the dependency lower bounds in pyproject.toml: builds a FRESH virtual environment,
# installs jaxrepro[test] with every direct dependency at the lowest version its bound allows
# (uv's --resolution lowest-direct; transitive dependencies resolve to their highest compatible
# versions), checks that each direct dependency really landed on its lower bound, and runs a
# smoke subset of the tests (engine, sharding over fake CPU devices with shard_map and an orbax
# checkpoint resumed on another device count, placement, metrics, data, plots, NNX models,
# checkpoint round trip and resume).
#
# Usage: scripts/check_lowest_versions.sh VENV_DIR [pytest args...]
#   VENV_DIR must not exist yet (the check is only meaningful in a fresh environment).
#   Extra arguments replace the default smoke subset (e.g. `tests/test_engine.py -k shapes`).
#   PYTHON (default python3) is the interpreter the venv is made from; uv is taken from PATH,
#   else installed into a separate tool venv VENV_DIR.uv.
# Exits non-zero if the install, the version check or any test fails.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 VENV_DIR [pytest args...]" >&2
  exit 2
fi
VENV=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

if [[ -e "$VENV" ]]; then
  echo "error: $VENV exists; give a path for a fresh venv" >&2
  exit 2
fi

UV=$(command -v uv || true)
if [[ -z "$UV" ]]; then
  "$PYTHON" -m venv "$VENV.uv"
  "$VENV.uv/bin/python" -m pip install -q uv
  UV="$VENV.uv/bin/uv"
fi

"$PYTHON" -m venv "$VENV"
"$UV" pip install --python "$VENV/bin/python" --resolution lowest-direct -e "$ROOT[test]"

# Every direct dependency (and the test extra) must sit exactly on its declared lower bound.
"$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PY'
import importlib.metadata as md
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["test"]
bad = []
for text in reqs:
    req = Requirement(text)
    low = [s.version for s in req.specifier if s.operator in (">=", "==")]
    got = md.version(req.name)
    mark = ""
    if low and Version(got) != Version(low[0]):
        mark = "  <-- not the lower bound"
        bad.append(req.name)
    print(f"{req.name:18} {got:14} ({text}){mark}")
sys.exit(f"not installed at their lower bound: {bad}" if bad else 0)
PY

if [[ $# -eq 0 ]]; then
  set -- tests/test_engine.py tests/test_placement.py tests/test_sharding.py \
    tests/test_metrics.py tests/test_data.py tests/test_plots.py tests/test_nnx.py \
    tests/test_study.py::test_checkpoint_round_trip_is_bitwise \
    tests/test_study.py::test_interrupted_run_resumes_to_bitwise_the_same_results
fi
cd "$ROOT"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -x --durations=10 "$@"
