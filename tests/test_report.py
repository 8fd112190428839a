"""Saved results, report tables, the paired comparison, and the ablation's views and cells."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from tokencomp.analysis.ablation import TokenSet, image_views, measure_cell
from tokencomp.analysis.report import render_markdown
from tokencomp.analysis.results import COLUMNS, join_flash, load_results, row_key, save_results
from tokencomp.analysis.tables import compare, metric_table


def _row(strategy, budget, recon, features="pixels", params=None, **extra):
    return {
        "features": features,
        "strategy": strategy,
        "params": params or {},
        "budget": budget,
        "kept": budget,
        "n_images": 3,
        "recon_error": recon,
        "recon_error_ci95": 0.01,
        **extra,
    }


def test_metric_table_marks_the_best_per_budget():
    rows = [
        _row("apet", 64, 0.3),
        _row("random", 64, 0.2),
        _row("apet", 128, 0.1),
        _row("random", 128, 0.1),
        {**_row("pdrop", None, 0.5), "kept": 72},
    ]
    table = metric_table(rows, "pixels", "recon_error")
    assert table.columns == [64, 128, None]
    assert table.kept == {64: "keep 64", 128: "keep 128", None: "kept 72"}
    cells = dict(table.rows)
    assert cells["apet"][0] == (0.3, 0.01, False) and cells["random"][0] == (0.2, 0.01, True)
    assert cells["apet"][1][2] and cells["random"][1][2]  # a tie: both best
    assert cells["pdrop"][:2] == [None, None] and cells["pdrop"][2][2]
    assert metric_table(rows, "pixels", "pred_agreement") is None


def test_compare_is_paired_over_images():
    common = {"per_image": {"recon_error": [0.1, 0.2, 0.3]}}
    rows = [
        _row("apet", 64, 0.2, params={"seed": 0}, **common),
        _row("random", 64, 0.3, params={"seed": 0}, per_image={"recon_error": [0.2, 0.3, 0.4]}),
        _row("pooling", 64, 0.2, per_image={"recon_error": [0.3, 0.1, 0.2]}),
    ]
    verdicts = {v["reference"]: v for v in compare(rows)}
    assert verdicts["random"]["difference"] == pytest.approx(-0.1)
    assert verdicts["random"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert verdicts["random"]["verdict"] == "apet keeps more"  # lower error on every image
    assert verdicts["pooling"]["difference"] == pytest.approx(0.0, abs=1e-12)
    assert verdicts["pooling"]["verdict"] == "no measurable difference"
    # a higher-is-better metric flips the direction
    rows[0]["per_image"] = {"pred_agreement": [1.0, 1.0, 1.0]}
    rows[1]["per_image"] = {"pred_agreement": [0.0, 0.0, 0.0]}
    assert {v["reference"]: v["verdict"] for v in compare(rows)}["random"] == "apet keeps more"


def test_compare_uses_the_default_configuration_only():
    rows = [
        _row("apet", 64, 0.2, params={"basis": "qr"}, per_image={"recon_error": [0.1, 0.1]}),
        _row("random", 64, 0.3, params={"seed": 0}, per_image={"recon_error": [0.2, 0.3]}),
    ]
    assert compare(rows) == []


def test_join_flash_spreads_the_vlm_measurement():
    rows = [
        _row(
            "fastv",
            64,
            math.nan,
            features="tiny-llava",
            flash_measured=True,
            flash_compatible=False,
            flash_error="needs eager",
            eager_ms=3.0,
            sdpa_ms=1.0,
            eager_peak_mib=5.0,
            sdpa_peak_mib=1.0,
        ),
        _row("apet", 64, math.nan, features="tiny-llava", flash_measured=True, flash_compatible=True, flash_error=""),
        _row("apet", 64, 0.3, flash_measured=False),
        _row("tome", 64, 0.3, flash_measured=False),
        _row("fastv", 128, 0.3, flash_measured=False),
    ]
    join_flash(rows)
    assert rows[2]["flash_compatible"] is True and rows[2]["eager_ms"] is None
    assert "flash_compatible" not in rows[3]  # never run in a VLM: not claimed
    assert rows[4]["flash_compatible"] is False and rows[4]["eager_ms"] == 3.0


def test_save_and_load_round_trip(tmp_path):
    rows = [_row("apet", 64, 0.25, params={"basis": "fps"}, heatmap=[0.5, 1.0], position_bias=math.nan)]
    save_results(tmp_path, rows, {"seed": 3})
    loaded, meta = load_results(tmp_path)
    assert meta == {"seed": 3}
    assert loaded[0]["params"] == json.dumps({"basis": "fps"}) and loaded[0]["position_bias"] is None
    assert loaded[0]["heatmap"] == [0.5, 1.0]
    assert row_key(loaded[0]) == row_key(rows[0])
    with open(tmp_path / "results.csv") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == COLUMNS
        (line,) = list(reader)
    assert line["recon_error"] == "0.25" and line["position_bias"] == "" and "heatmap" not in line
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokencomp ablate --out"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a tokencomp results file"):
        load_results(tmp_path)


def test_markdown_has_reference_row_and_bold_best():
    rows = [_row("apet", 64, 0.3), _row("random", 64, 0.2)]
    text = render_markdown(rows, {}, [])
    assert "| *uncompressed* | *0* |" in text
    assert "| random | **0.2000 ± 0.0100** |" in text and "| apet | 0.3000 ± 0.0100 |" in text
    assert "FlashAttention compatibility was not measured" in text


def test_image_views():
    img = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    views = image_views([("a", img), ("b", img)], ("full", "flip", "crop"))
    assert [n for n, _, _ in views] == ["a", "a/flip", "a/crop", "b", "b/flip", "b/crop"]
    assert [i for _, _, i in views] == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(views[1][1], img[:, ::-1]) and np.array_equal(views[2][1], img[1:9, 2:18])
    tl, br = image_views([("a", img)], ("crop-tl", "crop-br"))
    assert np.array_equal(tl[1], img[:8, :16]) and np.array_equal(br[1], img[2:, 4:])
    with pytest.raises(ValueError, match="allowed: full, flip, crop, crop-tl, crop-br"):
        image_views([("a", img)], ("rotate",))


def test_token_set_originals_and_permuted_cls_attention():
    cls = torch.rand(4, 6)
    ts = TokenSet(
        "x", torch.randn(4, 6, 3), (2, 3), list("abcd"), cls_attention=cls, view_of=torch.tensor([0, 0, 1, 1])
    )
    assert ts.originals.tolist() == [0, 2]
    perm = torch.tensor([[5, 4, 3, 2, 1, 0], [0, 2, 1, 3, 5, 4]])
    ctx = ts.context(ts.tokens[ts.originals], perm, rows=ts.originals)
    assert torch.equal(ctx.cls_attention, cls[[0, 2]].gather(1, perm))


def test_measure_cell_keeping_everything_is_lossless():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(5, 7)
    ts = TokenSet("x", torch.randn(3, 16, 5, generator=g), (4, 4), list("abc"), head=head)
    row = measure_cell(ts, "random", {"seed": 0}, 16)
    assert row["recon_error"] == 0.0 and row["lstsq_error"] < 1e-5
    assert row["pred_agreement"] == 1.0 and row["pred_kl"] < 1e-6
    assert row["position_bias"] == pytest.approx(0.0, abs=1e-12)
    assert row["heatmap"] == [1.0] * 16 and row["example_kept"] == list(range(16))
    assert row["per_image"]["recon_error"] == [0.0, 0.0, 0.0]


def test_measure_cell_heatmap_counts_originals_only():
    ts = TokenSet("x", torch.randn(4, 9, 3), (3, 3), list("abcd"), view_of=torch.tensor([0, 0, 1, 1]))
    row = measure_cell(ts, "pooling", {}, 1)  # one pooled token: the centre of the 3 x 3 grid
    assert row["heatmap"] == [0, 0, 0, 0, 1.0, 0, 0, 0, 0] and row["n_images"] == 4


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_follow_the_umask(tmp_path, umask, mode):
    """Atomic writes go through a temporary file; its 0600 must not become the result files' mode."""
    import os
    import stat

    old = os.umask(umask)
    try:
        save_results(tmp_path, [], {})
    finally:
        os.umask(old)
    for name in ("results.json", "results.csv", "run.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda rows: rows[0].update(budget="64"), "row 0 has budget '64'; a budget is a number"),
        (lambda rows: rows[0].update(budget=True), "row 0 has budget True"),
        (lambda rows: rows.append(dict(rows[0])), "rows 0 and 2 are the same cell"),
    ],
)
def test_hand_corrupted_rows_are_refused_on_load(tmp_path, edit, fragment):
    rows = [
        {"features": "pixels", "strategy": "apet", "params": "{}", "budget": 64, "kept": 64, "n_images": 2},
        {"features": "pixels", "strategy": "apet", "params": "{}", "budget": 0.5, "kept": 288, "n_images": 2},
    ]
    load = tmp_path / "results.json"
    load.write_text(json.dumps(rows))
    assert len(load_results(tmp_path)[0]) == 2
    edit(rows)
    load.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_results(tmp_path)
