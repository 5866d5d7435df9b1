"""streams.views.TopicView on the real broker: ready, sync, wait_for, since, odd events."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from streams.events import AgentRetired, Event
from streams.kafka import EventProducer, KafkaSettings
from streams.views import TopicView


def _retired(agent: str, at: datetime | None = None) -> AgentRetired:
    return AgentRetired(
        event_id=str(uuid.uuid4()),
        source="test",
        agent_id=agent,
        specialty="general",
        reason="idle",
        occurred_at=at or datetime.now(UTC),
    )


async def test_ready_sync_and_wait_for_follow_what_is_on_the_topic(settings: KafkaSettings):
    seen: list[str] = []

    def apply(event: Event) -> None:
        assert isinstance(event, AgentRetired)
        if event.agent_id == "poison":
            raise ValueError("an odd event")  # logged and skipped, the view goes on
        seen.append(event.agent_id)

    async with EventProducer(settings) as producer:
        await producer.send_many([_retired("a1"), _retired("poison"), _retired("a2")])
        view = TopicView(settings, [AgentRetired.topic], apply, source="test")
        await view.start()
        try:
            await asyncio.wait_for(view.ready.wait(), 30)
            # Ready means what was there at the start is folded, the odd one skipped (in
            # any order: the agents' records sit on different partitions).
            assert sorted(seen) == ["a1", "a2"]
            await producer.send(_retired("a3"))
            assert await view.sync(timeout=10)
            assert seen[-1] == "a3"
            # wait_for wakes when the view advances; its value is what the state says.
            waiting = asyncio.create_task(view.wait_for(lambda: "a4" if "a4" in seen else None, 10))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await producer.send(_retired("a4"))
            assert await waiting == "a4"
            # Nothing comes: None after the timeout, not an error.
            assert await view.wait_for(lambda: None, 0.3) is None
            changed = asyncio.create_task(view.changed(10))
            await producer.send(_retired("a5"))
            assert await changed
        finally:
            await view.stop()


async def test_since_skips_what_is_older(settings: KafkaSettings):
    seen: list[str] = []
    async with EventProducer(settings) as producer:
        # The record's timestamp is the producer's send time: wait so "old" is old.
        await producer.send(_retired("old"))
        await asyncio.sleep(1.2)
        cut = datetime.now(UTC)
        await producer.send(_retired("new"))
    view = TopicView(
        settings,
        [AgentRetired.topic],
        lambda e: seen.append(e.agent_id),  # type: ignore[attr-defined]
        source="test",
        since=lambda: cut - timedelta(milliseconds=100),
    )
    await view.start()
    try:
        await asyncio.wait_for(view.ready.wait(), 30)
        assert seen == ["new"]
    finally:
        await view.stop()
