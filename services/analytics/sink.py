"""The analytics sink: every catalog topic into the ClickHouse event log, committed after insert."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.analytics._ingest import HEADER_LEN
from services.analytics.query_server import QueryServer
from services.analytics.settings import AnalyticsSettings, SinkConfig
from services.analytics.store import (
    ClickHouseStore,
    EncodedEvent,
    EventStore,
    Rejection,
    StoreUnavailable,
    open_store,
)
from streams.codec import MAGIC, EventCodec, default_codec
from streams.events import DeadLetter
from streams.kafka import (
    BACKGROUND_FETCH,
    IDLE_POLL_MS,
    EventConsumer,
    EventProducer,
    KafkaSettings,
    dead_letter,
)
from streams.runtime import ServiceContext
from streams.topics import CATALOG

__all__ = ["SinkConfig", "SinkStats", "main", "run_sink"]

log = logging.getLogger(__name__)

# Kafka fetches sized for draining a backlog (the broker still answers as soon as one
# byte is there); a fetch response is also the most the consumer buffers ahead.
_CONSUMER_OVERRIDES: dict[str, Any] = {
    "max_partition_fetch_bytes": 2 * 1024 * 1024,
    "fetch_max_bytes": 32 * 1024 * 1024,
    **BACKGROUND_FETCH,
}
_SHUTDOWN_FLUSH_S = 5.0
_PROGRESS_EVERY_S = 10.0


@dataclass
class SinkStats:
    """What the sink has done, for logs, tests and the benchmark."""

    consumed: int = 0
    stored: int = 0
    inserts: int = 0
    rejected: int = 0
    undecodable: int = 0
    reencoded: int = 0
    retries: int = 0
    commits_failed: int = 0
    dead_letters_failed: int = 0
    largest_batch: int = 0
    largest_batch_bytes: int = 0
    paused: bool = False


@dataclass
class _Batch:
    rows: list[EncodedEvent] = field(default_factory=list)
    size: int = 0  # bytes of the rows' values
    # First and last offset read per partition, open in the consumer's offset tracker
    # until the insert succeeds: nothing at or past them is committed before that.
    marks: list[tuple[TopicPartition, int]] = field(default_factory=list)
    started: float = 0.0

    @property
    def empty(self) -> bool:
        return not self.marks


class _Sink:
    def __init__(
        self,
        settings: KafkaSettings,
        producer: EventProducer,
        group: str,
        store: EventStore,
        config: SinkConfig,
        stats: SinkStats,
        codec: EventCodec,
    ) -> None:
        self._producer = producer
        self._store = store
        self._config = config
        self._stats = stats
        self._codec = codec
        topics = [spec.name for spec in CATALOG]
        self._consumer = EventConsumer(
            settings,
            topics,
            group_id=group,
            producer=producer,
            codec=codec,
            source="analytics",
            **_CONSUMER_OVERRIDES,
        )
        # A record whose header names its topic's current schema goes to ClickHouse as
        # it is; anything else takes the codec's path (older writers, bad bytes).
        self._headers = {settings.topic(t): MAGIC + codec.fingerprint_for(t) for t in topics}
        self._logical = {settings.topic(t): t for t in topics}
        self._batch = _Batch()
        # Records read but not yet in a batch (they did not fit): nothing more is fetched
        # until they are in, and nothing of them is committed.
        self._backlog: deque[tuple[TopicPartition, list[ConsumerRecord[Any, Any]]]] = deque()
        self._inflight: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._last_progress = (time.monotonic(), 0)

    # -- main loop ------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        await self._consumer.start()
        try:
            while not stop.is_set():
                room = self._room()
                if room:
                    fetched = await self._consumer.raw.getmany(
                        timeout_ms=self._poll_timeout_ms(), max_records=room
                    )
                    self._backlog.extend(fetched.items())
                await self._fill()
                await self._maybe_flush()
                self._progress()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        # Write what was read, briefly: anything left uncommitted is read again next time.
        flush = asyncio.ensure_future(self._final_flush())
        try:
            await asyncio.wait_for(asyncio.shield(flush), _SHUTDOWN_FLUSH_S)
        except TimeoutError:
            flush.cancel()
            log.warning("analytics: stopped before the last batch was stored; it will be re-read")
        except Exception:
            log.exception("analytics: the last batch could not be stored; it will be re-read")
        await self._consumer.stop()

    def _inserting(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def _room(self) -> int:
        """Records the next fetch may bring: none while the batch is full."""
        if self._full():
            return 0
        # Idle store: fill to batch_rows and write at once. Busy store: keep reading up
        # to the cap, so the next insert is larger and its fixed cost is paid once.
        limit = self._config.max_batch_rows if self._inserting() else self._config.batch_rows
        return max(1, limit - len(self._batch.rows))

    def _full(self) -> bool:
        """The batch takes no more: at its row or byte cap, or read records did not fit."""
        batch = self._batch
        return (
            bool(self._backlog)
            or len(batch.rows) >= self._config.max_batch_rows
            or batch.size >= self._config.max_batch_bytes
        )

    def _poll_timeout_ms(self) -> int:
        if self._batch.empty:
            # Nothing read and nothing being written: nothing to do until a record comes,
            # and a record ends the poll at once.
            return IDLE_POLL_MS if not self._inserting() else int(self._config.batch_wait * 1000)
        if self._inserting():
            return 20  # come back soon: the next insert starts when this one ends
        age = time.monotonic() - self._batch.started
        return max(0, int((self._config.batch_wait - age) * 1000))

    async def _fill(self) -> None:
        """Move read records into the batch, in order, until all are in or it is full."""
        assigned = self._consumer.raw.assignment()
        while self._backlog:
            tp, records = self._backlog[0]
            if tp not in assigned:
                # Revoked since it was read: the next owner reads it from the committed offset.
                self._backlog.popleft()
                continue
            taken = await self._take(tp, records)
            if taken < len(records):
                self._backlog[0] = (tp, records[taken:])
                return
            self._backlog.popleft()

    async def _take(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> int:
        """Add records of one partition while the batch has room; how many it took."""
        batch = self._batch
        header = self._headers.get(tp.topic)
        topic = self._logical.get(tp.topic, tp.topic)
        max_rows, max_bytes = self._config.max_batch_rows, self._config.max_batch_bytes
        taken = 0
        for record in records:
            value = record.value
            # The key counts too: a producer's large keys once filled memory past the cap.
            size = (len(value) if isinstance(value, bytes) else 0) + len(record.key or b"")
            if batch.rows and (len(batch.rows) >= max_rows or batch.size + size > max_bytes):
                break
            if header is not None and value is not None and value[:HEADER_LEN] == header:
                row: EncodedEvent | None = EncodedEvent(
                    topic, value, tp.partition, record.offset, record.key
                )
            else:
                row = await self._reencode(record, topic)
            if row is not None:
                batch.rows.append(row)
                batch.size += len(row.value) + len(row.key or b"")
            if taken == 0:
                # Opened once the first record is handled (dead-lettering one opens and
                # closes its offset) and before the next: a commit by the running insert
                # must not pass records of this run that are not stored yet.
                self._mark(tp, record.offset)
            taken += 1
        if taken > 1:
            self._mark(tp, records[taken - 1].offset)
        self._stats.consumed += taken
        return taken

    def _mark(self, tp: TopicPartition, offset: int) -> None:
        # First and last offset of each run of records: nothing at or past the first is
        # committed until the batch is stored.
        batch = self._batch
        if batch.empty:
            batch.started = time.monotonic()
        self._consumer.tracker.start(tp, offset)
        batch.marks.append((tp, offset))

    async def _reencode(self, record: ConsumerRecord[Any, Any], topic: str) -> EncodedEvent | None:
        # The codec resolves older writer schemas and dead-letters what it cannot read.
        delivery = await self._consumer.decode(record)
        if delivery is None:
            self._stats.undecodable += 1
            return None
        self._stats.reencoded += 1
        value = self._codec.encode(delivery.event)
        return EncodedEvent(topic, value, record.partition, record.offset, record.key)

    def _due(self) -> bool:
        batch = self._batch
        if batch.empty:
            return False
        if self._full() or len(batch.rows) >= self._config.batch_rows:
            return True
        return time.monotonic() - batch.started >= self._config.batch_wait

    async def _maybe_flush(self) -> None:
        if not self._due():
            return
        if self._inflight is not None and self._inserting():
            if not self._full():
                return  # keep filling while the previous insert runs
            if not await self._wait_paused(self._inflight):
                return  # stopping: the shutdown flush takes over
        self._launch()

    def _launch(self) -> None:
        previous = self._inflight
        if previous is not None:
            previous.result()  # a failed write is a bug: crash loudly, redelivery dedupes
        batch, self._batch = self._batch, _Batch()
        self._stats.largest_batch = max(self._stats.largest_batch, len(batch.rows))
        self._stats.largest_batch_bytes = max(self._stats.largest_batch_bytes, batch.size)
        self._inflight = asyncio.create_task(self._write(batch), name="analytics-write")

    async def _wait_paused(self, inflight: asyncio.Task[None]) -> bool:
        """Stop fetching until the running insert ends (True) or the sink stops (False).

        Polling goes on meanwhile, so the group does not drop this member.
        """
        raw = self._consumer.raw
        self._stats.paused = True
        raw.pause(*raw.assignment())
        try:
            while not inflight.done():
                done, _ = await asyncio.wait({inflight}, timeout=1.0)
                if done:
                    break
                if self._stop.is_set():
                    return False
                # A long outage outlasts max_poll_interval_ms unless we poll; partitions a
                # rebalance just assigned are paused too, and a fetch that slipped in waits
                # in the backlog.
                raw.pause(*raw.assignment())
                self._backlog.extend((await raw.getmany(timeout_ms=0)).items())
        finally:
            raw.resume(*raw.assignment())
            self._stats.paused = False
        return True

    async def _final_flush(self) -> None:
        # The backlog is left: none of it is committed, so it is read again next time.
        if self._inflight is not None:
            await self._inflight
            self._inflight = None
        if not self._batch.empty:
            batch, self._batch = self._batch, _Batch()
            await self._write(batch)

    # -- writing --------------------------------------------------------------
    async def _write(self, batch: _Batch) -> None:
        delay = self._config.backoff_initial
        attempts = 0
        while True:
            try:
                rejected = await asyncio.to_thread(self._store.insert, batch.rows)
                break
            except StoreUnavailable as err:
                attempts += 1
                self._stats.retries += 1
                log.warning(
                    "analytics store unavailable (attempt %d, %d rows waiting): %s;"
                    " retrying in %.1f s",
                    attempts,
                    len(batch.rows),
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.backoff_max)
        if attempts:
            log.info("analytics store is back after %d failed attempts", attempts)
        for rejection in rejected:
            await self._dead_letter(rejection)
        self._stats.inserts += 1
        self._stats.stored += len(batch.rows) - len(rejected)
        for tp, offset in batch.marks:
            self._consumer.tracker.finish(tp, offset)
        await self._commit()

    async def _dead_letter(self, rejection: Rejection) -> None:
        row = rejection.row
        self._stats.rejected += 1
        if row.topic == DeadLetter.topic:
            # Re-sending a refused dead letter would loop forever; say it loudly instead.
            log.error(
                "a dead letter was refused by the table and is not stored: %s (%s[%d]@%d)",
                rejection.reason,
                row.topic,
                row.partition,
                row.offset,
            )
            return
        log.warning(
            "row refused by the table, dead-lettered: %s (%s[%d]@%d)",
            rejection.reason,
            row.topic,
            row.partition,
            row.offset,
        )
        letter = dead_letter(
            source="analytics",
            topic=row.topic,
            partition=row.partition,
            offset=row.offset,
            key=row.key,
            payload=row.value,
            reason=rejection.reason,
            error_type="RowRejected",
        )
        try:
            await self._producer.send(letter)
        except Exception:
            # Stopping here would stop the event log for good (the successor reads the
            # same batch); the record stays on its topic, where this line points.
            self._stats.dead_letters_failed += 1
            log.exception(
                "could not dead-letter the refused row %s[%d]@%d; it is still on its topic",
                row.topic,
                row.partition,
                row.offset,
            )

    async def _commit(self) -> None:
        # The tracker commits below the oldest batch still open, per partition, and has
        # forgotten partitions a rebalance took away (its listener commits before they go).
        try:
            await self._consumer.commit_tracked()
        except KafkaError as err:
            self._stats.commits_failed += 1
            log.warning(
                "offset commit failed (%s); those events will be read again and deduplicated",
                err,
            )

    def _progress(self) -> None:
        now = time.monotonic()
        last_time, last_stored = self._last_progress
        if now - last_time < _PROGRESS_EVERY_S:
            return
        stats = self._stats
        if stats.stored != last_stored:
            rate = (stats.stored - last_stored) / (now - last_time)
            log.info(
                "analytics: %d events stored (%.0f/s), %d inserts, %d refused, %d undecodable",
                stats.stored,
                rate,
                stats.inserts,
                stats.rejected,
                stats.undecodable,
            )
        self._last_progress = (now, stats.stored)


async def run_sink(
    ctx: ServiceContext,
    stop: asyncio.Event,
    store: EventStore,
    *,
    config: SinkConfig | None = None,
    stats: SinkStats | None = None,
    codec: EventCodec | None = None,
) -> None:
    """Consume every catalog topic in group ``ctx.group`` into ``store`` until ``stop`` is set."""
    sink = _Sink(
        ctx.settings,
        ctx.producer,
        ctx.group,
        store,
        config or AnalyticsSettings.from_env().sink_config(),
        stats if stats is not None else SinkStats(),
        codec or default_codec(),
    )
    await sink.run(stop)


async def main(ctx: ServiceContext, stop: asyncio.Event) -> None:
    """The service: open the store, apply the schema, serve read-only SQL, sink."""
    store = open_store()
    log.info("analytics: writing to %s", store.describe())
    # The SQL surface reads with the reader's credentials when a server has them.
    read_url = None if store.embedded else AnalyticsSettings.read("clickhouse_read_url")
    reader = ClickHouseStore(url=read_url) if read_url else store
    try:
        await _apply_schema(store, embedded=store.embedded)
        server = QueryServer(reader).start()
        try:
            await run_sink(ctx, stop, store)
        finally:
            server.close()
    finally:
        if reader is not store:
            await asyncio.to_thread(reader.close)
        await asyncio.to_thread(store.close)


async def _apply_schema(store: ClickHouseStore, *, embedded: bool) -> None:
    delay = 0.5
    while True:
        try:
            await asyncio.to_thread(store.apply_schema)
            return
        except StoreUnavailable as err:
            if embedded:
                raise  # a locked or unreadable data directory will not fix itself
            log.warning("ClickHouse not reachable (%s); retrying in %.1f s", err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
