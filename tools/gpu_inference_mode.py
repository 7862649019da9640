"""Which CUDA-only backends run the engine's step loop under `torch.inference_mode`.

Run on a lent GPU (docs/benchmarks/gpu-h100-run5/bnb_inference_mode.log is its output): the
embedded model's step loop, one request, under `no_grad` and under `inference_mode`, for each
CUDA-only backend / quant type. A backend's `allows_inference_mode` is on only where it ran.
"""

from __future__ import annotations

import torch

from pipelines.generate import GenerationRequest, resolve
from pipelines.loader import load_pipeline
from pipelines.stepping import StepBatch
from quantization.settings import QuantSettings

VARIANTS = (
    ("bitsandbytes_4bit", "nf4"),
    ("bitsandbytes_4bit", "fp4"),
    ("bitsandbytes_8bit", "int8"),
    ("torchao", "int4wo"),
    ("torchao", "float8dq"),
)


def main() -> None:
    for backend, quant_type in VARIANTS:
        try:
            settings = QuantSettings(quant_backend=backend, quant_type=quant_type, device="cuda")
            loaded = load_pipeline(settings)
        except Exception as exc:  # a refusal is a result here, printed like the others
            print(backend, quant_type, "LOAD FAIL", type(exc).__name__, str(exc)[:120])
            continue
        req = resolve(loaded.defaults, GenerationRequest("x", seed=1, width=32, height=32))
        for mode in ("no_grad", "inference_mode"):
            ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
            try:
                with ctx:
                    batch = StepBatch(loaded)
                    batch.add("a", req)
                    out = []
                    while not out:
                        out = batch.step()
                print(backend, quant_type, mode, "ok", out[0][1].images[0].size)
            except Exception as exc:
                print(backend, quant_type, mode, "FAIL", type(exc).__name__, str(exc)[:150])


if __name__ == "__main__":
    main()
