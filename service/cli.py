"""`qdserve` command line: serve, backends, quantize, convert-gguf, plan, bench, train-demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _settings_error(exc: Exception) -> int:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            var = f"QDS_{loc.upper()}" if loc != "settings" else "settings"
            msg = err["msg"].removeprefix("Value error, ")
            print(f"qdserve: invalid {var}: {msg}", file=sys.stderr)
    else:
        print(f"qdserve: {exc}", file=sys.stderr)
    return 2


def backend_table() -> list[dict[str, str]]:
    """Every backend and quant type with whether it runs on this machine, and why not."""
    from quantization.backends import BACKENDS
    from quantization.environment import detect_device

    device = detect_device()
    rows = []
    for backend in BACKENDS.values():
        for qtype in backend.quant_types or (None,):
            reason = backend.unavailable_reason(qtype, device, "auto")
            rows.append(
                {
                    "backend": backend.key,
                    "quant_type": qtype or "-",
                    "library": f"{backend.distribution} {backend.library_version() or '-'}"
                    if backend.distribution
                    else "-",
                    "available": "yes" if reason is None else "no",
                    "why_not": reason or "",
                }
            )
    return rows


def cmd_backends(args: argparse.Namespace) -> int:
    from quantization.environment import detect_device

    rows = backend_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"device: {detect_device().label}")
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0] if k != "why_not"}
    header = "  ".join(k.ljust(w) for k, w in widths.items()) + "  why not"
    print(header)
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in widths.items()) + "  " + r["why_not"])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.settings import ServiceSettings

    try:
        svc = ServiceSettings()
        from quantization.settings import QuantSettings

        quant = QuantSettings()  # validate the quantization env before binding the port
        from pipelines.lora import check_declared

        check_declared(svc.loras, quant.quant_backend, quant.resolved_quant_type)
    except Exception as exc:
        return _settings_error(exc)
    from engine.startup import configure_compile_cache

    # Before anything asks torch for its cache folder (torch then writes its default into the
    # environment the engine process inherits); the engine process checks again.
    configure_compile_cache(quant.cache_dir)
    from service.server import serve

    serve(args.host or svc.host, args.port or svc.port)
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    """Fill the compile caches (inductor's, under QDS_CACHE_DIR unless TORCHINDUCTOR_CACHE_DIR
    is set) for the configured model and warm-up sizes, then exit: run it as a Kubernetes init
    container or Job on the volume the pods mount, and they start warm."""
    import json

    from service.settings import ServiceSettings, lane_count

    try:
        svc = ServiceSettings()
        from quantization.settings import QuantSettings

        quant = QuantSettings()
        from pipelines.lora import check_declared

        check_declared(svc.loras, quant.quant_backend, quant.resolved_quant_type)
    except Exception as exc:
        return _settings_error(exc)
    import torch

    from engine.startup import warm_caches
    from quantization.environment import resolve_device

    threads = svc.torch_threads or torch.get_num_threads()
    lanes = lane_count(svc.engine_lanes, resolve_device(quant.device), threads)
    try:
        report = warm_caches(quant, svc, lanes=lanes, timeout=args.timeout)
    except Exception as exc:
        print(f"qdserve warmup: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from pipelines.prequantize import quantize_and_save
    from quantization.settings import QuantSettings

    overrides = {
        k: v
        for k, v in {
            "quant_backend": args.backend,
            "quant_type": args.quant_type,
            "model": args.model,
        }.items()
        if v
    }
    try:
        settings = QuantSettings(**overrides)
        out = quantize_and_save(settings, args.output)
    except Exception as exc:
        return _settings_error(exc)
    print(f"saved pre-quantized pipeline to {out} (serve it with QDS_MODEL={out})")
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from pipelines.loader import resolve_model
    from quantization.backends.gguf.convert import convert_to_gguf
    from quantization.settings import QuantSettings

    try:
        settings = QuantSettings(model=args.model) if args.model else QuantSettings()
        _, source = resolve_model(settings)
        out = convert_to_gguf(source, args.output, args.quant_type)
    except Exception as exc:
        return _settings_error(exc)
    print(
        f"wrote {out} ({os.path.getsize(out)} bytes); serve it with "
        f"QDS_QUANT_BACKEND=gguf QDS_GGUF_FILE={out}"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipelines.embedded import EMBEDDED_MODEL_ID, embedded_model_path
    from quantization.planning.entry import plan_request
    from quantization.planning.errors import PlanError
    from quantization.planning.render import plan_dict, plan_text

    model = args.model or os.environ.get("QDS_MODEL", "embedded")
    display = None
    if model in ("", "embedded", EMBEDDED_MODEL_ID):
        # The planner (quantization) does not know the runtime's embedded model: its folder.
        model, display = str(embedded_model_path()), EMBEDDED_MODEL_ID
    try:
        plan = plan_request(
            model,
            args.device,
            args.capability,
            args.memory,
            args.budget,
            args.priority,
            display=display,
        )
    except PlanError as exc:
        print(f"qdserve plan: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(plan_dict(plan), indent=2) if args.json else plan_text(plan))
    return 0


# `bench` and `train-demo` run code that is not installed with the package (benchmarks/ and
# examples/ of a checkout): find the checkout this package was installed from (an editable
# install) or the current folder, and run the module there as its own program. A child
# process, not an import: the runtime never imports benchmarks/ or examples/ (the import
# rules in pyproject.toml), so the installed package cannot come to depend on them.
CHECKOUT_HINT = "run from a qdserve checkout (clone it, then `pip install -e .` in it)"


def find_checkout() -> Path | None:
    """The qdserve checkout holding benchmarks/ and examples/, or None."""
    import service

    for root in (Path(service.__file__).resolve().parents[1], Path.cwd().resolve()):
        if (root / "benchmarks" / "__init__.py").is_file() and (
            root / "examples" / "demo" / "__init__.py"
        ).is_file():
            return root
    return None


def _run_in_checkout(command: str, module: str, argv: list[str]) -> int:
    import subprocess

    root = find_checkout()
    if root is None:
        print(
            f"qdserve {command}: not part of the installed package; {CHECKOUT_HINT}",
            file=sys.stderr,
        )
        return 2
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.call([sys.executable, "-m", module, *argv], cwd=root, env=env)


def cmd_bench(argv: list[str]) -> int:
    return _run_in_checkout("bench", "benchmarks", argv)


def cmd_train_demo(argv: list[str]) -> int:
    return _run_in_checkout("train-demo", "examples.demo.train", argv)


# Commands that parse their own arguments (`qdserve bench --help` shows the benchmark's).
FORWARDED: dict[str, Callable[[list[str]], int]] = {
    "bench": cmd_bench,
    "train-demo": cmd_train_demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the configured model over HTTP (uvicorn)")
    p.add_argument("--host", default=None, help="bind address (QDS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (QDS_PORT, default 8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "warmup", help="compile the configured model's warm-up sizes into the cache, then exit"
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds to allow for compiling (default: none)"
    )
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("backends", help="which backends and quant types run on this machine")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("quantize", help="quantize the model and save it pre-quantized")
    p.add_argument("output", help="folder to write the pre-quantized pipeline to")
    p.add_argument("--backend", help="overrides QDS_QUANT_BACKEND")
    p.add_argument("--quant-type", help="overrides QDS_QUANT_TYPE")
    p.add_argument("--model", help="overrides QDS_MODEL")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("convert-gguf", help="write the denoiser as a diffusers-format .gguf")
    p.add_argument("output", help="path of the .gguf file to write")
    p.add_argument(
        "--quant-type",
        default="Q8_0",
        help="Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, F16 or BF16 (default Q8_0)",
    )
    p.add_argument("--model", help="overrides QDS_MODEL")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser(
        "plan", help="what QDS_QUANT_BACKEND=auto would load, and why (reads no weights)"
    )
    p.add_argument("--model", help="QDS_MODEL value, or flux-dev / sd3-medium (shipped configs)")
    p.add_argument("--device", help="cpu or cuda (default: this machine, QDS_DEVICE)")
    p.add_argument("--capability", help="describe a CUDA device: compute capability, e.g. 8.9")
    p.add_argument("--memory", help="describe a device: its memory, e.g. 16GB or 24GiB")
    p.add_argument("--budget", help="overrides QDS_MEMORY_BUDGET (default: memory - 10%%)")
    p.add_argument("--priority", choices=("quality", "speed", "memory"), help="QDS_PRIORITY")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    # Listed here for `qdserve --help`; main() hands their arguments to them unparsed.
    sub.add_parser(
        "bench", help="benchmarks (from a checkout; --out, default the checkout's docs/benchmarks)"
    )
    sub.add_parser("train-demo", help="train the demo shapes model on CPU (from a checkout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return FORWARDED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
