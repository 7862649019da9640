"""Train the demo model: the embedded Flux pipeline, taught to draw captioned shapes on CPU.

Two phases, one command (`python -m examples.demo.train` / `tools/train_demo.py` /
`qdserve train-demo`):

1. The VAE (the embedded `VAE_CONFIG`: scale factor 2, 16 latent channels) is trained as an
   autoencoder on the shapes, so latents decode to pictures. Its `shift_factor` and
   `scaling_factor` are then set from the latent statistics, so the transformer sees
   zero-mean, unit-variance latents exactly as `FluxPipeline` will un-scale them.
2. The Flux transformer is trained with the rectified-flow objective Flux uses: sample t,
   x_t = (1 - t) x0 + t noise, predict noise - x0, with latents packed by
   `FluxPipeline._pack_latents`, image ids from `_prepare_latent_image_ids`, zero text ids
   and a guidance embedding input. The text encoders stay frozen at their seeded random
   weights: their outputs still differ per prompt (T5 has one token per word here), and the
   transformer learns to read them. Prompt embeddings are computed once with the pipeline's
   own `encode_prompt`, so inference sees exactly what training saw.

Everything is seeded and runs on a fixed number of CPU threads, so the same command gives the
same weights. The loss curve goes to `training_log.csv` next to the weights.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Inference defaults written to qdserve.json (the service's defaults follow that file).
from examples.demo.quality import DEFAULT_GUIDANCE, DEFAULT_STEPS, PROMPTS, adherence
from pipelines import demo_shapes as shapes

# The weights the runtime serves as its embedded default (pipelines/demo_weights/ of this
# checkout); `--out` writes elsewhere.
CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = CHECKOUT / "pipelines" / "demo_weights"
SIZE = shapes.DEFAULT_SIZE
MAX_SEQUENCE_LENGTH = 32
DEMO_VERSION = "demo-1"
# The demo transformer keeps the embedded inner dim (256: every 4-bit block size applies) but
# has fewer blocks than the random build: half the CPU time per step, so twice the steps in
# the same budget, and half the shipped bytes. The task (one shape, one color, one place)
# needs little depth.
DEMO_TRANSFORMER_OVERRIDES: dict[str, Any] = {"num_layers": 1, "num_single_layers": 2}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _images_to_tensor(samples: Sequence[shapes.Sample]) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], NCHW (the range the VAE and pipeline use)."""
    arr = np.stack([np.asarray(s.image, dtype=np.float32) for s in samples])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0).contiguous()


def _lr_at(step: int, total: int, peak: float, warmup: int, cosine: bool = True) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak (or constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not cosine:
        return peak
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_vae(
    vae: Any,
    images: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    gen: torch.Generator,
    logger: Any,
    t0: float,
) -> None:
    """Autoencoder training: MSE reconstruction of posterior samples + a light KL term.

    Reconstructing from *samples* (not the mean) makes the decoder tolerant of the small
    errors the transformer's latents will have; the KL term keeps the latents bounded.
    """
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=20)
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running += mse.item()
        if (step + 1) % 25 == 0 or step == steps - 1:
            n = 25 if (step + 1) % 25 == 0 else (step + 1) % 25
            logger.writerow(["vae", step + 1, f"{running / n:.6f}", f"{time.time() - t0:.1f}"])
            _log(f"vae step {step + 1}/{steps} mse {running / n:.5f} ({time.time() - t0:.0f}s)")
            running = 0.0
    vae.eval()


@torch.no_grad()
def vae_check(vae: Any, seed: int, n: int = 200) -> float:
    """Fraction of held-out reconstructions the checker still reads as their caption: the
    ceiling for the whole pipeline's prompt adherence."""
    from pipelines.demo_checker import classify

    held_out = shapes.generate(n, seed=seed + 2000, size=SIZE)
    rec = vae.decode(vae.encode(_images_to_tensor(held_out)).latent_dist.mode()).sample
    arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits = 0
    for img, s in zip(arr, held_out, strict=True):
        v = classify(img)
        hits += v is not None and (v.shape, v.color, v.position) == (s.shape, s.color, s.position)
    return hits / n


