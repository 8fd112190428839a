"""The Sphinx site builds offline with warnings as errors, and lists every registered strategy."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import tokencomp as tc

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if os.environ.get("CI"):  # CI installs the dev extra: the docs are built, never skipped
        import sphinx.cmd.build as sphinx
    else:
        sphinx = pytest.importorskip("sphinx.cmd.build", reason="the docs toolchain is in the dev extra")
    out = tmp_path_factory.mktemp("html")
    status = sphinx.build_main(["-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)])
    assert status == 0, "sphinx-build -W reported warnings or errors (printed above)"
    return out


def test_every_registered_strategy_has_a_row_and_a_page(built):
    table = (built / "strategies" / "index.html").read_text()
    for name in tc.available():
        assert (built / "strategies" / "generated" / f"{name}.html").is_file(), name
        assert f'href="generated/{name}.html"' in table, f"{name} missing from the strategies table"


def test_strategy_page_shows_algorithm_and_defaults(built):
    page = (built / "strategies" / "generated" / "apet.html").read_text()
    text = re.sub(r"<[^>]+>", "", page)
    assert "approximation" in text.lower() and "num_basis=10" in text and "FlashAttention" in text


def test_cli_reference_covers_every_command(built):
    text = re.sub(r"<[^>]+>", "", (built / "cli.html").read_text())
    for command in ("ls", "ablate", "report", "bench", "generate"):
        assert f"tokencomp {command}" in text
    assert "--resume" in text and "--max-ms" in text
