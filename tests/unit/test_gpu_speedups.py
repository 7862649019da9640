"""benchmarks/gpu_speedups.py (issue 26's GPU rows) dry-run on the CPU: a one-block
Flux denoiser through the step loop's split forward per step cache setting, and the fp8 row's
clear refusal where there is no CUDA card. The GPU numbers themselves come from a lent card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run")
def test_dry_run_writes_every_row(tmp_path: Path) -> None:
    from benchmarks import gpu_speedups

    out = tmp_path / "speedups.json"
    assert (
        gpu_speedups.main(
            ["--out", str(out), "--tiny", "--size", "32", "--steps", "1", "--no-compile"]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["dry_run"] is True
    cache = data["cases"]["step_cache bf16 eager"]
    assert set(cache) == set(gpu_speedups.CACHE_SETTINGS)
    # diffusers' TaylorSeer schedule over 28 steps: 0, 1, 2, then every 6th from step 4.
    assert (cache["taylorseer:6"]["steps_computed"], cache["taylorseer:6"]["steps_skipped"]) == (
        7,
        21,
    )
    assert cache["taylorseer:2"]["steps_computed"] == 15
    assert cache["taylorseer:6"]["latent_psnr_db_vs_off"] > 20
    assert data["cases"]["denoiser bf16"]["eager_seconds_per_step"] > 0
    assert data["cases"]["denoiser float8dq"]["error"].startswith(
        "unavailable: float8dq needs a CUDA GPU"
    )


@pytest.mark.gpu
def test_on_a_gpu_every_row_is_measured(tmp_path: Path) -> None:
    """The real thing on a CUDA card (tiny denoiser, so it fits any lent time): compile and,
    from compute capability 8.9, fp8 with compile."""
    from benchmarks import gpu_speedups

    out = tmp_path / "speedups.json"
    assert gpu_speedups.main(["--out", str(out), "--tiny", "--size", "256", "--steps", "2"]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert cases["denoiser bf16"]["compiled_seconds_per_step"] > 0
    fp8 = cases["denoiser float8dq"]
    if torch.cuda.get_device_capability() >= (8, 9):
        assert fp8.get("compiled_seconds_per_step", 0) > 0, fp8
    else:
        assert "compute capability" in fp8["error"]
