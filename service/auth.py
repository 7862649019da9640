"""Optional bearer-key authentication (QDS_API_KEYS); health and metrics stay open.

The matched key's position (`key1`, `key2`, ...; never the key) is left on the request for the
fair admission across keys (service.fairness). Serving without keys on an address other
than loopback is allowed but said loudly: a warning at start and on /readyz
(`no_auth_warning`). Keys configured but all empty refuse to start (service.settings).
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from service.errors import APIError

# The client identity of requests when authentication is off: one client, one share.
ANONYMOUS = ""


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless `Authorization: Bearer <one of QDS_API_KEYS>`."""
    keys = request.app.state.qds.settings.api_keys
    if not keys:
        request.state.client_key = ANONYMOUS
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    # Compare against every key, without stopping early, in constant time per key: the
    # response time must not reveal how much of a key matched or which key it was.
    ok = False
    matched = 0
    for i, key in enumerate(keys, start=1):
        same = hmac.compare_digest(token.encode(), key.get_secret_value().encode())
        ok |= same
        matched += i * same  # keys are distinct in practice; no branch on the comparison
    if scheme.lower() != "bearer" or not token or not ok:
        raise APIError(
            401,
            "missing or invalid API key; send Authorization: Bearer <key>",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
            kind="rejected",
        )
    request.state.client_key = f"key{matched}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def no_auth_warning(host: str, has_keys: bool) -> str | None:
    """The operator's warning when the API is open to more than this machine, else None."""
    if has_keys or is_loopback(host):
        return None
    return (
        f"authentication is off (QDS_API_KEYS unset) and the server listens on {host}: "
        "anyone who reaches it can use the API; set QDS_API_KEYS"
    )


def client_key(request: Request) -> str:
    """Who sent the request, for fair admission: an API key's position, "" without keys."""
    return str(getattr(request.state, "client_key", "") or "")
