"""The ``jaxrepro`` command (``jaxrepro.cli``, ``python -m jaxrepro``): the list of studies, a
study's flags, usage errors, a tiny real run, and the console script of a built wheel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrepro import cli, studies

ROOT = Path(__file__).resolve().parents[1]


def _listed(text: str) -> list[str]:
    """The study names at the start of the entries of ``jaxrepro --help``."""
    entries = text.split("studies:\n", 1)[1].splitlines()
    return [line.split()[0] for line in entries if line.startswith("  ") and line[2] != " "]


def test_help_lists_every_study_with_its_description(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxrepro <study>")
    assert _listed(out) == list(studies.NAMES)
    assert "when in training is irreproducibility born?" in out  # from the module docstring
    for name in studies.NAMES:
        assert cli.description(name) and "\n" not in cli.description(name)


def test_no_study_is_a_usage_error_listing_the_studies(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert _listed(err) == list(studies.NAMES) and "error: name a study" in err


@pytest.mark.parametrize("argv", [["nope"], ["--workdir=x"], ["chaoss", "--quick"]])
def test_unknown_study_is_a_usage_error_naming_the_studies(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"unknown study {argv[0]!r}" in err
    assert ", ".join(studies.NAMES) in err


def test_study_help_lists_its_flags(capsys):
    # As `python experiments/chaos.py --help` does: absl's short help, exit status 1.
    assert cli.main(["chaos", "--help"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("jaxrepro chaos: The chaos study")
    for flag in ("--scales", "--workdir", "--quick", "--[no]portable", "--num_processes"):
        assert flag in out, flag
    # Another study in the same process: its own flags replace the last one's.
    assert cli.main(["test-set-variance", "--help"]) == 1
    out = capsys.readouterr().out
    assert "--bootstrap_over" in out and "--scales" not in out


def test_study_bad_flag_is_a_usage_error(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert cli.main(["irreproducibility", "--quick", "--replicas=1", f"--workdir={workdir}"]) == 1
    assert "--replicas" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.slow
def test_tiny_study_runs_through_the_command(tmp_path, capsys):
    argv = ["--quick", "--settings=all", "--replicas=2", "--epochs=1", f"--workdir={tmp_path}"]
    assert cli.main(["irreproducibility", *argv]) == 0
    assert capsys.readouterr().out.startswith("# Irreproducibility")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["study"] == "irreproducibility" and results["complete"] is True
    assert results["config"]["replicas"] == 2 and list(results["results"]) == ["relu/all"]
    assert (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_python_m_jaxrepro_lists_every_study():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxrepro", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _listed(proc.stdout) == list(studies.NAMES)


@pytest.mark.slow
def test_installed_wheel_runs_the_command(tmp_path):
    # Builds the wheel (pip, with the build backend pyproject.toml asks for) and installs it
    # alone in a directory: its console script answers from there, outside the repository.
    # The source is copied first, so that setuptools' build/ and *.egg-info stay out of the
    # repository.
    src, wheels, target = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    shutil.copytree(
        ROOT / "jaxrepro", src / "jaxrepro", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("jaxrepro-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import jaxrepro.cli; print(jaxrepro.cli.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert where.stdout.startswith(str(target)), where.stdout  # the wheel's, not the repository's
    proc = subprocess.run(
        [str(target / "bin" / "jaxrepro"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _listed(proc.stdout) == list(studies.NAMES)
