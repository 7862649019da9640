"""The embedded default model: a small Flux-architecture pipeline built locally.

No hub is reachable on the machines this project runs on, so the default model is built from
configs with fixed seeds, tokenizers included (transformers v5 builds both tokenizers from
in-memory vocabularies). Its weights are random unless trained demo weights are shipped, so
its images are noise: it exists to exercise the real diffusers / quantization path.

Dimensions are chosen so every 4-bit format applies: the transformer's inner dim is 256, a
multiple of the block sizes used by GGUF (32), bitsandbytes (64) and quanto int4 (128).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

EMBEDDED_MODEL_ID = "qdserve/embedded-flux"
EMBEDDED_VERSION = "1"

# Words that get a single token in the T5 unigram vocabulary; anything else falls back to
# characters, so any prompt tokenizes.
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "to",
    "with",
    "and",
    "or",
    "is",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "white",
    "black",
    "gray",
    "circle",
    "square",
    "triangle",
    "star",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "middle",
    "small",
    "big",
    "large",
    "photo",
    "picture",
    "drawing",
    "image",
    "background",
    "shape",
    "of",
    "cat",
    "dog",
    "house",
    "tree",
    "car",
    "sky",
    "sea",
]

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 4,
    "joint_attention_dim": 128,
    "pooled_projection_dim": 128,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 24, 24),
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 32


def default_cache_dir() -> Path:
    """Where built models are cached: `QDS_CACHE_DIR`, else `$XDG_CACHE_HOME/qdserve`."""
    if env := os.environ.get("QDS_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qdserve"


def build_clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    # Byte-level characters only, no merges: every prompt maps to character tokens.
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    pieces += [("\u2581", -5.0)]
    pieces += [(c, -10.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = T5_MAX_LENGTH
    return tok


def clip_text_encoder(
    tok: Any, *, hidden: int, intermediate: int, layers: int, heads: int, **extra: Any
) -> Any:
    """A CLIP text encoder for the in-memory CLIP tokenizer, random weights (seed first)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **extra,
        )
    )


def t5_text_encoder(
    tok: Any, *, d_model: int, d_kv: int, d_ff: int, layers: int, heads: int
) -> Any:
    """A T5 encoder for the in-memory T5 tokenizer, random weights (seed first)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=d_model,
            d_kv=d_kv,
            d_ff=d_ff,
            num_layers=layers,
            num_heads=heads,
            relative_attention_num_buckets=8,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )


def build_pipeline(seed: int = 0) -> Any:
    """Build the embedded Flux pipeline in memory with deterministic random weights (fp32)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = clip_text_encoder(
        clip_tok, hidden=128, intermediate=256, layers=2, heads=4, projection_dim=128
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = t5_text_encoder(t5_tok, d_model=128, d_kv=32, d_ff=256, layers=2, heads=4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=False, base_image_seq_len=64, max_image_seq_len=1024
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embedded_model_path(cache_dir: Path | None = None) -> Path:
    """Return the on-disk folder of the embedded model, building and saving it if missing.

    Trained demo weights, when shipped inside the package (`pipelines/demo_weights/`),
    take precedence over the random-weight build.
    """
    shipped = Path(__file__).parent / "demo_weights"
    if (shipped / "model_index.json").exists():
        return shipped
    return random_model_path(cache_dir)


def random_model_path(cache_dir: Path | None = None) -> Path:
    """The random-weight embedded pipeline on disk (built once, then reused)."""
    root = (cache_dir or default_cache_dir()) / f"embedded-flux-v{EMBEDDED_VERSION}"
    marker = root / "model_index.json"
    if marker.exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    pipe = build_pipeline()
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "qdserve.json").write_text(json.dumps({"embedded": True, "version": EMBEDDED_VERSION}))
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Atomic publish: a concurrent builder (another test worker) either wins or we do.
        os.rename(tmp, root)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root
