"""Read a goal's budget from the budget table's changelog, outside the service."""

from __future__ import annotations

import json
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.budget.service import APP_NAME, TABLE_NAME
from services.budget.state import BudgetState
from streams.clock import Clock, SystemClock
from streams.kafka import KafkaSettings

__all__ = ["changelog_topic", "read_budget"]


def changelog_topic(settings: KafkaSettings) -> str:
    return f"{settings.prefix}{APP_NAME}-{TABLE_NAME}-changelog"


async def read_budget(
    settings: KafkaSettings, goal_id: str, clock: Clock | None = None
) -> dict[str, Any] | None:
    """The goal's limits and usage now, or None when the budget never saw the goal."""
    topic = changelog_topic(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        found = consumer.partitions_for_topic(topic)
        if not found:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            found = consumer.partitions_for_topic(topic) or set()
        parts = [TopicPartition(topic, p) for p in sorted(found)]
        if not parts:
            return None
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        key = json.dumps(goal_id).encode()
        latest: dict[str, Any] | None = None
        remaining = {tp for tp in parts if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for records in batch.values():
                for r in records:
                    if r.key == key and r.value is not None:
                        latest = json.loads(r.value)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        if latest is None:
            return None
        return BudgetState.from_dict(latest).summary((clock or SystemClock()).now())
    finally:
        await consumer.stop()
