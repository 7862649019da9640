"""Observability end to end: a real Prometheus scrapes a real server; /metrics parsed with
prometheus-client's parser (counts, histograms, bounded labels); JSON / text access logs and
levels; model load logs and progress bars; docs/observability.md's generated metric table.

One server for the module (the embedded model with backend `none`, plus `quanto:int8`
preloaded); every count is checked as the change a test's own requests make, so the tests
hold in any order.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_service_support import Server, free_port, running_server

from service import metric_names

ROOT = Path(__file__).resolve().parents[2]
IMG = "/v1/images/generations"
QUANTO = {"quant_backend": "quanto", "quant_type": "int8"}
SMALL = {"size": "32x32", "num_inference_steps": 2}
PROMETHEUS = Path("/usr/bin/prometheus")
ERROR_KINDS = {"validation", "timeout", "oom", "internal", "rejected"}
pytestmark = pytest.mark.timeout(120)

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- helpers ---------------------------------------------------------------------------------
def wait_for(cond: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy (returned); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.02)


def scrape(server: Server) -> str:
    with server.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200
    return r.text


def series(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(s: Series, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in s.items() if n == name and want <= set(lab))


def generate(server: Server, body: dict[str, Any], rid: str | None = None) -> httpx.Response:
    headers = {"X-Request-ID": rid} if rid else {}
    with server.client() as c:
        return c.post(IMG, json={"prompt": "x", **SMALL, **body}, headers=headers)


def wait_counted(server: Server, before: Series, expected: int, **labels: str) -> Series:
    """The request counter is incremented after the response is sent: wait until the
    requests a test made are all counted (bounded), then return the scrape."""
    name = "qds_requests_total"

    def counted() -> Series | None:
        now = series(scrape(server))
        done = total(now, name, **labels) - total(before, name, **labels) >= expected
        return now if done else None

    return wait_for(counted, 10, f"{expected} requests counted")


def documented_labels() -> dict[str, set[str] | None]:
    """Label names per family, from the comments in service/metric_names.py.

    A comment that is a list of names (`# endpoint, status`, or `# kind: v1, v2`) gives the
    labels; no comment, or prose, means no labels. GPU gauges are per device (commented on the
    first only); build info carries one label per library (None: checked separately).
    """
    source = (ROOT / "service" / "metric_names.py").read_text()
    out: dict[str, set[str] | None] = {}
    for name, comment in re.findall(r'^\s*"(qds_\w+)",\s*(?:#\s*(.*))?$', source, re.M):
        if m := re.fullmatch(r"([a-z_]+(?:, [a-z_]+)*)|([a-z_]+): .*", comment):
            out[name] = set((m.group(1) or m.group(2)).split(", "))
        else:
            out[name] = set()
    for name in metric_names.GPU_GAUGES:
        out[name] = {"device"}
    out["qds_build_info"] = None
    assert set(out) == set(metric_names.ALL)
    return out


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[Server]:
    with running_server(
        cache_dir,
        preload=["quanto:int8"],
        max_queue=1,
        max_images=4,
        max_pixels=64 * 64,
        max_steps=8,
        request_timeout=60,
    ) as s:
        yield s


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", body
        return body["data"]["result"]

    def by(self, promql: str, label: str) -> dict[str, float]:
        return {row["metric"].get(label, ""): float(row["value"][1]) for row in self.query(promql)}

    def scalar(self, promql: str) -> float:
        rows = self.query(promql)
        assert len(rows) <= 1, rows
        return float(rows[0]["value"][1]) if rows else 0.0

    def wait_scraped_after(self, t: float, timeout: float = 15) -> None:
        """Wait until a scrape of the service that started after wall-clock time `t`
        succeeded (`up` is written once per scrape, stamped with its start)."""

        def scraped() -> bool:
            rows = self.query('up{job="qdserve"}')
            return bool(rows) and rows[0]["value"][1] == "1" and self._last_scrape() > t

        try:
            wait_for(scraped, timeout, "a Prometheus scrape")
        except TimeoutError:
            raise AssertionError(
                f"no scrape after {t}: {self.query('up')}\n{self.log.read_text()[-2000:]}"
            ) from None

    def _last_scrape(self) -> float:
        return self.scalar('timestamp(up{job="qdserve"})')


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = PROMETHEUS if PROMETHEUS.exists() else shutil.which("prometheus")
    if not binary:
        pytest.skip("needs Debian's prometheus server (/usr/bin/prometheus; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: qdserve\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{log.read_text()[-2000:]}")
            try:
                return httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 30, "prometheus ready")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def captured_logs(
    fmt: str = "json", level: str = "INFO", tty: bool = False
) -> Iterator[io.StringIO]:
    """Configure the service's logging as `serve()` does, writing to a buffer instead of
    stderr; restore the `qdserve` logger afterwards (other tests rely on propagation)."""
    from engine.logs import configure_logging

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    buf = Stream()
    logger = logging.getLogger("qdserve")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    real_stderr = sys.stderr
    sys.stderr = buf
    try:
        configure_logging(level, fmt)
        yield buf
    finally:
        sys.stderr = real_stderr
        logger.handlers[:], logger.level, logger.propagate = saved


def access_lines(buf: io.StringIO, rid: str) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if rid in line]


# -- (a) a real Prometheus scrapes the service -------------------------------------------------
def test_prometheus_scrapes_request_counts_and_histograms_per_backend(
    server: Server, prometheus: Prometheus
) -> None:
    req = f'qds_requests_total{{endpoint="{IMG}",status="200"}}'
    # Baseline: a scrape after anything earlier tests did.
    prometheus.wait_scraped_after(time.time())
    before_requests = prometheus.scalar(f"sum({req})")
    count_q = "sum by (backend) (qds_inference_duration_seconds_count)"
    before_counts = prometheus.by(count_q, "backend")
    before_images = prometheus.by("sum by (backend) (qds_images_generated_total)", "backend")
    scraped = series(scrape(server))

    sent = {"none": 3, "quanto": 2}
    for backend, k in sent.items():
        for _ in range(k):
            r = generate(server, QUANTO if backend == "quanto" else {})
            assert r.status_code == 200, r.text
            assert r.json()["backend"] == backend
    wait_counted(server, scraped, sum(sent.values()), endpoint=IMG, status="200")
    prometheus.wait_scraped_after(time.time())

    # The request count through PromQL equals what was sent.
    assert prometheus.scalar(f"sum({req})") - before_requests == sum(sent.values())
    # A latency histogram per backend with one observation per request, and its +Inf bucket
    # equal to its count.
    counts = prometheus.by(count_q, "backend")
    inf = prometheus.by(
        'sum by (backend) (qds_inference_duration_seconds_bucket{le="+Inf"})', "backend"
    )
    sums = prometheus.by("sum by (backend) (qds_inference_duration_seconds_sum)", "backend")
    images = prometheus.by("sum by (backend) (qds_images_generated_total)", "backend")
    for backend, k in sent.items():
        assert counts[backend] - before_counts.get(backend, 0) == k, counts
        assert inf[backend] == counts[backend]
        assert sums[backend] > 0
        assert images[backend] - before_images.get(backend, 0) == k
    # The quanto series carry its quant type; the buckets reach minutes.
    rows = prometheus.query('qds_inference_duration_seconds_count{backend="quanto"}')
    assert [row["metric"]["quant_type"] for row in rows] == ["int8"]
    les = {
        row["metric"]["le"]
        for row in prometheus.query('qds_inference_duration_seconds_bucket{backend="none"}')
    }
    assert {"0.01", "60.0", "600.0", "+Inf"} <= les
    assert prometheus.scalar('qds_model_ready{job="qdserve"}') == 1


# -- (b) /metrics with prometheus-client's parser ------------------------------------------
def test_counters_and_histograms_match_the_requests(server: Server) -> None:
    before = series(scrape(server))
    requests = [({}, 1), ({}, 1), (QUANTO, 2)]  # (body, n): 3 requests, 4 images
    for body, n in requests:
        r = generate(server, {**body, "n": n})
        assert r.status_code == 200, r.text
    after = wait_counted(server, before, len(requests), endpoint=IMG, status="200")

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    k = len(requests)
    assert delta("qds_requests_total", endpoint=IMG, status="200") == k
    assert delta("qds_request_duration_seconds_count", endpoint=IMG, status="200") == k
    assert delta("qds_cache_hits_total") == k
    assert delta("qds_cache_misses_total") == 0
    assert delta("qds_images_generated_total", backend="none") == 2
    assert delta("qds_images_generated_total", backend="quanto") == 2
    # One inference and queue-wait observation per request, and (requests sent one at a time,
    # so no step is shared) one step observation per denoising step of each.
    for backend, calls in (("none", 2), ("quanto", 1)):
        assert delta("qds_inference_duration_seconds_count", backend=backend) == calls
        assert delta("qds_queue_wait_seconds_count", backend=backend) == calls
        steps = SMALL["num_inference_steps"] * calls
        assert delta("qds_step_duration_seconds_count", backend=backend) == steps
    assert delta("qds_inference_duration_seconds_sum", backend="quanto") > 0

    # Every histogram series: cumulative buckets, +Inf bucket == _count.
    for family in text_string_to_metric_families(scrape(server)):
        if family.type != "histogram":
            continue
        by_labels: dict[tuple, dict[str, Any]] = {}
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            entry = by_labels.setdefault(labels, {"buckets": []})
            if s.name.endswith("_bucket"):
                entry["buckets"].append((float(s.labels["le"]), s.value))
            else:
                entry[s.name.rsplit("_", 1)[1]] = s.value
        assert by_labels, family.name
        for labels, entry in by_labels.items():
            buckets = sorted(entry["buckets"])
            values = [v for _, v in buckets]
            assert values == sorted(values), (family.name, labels)
            assert buckets[-1][0] == float("inf")
            assert buckets[-1][1] == entry["count"], (family.name, labels)

    # Loads: one success per variant; real storage bytes per component, smaller when quantized.
    for backend in ("none", "quanto"):
        assert total(after, "qds_model_loads_total", backend=backend, outcome="success") == 1
    none_t = total(after, "qds_model_memory_bytes", backend="none", component="transformer")
    quanto_t = total(after, "qds_model_memory_bytes", backend="quanto", component="transformer")
    assert 0 < quanto_t < none_t
    assert total(after, "qds_cache_entries") == 2
    assert total(after, "qds_queue_depth") == 0


def test_prompt_cache_hits_and_misses_are_exported(server: Server) -> None:
    prompt = f"cached-{uuid.uuid4().hex}"
    before = series(scrape(server))
    for _ in range(2):  # the same prompt twice: encoded once, reused once
        assert generate(server, {"prompt": prompt}).status_code == 200
    names = ("qds_prompt_cache_hits_total", "qds_prompt_cache_misses_total")

    def reported() -> Series | None:
        # The engine reports its counters with its next message (at the latest when idle).
        now = series(scrape(server))
        return now if total(now, names[0]) > total(before, names[0]) else None

    after = wait_for(reported, 10, "the prompt cache hit")
    hits, misses = (total(after, n) - total(before, n) for n in names)
    assert (hits, misses) == (1, 1)
    assert total(after, "qds_prompt_cache_bytes") > 0


def test_label_sets_are_bounded(server: Server) -> None:
    secret = uuid.uuid4().hex
    before = series(scrape(server))
    for body in ({}, QUANTO):
        r = generate(
            server,
            {**body, "prompt": f"prompt-{secret}", "user": f"user-{secret}"},
            f"rid-{secret}",
        )
        assert r.status_code == 200, r.text
    with server.client() as c:
        assert c.get(f"/no/such/path/{secret}").status_code == 404
    wait_counted(server, before, 1, endpoint="other", status="404")
    text = scrape(server)
    # No prompt, user, request id or raw path anywhere in the exposition.
    assert secret not in text

    documented = documented_labels()
    qds = server.qds
    keys = qds.cache.loaded_keys()
    # Route templates (FastAPI >= 0.165 nests included routers: take them from the schema).
    routes = set(server.app.openapi()["paths"])
    allowed = {
        "endpoint": routes | {"other"},
        "backend": {k.backend for k in keys},
        "quant_type": {k.quant_type or "" for k in keys},
        "model": {qds.model_id},
        "component": {c for e in qds.cache.entries() for c in e.components},
        "kind": ERROR_KINDS,
        "reason": {"client_gone", "timeout", "shutdown"},
        "outcome": {"success", "failure"},
    }
    from service.metrics import build_labels

    seen = set()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("qds_"):
            continue
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        name = family.name + suffix
        seen.add(name)
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        want = documented[name]
        if want is None:  # build info: one label per library version
            assert labels == set(build_labels())
            assert {"version", "torch", "diffusers", "device"} <= labels
            continue
        if family.samples:
            assert labels == want, name
        for s in family.samples:
            for key, value in s.labels.items():
                if key == "status":
                    assert re.fullmatch(r"[1-5]\d\d", value), (name, value)
                elif key in allowed:
                    assert value in allowed[key], (name, key, value)
                elif key == "device":
                    assert re.fullmatch(r"cuda:\d+", value)
    assert {"qds_requests_total", "qds_inference_duration_seconds"} <= seen


def test_validation_and_rejection_are_answered_and_counted_by_status(server: Server) -> None:
    before = series(scrape(server))
    r = generate(server, {"n": 99})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    _queue_full(server)
    after = wait_counted(server, before, 1, endpoint=IMG, status="429")
    assert (
        total(after, "qds_requests_total", endpoint=IMG, status="400")
        - total(before, "qds_requests_total", endpoint=IMG, status="400")
        == 1
    )


def test_error_counter_counts_by_kind(server: Server) -> None:
    before = series(scrape(server))
    assert generate(server, {"n": 99}).status_code == 400
    _queue_full(server)
    after = wait_counted(server, before, 1, endpoint=IMG, status="429")
    for kind in ("validation", "rejected"):
        assert (
            total(after, "qds_errors_total", kind=kind)
            - total(before, "qds_errors_total", kind=kind)
            == 1
        ), kind


def _queue_full(server: Server) -> None:
    """Hold the engine, fill the one-slot queue, get one 429; then let both through."""
    scheduler = server.qds.scheduler
    arrived: list[int] = []
    gate = threading.Event()

    def hold(_batch: list) -> None:
        arrived.append(1)
        gate.wait(30)

    scheduler.before_batch = hold
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(generate, server, {})
            wait_for(lambda: arrived, 20, "first request running")
            queued = pool.submit(generate, server, {})
            wait_for(lambda: server.qds.queue_depth() == 1, 20, "second request queued")
            r = generate(server, {})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            gate.set()
            assert running.result(30).status_code == 200
            assert queued.result(30).status_code == 200
    finally:
        scheduler.before_batch = None
        gate.set()


# -- (c) logs ----------------------------------------------------------------------------------
def test_json_access_line_per_request(server: Server) -> None:
    rid, bad = f"obs-json-{uuid.uuid4().hex[:8]}", f"obs-bad-{uuid.uuid4().hex[:8]}"
    with captured_logs("json") as buf:
        assert generate(server, {**QUANTO, "n": 2}, rid).status_code == 200
        assert generate(server, {"n": 99}, bad).status_code == 400
        wait_for(lambda: access_lines(buf, bad), 10, "access lines")
        assert generate(server, {}, rid + "-x").status_code == 200
        wait_for(lambda: access_lines(buf, rid + "-x"), 10, "access lines")
    records = [json.loads(line) for line in buf.getvalue().splitlines()]  # all JSON
    mine = [r for r in records if r.get("request_id") == rid]
    assert len(mine) == 1, mine
    line = mine[0]
    assert line["logger"] == "qdserve.access" and line["level"] == "INFO"
    assert line["method"] == "POST" and line["path"] == IMG and line["status"] == 200
    assert line["backend"] == "quanto" and line["quant_type"] == "int8"
    assert line["model"] == server.qds.model_id
    assert line["images"] == 2 and line["size"] == "32x32"
    assert line["queue_s"] >= 0 and line["inference_s"] > 0
    assert line["duration_s"] >= line["inference_s"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    (err,) = [r for r in records if r.get("request_id") == bad]
    assert err["status"] == 400 and "backend" not in err


def test_text_format_and_level_from_the_environment(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import ServiceSettings

    rid = f"obs-text-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("QDS_LOG_FORMAT", "text")
    settings = ServiceSettings()
    with captured_logs(settings.log_format, settings.log_level) as buf:
        assert generate(server, {}, rid).status_code == 200
        (line,) = wait_for(lambda: access_lines(buf, rid), 10, "text access line")
    assert not line.startswith("{")
    assert re.match(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO qdserve.access \[{rid}\] "
        rf"POST {IMG} 200 \d+\.\d{{3}}s ",
        line,
    ), line
    for field in ("backend=none", f"model={server.qds.model_id}", "images=1", "size=32x32"):
        assert field in line
    assert re.search(r"queue_s=[\d.e-]+ inference_s=[\d.e-]+", line), line

    # QDS_LOG_LEVEL=WARNING: no access line, warnings still written.
    rid = f"obs-warn-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("QDS_LOG_FORMAT", "json")
    monkeypatch.setenv("QDS_LOG_LEVEL", "WARNING")
    settings = ServiceSettings()
    with captured_logs(settings.log_format, settings.log_level) as buf:
        before = series(scrape(server))
        assert generate(server, {}, rid).status_code == 200
        wait_counted(server, before, 1, endpoint=IMG, status="200")
        time.sleep(0.2)  # the access line follows the count in the same block
        logging.getLogger("qdserve.test").warning("still written")
    assert rid not in buf.getvalue()
    assert [json.loads(x)["msg"] for x in buf.getvalue().splitlines()] == ["still written"]


# -- (d) model load progress -------------------------------------------------------------------
@pytest.mark.parametrize("tty", [False, True], ids=["not-a-tty", "tty"])
def test_model_load_is_logged_with_backend_and_seconds(cache_dir: Path, tty: bool) -> None:
    from engine.cache import ModelCache
    from engine.keys import key_for
    from pipelines.loader import load_pipeline
    from quantization.settings import QuantSettings

    settings = QuantSettings(cache_dir=cache_dir)
    cache = ModelCache(load_pipeline, max_entries=1, memory_budget=None)
    try:
        with captured_logs("json", tty=tty) as buf:
            cache.load(key_for(settings), settings).result(60)
    finally:
        cache.close()
        from engine.cache import _progress_bars

        _progress_bars()  # back to what this (non-terminal) stderr gets
    text = buf.getvalue()
    # In a terminal the bars share the stream: take each JSON record from where it starts.
    lines = [json.loads(x[x.index('{"ts"') :]) for x in text.splitlines() if '{"ts"' in x]
    cache_lines = [x for x in lines if x["logger"] == "qdserve.cache"]
    assert [x["msg"].split()[0] for x in cache_lines] == ["loading", "loaded"], cache_lines
    start, end = cache_lines
    for line in (start, end):
        assert line["backend"] == "none" and line["model"] == key_for(settings).model
    assert end["load_s"] > 0 and end["storage_bytes"] > 0
    assert re.search(r" in \d+\.\d\ds ", end["msg"])
    # diffusers' "Loading pipeline components" bar: in a terminal only.
    assert ("Loading pipeline components" in text) is tty


# -- docs -----------------------------------------------------------------------------------
def test_observability_doc_has_the_generated_metric_table() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from doc_blocks import read_block
    from metrics_table import BLOCK, DOC, render

    assert read_block(DOC, BLOCK) == render(), "run: python tools/metrics_table.py --write"
