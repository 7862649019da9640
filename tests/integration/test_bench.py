"""The benchmark harness: its helpers are right, its reports show every case, it runs end to end.

Nothing here is timed: performance is measured by `qdserve bench`, which writes results.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import clean
from benchmarks import main as bench_main
from benchmarks.common import (
    image_distance,
    percentile,
    ratio,
    registry_variants,
    run_meta,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]
GPU_RUNS = sorted((REPO / "docs" / "benchmarks").glob("gpu-h200-run*"))


@pytest.mark.parametrize("q", [0, 1, 5, 25, 50, 75, 95, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [0.31, 0.12, 0.5, 0.5, 0.9, 0.05, 0.77, 0.2, 1.4, 0.33, 0.61]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_and_ratio() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["mean"], s["n"]) == (2.5, 1.0, 4.0, 2.5, 4)
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


def test_image_distance_psnr_and_mad() -> None:
    a = np.full((8, 8, 3), 100, dtype=np.uint8)
    same = image_distance(a, a.copy())
    assert same == {"psnr_db": None, "mean_abs_diff": 0.0, "identical": True}
    b = a + 10  # every pixel off by 10: MSE 100
    d = image_distance(a, b)
    assert d["mean_abs_diff"] == pytest.approx(10.0)
    assert d["psnr_db"] == pytest.approx(10 * math.log10(255**2 / 100))
    assert d["identical"] is False
    with pytest.raises(ValueError):
        image_distance(a, np.zeros((4, 4, 3), dtype=np.uint8))


def test_matrix_report_includes_every_case(tmp_path: Path) -> None:
    from benchmarks import matrix

    lat = summarize([0.1, 0.11, 0.12])
    measured = {
        "measured": True,
        "load_seconds": 1.0,
        "denoiser_storage_bytes": 2**20,
        "ratio_to_bf16": 0.5,
        "ratio_to_floor": 1.01,
        "peak_rss_delta_bytes": 2**21,
        "latency_seconds": lat,
        "size": 32,
        "steps": 4,
        "runs": 3,
        "warmup": 1,
        "quality_vs_none": {
            "seeds": 4,
            "psnr_db_mean": 40.0,
            "identical_seeds": 0,
            "mean_abs_diff": 0.5,
        },
    }
    runnable, _ = registry_variants()
    cases = [{**measured, "backend": b, "quant_type": q} for b, q in runnable] + [
        {"backend": "modelopt", "quant_type": "FP8", "measured": False, "unavailable": "GPU only"},
        {"backend": "quanto", "quant_type": "int2", "measured": False, "error": "boom | trace"},
    ]
    data = {
        "meta": run_meta("test"),
        "model": "m",
        "prompt": "p",
        "seeds": [0],
        "memory_method": "x",
        "storage_method": "y",
        "cases": cases,
    }
    text = matrix.render(data)
    for b, q in runnable:
        assert f"| {b} {q or ''}".rstrip() in text
    assert "modelopt FP8 | not run: GPU only" in text
    assert "boom / trace" in text  # a pipe in an error must not break the table
    matrix.plot(data, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000


@pytest.mark.skipif(not GPU_RUNS, reason="no recorded GPU runs in docs/benchmarks")
def test_gpu_report_shows_every_recorded_case_and_failure(tmp_path: Path) -> None:
    from benchmarks import gpu_report

    for run in GPU_RUNS:
        shutil.copytree(run, tmp_path / run.name)
    gpu_report.main(tmp_path)
    text = (tmp_path / "gpu.md").read_text()
    assert "NVIDIA H200" in text and "denoiser only" in text and "x50" in text
    for setting, *_ in gpu_report.ANCHORS:
        assert f"| {setting} |" in text
    for run in GPU_RUNS:
        for path in run.glob("gpu_bench*.json"):
            for arch in json.loads(path.read_text())["archs"].values():
                for key, result in arch["cases"].items():
                    assert key in text
                    if "error" in result:
                        assert result["error"].splitlines()[0][:60] in text
    assert "mslk" in text  # torchao int4wo's recorded failure


def test_clean_keeps_recorded_gpu_runs(tmp_path: Path) -> None:
    (tmp_path / "gpu-h200-run1").mkdir()
    (tmp_path / "gpu-h200-run1" / "gpu_bench.json").write_text("{}")
    (tmp_path / "matrix.json").write_text("{}")
    (tmp_path / "old").mkdir()
    clean(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-h200-run1"]
    assert (tmp_path / "gpu-h200-run1" / "gpu_bench.json").exists()


def test_bench_matrix_quick_end_to_end(tmp_path: Path) -> None:
    assert bench_main(["matrix", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "matrix.json").read_text())
    assert data["meta"]["versions"]["torch"] and data["meta"]["date"]
    rows = {(r["backend"], r["quant_type"]): r for r in data["cases"]}
    none = rows[("none", None)]
    assert none["measured"], none
    assert none["quality_vs_none"]["identical_seeds"] == none["quality_vs_none"]["seeds"]
    q8 = rows[("quanto", "int8")]
    assert q8["measured"], q8
    assert q8["ratio_to_bf16"] < 0.6 < none["ratio_to_bf16"]
    assert q8["latency_seconds"]["median"] > 0
    assert rows[("bitsandbytes_4bit", "nf4")]["measured"] is False  # no GPU: reason kept
    text = (tmp_path / "matrix.md").read_text()
    assert "quanto int8" in text and "torch" in text
    assert (tmp_path / "matrix.png").exists()
    index = (tmp_path / "README.md").read_text()
    assert "[matrix.md](matrix.md)" in index


def test_bench_batch_size_quick_every_way_and_variant_files(tmp_path: Path) -> None:
    argv = ["batch-size", "--quick", "--out", str(tmp_path), "--sizes", "1,2", "--rounds", "1"]
    assert bench_main(argv) == 0
    data = json.loads((tmp_path / "batch-size.json").read_text())
    # Flux: whole calls, the step loop, and the step loop on two lanes (the engine's CPU way).
    assert set(data["results"]) == {"generate_batch", "StepBatch", "StepBatch x2 lanes"}
    for way, rows in data["results"].items():
        assert set(rows) == {"1", "2"}
        assert all(r["images_per_second"] > 0 for r in rows.values())
        assert data["best_batch"][way] in ("1", "2")
    text = (tmp_path / "batch-size.md").read_text()
    assert "| 2 |" in text and "QDS_MAX_BATCH=auto" in text
    assert "StepBatch x2 lanes img/s" in text
    index = (tmp_path / "README.md").read_text()
    assert "[batch-size.md](batch-size.md)" in index
    assert bench_main([*argv, "--variant", "quanto:int8", "--sizes", "1"]) == 0
    assert (tmp_path / "batch-size-quanto-int8.md").exists()  # the default's file untouched
    assert json.loads((tmp_path / "batch-size.json").read_text()) == data


def test_wheel_packages_only_the_runtime() -> None:
    """pyproject's package discovery (what the wheel and the image get) leaves out the
    benchmarks and the demo trainer; the embedded model's weights stay in."""
    import tomllib

    from setuptools import find_namespace_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    spec = find["packages"]["find"]
    packages = find_namespace_packages(
        where=str(REPO), include=spec["include"], exclude=spec.get("exclude", ())
    )
    tops = {p.split(".")[0] for p in packages}
    assert tops == {"quantization", "pipelines", "engine", "service"}
    assert "pipelines.demo_weights" in packages
    assert not [
        p for p in packages if "bench" in p or p.startswith(("pipelines.demo.", "examples"))
    ]


