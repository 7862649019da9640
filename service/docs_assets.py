"""/docs (Swagger UI) and /redoc served from assets shipped in a Python package, not a CDN.

FastAPI's default docs pages load Swagger UI's and ReDoc's JavaScript and CSS from
cdn.jsdelivr.net (and a favicon from fastapi.tiangolo.com), so on an air-gapped machine
/docs is a blank page. The `fastapi-offline` distribution carries those files; this module
mounts them under `/docs-assets` and builds the two pages with FastAPI's own HTML helpers
pointed at them. Nothing on either page reaches outside this server: Swagger UI's spec
validator badge (validator.swagger.io) is turned off, and ReDoc is told not to load Google
Fonts, and both pages carry a Content-Security-Policy that lets them load from this server
only (ReDoc's sidebar shows a logo from cdn.redoc.ly that no option turns off: the browser
does not even ask for it, and ReDoc hides the image that failed). `QDS_DOCS=false` leaves
all of it (and /openapi.json) out.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"
# Swagger UI's parameters: no validator badge (it would fetch validator.swagger.io), the
# operations open at their summaries.
SWAGGER_PARAMETERS = {"validatorUrl": None, "docExpansion": "list", "defaultModelsExpandDepth": 0}
# This server only. FastAPI's pages start the UIs with an inline script, and both UIs style
# themselves inline; ReDoc runs its search in a worker made from a blob: URL.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; base-uri 'self'; "
    "frame-ancestors 'none'"
)


def assets_dir() -> Path:
    """The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def install_docs(app: FastAPI) -> None:
    """Add /docs, its OAuth2 redirect page, /redoc and the asset mount to `app` (created with
    docs_url=None and redoc_url=None)."""
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the docs pages need the OpenAPI schema (openapi_url)")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or f"{DOCS_URL}/oauth2-redirect"
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")

    def root(request: Request) -> str:
        # Behind a proxy that strips a prefix (uvicorn --root-path), links keep the prefix.
        return str(request.scope.get("root_path") or "")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = root(request)
        return _local_only(
            get_swagger_ui_html(
                openapi_url=prefix + openapi_url,
                title=f"{app.title} - API documentation",
                oauth2_redirect_url=prefix + oauth2_redirect_url,
                swagger_js_url=f"{prefix}{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{prefix}{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{prefix}{ASSETS_URL}/favicon.png",
                swagger_ui_parameters=SWAGGER_PARAMETERS,
            )
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        prefix = root(request)
        return _local_only(
            get_redoc_html(
                openapi_url=prefix + openapi_url,
                title=f"{app.title} - API reference",
                redoc_js_url=f"{prefix}{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{prefix}{ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )
