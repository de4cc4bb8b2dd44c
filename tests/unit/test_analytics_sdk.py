"""Enriched TSV written by the ``snowplow-enriched`` format, read by Snowplow's own Python
analytics SDK (``snowplow_analytics_sdk``, a test dependency): the line stays one it accepts,
every field reads as it did, and ``client_session`` is found among the derived entities."""

from __future__ import annotations

import json
from typing import Any

from snowplow_analytics_sdk import event_transformer  # type: ignore[import-untyped]
from support import APPLICATION_ENTITY, START_MS, enriched_tsv, event_id, tracker_event

from enricher import config
from enricher.codecs.factory import codecs
from enricher.enrich import Enricher
from enricher.session import SessionConfig, SessionEngine, Timeouts

TSV = codecs(config.Settings(input_format="snowplow-enriched", output_format="snowplow-enriched"))
ENRICHER = Enricher(SessionEngine(SessionConfig("sdk-test-salt", Timeouts.from_seconds(60, 15))))
SESSION_KEY = "contexts_com_snowplowanalytics_snowplow_client_session_1"
UA_PARSER = {
    "schema": "iglu:com.snowplowanalytics.snowplow/ua_parser_context/jsonschema/1-0-0",
    "data": {"useragentFamily": "Android", "osFamily": "Android", "deviceFamily": "Pixel"},
}


def line(number: int, time_s: int, **columns: str) -> bytes:
    """A realistic enriched event: a mobile screen view with the tracker's application entity,
    a ua_parser entity Enrich derived, and the columns Enrich fills."""
    fields = tracker_event(
        event_id(number), START_MS + time_s * 1000, entities=[APPLICATION_ENTITY]
    )
    derived = json.dumps(
        {
            "schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1",
            "data": [UA_PARSER],
        }
    )
    return enriched_tsv(
        fields,
        etl_tstamp="2026-01-01 00:10:00.000",
        v_collector="ssc-3.2.0-kafka",
        v_etl="snowplow-enrich-kafka-5.0.0",
        user_ipaddress="10.0.0.1",
        domain_userid="device-1",
        geo_country="FR",
        geo_latitude="48.85",
        useragent="Snowplow/Android",
        br_cookies="1",
        derived_contexts=derived,
        derived_tstamp="2026-01-01 00:00:00.250",
        event_fingerprint="f1",
        **columns,
    )


def transform(record: bytes, **converters: Any) -> dict[str, Any]:
    known = tuple(
        (name, converters.get(name, convert))
        for name, convert in event_transformer.ENRICHED_EVENT_FIELD_TYPES
    )
    event: dict[str, Any] = event_transformer.transform(record.decode(), known_fields=known)
    return event


def test_the_sdk_reads_every_field_as_before_and_the_session_among_the_derived_entities() -> None:
    state = None
    for number, time_s in enumerate([0, 20, 200]):
        record = line(number, time_s)
        step, enriched = ENRICHER.enrich("device-1", state, TSV.decode(record))
        state = step.state
        out = TSV.encode(enriched)
        before, after = transform(record), transform(out)
        [session] = after.pop(SESSION_KEY)
        assert session == enriched.client_session["data"]  # type: ignore[index]
        assert after == before  # every other field, the tracker's and Enrich's entities
        assert before["contexts_com_snowplowanalytics_snowplow_ua_parser_context_1"]
        # Read the tracker's contexts as plain text: the session comes from derived_contexts.
        derived_only = transform(out, contexts=event_transformer.convert_string)
        assert derived_only[SESSION_KEY] == [session]
    assert session["sessionIndex"] == 2
