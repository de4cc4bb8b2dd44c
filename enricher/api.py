"""The session HTTP API on the service's port, under ``/v1/``.

* ``GET /v1/devices/{device_id}/session``: the device's session (JSON), 404 for a device
  never seen;
* ``POST /v1/devices/{device_id}/session/renew``: off unless enabled; the device's next event
  starts a new session.

Every ``/v1/`` request needs ``Authorization: Bearer <token>`` (``ENRICHER_SESSION_API_TOKEN``):
a session id is derived from the device id and the secret salt, and the API would hand it to
anyone who knows a device id. Reads can be opened explicitly
(``ENRICHER_SESSION_API_ANONYMOUS_READS``); renew always needs the token. With no token and no
anonymous reads, the API answers 403 and says how to enable it.
"""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import unquote

from enricher.lookup import SessionLookup

_PREFIX = "/v1/devices/"
Response = tuple[int, str, bytes]


def _json(status: int, body: dict[str, Any]) -> Response:
    return status, "application/json", json.dumps(body).encode()


class SessionApi:
    """Routes ``/v1/...`` requests to a :class:`SessionLookup`."""

    prefix = "/v1/"

    def __init__(
        self,
        lookup: SessionLookup,
        *,
        token: str | None,
        renew: bool = False,
        anonymous_reads: bool = False,
    ) -> None:
        self.lookup = lookup
        self.token = token or None
        self.renew = renew
        self.anonymous_reads = anonymous_reads

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        denied = self._authorize(method, headers)
        if denied is not None:
            return denied
        path = path.split("?", 1)[0]
        if not path.startswith(_PREFIX):
            return _json(404, {"error": "not found"})
        device_part, _, action = path[len(_PREFIX) :].partition("/")
        device = unquote(device_part)
        if not device:
            return _json(404, {"error": "no device id in the path"})
        if action == "session" and method == "GET":
            view = self.lookup.get(device)
            if view is None:
                return _json(404, {"error": "unknown device", "device_id": device})
            return _json(200, view.as_dict())
        if action == "session/renew" and method == "POST":
            if not self.renew:
                return _json(403, {"error": "renew is disabled (ENRICHER_SESSION_API_RENEW)"})
            self.lookup.renew(device)
            return _json(202, {"device_id": device, "renew": "the next event starts a new session"})
        return _json(404, {"error": "not found"})

    def _authorize(self, method: str, headers: dict[str, str]) -> Response | None:
        """None if the request may go on, else the 403 or 401 to answer."""
        if method == "GET" and self.anonymous_reads:
            return None
        if self.token is None and self.anonymous_reads:
            return _json(403, {"error": "only GETs are anonymous: set ENRICHER_SESSION_API_TOKEN"})
        if self.token is None:
            return _json(
                403,
                {
                    "error": "the session API is disabled: set ENRICHER_SESSION_API_TOKEN (16+"
                    " characters) and send Authorization: Bearer <token>, or set"
                    " ENRICHER_SESSION_API_ANONYMOUS_READS=true to allow GETs without a token"
                },
            )
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.token.encode()
        ):
            return _json(401, {"error": "a valid bearer token is required"})
        return None
