"""Which goal each recent run belongs to, so feedback through a key stays in the key's goal.

The improvement service checks that the user giving feedback owns the run; a key
also names a goal, and a run of another goal must be refused even when the same
user asked it. The index reads the terminal topics outside any group, from
``lookback`` before the gateway started, and keeps at most ``capacity`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from datetime import datetime, timedelta

from aiokafka import TopicPartition

from streams.events import Event, WorkflowCompleted, WorkflowFailed
from streams.kafka import EventConsumer, KafkaSettings

__all__ = ["RunIndex"]


class RunIndex:
    """run_id -> goal_id of every run that ended since ``lookback`` before start."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        lookback: timedelta,
        capacity: int = 200_000,
        source: str = "gateway",
    ) -> None:
        self.lookback = lookback
        self.capacity = capacity
        self._goals: OrderedDict[str, str] = OrderedDict()
        self._consumer = EventConsumer(
            settings,
            (WorkflowCompleted.topic, WorkflowFailed.topic),
            group_id=None,
            source=source,
        )
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def note(self, run_id: str, goal_id: str) -> None:
        """Record a run's goal (the gateway records the runs it answered at once)."""
        self._goals[run_id] = goal_id
        self._goals.move_to_end(run_id)
        while len(self._goals) > self.capacity:
            self._goals.popitem(last=False)

    def goal_of(self, run_id: str) -> str | None:
        return self._goals.get(run_id)

    def _apply(self, event: Event) -> None:
        if isinstance(event, WorkflowCompleted | WorkflowFailed):
            self.note(event.run_id, event.goal_id)

    async def start(self, now: datetime) -> None:
        await self._consumer.start()
        raw = self._consumer.raw
        parts = list(raw.assignment())
        since = int((now - self.lookback).timestamp() * 1000)
        found = await raw.offsets_for_times(dict.fromkeys(parts, since))
        ends = await raw.end_offsets(parts)
        for tp in parts:
            at = found.get(tp)
            raw.seek(tp, at.offset if at is not None else ends[tp])
        self._task = asyncio.create_task(self._follow(ends), name="gateway-runs")

    async def _follow(self, ends: dict[TopicPartition, int]) -> None:
        pending = dict(ends)
        raw = self._consumer.raw
        async for batch in self._consumer.batches(timeout_ms=200, idle=True):
            for delivery in batch:
                self._apply(delivery.event)
            for tp, end in list(pending.items()):
                if await raw.position(tp) >= end:
                    del pending[tp]
            if not pending:
                self.ready.set()

    async def lookup(self, run_id: str, wait: float = 2.0) -> str | None:
        """The run's goal; waits up to ``wait`` for the index to catch up when not known yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            goal = self.goal_of(run_id)
            if goal is not None or loop.time() >= deadline:
                return goal
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()
