"""Lint is part of the suite, so the README's one test command (and CI, which runs it) also runs ruff.

Rules and exceptions: ruff.toml at the repository root.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff():
    venv_ruff = Path(sys.executable).with_name("ruff")
    return str(venv_ruff) if venv_ruff.is_file() else shutil.which("ruff")


def test_ruff_finds_nothing():
    ruff = _ruff()
    if ruff is None:
        pytest.fail("ruff is not installed: it is in requirements.txt (bash tools/install.sh)")
    out = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"ruff findings:\n{out.stdout}{out.stderr}"


def test_ruff_config_is_the_one_ci_uses():
    # a lint run that silently fell back to ruff's defaults would check far less than ruff.toml asks
    ruff = _ruff()
    out = subprocess.run([ruff, "check", "--show-settings", "lobes/brains.py"], cwd=ROOT, capture_output=True,
                         text=True)
    assert str(ROOT / "ruff.toml") in out.stdout
    assert "line_length = 130" in out.stdout.replace(" ", " ")
