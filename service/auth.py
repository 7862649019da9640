"""Optional bearer-key authentication (QDS_API_KEYS); health and metrics stay open."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import APIError


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless `Authorization: Bearer <one of QDS_API_KEYS>`."""
    keys = request.app.state.qds.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    # Compare against every key, without stopping early, in constant time per key: the
    # response time must not reveal how much of a key matched or which key it was.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.get_secret_value().encode())
    if scheme.lower() != "bearer" or not token or not ok:
        raise APIError(
            401,
            "missing or invalid API key; send Authorization: Bearer <key>",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
            kind="rejected",
        )
