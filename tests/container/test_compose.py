"""The compose stack up for real with the `cpu` profile: qdserve:cpu plus Prometheus built from
Debian's package on the same local base. Prometheus must scrape the service (a request made
here shows up in qds_requests_total through Prometheus's HTTP API) and load the alert rules.

Opt-in (QDSERVE_CONTAINER_TESTS=1) like the rest of tests/container; needs `make image` first.
Grafana is left out: Debian does not package it (tests/test_deploy.py checks its dashboard).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import yaml
from dockerctl import (
    BASE_IMAGE,
    IMAGE,
    ROOT,
    SKIP,
    compose,
    free_port,
    require_image,
    unique,
    wait_for,
)

pytestmark = [SKIP, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, str]]:
    require_image(IMAGE)
    require_image(BASE_IMAGE)
    project = unique("qdstest")
    env = {
        "QDSERVE_BASE_IMAGE": BASE_IMAGE,
        "QDSERVE_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "QDS_TORCH_THREADS": "1",
        "COMPOSE_PROFILES": "cpu",
    }
    # Prometheus's image builds once (cached after); qdserve:cpu is `make image`'s.
    compose(project, env, "build", "prometheus", timeout=900)
    try:
        compose(project, env, "up", "-d", "--no-build")
        yield {
            "qdserve": f"http://127.0.0.1:{env['QDSERVE_PORT']}",
            "prometheus": f"http://127.0.0.1:{env['PROMETHEUS_PORT']}",
        }
    finally:
        compose(project, env, "down", "-v", "--remove-orphans", timeout=300)


def _query(prometheus: str, expr: str) -> list[dict]:
    res = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    res.raise_for_status()
    return res.json()["data"]["result"]


def test_prometheus_scrapes_a_request_made_here(stack: dict[str, str]) -> None:
    qdserve, prometheus = stack["qdserve"], stack["prometheus"]
    wait_for(
        lambda: httpx.get(f"{qdserve}/readyz", timeout=5).status_code == 200,
        300,
        "qdserve /readyz",
    )
    res = httpx.post(
        f"{qdserve}/v1/generate", json={"prompt": "a green triangle", "seed": 7}, timeout=120
    )
    assert res.status_code == 200, res.text
    expr = 'qds_requests_total{job="qdserve",endpoint="/v1/generate",status="200"}'
    # The scrape interval is 15 s: the sample arrives within two scrapes.
    series = wait_for(lambda: _query(prometheus, expr), 90, f"Prometheus series {expr}")
    assert float(series[0]["value"][1]) >= 1
    assert series[0]["metric"]["namespace"] == "compose"
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]
    qds = [t for t in targets["activeTargets"] if t["labels"]["job"] == "qdserve"]
    assert [t["health"] for t in qds] == ["up"], qds


def test_prometheus_loads_the_alert_rules(stack: dict[str, str]) -> None:
    wanted = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    res = wait_for(
        lambda: httpx.get(f"{stack['prometheus']}/api/v1/rules", timeout=10).json(),
        60,
        "Prometheus /api/v1/rules",
    )
    groups = {g["name"]: g for g in res["data"]["groups"]}
    assert set(groups) == {g["name"] for g in wanted["groups"]}
    for group in wanted["groups"]:
        loaded = groups[group["name"]]["rules"]
        names = [r.get("alert") or r.get("record") for r in group["rules"]]
        assert [r["name"] for r in loaded] == names
    alerts = [r for g in groups.values() for r in g["rules"] if r["type"] == "alerting"]
    assert alerts, "rules.yml defines alerts"
