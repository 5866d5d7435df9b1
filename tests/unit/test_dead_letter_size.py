"""A dead letter carries a bounded excerpt of its record and a pointer to the whole one."""

from __future__ import annotations

from streams.codec import default_codec
from streams.events import DeadLetter, RequestReceived
from streams.kafka import DEAD_LETTER_EXCERPT, dead_letter, failed_letter

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
