"""A dead letter carries a bounded excerpt of its record and a pointer to the whole one."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord

from streams.codec import default_codec
from streams.events import DeadLetter, RequestReceived
from streams.kafka import (
    DEAD_LETTER_EXCERPT,
    EventConsumer,
    EventProducer,
    KafkaSettings,
    dead_letter,
    failed_letter,
)

KAFKA_LIMIT = 1024 * 1024


def _near_the_limit() -> RequestReceived:
    # A request's context is capped at 64 KB, but a producer without our models can write
    # more: a record just under 1 MB, which the handler then fails on.
    return RequestReceived.model_construct(
        **RequestReceived(
            source="sdk", run_id="r1", goal_id="g1", user_id="u1", message="h"
        ).model_dump()
        | {"context": {f"k{i}": "v" * 10_300 for i in range(100)}}
    )


def test_a_handler_failure_on_a_record_near_the_limit_makes_a_small_dead_letter():
    codec = default_codec()
    event = _near_the_limit()
    original = codec.encode(event)
    assert KAFKA_LIMIT - 20_000 < len(original) < KAFKA_LIMIT
    letter = failed_letter(
        event,
        RuntimeError("boom"),
        source="budget",
        topic="request_received",
        partition=3,
        offset=41,
        codec=codec,
    )
    encoded = codec.encode(letter)
    assert len(encoded) < DEAD_LETTER_EXCERPT + 4_096
    assert letter.payload == original[:DEAD_LETTER_EXCERPT]
    assert (letter.original_topic, letter.partition, letter.offset) == ("request_received", 3, 41)
    assert f"payload cut to {DEAD_LETTER_EXCERPT} of {len(original)} bytes" in letter.reason
    assert isinstance(codec.decode(encoded), DeadLetter)


def test_undecodable_bytes_and_a_huge_key_are_cut_too():
    letter = dead_letter(
        source="router",
        topic="request_received",
        partition=0,
        offset=7,
        key=b"k" * 500_000,
        payload=b"\x00" * 1_000_000,
        reason="bad header " * 1_000,
        error_type="DecodeError",
    )
    assert len(default_codec().encode(letter)) < DEAD_LETTER_EXCERPT + 8_192
    small = dead_letter(
        source="router",
        topic="t",
        partition=0,
        offset=1,
        key=b"k",
        payload=b"abc",
        reason="bad",
        error_type="DecodeError",
    )
    assert (small.payload, small.original_key, small.reason) == (b"abc", b"k", "bad")


async def test_a_dead_letter_the_broker_refuses_at_first_is_sent_again_not_lost() -> None:
    # The decode path sent its dead letter once: a broker blip there raised out of the
    # consumer's loop and the service stopped, while the offset could still move past it.
    settings = KafkaSettings("127.0.0.1:1", "t.")
    producer = EventProducer(settings)
    broker = _FirstSendFails()
    producer._producer = broker  # type: ignore[assignment]
    consumer = EventConsumer(
        settings, ["request_received"], group_id=None, producer=producer, source="router"
    )
    record = ConsumerRecord(
        "t.request_received", 2, 17, 0, 0, b"k1", b"\x00not avro", None, 2, 9, []
    )
    assert await consumer.decode(record) is None
    assert broker.attempts == 2
    (letter,) = broker.sent
    assert (letter.original_topic, letter.partition, letter.offset) == ("request_received", 2, 17)


class _FirstSendFails:
    """What AIOKafkaProducer.send gives: a future, failed on the first record only."""

    def __init__(self) -> None:
        self.attempts = 0
        self.sent: list[Any] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        self.attempts += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.attempts == 1:
            future.set_exception(KafkaConnectionError("broker restarting"))
        else:
            self.sent.append(default_codec().decode(value))
            future.set_result(None)
        return future
