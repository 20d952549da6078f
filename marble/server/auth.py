"""The optional API key: every route but /health requires it.

Accepted as `Authorization: Bearer KEY` (the openai client), as HTTP Basic with KEY as the
password and any user name (webuiapi's `username`/`password`, and a browser's own login prompt,
which then covers the web UI's fetches), or as `X-API-Key: KEY`.
"""
from __future__ import annotations

import base64
import binascii
import hmac
from typing import Callable

OPEN_PATHS = frozenset({"/health"})


def presented_keys(headers: dict[bytes, bytes]) -> list[bytes]:
    """Every key the request offers, in the three accepted forms."""
    keys = []
    if b"x-api-key" in headers:
        keys.append(headers[b"x-api-key"].strip())
    scheme, _, value = headers.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer":
        keys.append(value.strip())
    elif scheme.lower() == b"basic":
        try:
            _user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            keys.append(password)
        except (binascii.Error, ValueError):
            pass
    return keys


class ApiKeyAuth:
    """ASGI middleware: 401 (with a Basic challenge, so browsers ask) unless the key matches."""

    def __init__(self, app, api_key: str, respond: Callable):
        self.app, self.key, self.respond = app, api_key.encode(), respond

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        # compare_digest on every candidate: the time taken does not depend on the key's content
        if any(hmac.compare_digest(k, self.key) for k in presented_keys(headers)):
            return await self.app(scope, receive, send)
        response = self.respond(scope["path"], 401, "a valid API key is required (Authorization: Bearer KEY)")
        response.headers["WWW-Authenticate"] = 'Basic realm="marble", charset="UTF-8"'
        await response(scope, receive, send)
