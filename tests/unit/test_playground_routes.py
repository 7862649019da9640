"""The playground page and the offline docs pages as routes (no engine, no browser: the
browser tests are tests/integration/test_playground_browser.py), and their two switches."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.docs_assets import assets_dir
from service.routes.playground import ASSETS, PAGE_DIR
from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]


def _client(**settings: object) -> TestClient:
    # No `with`: the lifespan (the engine) does not start; these routes do not need it.
    return TestClient(create_app(service=ServiceSettings(**settings)))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield _client()


def test_root_redirects_to_the_page_and_the_page_loads_its_own_files(client: TestClient) -> None:
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/playground"
    page = client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    # The page names its script and style by relative URL, and both are served.
    for name, media in ASSETS.items():
        assert f'"playground/{name}"' in page.text
        r = client.get(f"/playground/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media
        assert r.content == (PAGE_DIR / name).read_bytes()
    assert client.get("/playground/index.html").status_code == 404
    assert client.get("/playground/../settings.py").status_code == 404


def test_page_files_load_nothing_from_elsewhere() -> None:
    """No CDN, no framework, no absolute URL: every file of the page is plain and local."""
    for path in PAGE_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://|//cdn|\bimport\s", text), path.name
    assert {p.name for p in PAGE_DIR.iterdir()} == {"index.html", *ASSETS}


def test_page_files_are_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["service"]
    for path in PAGE_DIR.iterdir():
        rel = path.relative_to(ROOT / "service")
        assert any(rel.match(g) for g in globs), rel


def test_docs_pages_use_the_packaged_assets(client: TestClient) -> None:
    for url in ("/docs", "/redoc"):
        r = client.get(url)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text, r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]
        for asset in re.findall(r'(?:src|href)="(/docs-assets/[^"]+)"', r.text):
            assert client.get(asset).status_code == 200, asset
    assert "swagger-ui-bundle.js" in client.get("/docs").text
    assert "redoc.standalone.js" in client.get("/redoc").text
    assert (assets_dir() / "swagger-ui-bundle.js").is_file()
    assert client.get("/docs/oauth2-redirect").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "[playground](playground)" in schema["info"]["description"]
    # The page and the asset routes are not API operations.
    assert not any(p.startswith(("/playground", "/docs")) or p == "/" for p in schema["paths"])


def test_qds_docs_false_serves_no_documentation() -> None:
    client = _client(docs=False)
    for url in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui.css"):
        assert client.get(url).status_code == 404, url
    assert client.get("/playground").status_code == 200


def test_qds_playground_false_serves_no_page() -> None:
    client = _client(playground=False)
    for url in ("/", "/playground", "/playground/playground.js"):
        assert client.get(url, follow_redirects=False).status_code == 404, url
    assert "playground" not in client.get("/openapi.json").json()["info"]["description"]
    assert client.get("/docs").status_code == 200


def test_switches_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (ServiceSettings().docs, ServiceSettings().playground) == (True, True)
    monkeypatch.setenv("QDS_DOCS", "false")
    monkeypatch.setenv("QDS_PLAYGROUND", "0")
    s = ServiceSettings()
    assert (s.docs, s.playground) == (False, False)
