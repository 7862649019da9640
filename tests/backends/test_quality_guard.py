"""Quality guard: PSNR / adherence against the unquantized model or recorded references."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from pipelines.quality_guard import (
    Probe,
    QualityFloor,
    QualityRefused,
    check_against_model,
    check_against_references,
    compare,
    enforce,
    probe_for,
    psnr,
    record_references,
)

PROMPTS = ("a red circle on the left", "a blue square in the center")


def _shapes() -> list[Image.Image]:
    from pipelines.demo_shapes import render

    return [render("circle", "red", "left"), render("square", "blue", "center")]


def test_psnr_values() -> None:
    a = Image.new("RGB", (8, 8), (100, 100, 100))
    b = Image.new("RGB", (8, 8), (110, 100, 100))  # one channel off by 10 -> mse 100/3
    assert psnr(a, a) == math.inf
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (100 / 3)))
    with pytest.raises(ValueError, match="sizes differ"):
        psnr(a, Image.new("RGB", (4, 4)))


def test_compare_passes_identical_and_refuses_noise_with_its_numbers() -> None:
    probe = Probe(prompts=PROMPTS)
    refs = _shapes()
    ok = compare(refs, refs, probe, QualityFloor(), "refs", judge_adherence=True)
    assert ok.passed and ok.psnr_db == math.inf and ok.adherence == 1.0
    assert "identical images, adherence 100%" in ok.reason
    noise = [Image.effect_noise((32, 32), 64).convert("RGB") for _ in refs]
    bad = compare(noise, refs, probe, QualityFloor(), "refs", judge_adherence=True)
    assert not bad.passed
    assert bad.adherence == 0.0 and bad.reference_adherence == 1.0
    assert f"PSNR {bad.psnr_db:.1f} dB" in bad.reason
    assert "is below the floor 30.0 dB" in bad.reason
    assert "prompt adherence 0% (reference 100%) is below the floor 75%" in bad.reason
    with pytest.raises(QualityRefused, match="quality check failed on 2 probe images") as err:
        enforce(bad)
    assert err.value.report is bad
    described = bad.describe()
    assert described["passed"] is False and described["psnr_db"] == round(bad.psnr_db, 2)


def test_adherence_floor_alone_can_refuse() -> None:
    probe = Probe(prompts=PROMPTS)
    refs = _shapes()
    swapped = list(reversed(refs))  # right shapes, wrong prompts
    report = compare(swapped, refs, probe, QualityFloor(psnr_db=0.0), "refs", True)
    assert not report.passed
    assert "PSNR" not in report.reason.split(": ", 1)[1]
    assert "prompt adherence 0%" in report.reason


# --- on the demo model (real loads, CPU) ----------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> Iterator[object]:
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    loaded = load_pipeline(QuantSettings())
    yield loaded
    loaded.release()


def _quanto(quant_type: str) -> object:
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    return load_pipeline(QuantSettings(quant_backend="quanto", quant_type=quant_type))


# Two prompts at 4 steps instead of four at the demo's 12 keep each probe short; measured on
# the four default probes: int2 26.2 dB, int8 61.9 dB at 4 steps (25.5 / 62.0 dB at 12).
# Adherence needs the full step count to be meaningful; its path is tested above.
NO_ADHERENCE = QualityFloor(adherence=None)


def _fast(loaded: object) -> Probe:
    return replace(probe_for(loaded, steps=4), prompts=PROMPTS)


@pytest.mark.slow
def test_quanto_int2_is_refused_at_readiness_with_its_psnr(cache_dir: Path) -> None:
    """QDS_QUALITY_CHECK through the loader and the server: the full default probe (four
    prompts, the demo's 12 steps) against an unquantized load; /readyz says why."""
    from test_service_support import running_server

    quant = {"quant_backend": "quanto", "quant_type": "int2", "quality_check": True}
    with running_server(cache_dir, quant=quant, wait_ready=False) as server, server.client() as c:
        deadline = time.monotonic() + 150
        body = c.get("/readyz").json()
        while "failed" not in body["reason"]:
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
            body = c.get("/readyz").json()
        assert c.get("/readyz").status_code == 503
    reason = body["reason"]
    assert "quality check failed on 4 probe images against the unquantized model" in reason
    psnr_db = float(re.search(r"PSNR ([\d.]+) dB", reason).group(1))
    assert psnr_db < 30.0
    assert "is below the floor 30.0 dB" in reason


@pytest.mark.slow
def test_quanto_int8_passes_and_references_replace_the_unquantized_load(
    reference: object, tmp_path: Path
) -> None:
    loaded = _quanto("int8")
    probe = _fast(loaded)
    direct = enforce(check_against_model(loaded, reference, NO_ADHERENCE, probe))
    assert direct.psnr_db > 50.0
    folder = record_references(reference, tmp_path / "refs", probe)
    recorded = check_against_references(loaded, folder, NO_ADHERENCE)
    loaded.release()
    assert recorded.passed
    # PNG round trip is lossless: the same numbers as against the live unquantized model.
    assert recorded.psnr_db == pytest.approx(direct.psnr_db)
    assert "references recorded from qdserve/embedded-flux" in recorded.reason


def test_missing_references_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds no references\.json"):
        check_against_references(None, tmp_path)  # type: ignore[arg-type]
