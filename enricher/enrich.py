"""One event through the rules: the pure enrichment step shared by file and stream modes."""

from __future__ import annotations

from dataclasses import dataclass, field

from enricher.codecs import tracker
from enricher.codecs.tracker import TrackerEvent, merge_entities, schema_family
from enricher.entities import (
    APPLICATION_LIFECYCLE_SCHEMA,
    CLIENT_SESSION_SCHEMA,
    SelfDescribing,
    client_session_contexts,
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
    anonymous_apps: frozenset[str] = frozenset()
    """app ids whose events are tracked anonymously (:attr:`Enriched.anonymous`)"""


@dataclass(slots=True)
class Enriched:
    """An event, the state the rules gave its device, and which entities to attach: the
    entities are built once, when first asked for (:attr:`entities`), and the output fields
    (:meth:`fields`) take a shortcut for the common case. Not frozen: one is built per event,
    and a frozen dataclass costs several times as much to build."""

    event: TrackerEvent
    state: SessionState
    options: EntityOptions
    storage_mechanism: str
    anonymous: bool = False
    """the session entity as under the trackers' anonymisation: the event asked for it (a
    collector request's ``SP-Anonymous`` header) or its app is tracked anonymously"""
    _entities: list[SelfDescribing] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def entities(self) -> list[SelfDescribing]:
        """The entities the enricher attaches to the event, in attachment order."""
        if self._entities is None:
            self._entities = self._build_entities()
        return self._entities

    def _build_entities(self) -> list[SelfDescribing]:
        options, event = self.options, self.event
        entities = session_entities(
            self.state,
            storage_mechanism=self.storage_mechanism,
            session_context=options.session_context,
            lifecycle_context=options.lifecycle_context,
            anonymous=self.anonymous,
        )
        if options.keep_tracker_entities and event.contexts:
            present = {schema_family(context.get("schema")) for context in event.contexts}
            entities = [e for e in entities if schema_family(e["schema"]) not in present]
        return entities

    def fields(self, *, unicode: bool = False) -> dict[str, str]:
        """The event's fields as published: ``tracker.with_entities(event, entities)``. An
        event without contexts that gets the ``client_session`` entity alone (the default
        options) gets its ``co`` from :func:`client_session_contexts`, the same JSON with the
        session's parts formatted once per session."""
        event, options = self.event, self.options
        if (
            event.contexts_field is None
            and options.session_context
            and not options.lifecycle_context
            and not self.anonymous
        ):
            # with_entities' result, without its call: the fields with the prepared co.
            fields = dict(event.fields)
            fields["co"] = client_session_contexts(self.state, self.storage_mechanism)
            return fields
        return tracker.with_entities(event, self.entities, unicode=unicode)

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

    __slots__ = ("engine", "options", "storage_mechanism")

    def __init__(self, engine: SessionEngine, options: EntityOptions | None = None) -> None:
        self.engine = engine
        self.options = options or EntityOptions()
        self.storage_mechanism = engine.config.storage_mechanism

    def enrich(
        self,
        device_id: str,
        state: SessionState | None,
        event: TrackerEvent,
        renew_requests: int = 0,
    ) -> tuple[Step, Enriched]:
        step = self.engine.advance(device_id, state, event, renew_requests)
        options = self.options
        anonymous = event.anonymous or (
            bool(options.anonymous_apps) and event.app_id in options.anonymous_apps
        )
        return step, Enriched(event, step.state, options, self.storage_mechanism, anonymous)
