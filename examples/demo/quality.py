"""Quality report: what each backend / quant type costs the demo model in image quality.

For a fixed prompt set and seeds, every pipeline generates the same images; the checker
decides whether each shows the prompted shape, color and position (prompt adherence), and
every image is compared with the unquantized pipeline's image at the same seed (PSNR, mean
absolute difference). Results go to a markdown table and a PNG grid (rows: backends,
columns: prompts, first seed), so a person can see the difference.

`report()` takes ready pipelines as (name, pipeline) pairs, the first being the reference;
`report_with_loader()` takes a loader callable (the service's
`pipelines.loader.load_pipeline(settings)` wrapped per backend) so a backend that fails to
load is reported as such instead of aborting the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipelines import demo_shapes as shapes
from pipelines.demo_checker import adheres


def _prompt_set() -> list[str]:
    """Every shape x color once; positions rotate so each color appears in every position."""
    out = []
    for i, (shape, color) in enumerate((s, c) for s in shapes.SHAPES for c in shapes.COLORS):
        position = shapes.POSITIONS[(i + i // len(shapes.COLORS)) % len(shapes.POSITIONS)]
        out.append(shapes.caption(shape, color, position))
    # Position-free prompts too: the model must still draw the right thing somewhere.
    out += ["a blue square", "a red circle", "a green triangle"]
    return out


PROMPTS: list[str] = _prompt_set()
# The checkout's docs/ (the report's default home), not the current folder.
DOCS = Path(__file__).resolve().parents[2] / "docs"
SEEDS: list[int] = [0, 1]
DEFAULT_STEPS = 12
DEFAULT_GUIDANCE = 3.5
SIZE = shapes.DEFAULT_SIZE


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch: int = 32,
) -> list[Image.Image]:
    """Images for every (seed, prompt) pair, seed-major, one generator per image.

    Per-image generators make a batched call draw the same noise as a single-image call with
    that seed, so batching changes speed, not results.
    """
    import torch

    jobs = [(p, s) for s in seeds for p in prompts]
    images: list[Image.Image] = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        with torch.no_grad():
            out = pipe(
                [p for p, _ in chunk],
                height=SIZE,
                width=SIZE,
                num_inference_steps=steps,
                guidance_scale=guidance,
                max_sequence_length=32,
                generator=[torch.Generator().manual_seed(s) for _, s in chunk],
            )
        images.extend(out.images)
    return images


def adherence(
    pipe: Any,
    prompts: Sequence[str] = PROMPTS,
    seeds: Sequence[int] = SEEDS,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> float:
    """Fraction of generated images the checker finds faithful to their prompt."""
    images = generate(pipe, prompts, seeds, steps, guidance)
    jobs = [p for _ in seeds for p in prompts]
    return sum(adheres(img, p) for img, p in zip(images, jobs, strict=True)) / len(images)


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB (8-bit range); inf for identical images."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference on the 0-255 scale."""
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@dataclass
class Row:
    """One backend's results; `error` is set (and the numbers absent) when it did not run."""

    name: str
    adherence: float | None = None
    psnr: float | None = None
    mad: float | None = None
    seconds: float | None = None
    error: str | None = None
    # Edit checks (examples/demo/edits_check.py): "inpaint x% / keep y% / recolor z%", or why not.
    edits: str | None = None
    images: list[Image.Image] = field(default_factory=list, repr=False)