def test_bench_outside_a_checkout_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import service
    from service import cli

    # An installed (non-editable) package: service/ under site-packages, run from elsewhere.
    monkeypatch.setattr(service, "__file__", str(tmp_path / "site" / "service" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert cli.find_checkout() is None
    assert cli.main(["bench", "matrix", "--quick"]) == 2
    assert "run from a qdserve checkout" in capsys.readouterr().err
    assert cli.main(["train-demo", "--steps", "1"]) == 2
    assert "qdserve train-demo: not part of the installed package" in capsys.readouterr().err


def test_bench_finds_the_checkout_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.common import DEFAULT_OUT
    from service import cli

    monkeypatch.chdir(tmp_path)
    assert cli.find_checkout() == REPO
    assert DEFAULT_OUT == REPO / "docs" / "benchmarks"


# -- qdserve bench peer ----------------------------------------------------------------------
# A full peer run starts four servers (tens of seconds each on 2 cores), far over a test's
# budget: the harness is smoke-run by hand, and its report is tested from the JSON such a run
# wrote (`qdserve bench peer --rounds 1 --seconds 2 --concurrency 1,4 --direct-calls 2`).
PEER_FIXTURE = REPO / "tests" / "fixtures" / "peer_smoke.json"


def test_peer_options_default_to_every_table_at_1_4_16() -> None:
    from benchmarks.peer import parse_options

    opts = parse_options([])
    assert (opts.concurrency, opts.tables, opts.variant, opts.slug) == (
        (1, 4, 16),
        ("defaults", "pinned", "equal-batch"),
        "none",
        "peer",
    )
    q = parse_options(["--variant", "quanto:int8", "--tables", "pinned", "--rounds", "1"])
    assert (q.parsed_variant, q.slug, q.tables, q.rounds) == (
        ("quanto", "int8"),
        "peer-quanto-int8",
        ("pinned",),
        1,
    )
    assert parse_options(["--variant", "torchao:int8wo"]).slug == "peer-torchao-int8wo"
    g = parse_options(
        ["--model", "/m", "--size", "1024", "--steps", "4", "--name", "peer-nvidia-h200"]
    )
    assert (g.model, g.size, g.steps, g.slug) == ("/m", 1024, 4, "peer-nvidia-h200")
    with pytest.raises(SystemExit):
        parse_options(["--tables", "fastest"])


def test_peer_servers_get_the_same_pipeline_and_threads_only_when_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.peer import (
        PeerOptions,
        litserve_argv,
        litserve_batch,
        qdserve_env,
        same_requests,
        table_threads,
    )
    from quantization.settings import QuantSettings

    monkeypatch.delenv("QDS_QUANT_BACKEND", raising=False)
    settings = QuantSettings(model=str(tmp_path), quant_backend="quanto", quant_type="int8")
    defaults = qdserve_env(settings, None)
    assert defaults == {
        "QDS_MODEL": str(tmp_path),
        "QDS_QUANT_BACKEND": "quanto",
        "QDS_QUANT_TYPE": "int8",
    }  # defaults mean defaults: the step cache at its default too
    assert qdserve_env(settings, None, uncached=True)["QDS_STEP_CACHE"] == "off"
    assert qdserve_env(settings, 1)["QDS_TORCH_THREADS"] == "1"
    argv = litserve_argv(tmp_path / "s.json", None, litserve_batch("defaults", 8))
    assert argv[argv.index("--torch-threads") + 1] == "0"  # 0: torch's default
    assert argv[argv.index("--max-batch-size") + 1] == "4"
    assert argv[argv.index("--batch-timeout") + 1] == "0.025"
    assert litserve_argv(tmp_path / "s.json", 1, 4)[-1] == "1"
    # Only the pinned table pins threads; only the equal-batch table tunes LitServe's batch,
    # to qdserve's own limit on the device (8 on CPU, 4 on a GPU).
    assert [table_threads(t, 1) for t in ("defaults", "pinned", "equal-batch")] == [None, 1, None]
    assert [litserve_batch(t, 8) for t in ("defaults", "pinned", "equal-batch")] == [4, 4, 8]
    assert litserve_batch("equal-batch", 4) == 4
    # Both servers get the same body for the same round, level and index.
    opts = PeerOptions()
    assert same_requests(opts, 0, 4)(3) == same_requests(opts, 0, 4)(3)
    assert same_requests(opts, 0, 4)(3)["seed"] != same_requests(opts, 1, 4)(3)["seed"]
    assert same_requests(opts, 0, 4)(3)["size"] == "32x32"
    assert "num_inference_steps" not in same_requests(opts, 0, 4)(3)  # the model's default
    gpu = PeerOptions(size=1024, steps=4)
    assert same_requests(gpu, 0, 4)(3)["size"] == "1024x1024"
    assert same_requests(gpu, 0, 4)(3)["num_inference_steps"] == 4


def test_server_at_defaults_does_not_inherit_the_bench_qds_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from benchmarks.common import Server

    monkeypatch.setenv("QDS_BATCH_WINDOW_MS", "25")
    code = (
        "import os, sys; open(sys.argv[1], 'w').write(os.environ.get('QDS_BATCH_WINDOW_MS', '-'))"
    )
    for inherit, expected in ((True, "25"), (False, "-")):
        seen = tmp_path / f"env-{inherit}.txt"
        server = Server(
            "probe", [sys.executable, "-c", code, str(seen)], {}, "/", inherit_qds=inherit
        )
        with pytest.raises(RuntimeError, match="probe exited"):
            server.start(tmp_path, timeout=30)
        assert seen.read_text() == expected


def test_peer_report_says_which_server_is_which_in_every_table(tmp_path: Path) -> None:
    from benchmarks import report
    from benchmarks.peer import headline, render

    data = json.loads(PEER_FIXTURE.read_text())
    text = render(data)
    assert text.startswith("# qdserve vs LitServe, side by side (unquantized)")
    assert "Generated by `qdserve bench peer" in text and "(git " in text and "Machine: " in text
    assert "- **qdserve**: `qdserve serve`" in text
    assert "- **litserve**: LitServe 0.2.19, `benchmarks/peer_server.py`" in text
    assert "max_batch_size 4, batch_timeout 0.025 s" in text
    defaults = text.index("## As users run them (defaults): the headline")
    pinned = text.index("## Both pinned to the same torch thread count")
    assert defaults < pinned
    assert "torch threads: qdserve torch default (2), litserve torch default (2)" in text
    assert "torch threads: qdserve 1, litserve 1, direct call 1." in text
    for table in data["tables"].values():
        q = table["levels"]["qdserve"]["4"]
        assert f"| qdserve | 4 | {q['ok']} | 0 | {q['images_per_second']:.2f} |" in text
        assert table["ratios"]["4"]["images_per_second_qdserve_over_litserve"] == pytest.approx(
            q["images_per_second"] / table["levels"]["litserve"]["4"]["images_per_second"]
        )
    for batch in (1, 4, 8):
        assert text.count(f"| direct pipeline call, batch {batch} (ceiling) |") == 3
    tuned = text.index("## LitServe tuned to qdserve's batch limit (a second table")
    assert defaults < pinned < tuned
    assert text.count("LitServe max_batch_size 4;") == 2
    assert text.count("LitServe max_batch_size 8;") == 1
    assert headline(data).startswith("none: defaults: img/s qdserve/litserve c1 ")
    # The index lists the default run and a --variant run.
    (tmp_path / "peer.json").write_text(json.dumps({**data, "headline": headline(data)}))
    (tmp_path / "peer.md").write_text(text)
    quant = {**data, "variant": "quanto:int8"}
    quant["headline"] = headline(quant)
    (tmp_path / "peer-quanto-int8.json").write_text(json.dumps(quant))
    (tmp_path / "peer-quanto-int8.md").write_text(render(quant))
    report.write_index(tmp_path, None)
    index = (tmp_path / "README.md").read_text()
    assert "[peer.md](peer.md)" in index
    assert "| Side by side with LitServe, quanto-int8 | [peer-quanto-int8.md]" in index
    assert "quanto:int8: defaults: img/s" in index


def test_the_compiled_litserve_peer_is_the_headline_tables_second_peer(tmp_path: Path) -> None:
    """`--peers` (default: both) puts LitServe + `pipe.transformer.compile()` beside plain
    LitServe in the defaults table only; its argv asks the peer server to compile and warm up
    at the bench's size and steps; ratios and the report carry both peers, level by level."""
    from benchmarks.peer import (
        LITSERVE_COMPILED,
        PeerOptions,
        litserve_argv,
        parse_options,
        ratios,
        render,
        request_prompt,
        same_requests,
        table_peers,
    )
    from benchmarks.peer_server import main as peer_main

    assert parse_options([]).peers == ("litserve", "litserve-compiled", "litserve-taylorseer")
    assert parse_options([]).ours == ("qdserve", "qdserve-uncached")
    assert parse_options(["--peers", "litserve"]).peers == ("litserve",)
    with pytest.raises(SystemExit):
        parse_options(["--peers", "triton"])
    assert table_peers("defaults", ("litserve", LITSERVE_COMPILED)) == (
        "litserve",
        LITSERVE_COMPILED,
    )
    assert table_peers("pinned", ("litserve", LITSERVE_COMPILED)) == ("litserve",)
    plain = litserve_argv(tmp_path / "s.json", None, 4)
    assert "--compile" not in plain
    compiled = litserve_argv(tmp_path / "s.json", None, 4, compiled=True, size=1024, steps=4)
    assert compiled[compiled.index("--warmup-size") + 1] == "1024"
    assert compiled[compiled.index("--warmup-steps") + 1] == "4"
    assert "--compile" in compiled
    with pytest.raises(SystemExit):  # the peer server knows the flags (--help exits)
        peer_main(["--compile", "--warmup-size", "32", "--help"])
    # Distinct prompts: every request its own, the same one for every server.
    body = same_requests(PeerOptions(), 0, 4)
    assert body(1)["prompt"] != body(2)["prompt"] == request_prompt(body(2)["seed"])

    data = json.loads(PEER_FIXTURE.read_text())
    t = data["tables"]["defaults"]
    # The fixture predates the second peer: give it one, half as fast as plain LitServe.
    t["levels"][LITSERVE_COMPILED] = {
        c: {**r, "images_per_second": r["images_per_second"] / 2}
        for c, r in t["levels"]["litserve"].items()
    }
    t["ratios"] = ratios(t["levels"], t["direct"])
    r4 = t["ratios"]["4"]
    assert r4["images_per_second_qdserve_over_litserve_compiled"] == pytest.approx(
        2 * r4["images_per_second_qdserve_over_litserve"]
    )
    assert "p99_qdserve_over_litserve_compiled" in r4
    assert "p50_litserve_compiled_over_direct_batch1" in t["ratios"]["1"]
    text = render(data)
    assert "- **litserve-compiled**: the same LitServe server" in text
    assert "`pipe.transformer.compile()` in `setup`" in text
    assert "| concurrency | img/s qdserve/litserve | p50 qdserve/litserve | p99 " in text
    assert "| img/s qdserve/litserve-compiled | p50 qdserve/litserve-compiled |" in text
    # Level by level: qdserve, litserve, litserve-compiled at 1, then at 4.
    rows = [line.split(" | ")[0:2] for line in text.splitlines() if line.startswith("| ")]
    head = [r for r in rows if r[0].lstrip("| ") in ("qdserve", "litserve", LITSERVE_COMPILED)]
    assert [(r[0].lstrip("| "), r[1]) for r in head[:6]] == [
        ("qdserve", "1"),
        ("litserve", "1"),
        (LITSERVE_COMPILED, "1"),
        ("qdserve", "4"),
        ("litserve", "4"),
        (LITSERVE_COMPILED, "4"),
    ]
    from benchmarks.peer import headline

    assert "; img/s qdserve/litserve-compiled c1 " in headline(data)


def test_qdserve_at_its_defaults_caches_steps_beside_an_uncached_qdserve_and_a_taylorseer_peer(
    tmp_path: Path,
) -> None:
    """The defaults table serves qdserve as users start it (step cache on), qdserve with
    QDS_STEP_CACHE=off (the same work as the uncached peers) and LitServe with diffusers'
    TaylorSeer hook at qdserve's default interval; each qdserve server gets its own ratio
    table, and the quality rows (PSNR against plain LitServe's image) render."""
    from benchmarks.peer import (
        LITSERVE_TAYLORSEER,
        QDSERVE_UNCACHED,
        headline,
        litserve_argv,
        ratios,
        render,
        table_ours,
        taylorseer_interval,
    )
    from benchmarks.peer_server import main as peer_main
    from service.settings import DEFAULT_STEP_CACHE

    assert f"taylorseer:{taylorseer_interval()}" == DEFAULT_STEP_CACHE
    assert table_ours("defaults", ("qdserve", QDSERVE_UNCACHED)) == ("qdserve", QDSERVE_UNCACHED)
    assert table_ours("pinned", ("qdserve", QDSERVE_UNCACHED)) == (QDSERVE_UNCACHED,)
    argv = litserve_argv(tmp_path / "s.json", None, 4, taylorseer=6)
    assert argv[argv.index("--taylorseer") + 1] == "6" and "--compile" not in argv
    with pytest.raises(SystemExit):  # the peer server knows the flag (--help exits)
        peer_main(["--taylorseer", "6", "--help"])

    data = json.loads(PEER_FIXTURE.read_text())
    data["qdserve_step_cache"] = DEFAULT_STEP_CACHE
    data["peer"]["taylorseer"] = {"line": "pipe.transformer.enable_cache(...)"}
    t = data["tables"]["defaults"]
    levels = t["levels"]
    # The fixture's qdserve becomes the uncached one; the cached one is 3x as fast, the
    # TaylorSeer peer twice as fast as plain LitServe.
    levels[QDSERVE_UNCACHED] = levels["qdserve"]
    levels["qdserve"] = {
        c: {**r, "images_per_second": 3 * r["images_per_second"]}
        for c, r in levels[QDSERVE_UNCACHED].items()
    }
    levels[LITSERVE_TAYLORSEER] = {
        c: {**r, "images_per_second": 2 * r["images_per_second"]}
        for c, r in levels["litserve"].items()
    }
    t["ratios"] = ratios(levels, t["direct"])
    r4 = t["ratios"]["4"]
    assert r4["images_per_second_qdserve_over_litserve"] == pytest.approx(
        3 * r4["images_per_second_qdserve_uncached_over_litserve"]
    )
    assert r4["images_per_second_qdserve_over_litserve_taylorseer"] == pytest.approx(
        1.5 * r4["images_per_second_qdserve_uncached_over_litserve"]
    )
    assert "p50_qdserve_uncached_over_direct_batch1" in t["ratios"]["1"]
    t["quality"] = {
        "qdserve": {
            "images": 21,
            "reference": "litserve",
            "adherence": 1.0,
            "psnr_mean_db": 41.25,
            "psnr_min_db": 35.0,
            "identical": 0,
        },
        "litserve": {
            "images": 21,
            "reference": "litserve",
            "adherence": 20 / 21,
            "psnr_mean_db": 100.0,
            "psnr_min_db": None,
            "identical": 21,
        },
    }
    text = render(data)
    assert "every other setting at its default (its step cache included: " in text
    assert "`QDS_STEP_CACHE=taylorseer:6`" in text
    assert "- **qdserve-uncached**: the same with `QDS_STEP_CACHE=off`" in text
    assert "- **litserve-taylorseer**: the same LitServe server with the one line" in text
    assert "Ratios (qdserve / peer: img/s > 1 and latency < 1 favour qdserve):" in text
    assert "Ratios (qdserve-uncached / peer: img/s > 1" in text
    assert "| img/s qdserve-uncached/litserve-taylorseer |" in text
    assert "PSNR against litserve's answer to the same request" in text
    assert "| qdserve | 21 | 100.0% | 41.2 | 35.0 | 0 |" in text
    assert "| litserve | 21 | 95.2% | identical | - | 21 |" in text
    assert "; img/s qdserve-uncached/litserve-compiled" not in headline(data)
    assert "; img/s qdserve-uncached/litserve c1 " in headline(data)


GPU_PEER = REPO / "docs" / "benchmarks" / "peer-nvidia-h200.json"


def test_gpu_peer_report_names_the_card_the_request_and_the_gpu_batch_limit(
    tmp_path: Path,
) -> None:
    """The recorded H200 run renders with its device, request shape and qdserve's GPU limit (4),
    and `bench all` keeps it (it cannot be re-measured on the CPU machines)."""
    from benchmarks.peer import render

    data = json.loads(GPU_PEER.read_text())
    text = render(data)
    assert "Device: cuda (NVIDIA H200)." in text
    assert "b64 PNG, same seeds, 1024x1024, 4 steps)" in text
    assert "qdserve `QDS_MAX_BATCH` at its default (auto: 4 on cuda)." in text
    assert "| direct pipeline call, batch 8 (ceiling) |" not in text
    ratios = data["tables"]["defaults"]["ratios"]
    assert ratios["16"]["images_per_second_qdserve_over_litserve"] == pytest.approx(1.27, abs=0.01)
    assert ratios["16"]["p99_qdserve_over_litserve"] == pytest.approx(0.81, abs=0.01)
    for name in (GPU_PEER.name, "peer.json", "gpu-h200-run4"):
        (tmp_path / name).touch()
    clean(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-h200-run4", GPU_PEER.name]


def test_old_cpu_peer_reports_render_as_cpu_runs() -> None:
    from benchmarks.peer import render

    data = json.loads(PEER_FIXTURE.read_text())
    assert "device" not in data  # written before GPU runs existed
    text = render(data)
    assert "Device: cpu (cpu)." in text and "(auto: 8 on cpu)" in text
    assert "same seeds, 32x32, the model's default steps)" in text


def test_gpu_pipeline_folder_is_servable_flux_with_flux_dev_widths(tmp_path: Path) -> None:
    """The folder `bench peer --model` gets on a GPU, built here with the two-block denoiser:
    Flux-dev's text widths (T5 4096, pooled 768), an 8x VAE, Flux-dev's scheduler, and it
    generates through the loader and the step loop at 64x64."""
    from benchmarks.gpu_pipeline import FLUX_DEV_SCHEDULER, SMALL_DENOISER, build
    from pipelines.generate import GenerationRequest, generate
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    folder = tmp_path / "flux"
    info = build(folder, "cpu", SMALL_DENOISER)
    assert json.loads((folder / "built.json").read_text())["parameters"] == info["parameters"]
    loaded = load_pipeline(QuantSettings(model=str(folder), device="cpu"))
    pipe = loaded.pipeline
    assert pipe.vae_scale_factor == 8 and loaded.defaults.size == 1024
    assert pipe.text_encoder_2.config.d_model == SMALL_DENOISER["joint_attention_dim"] == 4096
    assert pipe.scheduler.config.use_dynamic_shifting == FLUX_DEV_SCHEDULER["use_dynamic_shifting"]
    out = generate(
        loaded,
        GenerationRequest("a red circle", seed=1, width=64, height=64, num_inference_steps=1),
    )
    assert out.images[0].size == (64, 64)


def test_peer_report_says_where_a_lone_requests_time_went() -> None:
    """The encoding every server pays and qdserve's own timings, beside the direct call."""
    from benchmarks.peer import time_notes

    table = {
        "direct": {"1": {"png_b64_seconds": 0.1104}},
        "levels": {
            "qdserve": {
                "1": {
                    "mean_timings_seconds": {
                        "queue_seconds": 0.0004,
                        "inference_seconds": 0.7351,
                        "encode_seconds": 0.0562,
                    }
                }
            }
        },
    }
    encoding, own = time_notes(table)
    assert "took 110.4 ms in the bench process" in encoding
    assert own.startswith("qdserve's own timings at concurrency 1 (mean): queue 0.4 ms, ")
    assert "inference 735.1 ms, encode 56.2 ms;" in own
    assert time_notes({"direct": {}, "levels": {"qdserve": {}}}) == []


def test_the_direct_call_is_a_third_contender_of_the_concurrency_1_rounds_only() -> None:
    """On a CPU a lone request is compared with a direct call timed in the same rounds, with
    the servers' seeds; the ratio and the table use that one, not the call timed afterwards."""
    from benchmarks.peer import DIRECT, PeerOptions, interleave, lone_p50, merge, same_requests

    seeds: list[int] = []
    opts = PeerOptions(rounds=2, seconds=0.05, concurrency=(1, 4))
    raw = interleave({}, opts, lambda seed: seeds.append(seed) or time.sleep(0.01))
    assert list(raw) == [DIRECT] and list(raw[DIRECT]) == ["1"]  # not at concurrency 4
    rounds = raw[DIRECT]["1"]
    assert len(rounds) == 2 and all(r.ok >= 2 and not r.errors for r in rounds)
    # The untimed first call and the timed ones take the servers' seeds of that round.
    first = [same_requests(opts, rnd, 1)(i)["seed"] for rnd in (0, 1) for i in (0, 1)]
    assert seeds[:3] == [first[0], *first[:2]] and first[2] in seeds
    merged = merge(rounds)
    assert merged["latency_seconds"]["p50"] == pytest.approx(0.01, abs=0.01)
    later = {"seconds_per_call": {"p50": 9.0}}
    assert lone_p50({**later, "in_rounds": merged}) == merged["latency_seconds"]["p50"]
    assert lone_p50(later) == 9.0  # a GPU run or an older report


def test_the_paired_lone_request_note_states_both_medians_and_the_ratio() -> None:
    from benchmarks.peer import time_notes

    pairs = {
        "pairs": 30,
        "direct_seconds": {"p50": 0.1441},
        "qdserve_seconds": {"p50": 0.1470},
        "p50_qdserve_over_direct": 1.0201,
    }
    (note,) = time_notes({"direct": {}, "levels": {"qdserve": {}}, "paired_c1": pairs})
    assert note.startswith("Paired at concurrency 1 (30 pairs: a direct batch-1 call and ")
    assert "p50 direct 144 ms, qdserve 147 ms, **qdserve / direct 1.020**." in note


def test_open_loop_levels_send_both_servers_the_same_poisson_arrivals() -> None:
    from benchmarks.common import poisson_arrivals
    from benchmarks.peer import headline, open_level, parse_options

    a = poisson_arrivals(8.0, 100.0, seed=1)
    assert a == poisson_arrivals(8.0, 100.0, seed=1) != poisson_arrivals(8.0, 100.0, seed=2)
    assert all(0 < x < 100 for x in a) and a == sorted(a)
    assert 700 < len(a) < 900  # ~8 per second
    assert parse_options([]).rates == (8.0,) and parse_options(["--rates", ""]).rates == ()
    assert parse_options(["--rates", "4,12.5"]).rates == (4.0, 12.5)
    assert open_level(12.5) == "poisson 12.5/s"
    ratios = {"1": {"images_per_second_qdserve_over_litserve": 1.2}}
    ratios[open_level(8)] = {"images_per_second_qdserve_over_litserve": 1.0}
    data = {"variant": "none", "tables": {"defaults": {"ratios": ratios}}}
    assert headline(data) == "none: defaults: img/s qdserve/litserve c1 1.20"


def test_compile_serving_report_says_which_is_which_and_the_ratio() -> None:
    from benchmarks.serving import headline, render_compile_serving

    def level(rps: float) -> dict[str, Any]:
        lat = {"p50": 0.1, "p95": 0.2, "p99": 0.3}
        return {
            "requests": 10,
            "ok": 10,
            "errors": {},
            "throughput_rps": rps,
            "latency_seconds": lat,
            "usage": None,
        }

    from benchmarks.serving import DEFAULT_COMPILED as compiled
    from benchmarks.serving import EAGER as eager

    data = {
        "meta": run_meta("qdserve bench compile-serving"),
        "variant": "quanto int8",
        "levels": {eager: {"4": level(10.0)}, compiled: {"4": level(12.5)}},
        "throughput_gain_vs_off": {compiled: {"4": 1.25}},
        "servers": {eager: {"start_to_ready_seconds": 8.8}, compiled: {}},
        "method": "two qdserve servers (quanto int8) differing only in QDS_COMPILE",
    }
    text = render_compile_serving(data)
    assert "eager vs compiled qdserve (quanto int8)" in text
    assert f"| {compiled} | 4 | 1.25 |" in text
    assert "eager (QDS_COMPILE=false): 8.8 s to ready" in text
    assert "Throughput over eager:" in text
    assert headline("compile-serving", data) == f"{compiled}: c4 x1.25"
