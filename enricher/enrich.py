"""One event through the rules: the pure enrichment step shared by file and stream modes."""

from __future__ import annotations

from dataclasses import dataclass

from enricher.codecs.tracker import TrackerEvent, merge_entities, schema_family
from enricher.entities import (
    APPLICATION_LIFECYCLE_SCHEMA,
    CLIENT_SESSION_SCHEMA,
    SelfDescribing,
    session_entities,
)
from enricher.errors import BadInput
from enricher.session import SessionEngine, SessionState, Step


def check_not_ahead(time_ms: int, reference_ms: int, max_ahead_ms: int) -> None:
    """Refuse an event time more than ``max_ahead_ms`` ahead of ``reference_ms`` (the record's
    Kafka timestamp; in file mode, the run's reference time). Such an event would become its
    device's clock, and every later real event would join its session. A reference of 0 or
    less is unknown (a record without a timestamp): then only the codec's bounds apply."""
    if reference_ms > 0 and time_ms - reference_ms > max_ahead_ms:
        raise BadInput(
            "future_timestamp",
            f"the event time is {(time_ms - reference_ms) / 1000:.0f}s ahead of the reference"
            f" time {reference_ms} (at most {max_ahead_ms / 1000:.0f}s allowed)",
        )


@dataclass(frozen=True, slots=True)
class EntityOptions:
    """Which entities the enricher attaches, and what happens to the tracker's own."""

    session_context: bool = True
    lifecycle_context: bool = False
    keep_tracker_entities: bool = False


@dataclass(frozen=True, slots=True)
class Enriched:
    """An event and the entities the enricher attached to it."""

    event: TrackerEvent
    entities: list[SelfDescribing]

    @property
    def contexts(self) -> list[SelfDescribing]:
        """The event's contexts as published: the tracker's with the enricher's merged in."""
        return merge_entities(self.event.contexts, self.entities)

    def entity(self, schema: str) -> SelfDescribing | None:
        for entity in self.entities:
            if entity["schema"] == schema:
                return entity
        return None

    @property
    def client_session(self) -> SelfDescribing | None:
        return self.entity(CLIENT_SESSION_SCHEMA)

    @property
    def application_lifecycle(self) -> SelfDescribing | None:
        return self.entity(APPLICATION_LIFECYCLE_SCHEMA)


class Enricher:
    """Applies the session rules to an event and picks the entities to attach."""

    __slots__ = ("engine", "options")

    def __init__(self, engine: SessionEngine, options: EntityOptions | None = None) -> None:
        self.engine = engine
        self.options = options or EntityOptions()

    def enrich(
        self,
        device_id: str,
        state: SessionState | None,
        event: TrackerEvent,
        renew_requests: int = 0,
    ) -> tuple[Step, Enriched]:
        step = self.engine.advance(device_id, state, event.facts, renew_requests)
        entities = session_entities(
            step.state,
            storage_mechanism=self.engine.config.storage_mechanism,
            session_context=self.options.session_context,
            lifecycle_context=self.options.lifecycle_context,
        )
        if self.options.keep_tracker_entities and event.contexts:
            present = {schema_family(context.get("schema")) for context in event.contexts}
            entities = [e for e in entities if schema_family(e["schema"]) not in present]
        return step, Enriched(event, entities)
