"""The local stack's layout (``ops/stacklib/layout.py``), as pure units."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator

import pytest

from stacklib import layout


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    dashed = uuid.UUID(bytes=b"\xf8" + bytes(15))  # 0b111110...: '-' in URL-safe base64
    plain = uuid.UUID(int=1)
    drawn: Iterator[uuid.UUID] = iter([dashed, plain])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(drawn))
    assert base64.urlsafe_b64encode(dashed.bytes).startswith(b"-")
    assert layout.new_cluster_id() == base64.urlsafe_b64encode(plain.bytes).rstrip(b"=").decode()
