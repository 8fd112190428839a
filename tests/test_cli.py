"""The command line: ls, ablate, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json
import os

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
        [
            "ablate",
            "--features",
            "pixels",
            "--max-images",
            "4",
            "--budgets",
            "64,0.25",
            "--strategies",
            "apet,random,pooling",
            "--param",
            "apet.basis=fps,qr",
            "--out",
            str(tmp_path),
            "--no-vlm",
        ],
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


TIMINGS = ("time_ms", "prefill_ms", "prefill_ms_uncompressed", "prefill_ratio")


def test_ablate_is_deterministic(tmp_path):
    args = ["ablate", "--features", "pixels", "--max-images", "3", "--budgets", "64", "--strategies", "apet,random"]
    args += ["--questions", "5"]
    for out in ("a", "b"):
        result = runner.invoke(app, args + ["--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output

    def rows(out):
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in _csv(tmp_path / out / "results.csv")]

    a, b = rows("a"), rows("b")
    assert a == b and len(a) == 13 + 2  # 12 ApET variants and random on pixels; ApET and random in mini-llava
    assert {r["features"] for r in a} == {"pixels", "mini-llava"}
    assert {r["n_questions"] for r in a if r["features"] == "mini-llava"} == {"5"}
    assert "mini-llava uncompressed: accuracy" in result.output


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
    base = [
        "ablate",
        "--features",
        "pixels",
        "--max-images",
        "3",
        "--strategies",
        "random,pooling",
        "--no-vlm",
        "--out",
        str(tmp_path),
    ]
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
        json.dumps({"basis": b, "error_norm": "l1", "seed": 0}, sort_keys=True) for b in ("qr", "random")
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = [64]\n")
    result = runner.invoke(app, ["ablate", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown key(s) budget" in result.output


def test_report_rerenders_from_saved_results(tmp_path):
    args = [
        "ablate",
        "--features",
        "pixels",
        "--max-images",
        "2",
        "--budgets",
        "64",
        "--strategies",
        "apet,random,fastv",
        "--questions",
        "5",
        "--out",
        str(tmp_path),
    ]
    assert runner.invoke(app, args).exit_code == 0
    original = (tmp_path / "report.md").read_text()
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == [
        "answer_cells_mini-llava.png",
        "flash_compatibility.png",
        "heatmaps_mini-llava.png",
        "heatmaps_pixels.png",
        "overlay_pixels.png",
        "retention_mini-llava.png",
        "retention_pixels.png",
    ]
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
    assert flash[("pixels", "apet")] == "True" and flash[("mini-llava", "fastv")] == "False"
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_ablate_on_a_saved_clip_tower(tmp_path):
    """hf:MODEL features, offline: a tiny CLIP tower saved with save_pretrained; its real [CLS] row is used."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch_seed = __import__("torch").manual_seed(0)  # noqa: F841
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14
    )
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    result = runner.invoke(
        app,
        [
            "ablate",
            "--features",
            f"hf:{tmp_path / 'clip'}",
            "--max-images",
            "2",
            "--budgets",
            "16",
            "--strategies",
            "visionzip,random",
            "--no-vlm",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "is a proxy" not in result.output  # a real [CLS] row, no stand-in
    rows = _csv(tmp_path / "out" / "results.csv")
    assert {r["features"] for r in rows} == {f"hf:{tmp_path / 'clip'}"} and {r["kept"] for r in rows} == {"16"}


# ---------------------------------------------------------------- robustness: one-line errors, exit 2
ABLATE = ["ablate", "--features", "pixels", "--max-images", "2", "--no-vlm", "--budgets", "16"]
BENCH = ["bench", "--no-goals", "--frames", "", "--repeats", "1", "--no-memory", "--shape", "1x16x8:4"]
GENERATE = ["generate", "--model", "nobody/nothing", "--image", "astronaut", "--prompt", "what is this?"]


def _one_line_error(result, *fragments):
    """Exit code 2, no traceback, and the whole output one line ``error: ...`` holding every fragment."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ABLATE + ["--strategies", "random,apte"],
        BENCH + ["-s", "random", "-s", "apte"],
        GENERATE + ["--strategy", "apte"],
        ["report", "--focus", "apte"],
    ],
    ids=["ablate", "bench", "generate", "report"],
)
def test_unknown_strategy_in_every_command(command, tmp_path):
    if command[0] == "report":
        _write_results(tmp_path)
        (tmp_path / "results.csv").unlink()
    result = runner.invoke(
        app,
        command
        + (
            ["--out", str(tmp_path)]
            if command[0] in ("ablate", "bench")
            else [str(tmp_path)]
            if command[0] == "report"
            else []
        ),
    )
    _one_line_error(result, "unknown strategy 'apte'", "Did you mean 'apet'", "Available: apet,")
    # refused before anything was written
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["results.json", "run.json"] if command[0] == "report" else []
    )


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("apet.basis", "malformed parameter grid 'apet.basis'; expected STRATEGY.PARAM=V1,V2"),
        ("apet=fps", "malformed parameter grid 'apet=fps'; expected"),
        (".x=1", "malformed parameter grid '.x=1'; expected"),
        ("apet.basis=", "malformed parameter grid 'apet.basis='; expected"),
        ("apet.basis=fps,", "malformed parameter grid 'apet.basis=fps,': it has an empty value"),
        ("apet.basis=,qr", "malformed parameter grid 'apet.basis=,qr': it has an empty value"),
    ],
)
def test_malformed_grid(spec, fragment, tmp_path):
    result = runner.invoke(app, ABLATE + ["--strategies", "apet", "--param", spec, "--out", str(tmp_path)])
    _one_line_error(result, fragment, "e.g. apet.basis=fps,qr,random")


def test_grid_parameter_given_twice(tmp_path):
    result = runner.invoke(
        app, ABLATE + ["-s", "apet", "-p", "apet.basis=fps", "-p", "apet.basis=qr", "--out", str(tmp_path)]
    )
    _one_line_error(result, "--param apet.basis is given twice", "apet.basis=V1,V2")


@pytest.mark.parametrize("spec", ["=3", "num_basis=", "num_basis"])
def test_generate_malformed_param(spec):
    result = runner.invoke(app, GENERATE + ["--param", spec])
    _one_line_error(result, f"--param {spec!r}: expected P=V with a name and a value")


@pytest.mark.parametrize("shape", ["16x576", "axbxc:d", "16x576x1024", "16x576x1024:0", "1x16x8:17"])
def test_bench_malformed_shape(shape, tmp_path):
    result = runner.invoke(app, ["bench", "--no-goals", "--frames", "", "--shape", shape, "--out", str(tmp_path / "b")])
    line = _one_line_error(result, f"shape {shape!r}")
    assert "BxNxD:K" in line or "K <= N" in line
    assert not (tmp_path / "b").exists()


def _image_folders(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.png").write_bytes(b"garbage bytes, not an image")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "a.png").write_bytes(png.getvalue()[:200])  # a real PNG cut short
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    return tmp_path


@pytest.mark.parametrize(
    "folder,fragments",
    [
        ("missing", ["image folder", "missing' does not exist or is not a folder"]),
        ("corrupt", ["cannot read image", "corrupt/x.png'", "cannot identify image file"]),
        ("truncated", ["cannot read image", "truncated/a.png'", "truncated"]),
        ("empty", ["image folder", "empty' holds no image (.png, .jpg"]),
    ],
)
def test_ablate_bad_image_folder(folder, fragments, tmp_path):
    _image_folders(tmp_path)
    result = runner.invoke(
        app, ABLATE + ["-s", "random", "--images", str(tmp_path / folder), "--out", str(tmp_path / "out")]
    )
    _one_line_error(result, *fragments)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    "image,fragment",
    [("corrupt/x.png", "cannot identify image file"), ("missing.png", "is neither a file nor a bundled image")],
)
def test_generate_bad_image(image, fragment, tmp_path):
    _image_folders(tmp_path)
    result = runner.invoke(app, GENERATE[:4] + [str(tmp_path / image)] + GENERATE[5:])
    _one_line_error(result, fragment)


def _write_results(folder):
    from tokencomp.analysis.results import save_results

    folder.mkdir(parents=True, exist_ok=True)
    save_results(
        folder,
        [
            {
                "features": "pixels",
                "strategy": "random",
                "params": {},
                "budget": 16,
                "kept": 16,
                "n_images": 2,
                "recon_error": 0.5,
            }
        ],
        {"seed": 0},
    )


def _command_with_out(command, out):
    if command == "ablate":
        return ABLATE + ["-s", "random", "--out", str(out)]
    if command == "bench":
        return BENCH + ["-s", "random", "--out", str(out)]
    return ["report", str(out)]


@pytest.mark.parametrize("command", ["ablate", "bench", "report"])
def test_unwritable_output_folder(command, tmp_path):
    import os

    locked = tmp_path / "locked"
    out = locked / "run" if command != "report" else locked
    if command == "report":
        _write_results(locked)
    else:
        locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        try:
            (locked / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("chmod 0o500 does not stop writes here (running as root)")
        result = runner.invoke(app, _command_with_out(command, out))
        option = "report folder" if command == "report" else "--out"
        _one_line_error(
            result, f"{option} {str(out)!r} is not writable (Permission denied)", "give a folder you can write to"
        )
    finally:
        os.chmod(locked, 0o700)


@pytest.mark.parametrize("command", ["ablate", "bench"])
def test_output_folder_that_is_a_file_or_under_a_file(command, tmp_path):
    (tmp_path / "taken").write_text("a file")
    result = runner.invoke(app, _command_with_out(command, tmp_path / "taken"))
    _one_line_error(
        result, f"--out {str(tmp_path / 'taken')!r} is a file, not a folder", "give a folder you can write to"
    )
    result = runner.invoke(app, _command_with_out(command, tmp_path / "taken" / "run"))
    _one_line_error(result, f"--out {str(tmp_path / 'taken' / 'run')!r} is not writable")
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize(
    "content,fragments",
    [
        (None, ["results.json' does not exist", "run `tokencomp ablate --out"]),
        ("this is not JSON {", ["is not a tokencomp results file: it is not valid JSON (Expecting value"]),
        (b"\xff\xfe\x00garbage", ["is not a tokencomp results file: it is not valid JSON"]),
        ('{"rows": []}', ["is not a tokencomp results file: it holds a dict; expected a list of rows with features"]),
        ("[1, 2]", ["is not a tokencomp results file: row 0 is a int"]),
        (
            '[{"strategy": "apet", "budget": 64}]',
            ["is not a tokencomp results file: row 0 lacks features, params, kept, n_images"],
        ),
        (
            '[{"features": 3, "strategy": "apet", "params": {}, "budget": 64, "kept": 64, "n_images": 1}]',
            ["row 0 has features 3", "features and strategy must be strings"],
        ),
    ],
)
def test_report_on_missing_or_corrupt_results(content, fragments, tmp_path):
    if isinstance(content, bytes):
        (tmp_path / "results.json").write_bytes(content)
    elif content is not None:
        (tmp_path / "results.json").write_text(content)
    result = runner.invoke(app, ["report", str(tmp_path)])
    _one_line_error(result, str(tmp_path / "results.json"), *fragments)
    assert not (tmp_path / "report.md").exists()


def test_report_on_a_corrupt_run_file(tmp_path):
    _write_results(tmp_path)
    (tmp_path / "run.json").write_text("[1, 2]")
    result = runner.invoke(app, ["report", str(tmp_path)])
    _one_line_error(result, "run.json' is not a tokencomp run file: it holds a list, not a JSON object")


# ---------------------------------------------------------------- robustness: interrupted ablate, --resume
INTERRUPTED = ABLATE[:-1] + ["16,32", "--strategies", "random,pooling"]  # 4 cells


def _rows_without_time(folder):
    csv_rows = [{k: v for k, v in r.items() if k != "time_ms"} for r in _csv(folder / "results.csv")]
    json_rows = [
        {k: v for k, v in r.items() if k != "time_ms"} for r in json.loads((folder / "results.json").read_text())
    ]
    return csv_rows, json_rows


def _interrupt_cell(monkeypatch, after, sigterm=False):
    """Make the ablation's cell measurement raise KeyboardInterrupt (or send this process SIGTERM) once
    ``after`` cells have finished."""
    import os
    import signal

    from tokencomp.analysis import ablation

    real, calls = ablation.measure_cell, []

    def measure(*args, **kwargs):
        calls.append(args[1:])
        if len(calls) > after:
            if sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation, "measure_cell", measure)
    return calls


def test_interrupted_ablate_saves_finished_cells_and_resume_completes_it(tmp_path, monkeypatch):
    assert runner.invoke(app, INTERRUPTED + ["--out", str(tmp_path / "whole")]).exit_code == 0
    whole_csv, whole_json = _rows_without_time(tmp_path / "whole")
    assert len(whole_csv) == len(whole_json) == 4

    with monkeypatch.context() as patch:
        _interrupt_cell(patch, after=2)
        result = runner.invoke(app, INTERRUPTED + ["--out", str(tmp_path / "split")])
    assert result.exit_code == 130 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if "interrupted" in line]
    assert lines == [
        f"interrupted: 2 finished cells are saved in {tmp_path / 'split'}; run the same command with "
        "--resume to finish the rest"
    ]
    # complete, loadable files holding the finished cells; no temporary file left; no report yet
    part_csv, part_json = _rows_without_time(tmp_path / "split")
    assert part_csv == whole_csv[:2] and part_json == whole_json[:2]
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["results.csv", "results.json", "run.json"]

    calls = _interrupt_cell(monkeypatch, after=99)
    result = runner.invoke(app, INTERRUPTED + ["--out", str(tmp_path / "split"), "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming: 2 finished cells" in result.output
    assert [(name, budget) for name, _, budget in calls] == [("pooling", 16), ("pooling", 32)]  # only the missing cells
    assert _rows_without_time(tmp_path / "split") == (whole_csv, whole_json)
    assert (tmp_path / "split" / "report.md").is_file() and not list((tmp_path / "split").glob(".*.tmp"))


def test_interrupt_while_writing_leaves_no_half_written_file(tmp_path, monkeypatch):
    """Ctrl-C inside a write, then again inside the save on the way out: results.json is absent, never half
    written, and no temporary file is left; an interrupt in the middle of a write keeps the old file whole."""
    from tokencomp.analysis import results

    real = results.write_atomic

    def interrupted_write(path, write):
        def partial(fh):
            fh.write('[{"features": ')
            raise KeyboardInterrupt

        real(path, partial if path.name == "results.json" else write)

    monkeypatch.setattr(results, "write_atomic", interrupted_write)
    result = runner.invoke(app, INTERRUPTED + ["--out", str(tmp_path)])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert (
        "were not saved" in result.output and "(interrupted again); run the same command with --resume" in result.output
    )
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(KeyboardInterrupt):
        results.save_results(tmp_path, [], {})
    assert (tmp_path / "results.json").read_text() == "[]" and sorted(p.name for p in tmp_path.iterdir()) == [
        "results.json"
    ]


def test_interrupt_before_any_cell_writes_nothing(tmp_path, monkeypatch):
    _interrupt_cell(monkeypatch, after=0)
    result = runner.invoke(app, INTERRUPTED + ["--out", str(tmp_path)])
    assert result.exit_code == 130
    assert "interrupted before any cell finished; nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_program_quiets_the_profilers_start_stop_lines_unless_asked(monkeypatch):
    import tokencomp.cli as cli

    monkeypatch.setattr(cli, "app", lambda: None)
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    cli.main()
    assert os.environ["KINETO_LOG_LEVEL"] == "6"  # above Kineto's last level: its USDT lines are not printed
    monkeypatch.setenv("KINETO_LOG_LEVEL", "2")
    cli.main()
    assert os.environ["KINETO_LOG_LEVEL"] == "2"  # the user's choice stands


@pytest.fixture
def broken_strategy(monkeypatch):
    """A registered strategy whose ``_compress`` has a bug (an IndexError and a ValueError variant)."""
    from tokencomp import registry

    tc.available()  # load every strategy first: the copy restored afterwards then holds them all
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    def make(name: str, error: type[Exception]):
        @tc.register(name)
        class Broken(tc.Compressor):
            summary = "a strategy with a bug, for the error-boundary test"

            def _compress(self, tokens, k, context):
                raise error("a bug inside the strategy")

        return Broken

    return make


@pytest.mark.parametrize("error", [IndexError, ValueError, KeyError, TypeError])
def test_a_bug_inside_a_strategy_keeps_its_traceback(broken_strategy, tmp_path, error):
    broken_strategy("broken", error)
    result = runner.invoke(
        app,
        [
            "ablate",
            "--features",
            "pixels",
            "--max-images",
            "1",
            "--views",
            "full",
            "--budgets",
            "64",
            "--strategies",
            "broken",
            "--out",
            str(tmp_path),
            "--no-vlm",
        ],
    )
    assert result.exit_code != 2, result.output  # not reported as the user's mistake
    assert isinstance(result.exception, error), result.output
    assert "a bug inside the strategy" in str(result.exception)
    assert result.exc_info is not None and result.exc_info[2] is not None  # the traceback reaches the user


def test_a_budget_the_strategy_refuses_is_one_line(tmp_path):
    result = runner.invoke(
        app,
        [
            "ablate",
            "--features",
            "pixels",
            "--max-images",
            "1",
            "--views",
            "full",
            "--budgets",
            "5000",
            "--strategies",
            "random",
            "--out",
            str(tmp_path),
            "--no-vlm",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output


def test_help_shows_the_defaults():
    """The help texts are plain text: a "[default: ...]" is shown, not swallowed as rich markup."""
    result = runner.invoke(app, ["ablate", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert (
        "[default: 64,128,192]" in text and "[default: 60]" in text and "[default: efficientnet,pixels,dinov2]" in text
    )


@pytest.mark.parametrize(
    "line,fragment",
    [
        ('vlm = "no"', "vlm = 'no' is not a boolean; write vlm = true or vlm = false"),
        ("max_images = -1", "config max_images = -1: give an integer >= 1"),
        ("max_images = 0", "config max_images = 0: give an integer >= 1"),
        ('max_images = "2"', "config max_images = '2': give an integer >= 1"),
        ("questions = 1.5", "config questions = 1.5: give an integer >= 1"),
        ("images = 5", "config images = 5: give a folder path"),
        ("out = 5", "config out = 5: give a folder path"),
        ('seed = "1"', "config seed = '1': give an integer in [0, 2**63)"),
        ("seed = 18446744073709551615", "give an integer in [0, 2**63)"),
    ],
)
def test_config_values_are_checked_not_coerced(line, fragment, tmp_path):
    """A TOML value of the wrong type or range is refused in one line, before anything runs."""
    config = tmp_path / "grid.toml"
    config.write_text(f'features = ["pixels"]\nstrategies = ["random"]\n{line}\n')
    out = [] if line.startswith("out") else ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, ["ablate", "--config", str(config), *out])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert fragment in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--views", "full,full"], "--views: 'full' is given twice"),
        (["--budgets", "64,64"], "--budgets: '64' is given twice"),
        (["--strategies", "random,random"], "--strategies: 'random' is given twice"),
        (["--param", "apet.basis=fps,fps"], "--param apet.basis: 'fps' is given twice"),
    ],
)
def test_a_value_given_twice_is_refused(args, fragment):
    """A duplicate would run twice and count as two independent samples (confidence intervals too narrow)."""
    result = runner.invoke(app, ["ablate", "--features", "pixels", "--max-images", "2", "--no-vlm", *args])
    assert result.exit_code == 2 and fragment in result.output, result.output


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--out", ""], "--out / config out = '': give a folder path"),
        (["--images", ""], "--images / config images = '': give a folder path"),
        (["--views", "nosuch"], "--views: unknown 'nosuch'; allowed: full, flip"),
    ],
)
def test_empty_paths_and_unknown_views_are_refused_whatever_runs(args, fragment, tmp_path, monkeypatch):
    """``--out ''`` wrote into the working directory and ``--views nosuch`` ran when only pixels read no view."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["ablate", "--features", "pixels", "--max-images", "2", "--no-vlm", *args])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_seed_sweep_is_one_line_per_seed_and_columns_follow_the_kept_count(tmp_path):
    """-p random.seed=0,1,2 gives three table lines (not one showing the last seed); a fraction's column
    sits where its kept count falls and says which budget it is."""
    args = [*ABLATE[:-1], "64,0.25,16", "-s", "random", "-p", "random.seed=0,1,2", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text()
    assert all(f"| random seed={s} |" in report for s in (0, 1, 2))
    assert "| strategy | keep 16 | keep 64 | keep 144 (0.25) |" in report


def test_sigterm_saves_finished_cells_like_ctrl_c(tmp_path, monkeypatch):
    """SIGTERM (schedulers, ``timeout``, ``docker stop``) is handled as Ctrl-C: finished cells are saved."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    _interrupt_cell(monkeypatch, after=2, sigterm=True)
    result = runner.invoke(app, INTERRUPTED + ["--out", str(tmp_path)])
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert "interrupted: 2 finished cells are saved" in result.output
    assert len(_csv(tmp_path / "results.csv")) == 2
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone again
