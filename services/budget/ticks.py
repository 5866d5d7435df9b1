"""Which goals the budget's timer ticks: those of its table with tasks queued or running
(or holds and tokens that lapse by time).

The table keeps a record for every goal it ever saw, and most are idle: their tasks all
ended, and only their limits, spend and the ids kept for replays are left. The tick used
to read every record each second to find the few with tasks (``python -m
bench.budget_ticks``: 51 ms at 50,000 goals, 0.57 s at 500,000, on the one event loop
that decides every goal's admissions). It reads the goals kept here instead, in
O(goals with tasks).

The set follows the table: the service notes every record it writes, and on every
recovery of the table (the partitions this instance owns changed, or it started) it is
rebuilt from the whole table, so a goal whose record another instance wrote is ticked
once its partition comes here. A goal is never left out while its record (here) has
tasks; one too many costs a tick its owner finds nothing to do with. Each goal a tick
looks at goes to the back, so past the tick's limit the next tick starts with those left
out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

__all__ = ["BusyGoals", "is_busy"]


def is_busy(record: Mapping[str, Any] | None) -> bool:
    """Whether a goal's record has something a tick acts on by time alone: tasks queued or
    running, holds waiting for a cost (one its loader never reported is counted at the
    lapse by the budget's own report), admission tokens (given back at their lapse)."""
    return record is not None and bool(
        record.get("queue")
        or record.get("in_flight")
        or record.get("pending")
        or record.get("tokens")
    )


class BusyGoals:
    """The goals of ``table`` whose records have tasks queued or running, in the order a
    tick should look at them.

    :meth:`note` after every write of a record, :meth:`recovered` after every recovery of
    the table; :meth:`due` reads the records of the goals it returns (again: a changelog
    may have replaced one since it was noted) and of no other.
    """

    def __init__(self, table: Mapping[str, Any]) -> None:
        self.table = table
        self._goals: dict[str, None] = {}  # insertion order: the next to tick first

    def __len__(self) -> int:
        return len(self._goals)

    def note(self, goal: str, record: Mapping[str, Any] | None) -> None:
        """The goal's record as just written."""
        if is_busy(record):
            self._goals.setdefault(goal, None)
        else:
            self._goals.pop(goal, None)

    def recovered(self, records: Iterable[tuple[str, Any]]) -> None:
        """The table as its recovery left it: the goals with tasks, read afresh."""
        self._goals = {goal: None for goal, raw in records if is_busy(raw)}

    def due(self, limit: int) -> list[str]:
        """Up to ``limit`` goals to tick now, those ticked longest ago first."""
        due: list[str] = []
        for goal in list(islice(self._goals, limit)):
            del self._goals[goal]
            if is_busy(self.table.get(goal)):
                self._goals[goal] = None  # to the back: past the limit, the rest go next
                due.append(goal)
        return due
