"""The repository's tooling: ``ruff`` (lint and format) on the repository and ``mypy`` on ``tokencomp``,
with the configuration in ``pyproject.toml``.

Deselect with ``-m "not tooling"``. The mypy cache lives in the system's temporary directory (one per
checkout), so only the first run in a fresh environment pays for the full check.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.tooling


def test_mypy_reports_no_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[dev]')")
    checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"tokencomp-mypy-cache-{checkout}"
    monkeypatch.chdir(ROOT)  # the configuration's paths are relative to the repository root
    stdout, stderr, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), "--no-error-summary", "tokencomp"]
    )
    assert status == 0 and not stdout.strip(), f"mypy tokencomp:\n{stdout}{stderr}"


@pytest.mark.parametrize(
    "command", [["check", "--no-cache"], ["format", "--check", "--no-cache"]], ids=["check", "format"]
)
def test_ruff_reports_nothing(command: list[str]) -> None:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    run = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"ruff {' '.join(command)} .:\n{run.stdout}{run.stderr}"
