"""Typed producer and consumer helpers on aiokafka, tuned for low latency on loopback.

Handlers get typed events, never bytes: decoding happens here, at the edge, and
anything that cannot be decoded or validated goes to ``dead_letter`` with the
reason while the consumer keeps going.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from streams.codec import EventCodec, default_codec
from streams.errors import DecodeError
from streams.events import DeadLetter, Event

__all__ = [
    "Delivery",
    "EventConsumer",
    "EventProducer",
    "Handler",
    "KafkaSettings",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaSettings:
    """Where the broker is and how topics are named (a prefix isolates tests and tenants)."""

    bootstrap: str
    prefix: str = ""

    @classmethod
    def from_env(cls) -> KafkaSettings:
        from streams.localkafka import bootstrap_servers

        return cls(bootstrap_servers(), os.environ.get("ORCH_TOPIC_PREFIX", ""))

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
    "fetch_max_wait_ms": int(os.environ.get("ORCH_FETCH_MAX_WAIT_MS", "100")),
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "session_timeout_ms": 10000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 300000,
    "metadata_max_age_ms": 30000,
}


class EventProducer:
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
            bootstrap_servers=settings.bootstrap,
            client_id=client_id,
            **{**_PRODUCER_DEFAULTS, **overrides},
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def send(self, event: Event) -> None:
        """Send and wait until the broker has it."""
        await self._producer.send_and_wait(
            self.settings.topic(event.topic), self.codec.encode(event), key=event.key()
        )

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

    async def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Bytes as they are: for tests and tools that must write what a codec would refuse."""
        await self._producer.send_and_wait(self.settings.topic(topic), value, key=key)

    async def flush(self) -> None:
        await self._producer.flush()


@dataclass(frozen=True)
class Delivery:
    """A decoded event and where it came from."""

    event: Event
    topic: str
    partition: int
    offset: int


Handler = Callable[[Event, Delivery], Awaitable[None]]


class EventConsumer:
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
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap, group_id=group_id, **opts
        )
        self.dead_lettered = 0

    @property
    def raw(self) -> AIOKafkaConsumer:
        return self._consumer

    async def start(self) -> None:
        await self._consumer.start()
        physical = [self.settings.topic(t) for t in self.topics]
        if self.group_id is not None:
            self._consumer.subscribe(physical)
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

    async def __aenter__(self) -> EventConsumer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def commit(self) -> None:
        if self.group_id is not None:
            await self._consumer.commit()

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
        await self._producer.send(
            DeadLetter(
                source=self.source,
                original_topic=self.settings.logical(record.topic),
                partition=record.partition,
                offset=record.offset,
                original_key=record.key,
                payload=value,
                reason=err.reason,
                error_type=type(err).__name__,
            )
        )

    async def decode(self, record: ConsumerRecord[Any, Any]) -> Delivery | None:
        """The typed delivery, or None after sending the record to dead_letter."""
        logical = self.settings.logical(record.topic)
        try:
            event = self.codec.decode(record.value, topic=logical)
        except DecodeError as err:
            await self._dead_letter(record, err)
            return None
        return Delivery(event, logical, record.partition, record.offset)

    async def batches(
        self, timeout_ms: int = 200, max_records: int = 500
    ) -> AsyncIterator[list[Delivery]]:
        """Decoded batches, forever; commit after handling each one for at-least-once."""
        while True:
            fetched = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            out: list[Delivery] = []
            for records in fetched.values():
                for record in records:
                    delivery = await self.decode(record)
                    if delivery is not None:
                        out.append(delivery)
            if out or fetched:
                yield out

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        async for batch in self.batches():
            for delivery in batch:
                yield delivery

    async def run(self, handler: Handler, *, stop: asyncio.Event | None = None) -> None:
        """Handle every event at least once: commit after each handled batch."""
        async for batch in self.batches():
            for delivery in batch:
                await handler(delivery.event, delivery)
            await self.commit()
            if stop is not None and stop.is_set():
                return
