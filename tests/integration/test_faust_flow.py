"""A Faust agent built by the app factory reads typed events from the real broker into a table."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from streams.codec import default_codec
from streams.events import DeadLetter, RouteDecided, TaskRequested
from streams.faust_app import FAUST_FETCHER_TIMEOUT_S, create_app, event_topic, start_app
from streams.kafka import EventConsumer, EventProducer
from tests.integration.waiting import until

pytestmark = pytest.mark.broker


async def test_faust_agent_updates_a_table_in_key_order(settings):
    app = create_app(f"faust-test-{uuid.uuid4().hex[:6]}", settings)
    tasks = event_topic(app, "task_requested", settings, source="faust-test")
    seen = app.Table("seen", default=list, partitions=4)
    done = asyncio.Event()
    expected = 45

    @app.agent(tasks)
    async def count(stream):
        total = 0
        async for event in stream:
            assert isinstance(event, TaskRequested)
            seen[event.goal_id] = [*seen[event.goal_id], int(event.context["seq"])]
            total += 1
            if total == expected:
                done.set()

    events = [
        TaskRequested(
            source="test",
            run_id=f"run-{i}",
            goal_id=f"g{i % 3}",
            agent_id="a1",
            specialty="general",
            message=f"task {i}",
            context={"seq": str(i)},
        )
        for i in range(expected)
    ]
    await start_app(app, settings)
    try:
        # The table's changelog was created ahead of the app, with the table's partitions.
        consumer = app.consumer
        assert consumer.topic_partitions(seen.changelog_topic_name) == 4
        codec = default_codec()
        misfiled = RouteDecided(source="test", run_id="run-x", specialty="general", action="reuse")
        miskeyed = events[1].model_copy(update={"run_id": "run-k", "context": {"seq": "999"}})
        async with EventProducer(settings) as producer:
            await producer.send_raw("task_requested", b"\x00garbage", key=b"g0")
            # Valid events, wrongly placed: another topic's event, and a goal's task under
            # another goal's key (another partition: another instance's state).
            await producer.send_raw("task_requested", codec.encode(misfiled), key=b"g0")
            await producer.send_raw("task_requested", codec.encode(miskeyed), key=b"g2")
            await producer.send_many(events)
        await asyncio.wait_for(done.wait(), 60)
        # Faust's aiokafka consumer (built in Faust's consumer thread) keeps aiokafka's back-off
        # for the partitions Faust reads, and knows which those are: the input's, not the
        # table's changelog (fetched, never taken once recovered) ...
        fetcher = consumer._thread._ensure_consumer()._fetcher
        assert fetcher._prefetch_backoff == 0.1
        asked = {(tp.topic, tp.partition) for tp in fetcher._orch_asked}
        inputs = {(settings.topic("task_requested"), p) for p in range(4)}
        assert inputs <= asked
        assert not any(topic == seen.changelog_topic_name for topic, _ in asked)

        # ... so the changelog's records, written by the agent and fetched, do not hold the
        # next fetch back (a held-back fetch cost every input up to 0.1 s). The fetch loop
        # runs in Faust's consumer thread: what it fetched and did are waited for, not slept.
        def untaken() -> list[Any]:
            held = list(fetcher._records.items())
            return [r for tp, r in held if tp not in fetcher._orch_asked]

        await until(lambda: bool(untaken()), "the changelog's records fetched and untaken")
        # Their back-off is gone once the loop has looked again (not merely outlived).
        await until(lambda: all(r._backoff == 0 for r in untaken()), "their back-off dropped")
        assert all(r.calculate_backoff() == 0 for r in untaken())
        # ... and, idle, looks again once a second like ours, not five times.
        assert fetcher._fetcher_timeout == FAUST_FETCHER_TIMEOUT_S == 1.0
        async with EventConsumer(settings, ["task_requested"], group_id=None) as ours:
            assert ours.raw._fetcher._prefetch_backoff == 0.1
        for goal in ("g0", "g1", "g2"):
            assert seen[goal] == [i for i in range(expected) if f"g{i % 3}" == goal]
    finally:
        await app.stop()

    # The garbage value and the two misplaced events went to dead_letter with their
    # reasons; the agent kept going and never saw them (seq 999 is in no goal's list).
    letters = []

    async def three() -> None:
        async for delivery in dead:
            letters.append(delivery.event)
            if len(letters) == 3:
                return

    async with EventConsumer(settings, ["dead_letter"], group_id=None) as dead:
        await asyncio.wait_for(three(), 30)
    assert all(isinstance(letter, DeadLetter) for letter in letters)
    assert {letter.original_topic for letter in letters} == {"task_requested"}
    assert {letter.source for letter in letters} == {"faust-test"}
    # Keyed as their records were: on different partitions, read in any order.
    header = [letter.reason for letter in letters if "header" in letter.reason]
    assert len(header) == 1
    assert sorted(letter.reason for letter in letters) == sorted(
        [
            *header,
            "a route_decided event does not belong on this topic",
            "the record's key b'g2' is not the event's goal_id 'g1'",
        ]
    )
