"""The auto planner: parameter counts from configs, measured tables, and the expected plans.

The expected plans below are justified number by number in docs/planning.md; a change to the
tables or the rules that moves one of them must update that page too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from quantization.planning import tables
from quantization.planning.devices import describe_device, resolve_budget
from quantization.planning.errors import PlanError
from quantization.planning.model_spec import ModelSpec, read_model_spec
from quantization.planning.render import plan_dict, plan_text
from quantization.planning.search import NoPlanFits, Plan, make_plan
from quantization.planning.units import parse_bytes

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "docs" / "benchmarks"
U = "none"  # unquantized


@pytest.fixture(scope="module")
def flux() -> ModelSpec:
    return read_model_spec("flux-dev")


@pytest.fixture(scope="module")
def sd3() -> ModelSpec:
    return read_model_spec("sd3-medium")


def test_parse_bytes() -> None:
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("1.5gb") == 1_500_000_000
    assert parse_bytes("123") == 123
    assert parse_bytes("16G") == parse_bytes("16gb")
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(7) == 7
    assert parse_bytes("1.5e3MB") == 1_500_000_000
    with pytest.raises(ValueError, match=r"^'16 apples' is not a size"):
        parse_bytes("16 apples")
    with pytest.raises(ValueError, match=r"^QDS_X='16 apples' is not a size"):
        parse_bytes("16 apples", "QDS_X")
    # The planner reports a bad size as a PlanError (`qdserve plan` prints those), same text.
    with pytest.raises(PlanError, match=r"^'16 apples' is not a size"):
        describe_device("cpu", None, "16 apples")
    with pytest.raises(PlanError, match=r"^'lots' is not a size"):
        resolve_budget(describe_device("cpu", None, "16GB"), "lots")


def test_parameter_counts_from_published_configs(flux: ModelSpec, sd3: ModelSpec) -> None:
    counts = {c.name: c.parameters for c in flux.components}
    # The transformer count equals the one the H200 runs measured on real tensors.
    assert counts["transformer"] == 11_901_408_320 == tables.DENOISER_PARAMETERS["flux-dev"][1]
    assert counts["text_encoder_2"] == 4_762_310_656  # T5-XXL encoder
    assert counts["text_encoder"] == 123_060_480  # CLIP-L text model
    assert counts["vae"] == 83_819_683
    assert flux.arch == "flux-dev"
    counts = {c.name: c.parameters for c in sd3.components}
    assert counts["transformer"] == 2_028_328_000 == tables.DENOISER_PARAMETERS["sd3-medium"][1]
    assert counts["text_encoder_2"] == 694_659_840  # OpenCLIP bigG with projection
    assert counts["text_encoder_3"] == 4_762_310_656
    # SD3's positional embedding is a 192x192x1536 float buffer: it is part of the weights.
    assert sd3.component("transformer").float_buffers == 192 * 192 * 1536
    assert sd3.arch == "sd3-medium"


def test_embedded_model_is_identified_by_its_measured_parameter_count() -> None:
    from pipelines.embedded import embedded_model_path

    # The planner does not know the runtime's embedded model by name: its folder, as
    # `qdserve plan` passes it.
    spec = read_model_spec(str(embedded_model_path()))
    assert spec.arch == "embedded"
    assert spec.component("transformer").parameters == tables.DENOISER_PARAMETERS["embedded"][1]
    assert spec.default_size == 32


# --- the tables equal the recorded files they cite -------------------------------------------


def _gpu_cells() -> dict[tuple[str, str], dict]:
    cells = {}
    for path in sorted(BENCH.glob("gpu-h200-run*/*.json")):
        data = json.loads(path.read_text())
        for arch, body in data["archs"].items():
            for case, cell in body["cases"].items():
                if "error" not in cell:
                    cells[(arch, case, str(path.relative_to(ROOT)))] = cell
    return cells


@pytest.mark.skipif(not BENCH.is_dir(), reason="needs a checkout's docs/benchmarks")
def test_tables_match_the_recorded_runs() -> None:
    gpu = _gpu_cells()
    matrix = {
        (c["backend"], c["quant_type"]): c
        for c in json.loads((BENCH / "matrix.json").read_text())["cases"]
        if c.get("measured")
    }
    checked = 0
    for arch, runs in tables.DENOISER_RUNS.items():
        for (backend, qtype), run in runs.items():
            if arch == "embedded":
                cell = matrix[(backend, qtype)]
                assert run.storage_bytes == cell["denoiser_storage_bytes"]
                assert run.parameters == cell["denoiser_parameters"]
                assert run.peak_rss_delta_bytes == cell["peak_rss_delta_bytes"]
                assert run.seconds_per_image == round(cell["latency_seconds"]["median"], 4)
            else:
                cell = gpu[(arch, f"{backend}:{qtype or '-'}", run.source)]
                assert run.storage_bytes == cell["storage_bytes"]
                assert run.parameters == cell["parameters"]
                assert run.after_load_bytes == cell["gpu_allocated_after_load_bytes"]
                assert run.peak_bytes == cell["peak_bytes"]
                assert run.seconds_per_step == cell["seconds_per_step_median"]
            checked += 1
    assert checked == 27


@pytest.mark.skipif(not (ROOT / "docs" / "quality.md").is_file(), reason="needs docs/quality.md")
def test_quality_cells_match_docs_quality() -> None:
    rows = {}
    for line in (ROOT / "docs" / "quality.md").read_text().splitlines():
        m = re.match(r"\| (\w+):(\w+) \| ([\d.]+)% \| ([\d.]+) \|", line)
        if m:
            rows[(m[1], m[2])] = (float(m[4]), round(float(m[3]) / 100, 3))
    assert rows, "docs/quality.md has no measured rows"
    for case, cell in tables.QUALITY_CELLS.items():
        assert rows[case] == (cell.psnr_db, cell.adherence), case
    assert set(rows) == set(tables.QUALITY_CELLS)


def test_activation_anchor_is_the_largest_published_delta() -> None:
    activation, source = tables.anchor_pipeline_activation()
    assert activation == int(5.1 * 2**30)
    assert "bnb 8-bit" in source


# --- expected plans (priority quality); docs/planning.md derives each one -------------------

DEVICES = {
    "16GB-7.5": ("cuda", "7.5", "16GB"),
    "24GB-8.9": ("cuda", "8.9", "24GB"),
    "40GB-8.0": ("cuda", "8.0", "40GB"),
    "80GB-9.0": ("cuda", "9.0", "80GB"),
    "cpu-64GB": ("cpu", None, "64GB"),
    "cpu-32GB": ("cpu", None, "32GB"),
}

# (transformer, text_encoder, text_encoder_2[, text_encoder_3]), each "none" or "backend type"
FLUX_PLANS = {
    "24GB-8.9": ("torchao int8wo", U, "quanto int4"),
    "40GB-8.0": (U, U, "torchao int8wo"),
    "80GB-9.0": (U, U, U),
    "cpu-64GB": ("torchao int8wo", U, U),
    "cpu-32GB": ("torchao int8wo", U, "quanto int4"),
}
SD3_PLANS = {
    "16GB-7.5": ("torchao int8wo", U, "torchao int8wo", "torchao int8wo"),
    "24GB-8.9": (U, U, U, U),
    "40GB-8.0": (U, U, U, U),
    "80GB-9.0": (U, U, U, U),
    "cpu-64GB": (U, U, U, U),
    "cpu-32GB": (U, U, U, "torchao int8wo"),
}


def _labels(plan: Plan, names: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for name in names:
        comp = next(c for c in plan.components if c.name == name)
        out.append(U if comp.choice.backend == "none" else comp.choice.label)
    return tuple(out)


@pytest.mark.parametrize("device", sorted(FLUX_PLANS))
def test_flux_dev_plans(flux: ModelSpec, device: str) -> None:
    dev = describe_device(*DEVICES[device])
    plan = make_plan(flux, dev, resolve_budget(dev, None))
    assert _labels(plan, ("transformer", "text_encoder", "text_encoder_2")) == FLUX_PLANS[device]
    assert plan.total_bytes <= plan.budget.bytes


@pytest.mark.parametrize("device", sorted(SD3_PLANS))
def test_sd3_medium_plans(sd3: ModelSpec, device: str) -> None:
    dev = describe_device(*DEVICES[device])
    plan = make_plan(sd3, dev, resolve_budget(dev, None))
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    assert _labels(plan, names) == SD3_PLANS[device]
    assert plan.total_bytes <= plan.budget.bytes


def test_flux_dev_on_16gb_says_nothing_fits_with_the_smallest_size(flux: ModelSpec) -> None:
    dev = describe_device("cuda", "7.5", "16GB")
    with pytest.raises(NoPlanFits) as err:
        make_plan(flux, dev, resolve_budget(dev, None))
    msg = str(err.value)
    assert "fits the memory budget 14.40 GB" in msg
    assert "the smallest plan (" in msg and "needs 14.83 GB" in msg
    assert "transformer=bitsandbytes_4bit nf4" in msg
    assert err.value.smallest_bytes > 14_400_000_000
    # Given that much budget, priority memory gets exactly the smallest plan.
    plan = make_plan(flux, dev, resolve_budget(dev, "14.9GB"), "memory")
    assert plan.total_bytes == err.value.smallest_bytes


def test_speed_and_memory_priorities(flux: ModelSpec) -> None:
    dev = describe_device("cuda", "8.9", "24GB")
    budget = resolve_budget(dev, None)
    speed = make_plan(flux, dev, budget, "speed")
    # nf4 is the fastest measured quantized Flux-dev step (0.1841 s) and leaves room for bf16 T5.
    assert _labels(speed, ("transformer", "text_encoder", "text_encoder_2")) == (
        "bitsandbytes_4bit nf4",
        U,
        U,
    )
    memory = make_plan(flux, dev, budget, "memory")
    assert _labels(memory, ("transformer", "text_encoder", "text_encoder_2")) == (
        ("bitsandbytes_4bit nf4",) * 3
    )
    assert 14.82e9 < memory.total_bytes < 14.84e9 < speed.total_bytes


def test_unmeasured_quality_is_ranked_below_the_measured_cells(flux: ModelSpec) -> None:
    dev = describe_device("cuda", "9.0", "80GB")
    plan = make_plan(flux, dev, resolve_budget(dev, "20GB"), "memory")
    den = next(c for c in plan.components if c.name == "transformer")
    assert den.choice.label == "bitsandbytes_4bit nf4"
    assert den.choice.quality_measured is False
    assert "UNMEASURED" in den.choice.quality_text()
    assert den.choice.psnr == 39.5  # the lowest measured 4-bit PSNR (quanto int4)


def test_the_plan_explains_every_choice_and_rejection(flux: ModelSpec) -> None:
    dev = describe_device("cuda", "8.9", "24GB")
    plan = make_plan(flux, dev, resolve_budget(dev, None))
    den = next(c for c in plan.components if c.name == "transformer")
    reasons = {r.option: r.reason for r in den.alternatives}
    assert "the plan would need" in reasons["unquantized"]
    assert "below the quality floor 30.0 dB" in reasons["quanto int2"]
    assert "cannot run here" in reasons["torchao int4wo"]
    assert "pre-converted" in next(v for k, v in reasons.items() if k.startswith("gguf"))
    text = plan_text(plan)
    assert "budget:   21.60 GB (the device's memory 24.00 GB minus a 10% safety margin" in text
    assert "transformer (FluxTransformer2DModel, 11,901,408,320 parameters): torchao int8wo" in text
    data = plan_dict(plan)
    assert data["components"]["transformer"]["backend"] == "torchao"
    assert data["total_bytes"] == plan.weights_bytes + plan.activation_bytes
    assert plan.quant_choices() == {
        "transformer": ("torchao", "int8wo"),
        "text_encoder_2": ("quanto", "int4"),
    }


def test_bad_descriptions_are_refused() -> None:
    with pytest.raises(PlanError, match="needs --capability"):
        describe_device("cuda", None, "16GB")
    with pytest.raises(PlanError, match=r"MAJOR\.MINOR"):
        describe_device("cuda", "eight", "16GB")
    with pytest.raises(PlanError, match="allowed: cpu, cuda"):
        describe_device("tpu", None, "16GB")


def test_qdserve_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    args = ["plan", "--model", "sd3-medium", "--device", "cuda", "--capability", "8.9"]
    assert main([*args, "--memory", "24GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "sd3-medium"
    assert data["device"] == {
        "kind": "cuda",
        "name": "GPU sm_89",
        "capability": "8.9",
        "total_bytes": 24 * 10**9,
        "described": True,
    }
    assert data["budget_bytes"] == 21_600_000_000
    assert {c["backend"] for c in data["components"].values()} == {"none"}
    assert data["total_bytes"] <= data["budget_bytes"]

    assert main([*args, "--memory", "24GB", "--budget", "12GB", "--priority", "speed"]) == 0
    text = capsys.readouterr().out
    assert "budget:   12.00 GB (QDS_MEMORY_BUDGET=12GB)" in text
    assert "priority: speed" in text
    assert "    - not " in text  # rejected alternatives are listed

    flux = ["plan", "--model", "flux-dev", "--device", "cuda", "--capability", "7.5"]
    assert main([*flux, "--memory", "16GB"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qdserve plan: no plan for black-forest-labs/FLUX.1-dev fits")
    assert "needs 14.83 GB" in err


# --- QDS_QUANT_BACKEND=auto through the settings, the loader and the server ------------------


def test_auto_settings() -> None:
    from pydantic import ValidationError

    from quantization.settings import QuantSettings

    s = QuantSettings(quant_backend="auto", memory_budget="15MB", priority="speed")
    assert (s.memory_budget, s.priority, s.resolved_quant_type) == (15_000_000, "speed", None)
    assert QuantSettings(quant_backend="auto", memory_budget="2GiB").memory_budget == 2 * 2**30
    with pytest.raises(ValidationError, match="QDS_QUANT_BACKEND=auto chooses the type"):
        QuantSettings(quant_backend="auto", quant_type="int8")
    with pytest.raises(ValidationError, match="QDS_MEMORY_BUDGET='lots' is not a size"):
        QuantSettings(quant_backend="auto", memory_budget="lots")
    with pytest.raises(ValidationError, match=r"allowed: .*, auto"):
        QuantSettings(quant_backend="automatic")


# The embedded model's unquantized weights: 24,461,812 bytes (docs/benchmarks/matrix.json,
# pipeline_storage_bytes), above this budget.
BUDGET = 15_000_000


@pytest.mark.slow
def test_auto_loads_the_embedded_model_quantized_within_the_budget(cache_dir: Path) -> None:
    from pipelines.loader import load_pipeline
    from quantization.backends import ModelLoadError
    from quantization.settings import QuantSettings

    settings = QuantSettings(
        quant_backend="auto", memory_budget=BUDGET, device="cpu", cache_dir=cache_dir
    )
    loaded = load_pipeline(settings)
    try:
        plan = loaded.extra["plan"]
        assert loaded.backend == "auto"
        assert plan["total_bytes"] <= BUDGET
        unquantized = sum(c.unquantized_bytes for c in loaded.components.values())
        assert unquantized > BUDGET
        # What was really loaded: within the budget with the plan's measured activation peak.
        assert loaded.storage_bytes + plan["activation_bytes"] <= BUDGET
        for name, comp in plan["components"].items():
            assert loaded.components[name].quantized == (comp["backend"] != "none")
            assert loaded.components[name].storage_bytes <= comp["bytes"]
        assert plan["components"]["transformer"]["backend"] == "torchao"
        assert loaded.describe()["plan"]["budget_bytes"] == BUDGET
    finally:
        loaded.release()
    with pytest.raises(ModelLoadError, match=r"auto: no plan .* the smallest plan \("):
        load_pipeline(settings.model_copy(update={"memory_budget": 5_000_000}))


@pytest.mark.slow
def test_auto_is_served_and_listed(cache_dir: Path) -> None:
    from test_service_support import running_server

    quant = {"quant_backend": "auto", "memory_budget": BUDGET, "device": "cpu"}
    with running_server(cache_dir, quant=quant) as server, server.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "32x32"})
        assert r.status_code == 200, r.text
        card = c.get("/v1/models").json()["data"][0]
        assert card["backend"] == "auto" and card["loaded"] is True
        assert card["storage_bytes"] < BUDGET
        # The served plan is listed: each component's choice, within the budget.
        plan = card["plan"]
        assert plan["budget_bytes"] == BUDGET and plan["total_bytes"] <= BUDGET
        assert plan["components"]["transformer"]["backend"] == "torchao"
