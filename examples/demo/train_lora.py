"""Train the demo LoRA: teach the shipped demo model a color it never saw ("orange").

The demo model (`pipelines/demo_weights/`) was trained on six colors; asked for "an
orange circle" it draws a black or red one. This trainer adds a PEFT LoRA to its Flux
transformer (attention, feed-forward and single-block projections) and trains only the LoRA
with the base model's own objective (rectified flow, as `examples/demo/train.py`), on a mix
of orange shapes and the base data set (prior preservation: with the adapter on, the six
known colors still draw). The result is saved with diffusers' `save_lora_weights`, the same
format `load_lora_weights` (and qdserve's `QDS_LORAS`) reads.

    .venv/bin/python -m examples.demo.train_lora [--out DIR] [--steps N]

Everything is seeded; the loss curve and the adherence checks go to `<name>_training_log.csv`
next to the adapter, and the cost (steps, seconds, threads) to `<name>.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from examples.demo.quality import DEFAULT_GUIDANCE, DEFAULT_STEPS, PROMPTS, adherence
from examples.demo.train import (
    _images_to_tensor,
    _lr_at,
    encode_captions,
    encode_dataset,
)
from pipelines import demo_shapes as shapes

CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = CHECKOUT / "pipelines" / "demo_weights" / "lora"
NAME = "orange"
NEW_COLOR = "orange"
SIZE = shapes.DEFAULT_SIZE
# Every Linear that mixes text into the image or shapes the output, in both block kinds.
# (norm/embedding Linears stay frozen: they only modulate, and a smaller file loads faster.)
TARGET_MODULES: list[str] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
]


def _prompts(color: str) -> list[str]:
    """Every shape x position once with the new color, plus the position-free forms."""
    out = [shapes.caption(s, color, p) for s in shapes.SHAPES for p in shapes.POSITIONS]
    return out + [shapes.caption(s, color, None) for s in shapes.SHAPES]


# The checker's prompt set for the adapter (12 prompts): every shape and position in orange.
LORA_PROMPTS: list[str] = _prompts(NEW_COLOR)


def _log(msg: str) -> None:
    print(msg, flush=True)


def new_color_samples(
    n: int, seed: int, color: str = NEW_COLOR, p_no_position: float = 0.25
) -> list[shapes.Sample]:
    """`n` samples drawn like `shapes.sample` (same jitter and captions), all in `color`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        shape, position = rng.choice(shapes.SHAPES), rng.choice(shapes.POSITIONS)
        radius = SIZE * rng.uniform(0.16, 0.22)
        dx, dy = SIZE * rng.uniform(-0.04, 0.04), SIZE * rng.uniform(-0.08, 0.08)
        image = shapes.render(shape, color, position, SIZE, radius, dx, dy)
        named = None if rng.random() < p_no_position else position
        out.append(
            shapes.Sample(image, shapes.caption(shape, color, named), shape, color, position)
        )
    return out


def load_base(model: Path) -> Any:
    """The demo pipeline in fp32 on CPU, as the service loads it unquantized."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_lora(transformer: Any, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """Attach a fresh PEFT LoRA (diffusers' `add_adapter`); returns its trainable params."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TARGET_MODULES
        ),
        adapter_name=NAME,
    )
    return [p for p in transformer.parameters() if p.requires_grad]


