"""The benchmark harness: its helpers are right, its reports show every case, it runs end to end.

Nothing here is timed: performance is measured by `qdserve bench`, which writes results.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

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

REPO = Path(__file__).resolve().parent.parent
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
    assert tops == {"quantization", "service"}
    assert "quantization.demo_weights" in packages
    assert not [p for p in packages if "bench" in p or p.startswith("quantization.demo.")]


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
