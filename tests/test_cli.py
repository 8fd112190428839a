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
         "--strategies", "apet,random,pooling", "--param", "apet.basis=fps,qr", "--out", str(tmp_path), "--no-vlm"],
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
    assert "Reconstruction error" in result.output
    assert (tmp_path / "report.md").is_file() and (tmp_path / "plots" / "retention_pixels.png").is_file()


def test_ablate_is_deterministic(tmp_path):
    args = ["ablate", "--features", "pixels", "--max-images", "3", "--budgets", "64", "--strategies", "apet,random"]
    runner.invoke(app, args + ["--out", str(tmp_path / "a")])
    runner.invoke(app, args + ["--out", str(tmp_path / "b")])
    a = [{k: v for k, v in r.items() if k != "time_ms"} for r in csv.DictReader(open(tmp_path / "a" / "results.csv"))]
    b = [{k: v for k, v in r.items() if k != "time_ms"} for r in csv.DictReader(open(tmp_path / "b" / "results.csv"))]
    assert a == b and len(a) == 13 + 2  # 12 ApET variants and random on pixels; ApET and random in the tiny VLM
    assert {r["features"] for r in a} == {"pixels", "tiny-llava"}


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


def _csv(path):
    return list(csv.DictReader(open(path)))


def test_resume_runs_only_missing_cells(tmp_path):
    base = ["ablate", "--features", "pixels", "--max-images", "3", "--strategies", "random,pooling", "--no-vlm",
            "--out", str(tmp_path)]
    assert runner.invoke(app, base + ["--budgets", "64"]).exit_code == 0
    first = _csv(tmp_path / "results.csv")
    result = runner.invoke(app, base + ["--budgets", "64,128", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming: 2 finished cells" in result.output
    both = _csv(tmp_path / "results.csv")
    assert len(both) == 4 and both[:2] == first  # the finished cells, time_ms included, untouched
    again = runner.invoke(app, base + ["--budgets", "64", "--resume", "--seed", "1"])
    assert again.exit_code == 2 and "different seed" in again.output


def test_config_file_sets_options_and_flags_win(tmp_path):
    config = tmp_path / "grid.toml"
    config.write_text(
        'strategies = ["apet", "random"]\nbudgets = [64]\nfeatures = ["pixels"]\nmax_images = 2\nvlm = false\n'
        f'out = "{tmp_path / "from-config"}"\n[params.apet]\nbasis = ["qr", "random"]\nerror_norm = "l1"\n'
    )
    result = runner.invoke(app, ["ablate", "--config", str(config), "--budgets", "32"])
    assert result.exit_code == 0, result.output
    rows = _csv(tmp_path / "from-config" / "results.csv")
    assert {r["budget"] for r in rows} == {"32"} and {r["n_images"] for r in rows} == {"2"}
    assert sorted(r["params"] for r in rows if r["strategy"] == "apet") == sorted(
        json.dumps({"basis": b, "error_norm": "l1", "seed": 0}, sort_keys=True) for b in ("qr", "random"))
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = [64]\n")
    result = runner.invoke(app, ["ablate", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown key(s) budget" in result.output


def test_report_rerenders_from_saved_results(tmp_path):
    args = ["ablate", "--features", "pixels", "--max-images", "2", "--budgets", "64", "--strategies", "apet,random,fastv",
            "--out", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    original = (tmp_path / "report.md").read_text()
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["flash_compatibility.png", "heatmaps_pixels.png", "heatmaps_tiny-llava.png", "overlay_pixels.png",
                     "overlay_tiny-llava.png", "retention_pixels.png", "retention_tiny-llava.png"]
    for p in (tmp_path / "plots").iterdir():
        p.unlink()
    (tmp_path / "report.md").unlink()
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").read_text() == original
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == plots
    assert "| fastv | **no** (needs eager)" in original and "| apet | yes |" in original
    rows = _csv(tmp_path / "results.csv")
    flash = {(r["features"], r["strategy"]): r["flash_compatible"] for r in rows}
    assert flash[("pixels", "apet")] == "True" and flash[("tiny-llava", "fastv")] == "False"
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_ablate_on_a_saved_clip_tower(tmp_path):
    """hf:MODEL features, offline: a tiny CLIP tower saved with save_pretrained; its real [CLS] row is used."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch_seed = __import__("torch").manual_seed(0)  # noqa: F841
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=112, patch_size=14)
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    result = runner.invoke(app, ["ablate", "--features", f"hf:{tmp_path / 'clip'}", "--max-images", "2", "--budgets", "16",
                                 "--strategies", "visionzip,random", "--no-vlm", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "is a proxy" not in result.output  # a real [CLS] row, no stand-in
    rows = _csv(tmp_path / "out" / "results.csv")
    assert {r["features"] for r in rows} == {f"hf:{tmp_path / 'clip'}"} and {r["kept"] for r in rows} == {"16"}