def save_adapter(pipe: Any, out: Path, name: str) -> Path:
    """The trained LoRA through diffusers' `save_lora_weights` (fp16: half the bytes)."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(pipe.transformer, adapter_name=NAME)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    weight_name = f"{name}.safetensors"
    FluxPipeline.save_lora_weights(
        out, transformer_lora_layers=state, weight_name=weight_name, safe_serialization=True
    )
    # safetensors writes 0600; the shipped file must be readable by a non-root server.
    (out / weight_name).chmod(0o644)
    return out / weight_name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train-demo-lora", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the shipped demo model")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    p.add_argument("--name", default=NAME, help="adapter file name (<name>.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1000, help="new-color training images")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=16, help="half new color, half base data")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=40, help="adherence check every N steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: results)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, check and save the demo LoRA; prints progress and the adherence it reached."""
    from pipelines.embedded import embedded_model_path

    args = parse_args(argv)
    loadavg = list(os.getloadavg())  # the CPUs may be shared: training time depends on it
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    pipe = load_base(args.model or embedded_model_path())

    new = new_color_samples(args.samples, args.seed + 3000)
    base = shapes.generate(args.samples, seed=args.seed + 1000, size=SIZE, p_no_position=0.25)
    data = new + base
    captions = sorted({s.caption for s in data})
    index = {c: i for i, c in enumerate(captions)}
    caption_ids = torch.tensor([index[s.caption] for s in data])
    with torch.no_grad():
        mean, std = encode_dataset(pipe.vae, _images_to_tensor(data))
        seq_emb, pooled_emb = encode_captions(pipe, captions)
    _log(f"{len(data)} samples encoded ({time.time() - t0:.0f}s)")

    transformer = pipe.transformer
    params = add_lora(transformer, args.rank, float(args.rank), args.seed)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    shift = float(pipe.vae.config.shift_factor)
    scale = float(pipe.vae.config.scaling_factor)
    _, c, h, w = mean.shape
    half = args.batch // 2
    img_ids = pipe._prepare_latent_image_ids(args.batch, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(seq_emb.shape[1], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{args.name}_training_log.csv"
    train_s = 0.0
    with log_path.open("w", newline="", buffering=1) as fh:
        logger = csv.writer(fh)
        logger.writerow(["phase", "step", "value", "elapsed_s"])
        running = 0.0
        for step in range(args.steps):
            tick = time.time()
            transformer.train()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, args.steps, args.lr, warmup=20)
            # Half new color, half base data in every batch (prior preservation).
            idx = torch.cat(
                [
                    torch.randint(0, len(new), (half,), generator=gen),
                    torch.randint(len(new), len(data), (args.batch - half,), generator=gen),
                ]
            )
            z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
            x0 = pipe._pack_latents((z - shift) * scale, args.batch, c, h, w)
            noise = torch.randn(x0.shape, generator=gen)
            u = torch.rand(args.batch, generator=gen)
            logit_normal = torch.sigmoid(torch.randn(args.batch, generator=gen))
            t = torch.where(torch.rand(args.batch, generator=gen) < 0.5, u, logit_normal)
            x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
            guidance = torch.rand(args.batch, generator=gen) * 10.0
            cap = caption_ids[idx]
            pred = transformer(
                hidden_states=x_t,
                timestep=t,
                guidance=guidance,
                pooled_projections=pooled_emb[cap],
                encoder_hidden_states=seq_emb[cap],
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            loss = F.mse_loss(pred, noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            train_s += time.time() - tick
            running += loss.item()
            if (step + 1) % 25 == 0:
                logger.writerow(["lora", step + 1, f"{running / 25:.6f}", f"{train_s:.1f}"])
                _log(f"lora step {step + 1}/{args.steps} loss {running / 25:.4f} ({train_s:.0f}s)")
                running = 0.0
            if args.eval_every and (step + 1) % args.eval_every == 0:
                transformer.eval()
                acc = adherence(pipe, LORA_PROMPTS, [0], DEFAULT_STEPS, DEFAULT_GUIDANCE)
                logger.writerow(
                    ["orange_adherence_seed0", step + 1, f"{acc:.4f}", f"{train_s:.1f}"]
                )
                _log(f"step {step + 1}: orange adherence (seed 0) {acc:.3f}")
    transformer.eval()
    path = save_adapter(pipe, args.out, args.name)

    seeds = [0, 1]
    with_lora = adherence(pipe, LORA_PROMPTS, seeds, DEFAULT_STEPS, DEFAULT_GUIDANCE)
    base_prompts_with_lora = adherence(pipe, PROMPTS, seeds, DEFAULT_STEPS, DEFAULT_GUIDANCE)
    transformer.disable_adapters()
    without = adherence(pipe, LORA_PROMPTS, seeds, DEFAULT_STEPS, DEFAULT_GUIDANCE)
    meta = {
        "adapter": path.name,
        "base_model": "qdserve/embedded-flux demo-1 (pipelines/demo_weights)",
        "new_color": NEW_COLOR,
        "rank": args.rank,
        "target_modules": TARGET_MODULES,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "samples": args.samples,
        "seed": args.seed,
        "torch_threads": args.threads,
        "train_seconds": round(train_s, 1),
        "loadavg_1_5_15_at_start": loadavg,
        "total_seconds": round(time.time() - t0, 1),
        "bytes": path.stat().st_size,
        "orange_adherence_with_adapter": with_lora,
        "orange_adherence_without_adapter": without,
        "base_prompt_adherence_with_adapter": base_prompts_with_lora,
        "eval_seeds": seeds,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    _log(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
