"""Bearer credentials: the API key for ``/v1/*`` and ``/generate``, the admin token for ``/admin/*``.

Both are compared as SHA-256 digests with ``hmac.compare_digest``: comparing the raw strings returns
early on a length mismatch and so tells a caller how long the secret is; fixed-length digests do not.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.entrypoints.state import RequestError


def secrets_match(given: str, expected: str) -> bool:
    """Constant-time equality that does not depend on (or reveal) the secrets' lengths."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def bearer(request: Request) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` header, if any."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


def require_api_key(request: Request) -> None:
    """With ``--api-key`` / ``MIXSERVE_API_KEY`` set, the inference endpoints need it (vLLM's convention)."""
    key = request.app.state.config.api_key
    if key is None:
        return
    given = bearer(request)
    if given is None:
        raise RequestError(401, "this server needs an API key: send 'Authorization: Bearer <key>'", None,
                           "missing_api_key")  # fmt: skip
    if not secrets_match(given, key):
        raise RequestError(401, "invalid API key", None, "invalid_api_key")
