"""Benchmark peer: the same quantized pipeline served by LitServe, with its batching on.

Not part of qdserve. It is what a user might write instead: LitServe (`pip install
litserve`) around the same `pipelines.loader.load_pipeline` / `generate_batch`, answering
the same OpenAI-style JSON at the same path with base64 PNGs (Pillow's default PNG level), so
`qdserve bench peer` can send identical requests to both servers. LitServe at its defaults
except the batching of its docs' typical example (`max_batch_size` / `batch_timeout` from the
command line) and one worker on one device; torch keeps its default thread count unless
`--torch-threads` pins it.

`--compile` is the second peer, "LitServe + compile": the one line a user would add to
`setup` (`pipe.transformer.compile()`), then a warm-up of batch sizes 1..max_batch_size at the
bench's size and steps (`--warmup-size`, `--warmup-steps`) before LitServe reports ready, as a
user would warm up too: its compile time is start-up, not part of the measured window.

`--taylorseer INTERVAL` is the third peer, "LitServe + TaylorSeer": the one line a user would add
to cache steps with diffusers' own hook, `pipe.transformer.enable_cache(TaylorSeerCacheConfig(
...))`, with the parameters qdserve's `taylorseer:<interval>` uses (3 full steps, first order,
lite mode). LitServe batches whole calls, so every sample of a batch is at the same step, which
is what the hook's single state assumes; FluxPipeline resets it at the end of each call.

Run from the checkout:
`python -m benchmarks.peer_server --port 8100 --settings settings.json --max-batch-size 4
--batch-timeout 0.025` (settings.json: a QuantSettings dump; without it, the service's
defaults from the QDS_* environment).
"""

import argparse
import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

import litserve as ls

# Runnable as a script from a checkout: the checkout root holds `quantization`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATH = "/v1/images/generations"


class DiffusersAPI(ls.LitAPI):
    """decode -> (LitServe batches) -> one generate_batch call -> PNG base64 per request."""

    def __init__(
        self,
        torch_threads: int,
        settings: dict[str, Any],
        compile_denoiser: bool = False,
        warmup: tuple[int, int | None, int] | None = None,
        taylorseer_interval: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.torch_threads = torch_threads
        self.settings = settings
        self.compile_denoiser = compile_denoiser
        self.taylorseer_interval = taylorseer_interval
        # (size, steps or None for the model's default, largest batch) of the warm-up.
        self.warmup = warmup

    def setup(self, device: str) -> None:
        import torch

        from pipelines.loader import load_pipeline
        from quantization.settings import QuantSettings

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        self.loaded = load_pipeline(QuantSettings(**self.settings))
        if self.taylorseer_interval:
            from diffusers.hooks import TaylorSeerCacheConfig

            from pipelines.step_cache import TAYLOR_ORDER, TAYLOR_WARMUP_STEPS

            # The one line a user would add to cache steps (diffusers' hook, the parameters of
            # qdserve's `taylorseer:<interval>`: 3 full steps, first order, lite mode; taken
            # from qdserve's constants so the two cannot drift apart).
            self.loaded.pipeline.transformer.enable_cache(
                TaylorSeerCacheConfig(
                    cache_interval=self.taylorseer_interval,
                    disable_cache_before_step=TAYLOR_WARMUP_STEPS,
                    max_order=TAYLOR_ORDER,
                    taylor_factors_dtype=torch.float32,
                    use_lite_mode=True,
                )
            )
        if self.compile_denoiser:
            # The one line a user would add to compile the denoiser:
            self.loaded.pipeline.transformer.compile()
        if self.warmup:
            self.warm_up(*self.warmup)

    def warm_up(self, size: int, steps: int | None, max_batch: int) -> None:
        """One call at every batch size LitServe may form (1..max_batch), at the served size
        and steps, inside `setup`: LitServe's /health answers ready only after it."""
        from pipelines.generate import GenerationRequest, generate_batch, resolve

        for batch in range(1, max_batch + 1):
            generate_batch(
                self.loaded,
                [
                    resolve(
                        self.loaded.defaults,
                        GenerationRequest(
                            prompt=f"warm-up {j}",
                            seed=j,
                            width=size,
                            height=size,
                            num_inference_steps=steps,
                        ),
                    )
                    for j in range(batch)
                ],
            )

    # LitServe reads this signature to build its route: a request without an annotation is
    # the raw Starlette request's JSON body.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        from pipelines.generate import GenerationRequest, resolve

        size = request.get("size") or f"{self.loaded.defaults.size}x{self.loaded.defaults.size}"
        width, height = (int(v) for v in size.split("x"))
        # The model's defaults for what the body leaves open (as a direct call would).
        return resolve(
            self.loaded.defaults,
            GenerationRequest(
                prompt=request["prompt"],
                num_inference_steps=request.get("num_inference_steps"),
                guidance_scale=request.get("guidance_scale"),
                seed=request.get("seed"),
                width=width,
                height=height,
                num_images=int(request.get("n", 1)),
            ),
        )

    def batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def predict(self, x: Any) -> list[Any]:
        from pipelines.generate import batch_key, generate_batch

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
            image.save(buf, format="PNG")
            data.append({"b64_json": base64.b64encode(buf.getvalue()).decode(), "seed": seed})
        return {"data": data, "size": f"{output.width}x{output.height}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--settings", type=Path, help="QuantSettings as JSON (same as qdserve's)")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--batch-timeout", type=float, default=0.025)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="call pipe.transformer.compile() in setup and warm up batch sizes "
        "1..max-batch-size before serving",
    )
    parser.add_argument(
        "--taylorseer",
        type=int,
        metavar="INTERVAL",
        help="cache steps with diffusers' TaylorSeer hook (pipe.transformer.enable_cache)",
    )
    parser.add_argument("--warmup-size", type=int, default=32, help="warm-up image side")
    parser.add_argument("--warmup-steps", type=int, help="warm-up steps (default: the model's)")
    args = parser.parse_args(argv)
    settings = json.loads(args.settings.read_text()) if args.settings else {}
    api = DiffusersAPI(
        args.torch_threads,
        settings,
        compile_denoiser=args.compile,
        warmup=(
            (args.warmup_size, args.warmup_steps, args.max_batch_size) if args.compile else None
        ),
        taylorseer_interval=args.taylorseer,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path=PATH,
    )
    server = ls.LitServer(api, devices=1, workers_per_device=1)
    # generate_client_file=False only keeps LitServe from writing client.py into the checkout.
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
