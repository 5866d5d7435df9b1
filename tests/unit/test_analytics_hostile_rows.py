"""Records a producer can send that the services read one way and ClickHouse another: each
must be stored as the services read it, or dead-lettered, never stored as something else
and never stall the sink (a review of 2026-12-06 found all three; real embedded store)."""

from __future__ import annotations

import io
from pathlib import Path

import fastavro
import pytest

from services.analytics._ingest import HEADER_LEN
from services.analytics.store import ClickHouseStore, EncodedEvent
from streams import events as ev
from streams.codec import MAGIC, default_codec
from streams.errors import DecodeError
from streams.events import terminal_event_id
from tests.samples import sample_event

CODEC = default_codec()


@pytest.fixture
def store(tmp_path: Path):
    found = ClickHouseStore(path=tmp_path / "clickhouse")
    found.apply_schema()
    yield found
    found.close()


def _rows(store: ClickHouseStore) -> list[tuple[str, str]]:
    sql = "SELECT goal_id, JSONExtractString(payload, 'text') FROM events FINAL ORDER BY goal_id"
    return [tuple(r) for r in store.query(sql).rows]


def test_bytes_past_a_records_end_are_not_read_as_another_record(store: ClickHouseStore):
    # The codec ignores them; ClickHouse read them as the next record of one shared block:
    # a forged row stood where an honest event went missing, and nothing was refused.
    honest = [sample_event(ev.WorkflowCompleted, goal_id=g, text=f"{g}'s answer") for g in "abc"]
    forged = sample_event(ev.WorkflowCompleted, goal_id="victim", text="FORGED")
    first, *rest = (CODEC.encode(e) for e in honest)
    hostile = first + CODEC.encode(forged)[HEADER_LEN:]
    assert CODEC.decode(hostile, topic="workflow_completed").text == "a's answer"
    rows = [EncodedEvent("workflow_completed", v, 0, i) for i, v in enumerate([hostile, *rest])]
    store.insert(rows)  # stored as the services read it, or refused: never the forgery
    assert ("victim", "FORGED") not in _rows(store)
    assert {("b", "b's answer"), ("c", "c's answer")} <= set(_rows(store))


def _llm_cost_body(ok: bytes = b"\x01") -> bytes:
    """An llm_call_completed body written by hand, its boolean as given."""
    event = sample_event(ev.LlmCallCompleted, goal_id="g1", ok=True)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, CODEC._current["llm_call_completed"].parsed, event.model_dump())  # noqa: SLF001
    canonical = buf.getvalue()
    # The boolean `ok` sits right before the trailing fields; find it by writing ok=False too.
    buf = io.BytesIO()
    other = event.model_copy(update={"ok": False}).model_dump()
    fastavro.schemaless_writer(buf, CODEC._current["llm_call_completed"].parsed, other)  # noqa: SLF001
    flipped = buf.getvalue()
    (at,) = [i for i, (x, y) in enumerate(zip(canonical, flipped, strict=True)) if x != y]
    return canonical[:at] + ok + canonical[at + 1 :]


def test_a_record_the_codec_reads_and_clickhouse_does_not_is_stored_as_the_codec_writes_it(
    store: ClickHouseStore,
):
    # A boolean written as byte 2 is true to the codec and refused by ClickHouse: the sink
    # once retried that batch for ever, every later event waiting behind it.
    value = MAGIC + CODEC.fingerprint_for("llm_call_completed") + _llm_cost_body(b"\x02")
    event = CODEC.decode(value, topic="llm_call_completed")
    assert event.ok is True
    assert store.insert([EncodedEvent("llm_call_completed", value, 0, 1)]) == []
    where = f"event_id = '{event.event_id}'"
    sql = f"SELECT JSONExtractBool(payload, 'ok') FROM events FINAL WHERE {where}"
    assert [tuple(r) for r in store.query(sql).rows] == [(True,)]


def test_a_record_on_one_topic_cannot_replace_another_topics_row(store: ClickHouseStore):
    # The table's key is (event_type, event_key): a feedback record naming itself a
    # workflow_completed, with a run's terminal event id, once replaced that run's outcome.
    run = "3f1c2b9e-0000-4000-8000-00000000beef"
    done = sample_event(
        ev.WorkflowCompleted, run_id=run, goal_id="victim", text="real answer"
    ).model_copy(update={"event_id": terminal_event_id(run)})
    store.insert([EncodedEvent("workflow_completed", CODEC.encode(done), 0, 1)])
    feedback = sample_event(ev.FeedbackReceived, run_id=run, goal_id="evil", score=1)
    body = feedback.model_dump() | {"event_type": "workflow_completed", "event_id": done.event_id}
    buf = io.BytesIO()
    buf.write(MAGIC + CODEC.fingerprint_for("feedback_received"))
    fastavro.schemaless_writer(buf, CODEC._current["feedback_received"].parsed, body)  # noqa: SLF001
    store.insert([EncodedEvent("feedback_received", buf.getvalue(), 0, 2)])
    sql = f"SELECT event_type, goal_id FROM events FINAL WHERE run_id = '{run}' ORDER BY 1"
    assert [tuple(r) for r in store.query(sql).rows] == [
        ("feedback_received", "evil"),
        ("workflow_completed", "victim"),
    ]


def _with(model: type[ev.Event], **fields: object) -> bytes:
    """A current-schema record of ``model`` holding values its own checks refuse."""
    event = sample_event(model)
    body = event.model_dump() | fields
    buf = io.BytesIO()
    buf.write(MAGIC + CODEC.fingerprint_for(event.topic))
    fastavro.schemaless_writer(buf, CODEC._current[event.topic].parsed, body)  # noqa: SLF001
    return buf.getvalue()


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (ev.LlmCallCompleted, {"cost_usd": -1000.0}),
        (ev.LlmCallCompleted, {"cost_usd": float("inf")}),
        (ev.LlmCallCompleted, {"prompt_tokens": -5}),
        (ev.WorkflowCompleted, {"latency_ms": -1.0}),
        (ev.WorkflowCompleted, {"goal_id": "other/goal"}),
        (ev.FeedbackReceived, {"user_id": "-x"}),
    ],
)
def test_values_every_service_refuses_are_not_stored_either(
    store: ClickHouseStore, model: type[ev.Event], fields: dict[str, object]
):
    # The fast path gave ClickHouse a current-schema record's bytes unchecked: a cost of
    # -1000 for a victim goal was stored and counted, though every service refused it.
    value = _with(model, **fields)
    with pytest.raises(DecodeError):
        CODEC.decode(value, topic=model.topic)
    rejected = store.insert([EncodedEvent(model.topic, value, 0, 1)])
    assert len(rejected) == 1
    assert store.query("SELECT count() FROM events").rows[0][0] == 0
    # A valid event of the same type goes in as before.
    assert store.insert([EncodedEvent(model.topic, CODEC.encode(sample_event(model)), 0, 2)]) == []
