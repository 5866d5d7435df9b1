"""The sink's batching policy as configured from the environment."""

from __future__ import annotations

import pytest

from services.analytics.settings import AnalyticsSettings
from services.analytics.sink import SinkConfig


def test_sink_config_from_environment(monkeypatch):
    monkeypatch.setenv("ORCH_SINK_BATCH_ROWS", "200")
    monkeypatch.setenv("ORCH_SINK_BATCH_MS", "50")
    monkeypatch.setenv("ORCH_SINK_MAX_BATCH_ROWS", "400")
    monkeypatch.setenv("ORCH_SINK_BACKOFF_MAX_MS", "1500")
    monkeypatch.setenv("ORCH_SINK_MAX_BATCH_BYTES", "300000")
    config = AnalyticsSettings.from_env().sink_config()
    assert config.max_batch_bytes == 300_000
    assert (config.batch_rows, config.batch_wait, config.max_batch_rows, config.backoff_max) == (
        200,
        0.05,
        400,
        1.5,
    )


def test_sink_config_defaults_and_bounds(monkeypatch):
    for name in ("BATCH_ROWS", "BATCH_MS", "MAX_BATCH_ROWS", "MAX_BATCH_BYTES", "BACKOFF_MAX_MS"):
        monkeypatch.delenv(f"ORCH_SINK_{name}", raising=False)
    config = AnalyticsSettings.from_env().sink_config()
    assert (config.batch_rows, config.batch_wait) == (5000, 0.2)
    assert config.max_batch_bytes == 64 * 1024 * 1024
    with pytest.raises(ValueError):
        AnalyticsSettings.model_validate({"ORCH_SINK_MAX_BATCH_BYTES": "0"})
    with pytest.raises(ValueError):
        SinkConfig(max_batch_bytes=0)
    with pytest.raises(ValueError):
        SinkConfig(batch_rows=10, max_batch_rows=5)
    with pytest.raises(ValueError):
        SinkConfig(batch_wait=0)


def test_an_idle_sink_polls_once_a_second_a_busy_one_by_its_batch_time():
    import time
    from types import SimpleNamespace

    from aiokafka import TopicPartition

    from services.analytics.sink import _Batch, _Sink
    from streams.kafka import IDLE_POLL_MS

    sink = object.__new__(_Sink)  # the polling policy alone, no consumer
    sink._config = SinkConfig(batch_wait=0.2)
    sink._batch, sink._inflight = _Batch(), None
    assert sink._poll_timeout_ms() == IDLE_POLL_MS == 1000  # nothing read, nothing writing
    sink._inflight = SimpleNamespace(done=lambda: False)
    assert sink._poll_timeout_ms() == 200  # an insert runs: look again at the batch time
    sink._batch.marks.append((TopicPartition("t", 0), 5))
    assert sink._poll_timeout_ms() == 20  # rows wait for the running insert
    sink._inflight = None
    sink._batch.started = time.monotonic()
    assert 150 <= sink._poll_timeout_ms() <= 200  # rows wait for the batch time


# -- a row the table refuses: its dead letter, and a send that fails ---------------------

REFUSAL = "Code: 748. DB::Exception: avro::Exception: Invalid Avro varint. (AVRO_EXCEPTION)"
KAFKA_MAX_REQUEST = 1_048_576  # aiokafka's max_request_size, which the platform keeps


class RefusingStore:
    def insert(self, rows):
        from services.analytics.store import Rejection

        return [Rejection(row, REFUSAL) for row in rows]


class SizeCheckingProducer:
    """Keeps what it is given; refuses what the real producer would refuse for its size."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.sent: list = []
        self.fail_with = fail_with

    async def send(self, event) -> None:
        from aiokafka.errors import MessageSizeTooLargeError
        from aiokafka.record.default_records import DefaultRecordBatchBuilder

        from streams.codec import default_codec

        if self.fail_with is not None:
            raise self.fail_with
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            event.key(), default_codec().encode(event), []
        )
        if size > KAFKA_MAX_REQUEST:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        self.sent.append(event)


class CommittingConsumer:
    def __init__(self) -> None:
        from streams.kafka import OffsetTracker

        self.tracker = OffsetTracker()
        self.committed: dict = {}

    async def commit_tracked(self) -> None:
        offsets = self.tracker.committable()
        self.committed.update(offsets)
        self.tracker.committed(offsets)


def writer(producer):
    """A sink with only what writing a batch needs: a store that refuses every row."""
    from services.analytics.sink import SinkStats, _Sink

    sink = object.__new__(_Sink)
    sink._store, sink._producer, sink._stats = RefusingStore(), producer, SinkStats()
    sink._config, sink._consumer = SinkConfig(), CommittingConsumer()
    return sink


def refused_batch(body_bytes: int):
    """One record with a valid header and a body ClickHouse cannot read, `body_bytes` long."""
    from aiokafka import TopicPartition

    from services.analytics.sink import _Batch
    from services.analytics.store import EncodedEvent
    from streams.codec import MAGIC, default_codec

    header = MAGIC + default_codec().fingerprint_for("request_received")
    row = EncodedEvent("request_received", header + b"\xff" * body_bytes, 3, 42, b"k" * 5000)
    tp = TopicPartition("request_received", 3)
    return row, tp, _Batch(rows=[row], marks=[(tp, 42)])


async def test_a_refused_record_near_the_kafka_limit_is_dead_lettered_as_an_excerpt():
    from streams.kafka import DEAD_LETTER_EXCERPT

    # Under the broker's 1 MiB record limit itself; the whole of it in a dead letter is not.
    row, tp, batch = refused_batch(1_048_300)
    producer = SizeCheckingProducer()
    sink = writer(producer)
    sink._consumer.tracker.start(tp, 42)

    await sink._write(batch)

    [letter] = producer.sent
    assert (letter.original_topic, letter.partition, letter.offset) == ("request_received", 3, 42)
    assert letter.payload == row.value[:DEAD_LETTER_EXCERPT]
    assert letter.original_key == b"k" * 1024
    assert letter.reason.startswith(REFUSAL) and "payload cut to 65536" in letter.reason
    assert letter.error_type == "RowRejected"
    assert sink._consumer.committed == {tp: 43}
    assert (sink._stats.rejected, sink._stats.dead_letters_failed) == (1, 0)


async def test_a_dead_letter_that_cannot_be_sent_is_logged_and_the_sink_goes_on(caplog):
    from aiokafka.errors import KafkaTimeoutError

    _, tp, batch = refused_batch(100)
    sink = writer(SizeCheckingProducer(fail_with=KafkaTimeoutError("broker gone")))
    sink._consumer.tracker.start(tp, 42)

    await sink._write(batch)  # does not raise: the writer task stays healthy

    assert sink._consumer.committed == {tp: 43}  # the next batch is not stuck behind it
    assert (sink._stats.rejected, sink._stats.dead_letters_failed) == (1, 1)
    [line] = [r for r in caplog.records if "could not dead-letter" in r.getMessage()]
    assert "request_received[3]@42" in line.getMessage()
