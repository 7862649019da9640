"""Token counts of a generation, in the shape of OpenAI's Images API `usage`.

OpenAI bills image models in tokens: text tokens of the prompt, image tokens of input images,
and output tokens of the generated images. qdserve reports the same three with real counts
from the pipeline that served the request (so it is computed where the pipeline lives, the
engine, and travels back on `GenerationResult.usage`):

- text tokens: the prompt's tokens in the sequence the denoiser attends to, as the pipeline's
  own tokenizer produces them (special tokens included, truncated where the pipeline
  truncates). For Flux that is the T5 tokenizer (`tokenizer_2`, cut at max_sequence_length):
  the transformer's joint attention runs over T5's sequence, while CLIP contributes one
  pooled vector, so counting CLIP's tokens too would count the same prompt twice. A negative
  prompt (true CFG) is encoded and attended to as well, so its tokens are added.
- image tokens: the denoiser's latent patches, (H / p) * (W / p) per image, with p the
  pixels per patch: the VAE's downsampling times the denoiser's patch size (Flux packs 2x2
  latents into one token: p = 16; SD3's transformer: 8 * 2; a UNet: 8, one per latent pixel).
  Output tokens are those of every generated image; input image tokens are those of the
  input images (edits), 0 for a plain generation.

Padding is not counted: the T5 sequence the transformer runs on is padded to
max_sequence_length whatever the prompt, which is compute, not prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.generate import GenerationRequest
    from pipelines.loader import LoadedPipeline

# FluxPipeline.__call__'s default max_sequence_length (T5 truncation).
_DEFAULT_MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class TokenUsage:
    text_tokens: int  # prompt (+ negative prompt) tokens, once per request
    image_tokens: int  # latent patches of the input images (edits); 0 for generation
    output_tokens: int  # latent patches of all generated images

    @property
    def input_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def sequence_tokenizer(pipe: Any, max_sequence_length: int | None) -> tuple[Any, int] | None:
    """The tokenizer whose sequence the denoiser attends to, and where the pipeline cuts it.

    A T5 tokenizer when the pipeline has one (Flux's tokenizer_2, SD3's tokenizer_3), cut at
    max_sequence_length; else the first CLIP tokenizer, cut at its model_max_length (77).
    """
    for name in ("tokenizer_3", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and "CLIP" not in type(tok).__name__:
            return tok, int(max_sequence_length or _DEFAULT_MAX_SEQUENCE_LENGTH)
    tok = getattr(pipe, "tokenizer", None)
    if tok is None:
        return None
    return tok, int(getattr(tok, "model_max_length", 77))


def text_tokens(pipe: Any, text: str, max_sequence_length: int | None = None) -> int:
    """Tokens of `text` as the pipeline's sequence tokenizer produces them (0 without one)."""
    found = sequence_tokenizer(pipe, max_sequence_length)
    if found is None:
        return 0
    tok, limit = found
    return len(tok(text, truncation=True, max_length=limit)["input_ids"])


def pixels_per_patch(pipe: Any) -> int:
    """Pixels along one side of a denoiser token (see the module docstring)."""
    vae_scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    if hasattr(pipe, "_pack_latents"):  # Flux family: 2x2 latents packed into one token
        return vae_scale * 2
    denoiser = getattr(pipe, "transformer", None)
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None)
    return vae_scale * int(patch or 1)


def image_tokens(pipe: Any, width: int, height: int) -> int:
    p = pixels_per_patch(pipe)
    return (int(width) // p) * (int(height) // p)


def count_usage(
    loaded: LoadedPipeline,
    req: GenerationRequest,
    *,
    input_sizes: Sequence[tuple[int, int]] = (),
) -> TokenUsage:
    """The token usage of a resolved request (width and height set) on this pipeline;
    `input_sizes` are the (width, height) of input images (edits)."""
    pipe = loaded.pipeline
    seq = loaded.defaults.max_sequence_length
    text = text_tokens(pipe, req.prompt, seq)
    if req.negative_prompt is not None:
        text += text_tokens(pipe, req.negative_prompt, seq)
    per_image = image_tokens(pipe, int(req.width or 0), int(req.height or 0))
    return TokenUsage(
        text_tokens=text,
        image_tokens=sum(image_tokens(pipe, w, h) for w, h in input_sizes),
        output_tokens=per_image * req.num_images,
    )
