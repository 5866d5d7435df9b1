"""Which goal each recent run belongs to, so feedback through a key stays in the key's goal.

The improvement service checks that the user giving feedback owns the run; a key
also names a goal, and a run of another goal must be refused even when the same
user asked it. The index reads the terminal topics outside any group, from
``lookback`` before the gateway started, and keeps at most ``capacity`` runs, at most
``per_goal`` of one goal: a goal's runs push out only its own older runs, and past
``capacity`` the goal holding the most loses its oldest, so one key's flood of requests
never makes another goal's feedback 404. The router's refusal of a request under a run id
another goal used names that run id but is no run of the refused goal: it is skipped.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from streams.events import Event, WorkflowCompleted, WorkflowFailed, is_run_id_refusal
from streams.kafka import BACKGROUND_FETCH, KafkaSettings
from streams.quotas import PerGoal
from streams.views import TopicView

__all__ = ["RunIndex"]


class RunIndex:
    """run_id -> goal_id of every run that ended since ``lookback`` before start."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        lookback: timedelta,
        capacity: int = 200_000,
        per_goal: int = 50_000,
        source: str = "gateway",
    ) -> None:
        self.settings = settings
        self.lookback = lookback
        self.capacity = capacity
        self.source = source
        self._runs: PerGoal[str, None] = PerGoal(per_goal, capacity)
        self._goals: dict[str, str] = {}  # run_id -> goal_id of every run in _runs
        self._view: TopicView | None = None

    def note(self, run_id: str, goal_id: str) -> None:
        """Record a run's goal (the gateway records the runs it answered at once)."""
        known = self._goals.get(run_id)
        if known is not None and known != goal_id:
            self._runs.pop(known, run_id)
        self._goals[run_id] = goal_id
        for _, old, _ in self._runs.put(goal_id, run_id, None):
            del self._goals[old]

    def goal_of(self, run_id: str) -> str | None:
        return self._goals.get(run_id)

    def _apply(self, event: Event) -> None:
        # A refusal read as the run's latest end handed the run to the refused goal: the
        # run's own goal got 403 on feedback about it, the refused goal's key passed
        # the gateway's check.
        if isinstance(event, WorkflowCompleted | WorkflowFailed) and not is_run_id_refusal(event):
            self.note(event.run_id, event.goal_id)

    async def start(self, now: datetime) -> None:
        self._view = TopicView(
            self.settings,
            (WorkflowCompleted.topic, WorkflowFailed.topic),
            self._apply,
            source=self.source,
            since=lambda: now - self.lookback,
            # Off the answer's path (the gateway notes the runs it answers itself).
            **BACKGROUND_FETCH,
        )
        await self._view.start()

    async def lookup(self, run_id: str, wait: float = 2.0) -> str | None:
        """The run's goal; waits up to ``wait`` for the index to catch up when not known yet."""
        goal = self.goal_of(run_id)
        if goal is not None or self._view is None:
            return goal
        return await self._view.wait_for(lambda: self.goal_of(run_id), wait)

    async def stop(self) -> None:
        if self._view is not None:
            await self._view.stop()
