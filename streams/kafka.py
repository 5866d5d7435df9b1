"""Typed producer and consumer helpers on aiokafka, tuned for low latency on loopback.

Handlers get typed events, never bytes: decoding happens here, at the edge, and
anything that cannot be decoded or validated goes to ``dead_letter`` with the
reason while the consumer keeps going.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from streams.codec import EventCodec, default_codec
from streams.config import BrokerSettings, broker_env, kafka_client_args
from streams.errors import DecodeError
from streams.events import DeadLetter, Event

__all__ = [
    "BACKGROUND_FETCH",
    "AsyncLifecycle",
    "Delivery",
    "EventConsumer",
    "EventProducer",
    "Handler",
    "KafkaSettings",
    "OffsetTracker",
    "dead_letter",
    "failed_letter",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaSettings:
    """Where the broker is and how topics are named (a prefix isolates tests and tenants)."""

    bootstrap: str
    prefix: str = ""

    @classmethod
    def from_env(cls) -> KafkaSettings:
        """The broker and prefix :class:`~streams.config.BrokerSettings` name."""
        broker = BrokerSettings.from_env()
        return cls(broker.bootstrap, broker.prefix)

    def env(self) -> dict[str, str]:
        """Variables that send a child process to this broker, credentials included."""
        return broker_env(self.bootstrap)

    def client_args(self) -> dict[str, Any]:
        """``bootstrap_servers`` and the credentials of an aiokafka client of this broker."""
        return kafka_client_args(self.bootstrap)

    def topic(self, name: str) -> str:
        return self.prefix + name

    def logical(self, physical: str) -> str:
        return physical[len(self.prefix) :] if physical.startswith(self.prefix) else physical


# Loopback request/reply: no batching delay on send, answer a fetch as soon as one
# byte is there. A short max wait bounds the idle poll; the broker still answers a
# parked fetch the moment data arrives.
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger_ms": 0,
    "acks": "all",
    "enable_idempotence": True,
    "request_timeout_ms": 15000,
}
_CONSUMER_DEFAULTS: dict[str, Any] = {
    "fetch_min_bytes": 1,
    "fetch_max_wait_ms": BrokerSettings.read("fetch_max_wait_ms"),
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "session_timeout_ms": 10000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 300000,
    "metadata_max_age_ms": 30000,
    # How often aiokafka's fetch loop looks again with nothing to wake it (aiokafka: 200
    # ms); a fetch answered, records taken or a new assignment wake it at once.
    "consumer_timeout_ms": 1000,
}
# For consumers off the answer's path: the broker holds their fetch until it has a batch
# worth decoding (or the wait ends). At one answer a second, a consumer of every topic
# answered at each event polled about ten fetches per answer, each over all its
# partitions; batched, it reads the same records in a few fetches a second.
BACKGROUND_FETCH: dict[str, Any] = {
    "fetch_max_wait_ms": BrokerSettings.read("background_fetch_max_wait_ms"),
    "fetch_min_bytes": BrokerSettings.read("background_fetch_min_bytes"),
}


class AsyncLifecycle:
    """``async with`` for anything with ``start()`` and ``stop()``."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()  # a half-started client must not leak its connections
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class EventProducer(AsyncLifecycle):
    """Sends typed events to the topic of their type, keyed as the catalog says."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        codec: EventCodec | None = None,
        client_id: str = "orchestrator",
        **overrides: Any,
    ) -> None:
        self.settings = settings
        self.codec = codec or default_codec()
        self._producer = AIOKafkaProducer(
            **settings.client_args(),
            client_id=client_id,
            **{**_PRODUCER_DEFAULTS, **overrides},
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, event: Event) -> None:
        """Send and wait until the broker has it."""
        await self._producer.send_and_wait(
            self.settings.topic(event.topic), self.codec.encode(event), key=event.key()
        )

    async def enqueue(self, event: Event) -> asyncio.Future[Any]:
        """Hand the event to the producer; the returned future resolves once the broker has it.

        Events to one partition reach the broker in the order they were enqueued.
        """
        future: asyncio.Future[Any] = await self._producer.send(
            self.settings.topic(event.topic), self.codec.encode(event), key=event.key()
        )
        return future

    async def send_many(self, events: Iterable[Event]) -> None:
        """Send several events at once and wait for all of them."""
        futures = [
            await self._producer.send(
                self.settings.topic(e.topic), self.codec.encode(e), key=e.key()
            )
            for e in events
        ]
        if futures:
            await asyncio.gather(*futures)

    async def deliver(self, events: Iterable[Event], *, what: str = "events") -> None:
        """Send until the broker has every one of ``events``, however long that takes.

        For what a request's outcome depends on (its terminal event, its cost): the
        handler does not finish, so its offset is not committed, until the broker has
        them; if the process dies first, the next owner replays the record and sends
        the same (deterministic) ids again. Only cancellation stops the retries.
        """
        pending = list(events)
        delay = 0.2
        while pending:
            try:
                await self.send_many(pending)
                return
            except MessageSizeTooLargeError:
                raise  # no retry makes a record smaller: the caller's error path must act
            except (KafkaError, OSError) as exc:
                log.warning("%s not acknowledged (%s); retrying in %.1f s", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Bytes as they are: for tests and tools that must write what a codec would refuse."""
        await self._producer.send_and_wait(self.settings.topic(topic), value, key=key)

    async def flush(self) -> None:
        await self._producer.flush()


