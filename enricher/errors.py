"""The one error type for input that cannot be enriched.

Every decoder raises :class:`BadInput` with a short machine-readable ``reason`` (used as a
dead-letter header and a metric label, so the set is closed) and a human-readable detail.
"""

from __future__ import annotations

from typing import Literal

Reason = Literal[
    "not_json",
    "not_avro",
    "not_an_object",
    "non_string_field",
    "missing_key",
    "invalid_key",
    "missing_event_id",
    "invalid_event_id",
    "missing_timestamp",
    "invalid_timestamp",
    "invalid_ue",
    "invalid_contexts",
    "invalid_base64",
    "invalid_number",
    "too_deep",
    "unknown_schema_id",
    "oversize",
    "not_producible",
    "future_timestamp",
    "not_encodable",
    "invalid_thrift",
    "not_payload_data",
    "invalid_field_count",
    "missing_device_id",
]

REASONS: tuple[Reason, ...] = Reason.__args__  # type: ignore[attr-defined]


class BadInput(ValueError):
    """An input record that cannot be enriched; it belongs on the dead-letter path."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail


class Unavailable(RuntimeError):
    """A service the enricher depends on cannot be reached; the work is retried, not dropped."""