def evaluate(
    named: Iterable[tuple[str, Any]],
    prompts: Sequence[str] = PROMPTS,
    seeds: Sequence[int] = SEEDS,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> list[Row]:
    """Generate with every pipeline; the first pair is the unquantized reference.

    A pipeline given as None, or one that raises while generating, becomes a row with its
    error so one broken backend does not hide the others.
    """
    rows: list[Row] = []
    reference: list[Image.Image] | None = None
    jobs = [p for _ in seeds for p in prompts]
    for name, pipe in named:
        row = Row(name)
        rows.append(row)
        if pipe is None or isinstance(pipe, Exception):
            row.error = str(pipe) if pipe is not None else "did not load"
            continue
        start = time.perf_counter()
        try:
            row.images = generate(pipe, prompts, seeds, steps, guidance)
        except Exception as exc:  # report, don't abort: the point is to compare backends
            row.error = f"{type(exc).__name__}: {exc}"
            continue
        row.seconds = time.perf_counter() - start
        ok = [adheres(img, p) for img, p in zip(row.images, jobs, strict=True)]
        row.adherence = sum(ok) / len(ok)
        if reference is None:
            reference = row.images
        finite = [psnr(a, b) for a, b in zip(row.images, reference, strict=True)]
        # Identical images have infinite PSNR; average the finite ones, report inf if none.
        finite_vals = [v for v in finite if math.isfinite(v)]
        row.psnr = float(np.mean(finite_vals)) if finite_vals else math.inf
        row.mad = float(
            np.mean([mean_abs_diff(a, b) for a, b in zip(row.images, reference, strict=True)])
        )
        row.edits = _edit_summary(pipe, steps, guidance)
    return rows


def _edit_summary(pipe: Any, steps: int, guidance: float) -> str:
    """The edit checks on this pipeline (img2img / inpaint built from its own modules)."""
    from examples.demo.edits_check import edit_scores

    try:
        return edit_scores(pipe, steps=steps, guidance=guidance).summary()
    except Exception as exc:  # report, don't abort (e.g. a family without edit pipelines)
        first = (str(exc).splitlines() or [""])[0].replace("|", "/")
        return f"not run: {type(exc).__name__}: {first}"


def grid(rows: Sequence[Row], prompts: Sequence[str], scale: int = 3) -> Image.Image:
    """Rows = backends, columns = prompts (first seed), with the backend name on the left."""
    cell = SIZE * scale
    label_w = 150
    img = Image.new("RGB", (label_w + cell * len(prompts), cell * len(rows)), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), row.name[:24], fill=(0, 0, 0))
        for c in range(len(prompts)):
            if c < len(row.images):
                tile = row.images[c].resize((cell, cell), Image.Resampling.NEAREST)
                img.paste(tile, (label_w + c * cell, r * cell))
    return img


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "-"
    return "inf (identical)" if math.isinf(v) else format(v, spec)