def failed_letter(
    event: Event,
    exc: BaseException,
    *,
    source: str,
    topic: str,
    partition: int,
    offset: int,
    codec: EventCodec,
) -> DeadLetter:
    """The dead letter of an event that decoded but that its handler failed on."""
    return dead_letter(
        source=source,
        topic=topic,
        partition=partition,
        offset=offset,
        key=event.key(),
        payload=codec.encode(event),
        reason=f"handler failed: {type(exc).__name__}: {exc}",
        error_type=type(exc).__name__,
    )


DEAD_LETTER_EXCERPT = 64 * 1024
# How long a consumer loop with nothing to do waits in one poll. A record ends the poll at
# once, so this sets only how often an idle service wakes up (aiokafka's fetch loop itself
# looks again every consumer_timeout_ms, 1 s).
IDLE_POLL_MS = 1000
"""Bytes of the original record a dead letter carries; (topic, partition, offset) point
at the whole of it. A record just under Kafka's 1 MB limit plus the letter's own fields
would pass the limit, and the consumer would fail on it again at every restart."""
_KEY_EXCERPT = 1024
_REASON_CHARS = 2000


def dead_letter(
    *,
    source: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    payload: bytes,
    reason: str,
    error_type: str,
) -> DeadLetter:
    """A dead letter of bounded size: an excerpt of the record and where the whole one is."""
    if len(payload) > DEAD_LETTER_EXCERPT:
        cut = f"payload cut to {DEAD_LETTER_EXCERPT} of {len(payload)} bytes"
        reason = f"{reason[:_REASON_CHARS]} ({cut})"
    return DeadLetter(
        source=source,
        original_topic=topic,
        partition=partition,
        offset=offset,
        original_key=None if key is None else key[:_KEY_EXCERPT],
        payload=payload[:DEAD_LETTER_EXCERPT],
        reason=reason[: _REASON_CHARS + 80],
        error_type=error_type[:200],
    )


@dataclass(frozen=True)
class Delivery:
    """A decoded event and where it came from."""

    event: Event
    topic: str
    partition: int
    offset: int
    physical_topic: str = ""

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.physical_topic or self.topic, self.partition)


