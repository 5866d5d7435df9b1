"""Which runs already have their terminal event: the record a service consults before it acts.

A task replayed after a crash or a rebalance must not be answered (or paid for) a
second time. Services that act on runs keep an :class:`EndedRuns` fed from the
terminal topics (``workflow_completed``, ``workflow_failed``), read outside any
group from a recent point in time (:func:`follow_recent`), so a restarted instance
knows what its predecessor finished before it takes any work.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from datetime import timedelta
from typing import Any

from streams.clock import Clock
from streams.events import (
    Event,
    LlmCallCompleted,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)
from streams.kafka import KafkaSettings
from streams.views import TopicView

__all__ = ["ATTEMPT_TOPICS", "TERMINAL_TOPICS", "EndedRuns", "follow_recent"]

log = logging.getLogger(__name__)
TERMINAL_TOPICS = (WorkflowCompleted.topic, WorkflowFailed.topic)
# With the attempts, the cost reports: an answer call that failed says so under an id
# derived from its attempt (see ``failed_call_id``), and that attempt paid nothing.
ATTEMPT_TOPICS = (WorkflowStarted.topic, LlmCallCompleted.topic)
_CALLS = uuid.UUID("3f6b2d8e-9a41-4c7e-b5d0-6e2a8c1f4b97")


def failed_call_id(attempt: str, legacy: bool) -> str:
    """The id of the report of an attempt's answer call that failed for good (unbilled):
    whoever runs the task next knows that attempt paid nothing."""
    return str(uuid.uuid5(_CALLS, f"{attempt}:failed:{int(legacy)}"))


# The goal of runs a snapshot written before runs were kept by goal ended: any goal's.
_ANY_GOAL = "*"  # never a goal id (those start with a letter or digit)


class EndedRuns:
    """Runs with a terminal event, the newest ``limit`` of them, each by its goal and run id.

    A run is its goal's: a run id that another goal used too (a producer that chose its
    own ids) names another run, which has not ended because the first did, and whose
    attempts are its own.
    """

    def __init__(self, clock: Clock, limit: int = 500_000) -> None:
        self.clock = clock
        self._runs: OrderedDict[tuple[str, str], None] = OrderedDict()  # (goal, run)
        self._goals: dict[str, int] = {}  # run id -> how many goals' runs of it ended
        # (goal, run) -> ids of the workflow_started events of its attempts (each a possible call)
        self._attempts: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        # (goal, run) -> ids of the reports of its answer calls that failed (unbilled)
        self._failed: OrderedDict[tuple[str, str], set[str]] = OrderedDict()
        # (goal, agent) -> the cost of its newest paid answer read from the terminal topics
        self._cost: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._runs)

    def apply(self, event: Event) -> None:
        goal = event.goal_id or ""
        if isinstance(event, WorkflowCompleted | WorkflowFailed):
            self.add(event.run_id, goal)
            self._attempts.pop((goal, event.run_id), None)
            self._failed.pop((goal, event.run_id), None)
            if isinstance(event, WorkflowCompleted) and event.agent_id and event.cost_usd > 0:
                # By goal too: another goal's answer naming this agent set what its own
                # goal was charged for an unreported call.
                key = (goal, event.agent_id)
                self._cost.pop(key, None)
                self._cost[key] = event.cost_usd
                if len(self._cost) > self._limit:
                    self._cost.popitem(last=False)
        elif isinstance(event, WorkflowStarted) and not self.has(event.run_id, goal):
            seen = self._attempts.setdefault((goal, event.run_id), [])
            if event.event_id not in seen:
                seen.append(event.event_id)
            if len(self._attempts) > self._limit:
                self._attempts.popitem(last=False)

        elif (
            isinstance(event, LlmCallCompleted)
            and event.purpose == "answer"
            and not event.ok
            and event.run_id
            and not self.has(event.run_id, goal)
        ):
            self._failed.setdefault((goal, event.run_id), set()).add(event.event_id)
            if len(self._failed) > self._limit:
                self._failed.popitem(last=False)

    def unbilled(self, run_id: str, attempt: str, *, goal_id: str) -> bool:
        """True when the attempt's answer call is known to have failed (nothing paid)."""
        return failed_call_id(attempt, False) in self._failed.get((goal_id, run_id), ())

    def last_cost(self, goal_id: str | None, agent_id: str) -> float | None:
        """What the agent's newest paid answer for ``goal_id`` cost (an estimate for a call
        not reported)."""
        return self._cost.get((goal_id or "", agent_id))

    def attempts(self, run_id: str, *, goal_id: str) -> list[str]:
        """The ids of the ``workflow_started`` events of a run that has not ended."""
        return list(self._attempts.get((goal_id, run_id), ()))

    def add(self, run_id: str, goal_id: str | None) -> None:
        key = (goal_id or "", run_id)
        if key in self._runs:
            self._runs.move_to_end(key)
            return
        self._runs[key] = None
        self._goals[run_id] = self._goals.get(run_id, 0) + 1
        while len(self._runs) > self._limit:
            (_, old), _ = self._runs.popitem(last=False)
            left = self._goals.pop(old) - 1
            if left:
                self._goals[old] = left

    def has(self, run_id: str, goal_id: str | None = None) -> bool:
        """Whether ``goal_id``'s run ``run_id`` ended; with no goal, any goal's."""
        if goal_id is None:
            return run_id in self._goals
        return (goal_id, run_id) in self._runs or (_ANY_GOAL, run_id) in self._runs

    def dump(self) -> dict[str, Any]:
        """The runs as plain values, oldest first (for a snapshot)."""
        return {
            # Run ids as before (what an older reader reads), and beside them their goals.
            "runs": [r for _, r in self._runs],
            "goals": [g for g, _ in self._runs],
            "attempts": [[r, list(i), g] for (g, r), i in self._attempts.items()],
            "failed": [[r, sorted(i), g] for (g, r), i in self._failed.items()],
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace what is known with a :meth:`dump`, or with an older one's runs: those
        (their goal not written) ended for any goal, as they did for their writer."""
        runs = [str(r) for r in data["runs"]]
        goals = [str(g) for g in data.get("goals", [_ANY_GOAL] * len(runs))]
        if len(goals) != len(runs):
            raise ValueError(f"{len(runs)} ended runs with {len(goals)} goals")

        def key(row: list[Any]) -> tuple[str, str]:
            return (str(row[2]) if len(row) > 2 else _ANY_GOAL), str(row[0])

        attempts = OrderedDict((key(row), [str(i) for i in row[1]]) for row in data["attempts"])
        failed = OrderedDict((key(row), {str(i) for i in row[1]}) for row in data.get("failed", []))
        self._runs, self._goals = OrderedDict(), {}
        for goal, run in zip(goals, runs, strict=True):
            self.add(run, goal)
        self._attempts, self._failed = attempts, failed


async def follow_recent(
    settings: KafkaSettings,
    ended: EndedRuns,
    ready: asyncio.Event,
    *,
    window_s: float,
    source: str,
    attempts: bool = False,
) -> None:
    """Fold the terminal topics (and with ``attempts`` the started ones) from ``window_s``
    ago into ``ended`` forever.

    ``ready`` is set once what was on the topics at the start has been read.
    Records older than the window are not read: a run admitted that long ago is
    past any deadline.
    """
    topics = TERMINAL_TOPICS + (ATTEMPT_TOPICS if attempts else ())
    since = ended.clock.now() - timedelta(seconds=window_s)
    view = TopicView(settings, topics, ended.apply, source=source, since=lambda: since)
    await view.start()
    try:
        await view.ready.wait()
        ready.set()
        await view.wait()
    finally:
        await view.stop()
