"""The session HTTP API on the service's port.

* ``GET /v1/devices/{device_id}/session``: the device's session (JSON), 404 for a device
  never seen;
* ``POST /v1/devices/{device_id}/session/renew``: off unless enabled, and then only with
  ``Authorization: Bearer <token>``; the device's next event starts a new session.
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
    """Routes ``/v1/devices/...`` requests to a :class:`SessionLookup`."""

    prefix = _PREFIX

    def __init__(self, lookup: SessionLookup, *, renew_token: str | None) -> None:
        self.lookup = lookup
        self.renew_token = renew_token

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        rest = path.split("?", 1)[0][len(_PREFIX) :]
        device_part, _, action = rest.partition("/")
        device = unquote(device_part)
        if not device:
            return _json(404, {"error": "no device id in the path"})
        if action == "session" and method == "GET":
            view = self.lookup.get(device)
            if view is None:
                return _json(404, {"error": "unknown device", "device_id": device})
            return _json(200, view.as_dict())
        if action == "session/renew" and method == "POST":
            return self._renew(device, headers)
        return _json(404, {"error": "not found"})

    def _renew(self, device: str, headers: dict[str, str]) -> Response:
        if self.renew_token is None:
            return _json(403, {"error": "renew is disabled (ENRICHER_SESSION_API_RENEW)"})
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.encode(), self.renew_token.encode()
        ):
            return _json(401, {"error": "a valid bearer token is required"})
        self.lookup.renew(device)
        return _json(202, {"device_id": device, "renew": "the next event starts a new session"})
