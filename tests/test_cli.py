"""The command line: ls, ablate, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

import tokencomp as tc
from tokencomp.cli import app

runner = CliRunner()


def test_ls_lists_every_strategy_with_capabilities():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0
    for name in tc.available():
        assert name in result.output
        assert tc.get(name).summary[:20] in result.output
    assert "pre_llm" in result.output


def test_ablate_writes_results(tmp_path):
    result = runner.invoke(
        app,
        ["ablate", "--features", "pixels", "--max-images", "4", "--budgets", "64,0.25",
         "--strategies", "apet,random,pooling", "--param", "apet.basis=fps,qr", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == (2 + 1 + 1) * 2
    assert {r["strategy"] for r in rows} == {"apet", "random", "pooling"}
    kept = {(r["strategy"], r["params"], r["budget"]): int(r["kept"]) for r in rows}
    assert kept[("random", json.dumps({"seed": 0}), "0.25")] == 144
    assert {json.loads(r["params"]).get("basis") for r in rows if r["strategy"] == "apet"} == {"fps", "qr"}
    for r in rows:
        assert 0 < float(r["recon_error"]) < 1 and 0 <= float(r["lstsq_error"]) < 1
        assert int(r["n_images"]) == 4
    saved = json.load(open(tmp_path / "results.json"))
    assert [(j["strategy"], j["params"], str(j["budget"])) for j in saved] == [
        (r["strategy"], r["params"], r["budget"]) for r in rows
    ]
    assert all(abs(j["recon_error"] - float(r["recon_error"])) < 1e-9 for j, r in zip(saved, rows))
    assert "reconstruction error" in result.output


def test_ablate_is_deterministic(tmp_path):
    args = ["ablate", "--features", "pixels", "--max-images", "3", "--budgets", "64", "--strategies", "apet,random"]
    runner.invoke(app, args + ["--out", str(tmp_path / "a")])
    runner.invoke(app, args + ["--out", str(tmp_path / "b")])
    a = [{k: v for k, v in r.items() if k != "time_ms"} for r in csv.DictReader(open(tmp_path / "a" / "results.csv"))]
    b = [{k: v for k, v in r.items() if k != "time_ms"} for r in csv.DictReader(open(tmp_path / "b" / "results.csv"))]
    assert a == b and len(a) == 13


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies", "apte"], "Did you mean 'apet'"),
        (["--param", "apet.basis"], "malformed parameter grid"),
        (["--param", "apet.bases=fps"], "unknown parameter(s) 'bases'"),
        (["--param", "apet.basis=kmeans"], "'basis' must be one of"),
        (["--budgets", "64,abc"], "'abc' is not a number"),
        (["--budgets", "1000"], "budget 1000 is out of range"),
        (["--features", "clip"], "unknown 'clip'"),
        (["--images", "/nonexistent/folder"], "does not exist"),
    ],
)
def test_ablate_user_errors_are_one_line_exit_2(args, message):
    result = runner.invoke(app, ["ablate", "--features", "pixels", "--max-images", "2", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_readme_strategy_table_is_the_registry():
    """The README's table is `tokencomp ls --markdown`, so it cannot drift from the classes."""
    from pathlib import Path

    from tokencomp.cli import strategy_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin = readme.index("<!-- strategies-table")
    block = readme[readme.index("\n", begin) + 1 : readme.index("<!-- /strategies-table -->")].strip()
    assert block == strategy_markdown(), "README table is stale: paste the output of `tokencomp ls --markdown`"
    for name in tc.available():
        assert f"| `{name}` |" in block


def test_flash_attention_status_follows_capabilities():
    assert tc.get("apet").flash_attention() == "yes"
    assert tc.get("pdrop").flash_attention() == "yes"
    assert tc.get("visionzip").flash_attention().startswith("LLM yes")
    assert tc.get("fastv").flash_attention().startswith("no")
