"""The playground page: GET /playground (and / redirects there), three static files.

The page (service/playground/: index.html, playground.js, playground.css) is plain HTML and
JavaScript with no build step and no third-party code; it calls this service's own API from
the browser (GET /v1/models, POST /v1/images/generations and /v1/images/edits with
`stream: true`) with the bearer key typed into it, so it needs no credentials of its own and
serves no data. `QDS_PLAYGROUND=false` leaves these routes out (app.py).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse

PAGE_DIR = Path(__file__).resolve().parent.parent / "playground"
PAGE_URL = "/playground"
# The files behind /playground/<name>, and their media types (nothing else is served).
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
# What the page may load and call: itself only. Images arrive as data: URLs (base64 in the
# API's JSON), the edit input and mask are drawn on canvases (blob: previews).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # The page is small and changes with the service version: always revalidate.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path') or ''}{PAGE_URL}", status_code=307)


@router.get(PAGE_URL)
async def page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get(PAGE_URL + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no playground file {name!r}")
    return FileResponse(PAGE_DIR / name, media_type=ASSETS[name], headers=HEADERS)