def write_report(
    rows: Sequence[Row],
    md_path: Path,
    png_path: Path,
    prompts: Sequence[str] = PROMPTS,
    seeds: Sequence[int] = SEEDS,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    notes: str = "",
    header: str = "",
) -> None:
    """docs/quality.md-style table plus the PNG grid; `header` (the run's machine, date and
    commit line) goes under the title."""
    md_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    grid([r for r in rows if r.images], prompts).save(png_path)
    lines = ["# Quality per backend (demo model)", ""]
    if header:
        lines += [header, ""]
    lines += [
        f"{len(prompts)} prompts x {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
        f"{SIZE}x{SIZE}, {steps} steps, guidance {guidance}. Adherence: the pixel checker "
        "(`pipelines/demo_checker.py`) finds the prompted shape, color and position. "
        f"PSNR / mean abs diff: against `{rows[0].name}` at the same seed (0-255 scale). "
        "Edits: the share of seeds 0-5 passing each edit check of `examples/demo/edits_check.py` "
        "(inpaint a blue square over the red circle; img2img at strength 0.3 keeps the "
        "circle's shape and place; img2img at 0.6 recolors it blue).",
        "",
        "| backend | prompt adherence | PSNR (dB) | mean abs diff | generation time (s) | note "
        "| edits: inpaint / keep / recolor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.error or ""
        if r.adherence is not None and rows[0].adherence and r.adherence < 0.5:
            note = "breaks the model (adherence below 50%)"
        lines.append(
            f"| {r.name} | {_fmt(r.adherence, '.1%')} | {_fmt(r.psnr, '.1f')} | "
            f"{_fmt(r.mad, '.2f')} | {_fmt(r.seconds, '.1f')} | {note} | {r.edits or '-'} |"
        )
    lines += ["", f"![grid]({png_path.name})", ""]
    if notes:
        lines += [notes, ""]
    lines += ["Prompts (grid columns, left to right):", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
    lines += kept_section(md_path)
    md_path.write_text("\n".join(lines) + "\n")


# A section another report writes into this file (the demo LoRA's adherence per backend,
# `python -m benchmarks.lora`), kept when this report rewrites the rest.
SECTION_BEGIN = "<!-- lora:begin -->"
SECTION_END = "<!-- lora:end -->"


# Likewise the step cache's rows (`qdserve bench step-cache`).
KEPT_SECTIONS = (
    (SECTION_BEGIN, SECTION_END),
    ("<!-- step-cache:begin -->", "<!-- step-cache:end -->"),
)


def kept_section(md_path: Path) -> list[str]:
    """The marked sections of the current file (each with a blank line before it)."""
    if not md_path.exists():
        return []
    text = md_path.read_text()
    out: list[str] = []
    for begin, finish in KEPT_SECTIONS:
        start, end = text.find(begin), text.find(finish)
        if 0 <= start < end:
            out += ["", text[start : end + len(finish)]]
    return out


def report(
    named: Iterable[tuple[str, Any]],
    md_path: Path = DOCS / "quality.md",
    png_path: Path = DOCS / "quality.png",
    prompts: Sequence[str] = PROMPTS,
    seeds: Sequence[int] = SEEDS,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    notes: str = "",
    header: str = "",
) -> list[Row]:
    """Evaluate (name, pipeline) pairs (first = unquantized reference) and write the report."""
    rows = evaluate(named, prompts, seeds, steps, guidance)
    write_report(rows, md_path, png_path, prompts, seeds, steps, guidance, notes, header)
    return rows


def report_with_loader(
    names: Sequence[str],
    load: Callable[[str], Any],
    skipped: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> list[Row]:
    """Like `report`, loading each backend by name with `load`; load errors become rows, and
    so do the `skipped` names (name -> why it cannot run here), which are not loaded.

    Pipelines are loaded one at a time and dropped after use, so memory holds at most the
    reference images and one pipeline.
    """

    def lazily() -> Iterator[tuple[str, Any]]:
        for name in names:
            try:
                pipe = load(name)
            except Exception as exc:
                yield name, RuntimeError(f"load failed: {type(exc).__name__}: {exc}")
                continue
            yield name, pipe
            del pipe
        for name, why in (skipped or {}).items():
            yield name, RuntimeError(f"not run here: {why}")

    return report(lazily(), **kwargs)


def variant_name(backend: str, qtype: str | None) -> str:
    """The report's row name: "none", "quanto:int8", or the bare key without quant types."""
    return f"{backend}:{qtype}" if qtype else backend


def service_loader(model: Path, workdir: Path) -> Callable[[str], Any]:
    """A `load(name)` for `report_with_loader` built on the service's own loader, so the
    report measures exactly what `qdserve serve` would run, after the backend's offline step
    (`prepare`: GGUF converts the denoiser into `workdir`)."""
    from benchmarks.common import parse_variant, prepared_settings
    from pipelines.loader import load_pipeline

    def load(name: str) -> Any:
        settings = prepared_settings(parse_variant(name), workdir, model=str(model))
        pipe = load_pipeline(settings).pipeline
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


def main(argv: Sequence[str] | None = None) -> int:
    """Write the quality report for the demo model: unquantized first, then every variant the
    backend registry can run here (those it cannot are rows that say why)."""
    import argparse
    import tempfile

    import torch

    from benchmarks.common import meta_line, registry_variants, run_meta
    from pipelines.embedded import embedded_model_path

    p = argparse.ArgumentParser(prog="qdserve bench quality", description="demo-model quality")
    p.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    p.add_argument(
        "--backends",
        default="",
        help="comma list of backend:quant_type (default: every variant the registry runs here)",
    )
    p.add_argument("--md", type=Path, default=DOCS / "quality.md")
    p.add_argument("--png", type=Path, default=DOCS / "quality.png")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma list")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        # On CPUs shared with other work, 1 thread avoids OpenMP spin contention.
        torch.set_num_threads(args.threads)
    model = args.model or embedded_model_path()
    runnable, unavailable = registry_variants()
    if args.backends:
        chosen = [b for b in args.backends.split(",") if b]
        skipped = {}
    else:
        chosen = [variant_name(*v) for v in runnable if v[0] != "none"]
        skipped = {variant_name(*v): why for v, why in unavailable.items()}
    command = "qdserve bench quality" + (f" {' '.join(argv)}" if argv else "")
    header = meta_line(run_meta(command, torch_threads=torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="qds-quality-") as tmp:
        rows = report_with_loader(
            ["none", *chosen],
            service_loader(model, Path(tmp)),
            skipped=skipped,
            md_path=args.md,
            png_path=args.png,
            seeds=[int(s) for s in args.seeds.split(",")],
            steps=args.steps,
            guidance=args.guidance,
            header=header,
        )
    for r in rows:
        print(
            f"{r.name:24s} adherence={_fmt(r.adherence, '.3f')} psnr={_fmt(r.psnr, '.1f')} "
            f"mad={_fmt(r.mad, '.2f')} {r.error or ''}"
        )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
