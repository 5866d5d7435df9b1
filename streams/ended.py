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


class EndedRuns:
    """Run ids with a terminal event, the newest ``limit`` of them."""

    def __init__(self, clock: Clock, limit: int = 500_000) -> None:
        self.clock = clock
        self._runs: OrderedDict[str, None] = OrderedDict()
        # run id -> ids of the workflow_started events of its attempts (each a possible call)
        self._attempts: OrderedDict[str, list[str]] = OrderedDict()
        # run id -> ids of the reports of its answer calls that failed (unbilled)
        self._failed: OrderedDict[str, set[str]] = OrderedDict()
        # (goal, agent) -> the cost of its newest paid answer read from the terminal topics
        self._cost: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._runs)

    def apply(self, event: Event) -> None:
        if isinstance(event, WorkflowCompleted | WorkflowFailed):
            self.add(event.run_id)
            self._attempts.pop(event.run_id, None)
            self._failed.pop(event.run_id, None)
            if isinstance(event, WorkflowCompleted) and event.agent_id and event.cost_usd > 0:
                # By goal too: another goal's answer naming this agent set what its own
                # goal was charged for an unreported call.
                key = (event.goal_id or "", event.agent_id)
                self._cost.pop(key, None)
                self._cost[key] = event.cost_usd
                if len(self._cost) > self._limit:
                    self._cost.popitem(last=False)
        elif isinstance(event, WorkflowStarted) and event.run_id not in self._runs:
            seen = self._attempts.setdefault(event.run_id, [])
            if event.event_id not in seen:
                seen.append(event.event_id)
            if len(self._attempts) > self._limit:
                self._attempts.popitem(last=False)

        elif (
            isinstance(event, LlmCallCompleted)
            and event.purpose == "answer"
            and not event.ok
            and event.run_id
            and event.run_id not in self._runs
        ):
            self._failed.setdefault(event.run_id, set()).add(event.event_id)
            if len(self._failed) > self._limit:
                self._failed.popitem(last=False)

    def unbilled(self, run_id: str, attempt: str) -> bool:
        """True when the attempt's answer call is known to have failed (nothing paid)."""
        return failed_call_id(attempt, False) in self._failed.get(run_id, ())

    def last_cost(self, goal_id: str | None, agent_id: str) -> float | None:
        """What the agent's newest paid answer for ``goal_id`` cost (an estimate for a call
        not reported)."""
        return self._cost.get((goal_id or "", agent_id))

    def attempts(self, run_id: str) -> list[str]:
        """The ids of the ``workflow_started`` events of a run that has not ended."""
        return list(self._attempts.get(run_id, ()))

    def add(self, run_id: str) -> None:
        self._runs[run_id] = None
        self._runs.move_to_end(run_id)
        if len(self._runs) > self._limit:
            self._runs.popitem(last=False)

    def has(self, run_id: str) -> bool:
        return run_id in self._runs

    def dump(self) -> dict[str, Any]:
        """The runs as plain values, oldest first (for a snapshot)."""
        return {
            "runs": list(self._runs),
            "attempts": [[r, list(i)] for r, i in self._attempts.items()],
            "failed": [[r, sorted(i)] for r, i in self._failed.items()],
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace what is known with a :meth:`dump`."""
        runs = OrderedDict.fromkeys(str(r) for r in data["runs"])
        attempts = OrderedDict((str(r), [str(i) for i in ids]) for r, ids in data["attempts"])
        failed = OrderedDict((str(r), {str(i) for i in ids}) for r, ids in data.get("failed", []))
        self._runs, self._attempts, self._failed = runs, attempts, failed


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
