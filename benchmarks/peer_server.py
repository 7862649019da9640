"""Benchmark peer: the same quantized pipeline served by LitServe, with its batching on.

Not part of qdserve. It is what a user might write instead: LitServe (`pip install
litserve`) around the same `quantization.loader.load_pipeline` / `generate_batch`, answering
the same OpenAI-style JSON at the same path with base64 PNGs, so `qdserve bench peer` can send
identical requests to both servers. Configuration: one inference worker on the CPU
(`accelerator="cpu", devices=1, workers_per_device=1`), one API server process,
`max_batch_size` / `batch_timeout` from the command line (LitServe's dynamic batching).

Run from the checkout:
`python -m benchmarks.peer_server --port 8100 --max-batch-size 4 --batch-timeout 0.025`
"""

import argparse
import base64
import io
import sys
from pathlib import Path
from typing import Any

import litserve as ls

# Runnable as a script from a checkout: the checkout root holds `quantization`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATH = "/v1/images/generations"


class DiffusersAPI(ls.LitAPI):
    """decode -> (LitServe batches) -> one generate_batch call -> PNG base64 per request."""

    def __init__(self, torch_threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.torch_threads = torch_threads

    def setup(self, device: str) -> None:
        import torch

        from quantization.loader import load_pipeline
        from quantization.settings import QuantSettings

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        self.loaded = load_pipeline(QuantSettings(device="cpu"))

    # LitServe reads this signature to build its route: a request without an annotation is
    # the raw Starlette request's JSON body.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        from quantization.generate import GenerationRequest

        size = request.get("size") or f"{self.loaded.defaults.size}x{self.loaded.defaults.size}"
        width, height = (int(v) for v in size.split("x"))
        return GenerationRequest(
            prompt=request["prompt"],
            num_inference_steps=request.get("num_inference_steps"),
            guidance_scale=request.get("guidance_scale"),
            seed=request.get("seed"),
            width=width,
            height=height,
            num_images=int(request.get("n", 1)),
        )

    def batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def predict(self, x: Any) -> list[Any]:
        from quantization.generate import batch_key, generate_batch

        requests = x if isinstance(x, list) else [x]
        # LitServe batches whatever arrives; split by compatible shape like qdserve does.
        groups: dict[Any, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(batch_key(self.loaded, req), []).append(i)
        results: list[Any] = [None] * len(requests)
        for idx in groups.values():
            batch = generate_batch(self.loaded, [requests[i] for i in idx])
            for i, res in zip(idx, batch, strict=True):
                results[i] = res
        return results if isinstance(x, list) else results[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return list(output)

    def encode_response(self, output: Any):  # type: ignore[no-untyped-def]
        data = []
        for image, seed in zip(output.images, output.seeds, strict=True):
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=6)
            data.append({"b64_json": base64.b64encode(buf.getvalue()).decode(), "seed": seed})
        return {"data": data, "size": f"{output.width}x{output.height}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--batch-timeout", type=float, default=0.025)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)
    api = DiffusersAPI(
        args.torch_threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path=PATH,
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=300)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
