"""Typed events through the real broker: helpers to plain aiokafka, and dead letters."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from streams.codec import default_codec
from streams.config import BrokerSettings
from streams.events import DeadLetter, RequestReceived, TaskRequested
from streams.kafka import EventConsumer, EventProducer
from tests.integration.waiting import until

pytestmark = pytest.mark.broker


async def _first_dead_letter(settings) -> DeadLetter:
    async def first() -> DeadLetter:
        async for delivery in dead:
            assert isinstance(delivery.event, DeadLetter)
            return delivery.event
        raise AssertionError("dead_letter ended without a letter")

    dead = EventConsumer(settings, ["dead_letter"], group_id=None)
    async with dead:
        return await asyncio.wait_for(first(), 30)


def _requests(n: int, goals: list[str]) -> list[RequestReceived]:
    return [
        RequestReceived(
            source="test",
            run_id=f"run-{i}",
            goal_id=goals[i % len(goals)],
            user_id="u1",
            message=f"message {i}",
        )
        for i in range(n)
    ]


def _tasks(n: int, goals: list[str]) -> list[TaskRequested]:
    return [
        TaskRequested(
            source="test",
            run_id=f"run-{i}",
            goal_id=goals[i % len(goals)],
            agent_id="agent-1",
            specialty="general",
            message=f"task {i}",
            context={"seq": str(i)},
        )
        for i in range(n)
    ]


async def test_helpers_to_plain_aiokafka_consumer_keeps_values_and_key_order(settings):
    events = _tasks(60, ["g1", "g2", "g3", "g4", "g5"])
    async with EventProducer(settings) as producer:
        await producer.send_many(events)

    consumer = AIOKafkaConsumer(
        settings.topic("task_requested"),
        **settings.client_args(),
        group_id=f"plain-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    got = []
    try:
        while len(got) < len(events):
            batch = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 20)
            for records in batch.values():
                for r in records:
                    assert r.key is not None
                    event = default_codec().decode(r.value, topic="task_requested")
                    assert r.key == event.goal_id.encode()
                    got.append(event)
    finally:
        await consumer.stop()
    assert sorted(got, key=lambda e: e.run_id) == sorted(events, key=lambda e: e.run_id)
    # Keyed by goal_id: each goal's tasks arrive in the order they were sent.
    for goal in ["g1", "g2", "g3", "g4", "g5"]:
        sent = [int(e.context["seq"]) for e in events if e.goal_id == goal]
        seen = [int(e.context["seq"]) for e in got if e.goal_id == goal]
        assert seen == sent


async def test_consumer_dead_letters_bad_bytes_and_keeps_going(settings):
    good = _requests(3, ["g1"])
    async with EventProducer(settings) as producer:
        await producer.send(good[0])
        await producer.send_raw("request_received", b"not avro at all", key=b"run-x")
        await producer.send_many(good[1:])

        consumer = EventConsumer(
            settings, ["request_received"], group_id=None, producer=producer, source="test"
        )
        seen = []

        async def read() -> None:
            # The bad record (key run-x) sits on another partition than the good ones (one
            # key's partition): the good may all be read before it, so both are waited for.
            async for batch in consumer.batches(idle=True):
                seen.extend(d.event for d in batch)
                if len(seen) >= 3 and consumer.dead_lettered:
                    return

        async with consumer:
            await asyncio.wait_for(read(), 30)
        assert [e.run_id for e in seen if e.run_id] and {e.run_id for e in seen} == {
            e.run_id for e in good
        }
        assert consumer.dead_lettered == 1

    letter = await _first_dead_letter(settings)
    assert letter.original_topic == "request_received"
    assert letter.payload == b"not avro at all"
    assert letter.original_key == b"run-x"
    assert "missing C3 01 header" in letter.reason


async def test_an_event_its_handler_fails_on_goes_to_dead_letter_and_the_rest_are_handled(
    settings,
):
    events = _requests(4, ["g1", "g2"])
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(event, delivery):
        if event.run_id == "run-2":
            raise ValueError("cannot route this one")
        handled.append(event.run_id)
        if len(handled) == 3:
            done.set()

    async with EventProducer(settings) as producer:
        await producer.send_many(events)
        consumer = EventConsumer(
            settings,
            ["request_received"],
            group_id=f"handler-test-{uuid.uuid4().hex[:6]}",
            producer=producer,
            source="handler-test",
        )
        async with consumer:
            task = asyncio.create_task(consumer.run_concurrently(handler))
            try:
                await asyncio.wait_for(done.wait(), 30)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert sorted(handled) == ["run-0", "run-1", "run-3"]

    letter = await _first_dead_letter(settings)
    assert letter.source == "handler-test" and letter.error_type == "ValueError"
    assert letter.reason == "handler failed: ValueError: cannot route this one"
    assert letter.original_topic == "request_received" and letter.original_key == b"run-2"
    # The payload is the event itself: it can be read back and replayed.
    assert default_codec().decode(letter.payload, topic="request_received") == events[2]


async def test_an_idle_concurrent_consumer_polls_rarely_and_still_commits_what_it_finishes(
    settings,
):
    """Nothing to do: one poll a second, not ten. A handler that finishes while no record
    comes is committed within the commit interval and the short poll, not at the next
    record: every poll while it waits for its commit is the short one."""
    group = f"idle-test-{uuid.uuid4().hex[:6]}"
    release = asyncio.Event()
    handled = asyncio.Event()

    async def handler(event, delivery):
        await release.wait()  # finishes while nothing else arrives
        handled.set()

    async with EventProducer(settings) as producer:
        consumer = EventConsumer(
            settings, ["request_received"], group_id=group, producer=producer, source="idle"
        )
        async with consumer:
            polls = 0
            waiting_commit: list[int] = []  # each poll's wait while finished work is uncommitted
            getmany = consumer.raw.getmany

            async def counting(*args, **kwargs):
                nonlocal polls
                polls += 1
                if consumer.tracker.committable() and not consumer.tracker.pending():
                    waiting_commit.append(kwargs["timeout_ms"])
                return await getmany(*args, **kwargs)

            consumer.raw.getmany = counting  # type: ignore[method-assign]
            task = asyncio.create_task(consumer.run_concurrently(handler))
            try:
                await until(lambda: bool(consumer.raw.assignment()), "joined and assigned")
                polls = 0
                await asyncio.sleep(3.0)
                assert polls <= 5, f"{polls} polls in 3 s of nothing to do"
                await producer.send(_requests(1, ["g-idle"])[0])
                await until(lambda: consumer.tracker.pending() == 1, "read and started")
                release.set()  # the handler waits until now
                await asyncio.wait_for(handled.wait(), 10)
                high = consumer.tracker._high  # noqa: SLF001  the record's partition
                tp = next(tp for tp in consumer.raw.assignment() if tp in high)
                loop = asyncio.get_running_loop()
                started = loop.time()
                # The short poll is checked poll by poll below; the clock only bounds the wait
                # (a commit and its read-back are broker round trips, slow on a loaded machine).
                within = BrokerSettings.read("commit_interval_ms") / 1000.0 + 5.0
                while (await consumer.raw.committed(tp) or 0) <= high[tp]:
                    assert loop.time() - started < within, "the finished record was not committed"
                    await asyncio.sleep(0.05)
                assert all(wait <= 100 for wait in waiting_commit), waiting_commit
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def test_commits_wait_for_the_interval_and_a_clean_stop_commits_at_once(
    settings, monkeypatch
):
    """ORCH_COMMIT_INTERVAL_MS spaces the commits (each is a record on the broker): with a
    minute's interval, records handled are not committed while the consumer runs, and a
    clean stop commits every one of them, so the group's next member repeats none."""
    monkeypatch.setenv("ORCH_COMMIT_INTERVAL_MS", "60000")
    group = f"interval-test-{uuid.uuid4().hex[:6]}"
    handled: list[str] = []
    all_done = asyncio.Event()

    async def handler(event, delivery):
        handled.append(event.run_id)
        if len(handled) == 6:
            all_done.set()

    async with EventProducer(settings) as producer:
        await producer.send_many(_requests(6, ["g-a", "g-b"]))
        consumer = EventConsumer(
            settings, ["request_received"], group_id=group, producer=producer, source="interval"
        )
        async with consumer:
            task = asyncio.create_task(consumer.run_concurrently(handler))
            try:
                await asyncio.wait_for(all_done.wait(), 30)
                await asyncio.sleep(1.5)  # several polls with finished work to commit
                parts = list(consumer.raw.assignment())
                assert [await consumer.raw.committed(tp) for tp in parts] == [None] * len(parts)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            ends = await consumer.raw.end_offsets(parts)
            committed = {tp: await consumer.raw.committed(tp) or 0 for tp in parts}
        assert committed == ends
        assert len(handled) == 6
