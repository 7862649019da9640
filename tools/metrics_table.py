"""Render docs/observability.md's metric table from a live app's Prometheus registry.

`python tools/metrics_table.py` prints it; `--write` replaces the block between the
`<!-- metrics:start -->` / `<!-- metrics:end -->` markers in docs/observability.md. A test
checks that the document's block equals this output, so the documentation cannot drift from
the code.

Names, types, label names and help texts come from the metric objects registered by
`service.app.create_app()`. The GPU collector reports nothing without CUDA, so its families
are rendered as it yields them for one CUDA device (the torch readings are stubbed; only the
family metadata is used): the table is the same on a CPU and a GPU machine.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from doc_blocks import write_block  # noqa: E402

BLOCK = "metrics"
DOC = ROOT / "docs" / "observability.md"


@contextmanager
def _one_fake_cuda_device() -> Iterator[None]:
    import torch

    props = mock.Mock(total_memory=0)
    with (
        mock.patch("engine.gpu_memory._cuda_devices", return_value=[0]),
        mock.patch.object(torch.cuda, "memory_allocated", return_value=0),
        mock.patch.object(torch.cuda, "memory_reserved", return_value=0),
        mock.patch.object(torch.cuda, "max_memory_allocated", return_value=0),
        mock.patch.object(torch.cuda, "get_device_properties", return_value=props),
    ):
        yield


def families() -> list[tuple[str, str, list[str], str, tuple[float, ...]]]:
    """(exposed name, type, label names, help, histogram buckets) of every qds_ family, in
    contract order."""
    from prometheus_client.metrics import Info, MetricWrapperBase

    from quantization.settings import QuantSettings
    from service import metric_names
    from service.app import create_app
    from service.gpu_metrics import GpuMemoryCollector
    from service.metrics import build_labels
    from service.settings import ServiceSettings

    app = create_app(QuantSettings(), ServiceSettings())
    metrics = app.state.qds.metrics
    registry = metrics.registry
    rows: dict[str, tuple[str, str, list[str], str, tuple[float, ...]]] = {}
    for collector in list(registry._collector_to_names):  # every collector registered
        if isinstance(collector, Info):
            (family,) = collector.describe()
            name = family.name + "_info"
            labels = list(build_labels())
            rows[name] = (name, "info (gauge = 1)", labels, family.documentation, ())
        elif isinstance(collector, MetricWrapperBase):
            (family,) = collector.describe()
            name = family.name + ("_total" if family.type == "counter" else "")
            labels = list(collector._labelnames)
            buckets = tuple(getattr(collector, "_upper_bounds", ()))
            rows[name] = (name, family.type, labels, family.documentation, buckets)
        elif isinstance(collector, GpuMemoryCollector):
            # A collector reading this process's allocator (the app's reads the engine's).
            with _one_fake_cuda_device():
                for family in GpuMemoryCollector().collect():
                    labels = sorted({k for s in family.samples for k in s.labels})
                    doc = family.documentation
                    rows[family.name] = (family.name, family.type, labels, doc, ())
    unknown = set(rows) - set(metric_names.ALL)
    missing = set(metric_names.ALL) - set(rows)
    if unknown or missing:
        raise RuntimeError(f"registry vs metric_names: unknown {unknown}, missing {missing}")
    return [rows[name] for name in metric_names.ALL]


def _seconds(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"


def render() -> str:
    rows = families()
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, labels, doc, _ in rows:
        label_text = ", ".join(f"`{label}`" for label in labels) or "-"
        doc = doc.replace("|", "\\|").rstrip(".")
        lines.append(f"| `{name}` | {kind} | {label_text} | {doc} |")
    by_buckets: dict[tuple[float, ...], list[str]] = {}
    for name, _, _, _, buckets in rows:
        if buckets:
            by_buckets.setdefault(buckets, []).append(f"`{name}`")
    lines.append("")
    for buckets, names in by_buckets.items():
        bounds = ", ".join(_seconds(b) for b in buckets)
        lines.append(f"Buckets (`le`, seconds) of {', '.join(names)}: {bounds}.")
        lines.append("")
    return "\n".join(lines).rstrip()


def write(doc: Path = DOC) -> None:
    write_block(doc, BLOCK, render())


if __name__ == "__main__":
    if "--write" in sys.argv:
        write()
    else:
        print(render())
