"""The Redis record format and Kafka's partitioner, as pure units."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from support import STATE_IDS, states

from enricher.partitioning import kafka_partition, murmur2
from enricher.records import NO_OFFSET, RecordCodec
from enricher.session import SessionState

IDS = STATE_IDS


@settings(max_examples=200, derandomize=True)
@given(states(), st.none() | states(), st.integers(min_value=NO_OFFSET, max_value=2**62))
def test_records_round_trip(
    state: SessionState, snapshot: SessionState | None, offset: int
) -> None:
    codec = RecordCodec(IDS)
    record = codec.unpack("device-1", codec.pack(state, offset, snapshot))
    assert record.state == state
    assert record.snapshot == snapshot
    assert record.offset == offset


@settings(max_examples=50, derandomize=True)
@given(states(), states(), st.integers(min_value=0, max_value=2**40))
def test_a_record_from_an_uncommitted_batch_yields_its_snapshot(
    state: SessionState, snapshot: SessionState, offset: int
) -> None:
    codec = RecordCodec(IDS)
    data = codec.pack(state, offset, snapshot)
    record = codec.unpack("device-1", data)
    assert record.state_before(offset + 1) == state
    assert record.state_before(offset) == snapshot
    assert record.state_before(offset - 1) == snapshot
    for start in (offset - 1, offset, offset + 1):
        assert codec.state_before("device-1", data, start) == record.state_before(start)
    assert codec.state_before("device-1", codec.pack(state, offset, None), offset) is None


def test_a_typical_record_is_compact() -> None:
    state = SessionState(
        user_id=IDS.user_id("d"),
        session_id=IDS.session_id("d", 3, "c6ef3124-b53a-4b13-a233-0088f79dcbcb"),
        session_index=3,
        previous_session_id=str(uuid.uuid4()),
        event_index=12,
        first_event_id="c6ef3124-b53a-4b13-a233-0088f79dcbcb",
        first_event_ms=1_767_246_230_664,
        last_event_ms=1_767_246_299_000,
        in_background=False,
        background_index=1,
        foreground_index=1,
    )
    # A 10-byte header and two states (now and before the batch) of 49 + 2 x 16 bytes.
    assert len(RecordCodec(IDS).pack(state, 41, state)) == 10 + 2 * (49 + 32)


def test_murmur2_matches_the_java_client() -> None:
    # Reference values from Apache Kafka's own tests of Utils.murmur2.
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    assert {key: murmur2(key) for key in cases} == cases
    assert all(0 <= kafka_partition(key, 12) < 12 for key in cases)
