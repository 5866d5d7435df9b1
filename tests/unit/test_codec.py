"""The Avro codec: round trips, single-object framing, schema evolution, bad bytes."""

from __future__ import annotations

import copy
import io

import fastavro
import pytest

from streams.codec import MAGIC, SCHEMA_DIR, EventCodec, default_codec, load_schema_file
from streams.errors import DecodeError, UnknownSchemaError
from streams.events import ALL_EVENTS, PromotionRequested, RequestReceived, WorkflowCompleted
from tests.samples import sample_event


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.topic)
def test_round_trip_every_event_type(cls):
    codec = default_codec()
    event = sample_event(cls)
    data = codec.encode(event)
    assert codec.decode(data, topic=cls.topic) == event


def test_single_object_header_is_magic_then_fingerprint():
    codec = default_codec()
    data = codec.encode(sample_event(RequestReceived))
    assert data[:2] == MAGIC == b"\xc3\x01"
    assert data[2:10] == codec.fingerprint_for("request_received")
    # The body after the header is plain Avro binary of the writer schema.
    body = fastavro.schemaless_reader(
        io.BytesIO(data[10:]), fastavro.parse_schema(codec.schema_for("request_received"))
    )
    assert body["message"] == "message-value"


def test_fingerprint_matches_the_avro_spec_vector():
    # CRC-64-AVRO of the schema "null" is 7195948357588979594 (Avro spec test vector),
    # written little-endian in the single-object header.
    from streams.codec import _fingerprint

    parsed = fastavro.parse_schema("null")
    assert int.from_bytes(_fingerprint(parsed), "little") == 7195948357588979594


def _old_schema(topic: str, drop: str) -> dict:
    raw = copy.deepcopy(load_schema_file(SCHEMA_DIR / f"{topic}.avsc"))
    raw["fields"] = [f for f in raw["fields"] if f["name"] != drop]
    return raw


def test_new_reader_reads_old_bytes_and_fills_the_default():
    # An old writer that did not have `automation_id` yet.
    old = _old_schema("workflow_completed", "automation_id")
    old_writer = EventCodec({"workflow_completed": old})
    event = sample_event(WorkflowCompleted, automation_id=None)
    old_bytes = old_writer.encode(event)

    new_reader = EventCodec.from_directory(extra_writers=[old])
    decoded = new_reader.decode(old_bytes, topic="workflow_completed")
    assert decoded.automation_id is None
    assert decoded.text == event.text

    # Without the old schema known, the reader says so instead of guessing.
    with pytest.raises(UnknownSchemaError, match="unknown writer schema fingerprint"):
        EventCodec.from_directory().decode(old_bytes, topic="workflow_completed")


def test_old_reader_reads_new_bytes_and_ignores_the_new_field():
    old = _old_schema("workflow_completed", "automation_id")
    new = load_schema_file(SCHEMA_DIR / "workflow_completed.avsc")
    new_writer = EventCodec.from_directory()
    event = sample_event(WorkflowCompleted, automation_id="auto-1")
    new_bytes = new_writer.encode(event)

    old_reader = EventCodec({"workflow_completed": old}, extra_writers=[new])
    name, record = old_reader.decode_record(new_bytes, topic="workflow_completed")
    assert name == "orchestrator.events.WorkflowCompleted"
    assert "automation_id" not in record
    assert record["text"] == event.text and record["run_id"] == event.run_id


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "missing C3 01 header"),
        (b'{"json": true}', "missing C3 01 header"),
        (MAGIC + b"\x00" * 8 + b"body", "unknown writer schema fingerprint"),
    ],
)
def test_bad_bytes_raise_one_error_type_with_reason_and_topic(data, reason):
    with pytest.raises(DecodeError) as info:
        default_codec().decode(data, topic="request_received")
    assert reason in info.value.reason
    assert info.value.topic == "request_received"
    assert "request_received" in str(info.value)


def test_truncated_body_is_a_decode_error():
    data = default_codec().encode(sample_event(RequestReceived))
    with pytest.raises(DecodeError, match="corrupt Avro body"):
        default_codec().decode(data[:15], topic="request_received")


def test_valid_avro_that_breaks_a_rule_is_a_decode_error():
    codec = default_codec()
    good = sample_event(RequestReceived)
    # Write a record the model refuses (empty message) straight through fastavro.
    record = good.model_dump() | {"message": "   "}
    buf = io.BytesIO()
    fastavro.schemaless_writer(
        buf, fastavro.parse_schema(codec.schema_for("request_received")), record
    )
    data = MAGIC + codec.fingerprint_for("request_received") + buf.getvalue()
    with pytest.raises(DecodeError, match="message is empty"):
        codec.decode(data, topic="request_received")


def test_event_on_the_wrong_topic_is_refused():
    codec = default_codec()
    data = codec.encode(sample_event(RequestReceived))
    with pytest.raises(DecodeError, match="does not belong on this topic"):
        codec.decode(data, topic="workflow_completed")


def test_events_written_before_meta_was_added_still_decode():
    # schemas/history keeps every released version a reader may meet on a topic.
    v1 = load_schema_file(SCHEMA_DIR / "history" / "workflow_completed.v1.avsc")
    old_writer = EventCodec({"workflow_completed": v1})
    event = sample_event(WorkflowCompleted, meta={})
    decoded = default_codec().decode(old_writer.encode(event), topic="workflow_completed")
    assert decoded.meta == {}
    assert decoded.model_dump(exclude={"meta"}) == event.model_dump(exclude={"meta"})


def test_a_promotion_requested_before_scope_existed_reads_as_an_approval():
    # Before `scope`, approving a saved improvement again promoted it to every goal; one
    # still on the topic from then is read as what its sender ran: `improve approve`.
    v1 = load_schema_file(SCHEMA_DIR / "history" / "promotion_requested.v1.avsc")
    assert "scope" not in {f["name"] for f in v1["fields"]}
    old = EventCodec({"promotion_requested": v1}).encode(
        PromotionRequested(source="cli", user_id="operator", improvement_id="imp_1")
    )
    decoded = default_codec().decode(old, topic="promotion_requested")
    assert isinstance(decoded, PromotionRequested)
    assert (decoded.improvement_id, decoded.scope) == ("imp_1", "goal")


def test_a_promotion_scope_other_than_goal_or_all_is_a_decode_error():
    codec = default_codec()
    event = PromotionRequested(source="cli", user_id="operator", improvement_id="imp_1")
    buf = io.BytesIO()
    fastavro.schemaless_writer(
        buf,
        fastavro.parse_schema(codec.schema_for("promotion_requested")),
        event.model_dump() | {"scope": "everyone"},
    )
    data = MAGIC + codec.fingerprint_for("promotion_requested") + buf.getvalue()
    with pytest.raises(DecodeError, match="scope"):
        codec.decode(data, topic="promotion_requested")
