"""The budget's tick: sent for every goal with tasks queued or running, without reading the
records of the goals that have none."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from services.budget.state import BudgetDefaults, BudgetState
from services.budget.ticks import BusyGoals

IDLE = BudgetState.new("g", BudgetDefaults()).to_dict() | {"spend": {"2026-05-01": 0.5}}


def _busy(goal: str) -> dict[str, Any]:
    return IDLE | {"goal_id": goal, "queue": ["r1"], "in_flight": {"r0": ["", 0.0, "", ""]}}


class _Table(dict[str, Any]):
    """A table (as the tick sees it) that counts the records read from it."""

    reads = 0

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        for item in super().items():
            self.reads += 1
            yield item

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.reads += 1
        return super().get(key, default)


def _written(table: _Table, goals: BusyGoals, goal: str, record: dict[str, Any]) -> None:
    """What the service does with every record it writes."""
    table[goal] = record
    goals.note(goal, record)


def test_the_tick_reads_no_idle_goals_record():
    """50,000 goals whose tasks all ended (only their spend and limits left) and three
    with tasks: a tick reads the three (it read all 50,003 records every second)."""
    table = _Table()
    goals = BusyGoals(table)
    for i in range(50_000):
        _written(table, goals, f"idle-{i}", IDLE | {"goal_id": f"idle-{i}"})
    for goal in ("b1", "b2", "b3"):
        _written(table, goals, goal, _busy(goal))
    table.reads = 0
    assert sorted(goals.due(10_000)) == ["b1", "b2", "b3"]
    assert table.reads <= 3


def test_a_goal_recovered_busy_is_ticked_and_one_gone_idle_is_not():
    """Records a recovery brought (another instance wrote them) are ticked; a goal whose
    tasks ended is not, whether this instance wrote it or a changelog did."""
    table = _Table()
    goals = BusyGoals(table)
    _written(table, goals, "mine", _busy("mine"))
    table["moved-here"] = _busy("moved-here")  # read from the changelog on assignment
    table["moved-idle"] = IDLE | {"goal_id": "moved-idle"}
    goals.recovered(table.items())
    assert sorted(goals.due(100)) == ["mine", "moved-here"]
    _written(table, goals, "mine", IDLE | {"goal_id": "mine"})
    table["moved-here"] = IDLE | {"goal_id": "moved-here"}  # a standby copy, written elsewhere
    assert goals.due(100) == []
    del table["moved-here"]
    goals.recovered(table.items())
    assert goals.due(100) == []


def test_every_busy_goal_is_ticked_in_turn_past_the_limit():
    """More goals with tasks than one tick sends: the next tick starts with the goals the
    last one left out, so none waits for ever (the first ones by table order were the only
    ones ticked)."""
    table = _Table()
    goals = BusyGoals(table)
    for i in range(25):
        _written(table, goals, f"g{i:02d}", _busy(f"g{i:02d}"))
    ticked: list[str] = []
    for _ in range(3):
        due = goals.due(10)
        assert len(due) == 10
        ticked += due
    assert set(ticked) == {f"g{i:02d}" for i in range(25)}


def test_a_goal_with_only_a_hold_waiting_for_its_cost_or_a_token_is_ticked():
    """A call given up on at the timeout whose loader died is counted by the budget at the
    hold's lapse, and an unused admission token gives its slot back at its lapse: both by
    time alone, with nothing else of the goal happening."""
    table, goals = _Table(), BusyGoals(_Table())
    goals.table = table
    pending = IDLE | {"goal_id": "p", "pending": {"r1": [0.01, "2026-05-01T00:00:00", None]}}
    tokens = IDLE | {"goal_id": "t", "tokens": {"k": ["", 0.01, "", "", "R1"]}}
    for goal, record in (("idle", IDLE), ("p", pending), ("t", tokens)):
        _written(table, goals, goal, record)
    assert sorted(goals.due(10)) == ["p", "t"]