Handler = Callable[[Event, Delivery], Awaitable[None]]


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish and commit what is running before partitions move, then forget them."""

    def __init__(self, consumer: EventConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # The next owner starts at the committed offset: a handler still running here
        # would otherwise run there a second time (two answers for one request).
        await self._consumer.settle()
        try:
            await self._consumer.commit_tracked()
        except Exception:  # a failed commit only means some records are replayed
            log.warning("commit before rebalance failed", exc_info=True)
        self._consumer.tracker.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for hook in self._consumer.on_assigned:
            hook(assigned)


class EventConsumer(AsyncLifecycle):
    """Reads typed events from catalog topics; bad bytes go to ``dead_letter``.

    With ``group_id`` the consumer joins a group (instances share partitions);
    without it, it reads every partition itself (``from_end`` starts at the end).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Iterable[str],
        *,
        group_id: str | None,
        producer: EventProducer | None = None,
        codec: EventCodec | None = None,
        source: str = "consumer",
        from_end: bool = False,
        **overrides: Any,
    ) -> None:
        self.settings = settings
        self.codec = codec or default_codec()
        self.topics = list(topics)
        self.group_id = group_id
        self.source = source
        self._producer = producer
        self._from_end = from_end
        opts = {**_CONSUMER_DEFAULTS, **overrides}
        if from_end:
            opts["auto_offset_reset"] = "latest"
        self._consumer = AIOKafkaConsumer(**settings.client_args(), group_id=group_id, **opts)
        self.dead_lettered = 0
        self.tracker = OffsetTracker()
        self.drain_s = 5.0
        self._running: set[asyncio.Task[None]] = set()
        self._generation = 0  # moves when partitions are revoked
        # Called with the partitions each time the group assigns this consumer some.
        self.on_assigned: list[Callable[[list[TopicPartition]], None]] = []

    @property
    def raw(self) -> AIOKafkaConsumer:
        return self._consumer

    async def start(self) -> None:
        await self._consumer.start()
        physical = [self.settings.topic(t) for t in self.topics]
        if self.group_id is not None:
            self._consumer.subscribe(physical, listener=_Revocations(self))
            return
        parts: list[TopicPartition] = []
        for name in physical:
            found = await self._partitions(name)
            parts.extend(TopicPartition(name, p) for p in sorted(found))
        self._consumer.assign(parts)
        if self._from_end:
            await self._consumer.seek_to_end(*parts)
            for tp in parts:  # resolve positions now, before anyone sends a request
                await self._consumer.position(tp)
        else:
            await self._consumer.seek_to_beginning(*parts)

    async def _partitions(self, topic: str) -> set[int]:
        for _ in range(50):
            found = self._consumer.partitions_for_topic(topic)
            if found:
                return set(found)
            await self._consumer._client.force_metadata_update()  # noqa: SLF001
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic!r} does not exist; run `python -m streams.topics create`")

    async def stop(self) -> None:
        await self._consumer.stop()

    async def commit(self) -> None:
        if self.group_id is None:
            return
        try:
            await self._consumer.commit()
        except KafkaError as exc:  # see commit_tracked: the next owner replays the rest
            log.warning(
                "%s: commit refused (%s); the next owner replays the rest", self.source, exc
            )

    async def commit_tracked(self) -> None:
        """Commit what the tracker says is finished (for out-of-order handling).

        A commit the group refuses (this member was paused or cut off and its
        partitions went to another) is not an error of the service: what it did not
        commit is replayed by the next owner, which every handler tolerates.
        """
        if self.group_id is None:
            return
        offsets = self.tracker.committable()
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            log.warning(
                "%s: commit refused (%s); the next owner replays the rest", self.source, exc
            )
            return
        self.tracker.committed(offsets)

    async def settle(self) -> None:
        """Stop starting handlers and give the running ones ``drain_s`` to finish."""
        self._generation += 1
        if self._running:
            await asyncio.wait(set(self._running), timeout=self.drain_s)

    async def run_concurrently(
        self,
        handler: Handler,
        *,
        max_in_flight: int = 1000,
        commit_every: float | None = None,
    ) -> None:
        """Handle each event in its own task; commit below the oldest unfinished one.

        At least once: a crash replays everything not finished, never skips it.
        A clean stop (cancellation) or a rebalance first lets running handlers
        finish and commits them, so another instance does not repeat their work.
        """
        if commit_every is None:
            commit_every = BrokerSettings.read("commit_interval_ms") / 1000.0
        slots = asyncio.Semaphore(max_in_flight)
        running = self._running
        loop = asyncio.get_running_loop()
        last_commit = loop.time()

        async def _one(delivery: Delivery) -> None:
            try:
                await handler(delivery.event, delivery)
            except Exception as exc:
                log.exception(
                    "%s: handler failed on %s@%s", self.source, delivery.topic, delivery.offset
                )
                await self._handler_failed(delivery, exc)
            finally:
                self.tracker.finish(delivery.tp, delivery.offset)
                slots.release()

        try:
            # Poll briefly while handlers run or finished ones wait for their commit, so
            # commits follow the work; with neither, nothing can change until a record
            # comes (which ends the poll at once), so wake up rarely.
            def poll_ms() -> int:
                return 100 if running or self.tracker.committable() else IDLE_POLL_MS

            async for batch in self.batches(timeout_ms=poll_ms, idle=True):
                generation = self._generation
                for delivery in batch:
                    await slots.acquire()
                    if generation != self._generation:
                        # Revoked meanwhile: the partitions' next owner reads these again.
                        slots.release()
                        break
                    self.tracker.start(delivery.tp, delivery.offset)
                    task = asyncio.create_task(_one(delivery))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if loop.time() - last_commit >= commit_every:
                    await self.commit_tracked()
                    last_commit = loop.time()
        except asyncio.CancelledError:
            await self.settle()
            try:
                await self.commit_tracked()
            except Exception:  # what is not committed is replayed: at least once still holds
                log.warning("%s: commit on stop failed", self.source, exc_info=True)
            raise
        finally:
            for task in running:
                task.cancel()

    async def _dead_letter(self, record: ConsumerRecord[Any, Any], err: DecodeError) -> None:
        self.dead_lettered += 1
        log.warning(
            "dead letter from %s[%s]@%s: %s",
            record.topic,
            record.partition,
            record.offset,
            err.reason,
        )
        if self._producer is None:
            return
        value = record.value if isinstance(record.value, bytes) else b""
        letter = dead_letter(
            source=self.source,
            topic=self.settings.logical(record.topic),
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            payload=value,
            reason=err.reason,
            error_type=type(err).__name__,
        )
        # Until the broker has it: the offset then moves past the record, which nothing
        # else will ever show (a broker blip here stopped the consuming service).
        await self._producer.deliver(
            [letter], what=f"the dead letter of {record.topic}[{record.partition}]@{record.offset}"
        )

    async def _handler_failed(self, delivery: Delivery, exc: Exception) -> None:
        """A handler that raised leaves its event on ``dead_letter`` with the reason."""
        self.dead_lettered += 1
        if self._producer is None:
            return
        letter = failed_letter(
            delivery.event,
            exc,
            source=self.source,
            topic=delivery.topic,
            partition=delivery.partition,
            offset=delivery.offset,
            codec=self.codec,
        )
        try:
            await self._producer.send(letter)
        except Exception:  # the log line above still names the event
            log.warning("%s: could not dead-letter a failed event", self.source, exc_info=True)

    async def decode(self, record: ConsumerRecord[Any, Any]) -> Delivery | None:
        """The typed delivery, or None after sending the record to dead_letter."""
        logical = self.settings.logical(record.topic)
        try:
            event = self.codec.decode(record.value, topic=logical)
        except DecodeError as err:
            await self._dead_letter(record, err)
            # Dead-lettered is handled: let the committed offset move past it.
            tp = TopicPartition(record.topic, record.partition)
            self.tracker.start(tp, record.offset)
            self.tracker.finish(tp, record.offset)
            return None
        return Delivery(event, logical, record.partition, record.offset, record.topic)

    async def batches(
        self,
        timeout_ms: int | Callable[[], int] = 200,
        max_records: int = 500,
        *,
        idle: bool = False,
    ) -> AsyncIterator[list[Delivery]]:
        """Decoded batches, forever; commit after handling each one for at-least-once.

        With ``idle`` an empty batch is yielded after each quiet poll, so a caller
        can do periodic work (commit what finished) while nothing arrives.
        ``timeout_ms`` may be a function, asked before each poll.
        """
        while True:
            wait = timeout_ms() if callable(timeout_ms) else timeout_ms
            fetched = await self._consumer.getmany(timeout_ms=wait, max_records=max_records)
            out: list[Delivery] = []
            for records in fetched.values():
                for record in records:
                    delivery = await self.decode(record)
                    if delivery is not None:
                        out.append(delivery)
            if out or fetched or idle:
                yield out

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        async for batch in self.batches():
            for delivery in batch:
                yield delivery

    async def run(self, handler: Handler, *, stop: asyncio.Event | None = None) -> None:
        """Handle every event at least once: commit after each handled batch."""
        # A quiet poll has nothing to do here, and a record ends a poll at once.
        async for batch in self.batches(timeout_ms=IDLE_POLL_MS):
            for delivery in batch:
                await handler(delivery.event, delivery)
            await self.commit()
            if stop is not None and stop.is_set():
                return


class OffsetTracker:
    """Commit only below the oldest record still being handled, per partition.

    Records may finish out of order (concurrent LLM calls, requests waiting for a
    spawn); committing past an unfinished one would lose it on a crash.
    """

    def __init__(self) -> None:
        self._open: dict[TopicPartition, set[int]] = {}
        self._high: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        self._open.setdefault(tp, set()).add(offset)
        self._high[tp] = max(self._high.get(tp, -1), offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        self._open.get(tp, set()).discard(offset)

    def pending(self) -> int:
        return sum(len(v) for v in self._open.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now (next offset to read), only where they moved."""
        out: dict[TopicPartition, int] = {}
        for tp, high in self._high.items():
            still = self._open.get(tp)
            nxt = min(still) if still else high + 1
            if nxt > self._committed.get(tp, -1):
                out[tp] = nxt
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions revoked in a rebalance: their records are another instance's now."""
        for tp in partitions:
            self._open.pop(tp, None)
            self._high.pop(tp, None)
            self._committed.pop(tp, None)
