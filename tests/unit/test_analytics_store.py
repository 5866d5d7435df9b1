"""The EventStore contract, run here on the in-memory adapter and in integration on ClickHouse."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from services.analytics.store import (
    ClickHouseStore,
    EncodedEvent,
    EventStore,
    MemoryEventStore,
    StoreUnavailable,
)
from streams import events as ev
from streams.codec import default_codec
from streams.errors import StoreError
from tests.samples import sample_event

# Both adapters refuse this: the real table by its CHECK constraint, the memory one by `reject`.
ANCIENT = datetime(1990, 1, 1, tzinfo=UTC)


def encoded(event: ev.Event) -> EncodedEvent:
    return EncodedEvent(event.topic, default_codec().encode(event), partition=1, offset=7)


def mixed(n: int) -> list[ev.Event]:
    kinds = [ev.WorkflowCompleted, ev.FeedbackReceived, ev.LlmCallCompleted, ev.DeadLetter]
    return [sample_event(kinds[i % len(kinds)]) for i in range(n)]


def refuse_ancient(event: ev.Event) -> str | None:
    if event.occurred_at < datetime(2000, 1, 1, tzinfo=UTC):
        return "occurred_at_in_range violated"
    return None


class EventStoreContract:
    """What the sink relies on from any store; subclasses provide the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> EventStore:
        raise NotImplementedError

    def test_n_rows_give_n_events(self, store: EventStore) -> None:
        rows = [encoded(e) for e in mixed(40)]
        assert store.insert(rows) == []
        assert store.count() == 40

    def test_inserting_again_changes_nothing(self, store: EventStore) -> None:
        rows = [encoded(e) for e in mixed(30)]
        store.insert(rows)
        store.insert(rows)
        store.insert(rows[:10])
        assert store.count() == 30

    def test_refused_rows_come_back_with_the_reason_and_the_rest_is_stored(
        self, store: EventStore
    ) -> None:
        good = [encoded(e) for e in mixed(20)]
        bad = [encoded(sample_event(ev.WorkflowCompleted, occurred_at=ANCIENT)) for _ in range(2)]
        rows = good[:7] + [bad[0]] + good[7:15] + [bad[1]] + good[15:]

        rejected = store.insert(rows)

        assert [r.row for r in rejected] == bad
        assert all("occurred_at_in_range" in r.reason for r in rejected)
        assert store.count() == 20

    def test_schema_can_be_applied_again(self, store: EventStore) -> None:
        store.insert([encoded(e) for e in mixed(3)])
        store.apply_schema()
        assert store.count() == 3

    def test_an_event_sent_again_later_counts_once(self, store: EventStore) -> None:
        # A replay re-creates an event with the same id and a later time (a crash
        # between sending and committing): it is still one event.
        first = sample_event(
            ev.WorkflowCompleted, occurred_at=datetime(2026, 11, 30, 23, 59, tzinfo=UTC)
        )
        again = first.model_copy(update={"occurred_at": datetime(2026, 12, 1, 0, 1, tzinfo=UTC)})
        store.insert([encoded(first)])
        store.insert([encoded(again)])
        assert store.count() == 1

    def test_empty_insert_is_a_no_op(self, store: EventStore) -> None:
        assert store.insert([]) == []
        assert store.count() == 0


class TestMemoryStore(EventStoreContract):
    @pytest.fixture
    def store(self) -> MemoryEventStore:
        store = MemoryEventStore(reject=refuse_ancient)
        store.apply_schema()
        return store

    def test_unavailable_store_raises_and_keeps_nothing(self, store: MemoryEventStore) -> None:
        store.available = False
        with pytest.raises(StoreUnavailable):
            store.insert([encoded(e) for e in mixed(5)])
        assert store.failed_attempts == 1
        store.available = True
        store.insert([encoded(e) for e in mixed(5)])
        assert store.count() == 5

    def test_undecodable_rows_are_refused(self, store: MemoryEventStore) -> None:
        rejected = store.insert([EncodedEvent("workflow_completed", b"\x00junk")])
        assert len(rejected) == 1
        assert "single-object" in rejected[0].reason

    def test_keeps_the_decoded_events(self, store: MemoryEventStore) -> None:
        events = mixed(4)
        store.insert([encoded(e) for e in events])
        assert sorted(store.events(), key=lambda e: e.event_id) == sorted(
            events, key=lambda e: e.event_id
        )

    def test_runs_no_sql(self, store: MemoryEventStore) -> None:
        with pytest.raises(StoreError, match="runs no SQL"):
            store.query("SELECT 1")


def test_a_server_gets_each_type_as_an_avro_external_table():
    import io

    import fastavro

    from services.analytics._ingest import HEADER_LEN, Column
    from services.analytics.store import ClickHouseStore

    store = ClickHouseStore(url="http://user:secret@clickhouse.invalid:8123/analytics")
    assert "secret" not in store.describe()
    store._columns = [Column("event_id", "String"), Column("score", "Nullable(Int64)")]
    codec = default_codec()
    done, feedback = sample_event(ev.WorkflowCompleted), sample_event(ev.FeedbackReceived)
    by_topic = {
        "workflow_completed": [codec.encode(done)[HEADER_LEN:]],
        "feedback_received": [codec.encode(feedback)[HEADER_LEN:]],
    }

    with store._sources(by_topic) as (selects, external):
        files = {f.name: f for f in external.files}
        assert set(files) == {"in_workflow_completed", "in_feedback_received"}
        assert files["in_feedback_received"].query_params["in_feedback_received_format"] == "Avro"
        structure = files["in_feedback_received"].query_params["in_feedback_received_structure"]
        assert "score Nullable(Int64)" in structure
        read = list(fastavro.reader(io.BytesIO(files["in_workflow_completed"].data)))
        assert read[0]["event_id"] == done.event_id
        assert selects[0].endswith("FROM in_workflow_completed")
        assert selects[1].endswith("FROM in_feedback_received")


def test_batch_files_of_dead_processes_are_removed(tmp_path):
    from services.analytics.store import ClickHouseStore

    ingest = tmp_path / "clickhouse-ingest"
    stale = ingest / "999999999-abc"  # no such pid
    stale.mkdir(parents=True)
    (stale / "x.workflow_completed.avro").write_bytes(b"left by a killed sink")
    mine = ingest / f"{os.getpid()}-live"
    mine.mkdir()

    store = ClickHouseStore(path=tmp_path / "clickhouse")
    staging = store._tmpdir()

    assert staging.parent == ingest and staging.name.startswith(f"{os.getpid()}-")
    assert not stale.exists()
    assert mine.exists()
    store.close()
    assert not staging.exists()


@pytest.mark.parametrize("password", ["hunter2#prod", "hunter2/prod", "hunter2?prod"])
def test_a_url_whose_password_breaks_its_parse_is_never_repeated(password: str) -> None:
    # An unescaped '#', '/' or '?' ends the host early, and Python's and the driver's parse
    # errors quote what follows: the password's start went into the sink's log.
    store = ClickHouseStore(url=f"http://orch:{password}@ch.internal:8123/orchestrator")
    assert "hunter2" not in store.describe() and "percent-encode" in store.describe()
    with pytest.raises(StoreError) as raised:
        store.query("SELECT 1")
    assert "hunter2" not in str(raised.value) and raised.value.__cause__ is None