@torch.no_grad()
def encode_dataset(vae: Any, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, ...]:
    """Posterior mean and std of every training image (the transformer samples from them)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        dist = vae.encode(images[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(pipe: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 sequence embeddings and pooled CLIP embeddings, via the pipeline's own encoder."""
    seqs, pooled = [], []
    for i in range(0, len(captions), 64):
        p_emb, p_pool, _ = pipe.encode_prompt(
            prompt=captions[i : i + 64], prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        seqs.append(p_emb)
        pooled.append(p_pool)
    return torch.cat(seqs), torch.cat(pooled)


def train_transformer(
    pipe: Any,
    latents: tuple[torch.Tensor, torch.Tensor],
    caption_ids: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch: int,
    lr: float,
    gen: torch.Generator,
    logger: Any,
    t0: float,
    checkpoint: Callable[[int, Any], None] | None = None,
    every: int = 0,
) -> Any:
    """Rectified-flow training of the Flux transformer; returns the EMA copy of it.

    The learning rate is constant after warm-up (the EMA does the averaging), so the
    checkpoint at step N is bit-for-bit what `--steps N` produces: training can be stopped
    at any checkpoint and the command that reproduces it is known.
    """
    transformer = pipe.transformer
    transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    mean, std = latents
    shift = float(pipe.vae.config.shift_factor)
    scale = float(pipe.vae.config.scaling_factor)
    seq_emb, pooled_emb = text
    _, c, h, w = mean.shape
    img_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(seq_emb.shape[1], 3)
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=100, cosine=False)
        idx = torch.randint(0, mean.shape[0], (batch,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        # The inverse of what FluxPipeline does before decoding: z / scale + shift.
        x0 = pipe._pack_latents((z - shift) * scale, batch, c, h, w)
        noise = torch.randn(x0.shape, generator=gen)
        # Half uniform, half logit-normal t: the few-step sampler visits every noise level,
        # and the middle (where shape and place get decided) gets extra attention.
        u = torch.rand(batch, generator=gen)
        logit_normal = torch.sigmoid(torch.randn(batch, generator=gen))
        t = torch.where(torch.rand(batch, generator=gen) < 0.5, u, logit_normal)
        x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
        # Guidance is only an input here (no distillation); random values over the usual
        # range teach the model to draw the same thing whatever guidance a client sends.
        guidance = torch.rand(batch, generator=gen) * 10.0
        cap = caption_ids[idx]
        pred = transformer(
            hidden_states=x_t,
            timestep=t,  # the pipeline passes sigma (= t / 1000 of its timesteps) too
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
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        # EMA weights generate noticeably cleaner shapes than the last raw step.
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - decay)
        running += loss.item()
        if (step + 1) % 25 == 0 or step == steps - 1:
            n = 25 if (step + 1) % 25 == 0 else (step + 1) % 25
            logger.writerow(
                ["transformer", step + 1, f"{running / n:.6f}", f"{time.time() - t0:.1f}"]
            )
            _log(f"flow step {step + 1}/{steps} loss {running / n:.4f} ({time.time() - t0:.0f}s)")
            running = 0.0
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint(step + 1, ema)
    transformer.eval()
    return ema


def build_demo_pipeline(seed: int) -> Any:
    """The embedded pipeline (tokenizers, text encoders, VAE, scheduler) with the demo's
    smaller-depth transformer in place of the random-build one."""
    from diffusers import FluxTransformer2DModel

    from pipelines.embedded import TRANSFORMER_CONFIG, build_pipeline

    pipe = build_pipeline(seed)
    torch.manual_seed(seed)
    pipe.transformer = FluxTransformer2DModel(
        **{**TRANSFORMER_CONFIG, **DEMO_TRANSFORMER_OVERRIDES}
    )
    pipe.register_modules(transformer=pipe.transformer)
    return pipe


def save(pipe: Any, out: Path, steps: int, guidance: float, extra: dict[str, Any]) -> int:
    """save_pretrained with the transformer stored in fp16 (diffusers loads it back as fp32
    unless asked otherwise: half the bytes, same images); the small VAE and text encoders
    stay fp32 (transformers would load fp16 text encoders as fp16). Writes in place so the
    loss log in the same folder keeps growing. Returns the folder's bytes on disk."""
    transformer = pipe.transformer
    half = copy.deepcopy(transformer).to(torch.float16)
    pipe.register_modules(transformer=half)
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        pipe.register_modules(transformer=transformer)
    meta = {
        "embedded": True,
        "version": DEMO_VERSION,
        "default_steps": steps,
        "default_guidance": guidance,
        "default_size": SIZE,
        **extra,
    }
    (out / "qdserve.json").write_text(json.dumps(meta, indent=2) + "\n")
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def parse_args(argv: Sequence[str] | None, prog: str = "train-demo") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"save_pretrained folder (default: {DEFAULT_OUT}, the embedded model)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=4000, help="procedural training images")
    p.add_argument("--vae-steps", type=int, default=250)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=3000, help="transformer steps")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=250,
        help="save the EMA weights to --out and log prompt adherence every N steps",
    )
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: results)")
    p.add_argument("--eval-seeds", type=int, default=2, help="seeds per prompt in the final check")
    p.add_argument("--vae-from", type=Path, default=None, help="reuse a trained VAE folder")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "train-demo") -> int:
    """Train and save the demo model; prints progress and the final prompt adherence."""
    args = parse_args(argv, prog)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.csv"

    pipe = build_demo_pipeline(args.seed)
    # 25% of captions omit the position, so "a blue square" is a prompt the model knows.
    data = shapes.generate(args.samples, seed=args.seed + 1000, size=SIZE, p_no_position=0.25)
    images = _images_to_tensor(data)
    _log(f"{len(data)} samples rendered ({time.time() - t0:.0f}s)")

    with log_path.open("w", newline="", buffering=1) as fh:
        logger = csv.writer(fh)
        logger.writerow(["phase", "step", "loss", "elapsed_s"])
        if args.vae_from is not None:
            from diffusers import AutoencoderKL

            pipe.vae = AutoencoderKL.from_pretrained(args.vae_from / "vae")
            pipe.register_modules(vae=pipe.vae)
        else:
            train_vae(pipe.vae, images, args.vae_steps, args.batch, args.vae_lr, gen, logger, t0)
        _log(f"vae reconstructions the checker reads right: {vae_check(pipe.vae, args.seed):.3f}")
        mean, std = encode_dataset(pipe.vae, images)
        # Global shift / scale: FluxPipeline decodes latents / scaling_factor + shift_factor.
        shift = float(mean.mean())
        scale = float(1.0 / mean.std())
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        _log(f"latent shift {shift:.4f} scale {scale:.4f}")

        captions = shapes.all_captions()
        index = {c: i for i, c in enumerate(captions)}
        caption_ids = torch.tensor([index[s.caption] for s in data])
        text = encode_captions(pipe, captions)

        def checkpoint(step: int, ema: Any) -> None:
            # Evaluate and save the EMA weights as they are now (one seed: cheap).
            live = pipe.transformer
            pipe.register_modules(transformer=ema)
            acc = adherence(pipe, PROMPTS, [0], steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE)
            logger.writerow(["adherence_seed0", step, f"{acc:.4f}", f"{time.time() - t0:.1f}"])
            save(pipe, out, DEFAULT_STEPS, DEFAULT_GUIDANCE, {"checkpoint_step": step})
            pipe.register_modules(transformer=live)
            _log(f"checkpoint at step {step}: adherence (seed 0) {acc:.3f}")

        ema = train_transformer(
            pipe,
            (mean, std),
            caption_ids,
            text,
            args.steps,
            args.batch,
            args.lr,
            gen,
            logger,
            t0,
            checkpoint,
            args.checkpoint_every,
        )
    pipe.register_modules(transformer=ema)
    train_s = time.time() - t0

    seeds = list(range(args.eval_seeds))
    acc = adherence(pipe, PROMPTS, seeds, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE)
    _log(f"prompt adherence {acc:.3f} over {len(PROMPTS)} prompts x {len(seeds)} seeds")
    size = save(
        pipe,
        out,
        DEFAULT_STEPS,
        DEFAULT_GUIDANCE,
        {"train_steps": args.steps, "train_seconds": round(train_s, 1), "prompt_adherence": acc},
    )
    _log(f"saved {out} ({size / 1e6:.2f} MB) after {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="qdserve train-demo"))
