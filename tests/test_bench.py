"""``tokencomp bench``: its references are right, its arithmetic is right, its command writes its tables."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from typer.testing import CliRunner

import tokencomp as tc
from tokencomp.analysis import bench
from tokencomp.analysis.authors_apet import authors_apet
from tokencomp.cli import app


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,d,k", [(576, 64, 64), (100, 16, 30), (40, 16, 40)])
def test_authors_procedure_equals_the_batched_strategy(seed, n, d, k):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, d, generator=g) * torch.rand(3, n, 1, generator=g) * 3
    ours = tc.create("apet", seed=seed).compress(x, k)
    theirs = authors_apet(x, k, ours.info["basis_indices"][:, 0])
    torch.testing.assert_close(theirs, ours.tokens, rtol=1e-5, atol=1e-5)


def test_shape_parsing():
    assert bench.BenchShape.parse(" 16x576x1024:64 ") == bench.BenchShape(16, 576, 1024, 64)
    assert bench.BenchShape(1, 18432, 1024, 2304).grid() == (32, 24, 24)
    assert bench.BenchShape(1, 576, 8, 4).grid() == (24, 24)
    assert bench.BenchShape(1, 100, 8, 4).grid() == (10, 10)
    assert bench.BenchShape(1, 50, 8, 4).grid() is None
    for bad in ("16x576:64", "16x576x1024:0", "1x4x4:5", "axbxc:d"):
        with pytest.raises(ValueError, match="shape"):
            bench.BenchShape.parse(bad)


@pytest.mark.parametrize(
    "expr,power",
    [
        ("O(N D)", 1),
        ("O(N log N)", 1),
        ("O(M N D + (N - K) K D)", 2),
        ("O(N^3 D)", 3),
        ("O(L H Dh + N log N)", 1),
        ("O(T N + N^2 D)", 2),
        ("O(M D)", 0),
        ("", None),
    ],
)
def test_complexity_exponent(expr, power):
    assert bench.complexity_exponent(expr) == power


def test_complexity_must_be_big_o():
    with pytest.raises(ValueError, match="O\\(...\\)"):
        bench.complexity_exponent("N D")


@pytest.mark.parametrize("name", tc.available())
def test_every_strategy_declares_a_parseable_complexity(name):
    assert bench.complexity_exponent(tc.get(name).complexity) is not None


def test_loglog_slope_is_exact_on_power_laws():
    ns = [576, 1152, 2304, 4608]
    assert bench.loglog_slope(ns, [3e-6 * n**2 for n in ns]) == pytest.approx(2.0)
    assert bench.loglog_slope(ns, [5.0 * n for n in ns]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bench.loglog_slope([1], [1])


def test_goals_on_small_shapes_and_their_csv(tmp_path):
    rows, found = bench.goals(1, image=bench.BenchShape(2, 64, 16, 16), video=bench.BenchShape(1, 256, 16, 32))
    assert [g.limit for g in found] == [0.1, 0.1, 0.1, 8.0, 3.0]
    assert found[0].ratio == rows[0]["ratio"] and found[4].ratio == rows[3]["peak_x_input"]
    bench.write_csv(tmp_path / "r.csv", rows)  # rows with different keys share one table
    with open(tmp_path / "r.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 and table[0]["peak_x_input"] == "" and float(table[3]["peak_x_input"]) > 0


def test_goal_is_met_at_most_the_limit():
    assert bench.Goal("g", 0.1, 0.1).met and not bench.Goal("g", 0.11, 0.1).met


def test_scaling_rows_summary_and_plot(tmp_path):
    rows = bench.scaling(["pooling", "apet"], frames=(1, 2, 4), d=8, frame_tokens=64, memory=True)
    # 12.5 % of 64 is 8, too few for ApET's 10 basis tokens plus a merge slot: that size is skipped
    assert [(r["strategy"], r["n"]) for r in rows] == [
        ("pooling", 64),
        ("pooling", 128),
        ("pooling", 256),
        ("apet", 128),
        ("apet", 256),
    ]
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in rows)
    summary = {s["strategy"]: s for s in bench.scaling_summary(rows)}
    assert summary["apet"]["power"] == 2 and summary["pooling"]["power"] == 1
    assert summary["apet"]["largest_n"] == 256 and not math.isnan(summary["apet"]["slope"])
    bench.plot_scaling(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_cost_regimes_get_their_own_curves(monkeypatch):
    # VisPruner's two algorithms (cosines cached or recomputed every round) are timed as their own curves,
    # held to VisPruner's complexity; each curve is made with its regime's parameters.
    made = []
    real = bench.create
    monkeypatch.setattr(bench, "create", lambda name, **params: made.append((name, params)) or real(name, **params))
    assert bench.scaling_curves(["pooling", "vispruner"]) == [
        ("pooling", "pooling", {}),
        ("vispruner", "vispruner", {}),
        ("vispruner[cached]", "vispruner", {"cache": "always"}),
        ("vispruner[recomputed]", "vispruner", {"cache": "never"}),
    ]
    rows = bench.scaling(["vispruner"], frames=(1, 2), d=8, frame_tokens=64, memory=False)
    assert [(r["strategy"], r["n"]) for r in rows] == [
        (label, n) for label in ("vispruner", "vispruner[cached]", "vispruner[recomputed]") for n in (64, 128)
    ]
    assert (
        made
        == [("vispruner", {})] * 2 + [("vispruner", {"cache": "always"})] * 2 + [("vispruner", {"cache": "never"})] * 2
    )
    summary = bench.scaling_summary(rows)
    assert [(s["strategy"], s["power"], s["complexity"]) for s in summary] == [
        (label, 3, "O(N^3 D)") for label in ("vispruner", "vispruner[cached]", "vispruner[recomputed]")
    ]
    assert bench.strategy_of("vispruner[cached]") == "vispruner" and bench.strategy_of("apet") == "apet"


def test_scaling_stops_where_the_complexity_predicts_too_long():
    rows = bench.scaling(["apet"], frames=(1, 2, 4), d=8, frame_tokens=128, memory=False, max_ms=1e-6)
    assert [r["n"] for r in rows] == [128]


def test_prediction_follows_the_declared_power():
    curve = [{"strategy": "apet", "n": 576, "ms": 10.0}, {"strategy": "apet", "n": 1152, "ms": 30.0}]
    # nearest row 1152, ApET's power 2: 30 * 4 ** 2 per image, times 2 images
    assert bench.predict_ms(curve, "apet", bench.BenchShape(2, 4608, 8, 8)) == pytest.approx(960.0)
    assert bench.predict_ms(curve, "apet", bench.BenchShape(1, 576, 8, 8)) == pytest.approx(10.0)
    assert bench.predict_ms(curve, "pooling", bench.BenchShape(1, 576, 8, 8)) is None


def test_bench_strategy_reports_ratio_to_the_matmul():
    row = bench.bench_strategy("apet", bench.BenchShape(2, 64, 16, 16), repeats=1)
    assert row["x_matmul"] == pytest.approx(row["ms"] / row["matmul_ms"])
    assert row["x_input"] == pytest.approx(row["peak_mib"] * 2**20 / (2 * 64 * 16 * 4))


def test_references_check_agreement_before_timing():
    row = bench.authors_reference(bench.BenchShape(2, 64, 16, 16))
    assert row["ratio"] == pytest.approx(row["ours_ms"] / row["reference_ms"])
    qr = bench.lapack_reference(bench.BenchShape(1, 64, 32, 16), repeats=1)
    assert qr["reference"].endswith("mode='r')")
    mm = bench.matmul_reference(bench.BenchShape(1, 256, 16, 32), columns=64, repeats=1)
    assert mm["peak_x_input"] > 0


def test_bench_command_writes_its_tables(tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--shape",
            "2x64x16:12",
            "--frames",
            "1",
            "--no-goals",
            "--repeats",
            "1",
            "--no-memory",
            "-s",
            "apet",
            "-s",
            "random",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    with open(out / "strategies.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["strategy"] for r in rows] == ["apet", "random"]
    assert (out / "scaling.png").exists() and (out / "scaling_summary.csv").exists()


def test_bench_command_prints_the_regime_curves(tmp_path):
    # the labels name[regime] are printed as they are (not read as console markup) and written to the CSV
    out = tmp_path / "b"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--shape",
            "1x64x16:12",
            "--frames",
            "1,2",
            "--no-goals",
            "--repeats",
            "1",
            "--no-memory",
            "-s",
            "vispruner",
            "--out",
            str(out),
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "vispruner[cached]" in result.output and "vispruner[recomputed]" in result.output
    with open(out / "scaling_summary.csv") as fh:
        assert [r["strategy"] for r in csv.DictReader(fh)] == [
            "vispruner",
            "vispruner[cached]",
            "vispruner[recomputed]",
        ]


def test_bench_command_skips_what_the_curve_predicts_too_slow(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--shape",
            "2x1152x16:144",
            "--frames",
            "1",
            "--no-goals",
            "--repeats",
            "1",
            "--no-memory",
            "-s",
            "apet",
            "--max-ms",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "apet at 2x1152x16:144 skipped" in result.output
    assert not (tmp_path / "strategies.csv").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--shape", "2x64:8"], "BxNxD:K"),
        (["-s", "apett"], "apet"),
        (["--frames", "1,x"], "--frames"),
        (["--dtype", "float8"], "--dtype"),
        (["--device", "cuda"], "CUDA"),
    ],
)
def test_bench_command_rejects_bad_options(args, fragment, tmp_path):
    if fragment == "CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = CliRunner().invoke(app, ["bench", "--no-goals", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert fragment in result.output
