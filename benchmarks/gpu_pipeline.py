"""A servable Flux pipeline folder with a Flux-dev-size denoiser and random weights.

`qdserve bench peer --model FOLDER --size 1024` on a GPU needs a whole pipeline both servers
can load, and no hub is reachable: this builds one. Only the denoiser is real-size (Flux-dev's
published config, 11.9 B parameters, bf16): it is where a 1024x1024 request spends its time.
The text encoders are one-layer models with Flux's output widths (T5 4096, CLIP pooled 768)
and the VAE is a small 8x autoencoder, so the transformer sees Flux-dev's real token counts
(4096 image + 512 text at 1024x1024) while the build stays seconds and the folder ~24 GB.
The scheduler is Flux-dev's (dynamic shifting). The images are noise: this measures serving,
not quality.

Run: `python -m benchmarks.gpu_pipeline --out /dev/shm/flux-dev-random` (builds the denoiser on
CUDA when there is one); `--small` swaps in a two-block denoiser for a CPU dry run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu import FLUX_DEV, bf16_weights

# A two-block denoiser with the same input/output widths: the CPU dry run of the GPU script.
SMALL_DENOISER = {
    **FLUX_DEV,
    "num_layers": 1,
    "num_single_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 128,
}
# Flux-dev's scheduler config (dynamic shifting by image token count).
FLUX_DEV_SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),  # four blocks: 8x down, as Flux's VAE
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    # Mid-block attention over a 128x128 latent is 16k tokens: not what this folder measures.
    "mid_block_add_attention": False,
}


def build(folder: Path, device: str, denoiser: dict[str, Any]) -> dict[str, Any]:
    """Build and save the pipeline into `folder`; returns what was built."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    from pipelines.embedded import (
        build_clip_tokenizer,
        build_t5_tokenizer,
        clip_text_encoder,
        t5_text_encoder,
    )

    t0 = time.perf_counter()
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(0)
    with bf16_weights():
        # Initialised where it will run: 12 B parameters initialise in seconds on a GPU.
        with torch.device(device):
            transformer = FluxTransformer2DModel(**denoiser)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = clip_text_encoder(
            clip_tok,
            hidden=denoiser["pooled_projection_dim"],
            intermediate=256,
            layers=1,
            heads=12,
        )
        text_encoder_2 = t5_text_encoder(
            t5_tok, d_model=denoiser["joint_attention_dim"], d_kv=64, d_ff=256, layers=1, heads=8
        )
    built = time.perf_counter() - t0
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }
    info = {
        "folder": str(folder),
        "denoiser_config": denoiser,
        "parameters": params,
        "dtype": "bfloat16",
        "build_seconds": round(built, 2),
        "save_seconds": round(time.perf_counter() - t0 - built, 2),
    }
    (folder / "built.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_pipeline", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--small", action="store_true", help="two-block denoiser (CPU dry run)")
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = build(args.out, device, SMALL_DENOISER if args.small else FLUX_DEV)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
