"""The budget's published view of a goal, as `budget show` reads it."""

from __future__ import annotations

from datetime import UTC, datetime

from streams.budgets import budget_view
from streams.clock import FakeClock
from streams.events import BudgetReported

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _report(day: str) -> BudgetReported:
    return BudgetReported(
        source="budget",
        goal_id="g1",
        max_agents=5,
        max_concurrent=2,
        max_daily_cost=10.0,
        agents=1,
        in_flight=1,
        queued=3,
        spent_today=0.25,
        held=0.065,
        day=day,
        cost_weight=2.5,
    )


def test_a_report_of_today_is_shown_as_it_is() -> None:
    view = budget_view(_report("2026-12-03"), FakeClock(NOW))
    assert view == {
        "goal_id": "g1",
        "max_agents": 5,
        "max_concurrent": 2,
        "max_daily_cost": 10.0,
        "agents": 1,
        "in_flight": 1,
        "queued": 3,
        "spent_today": 0.25,
        "held": 0.065,
        "day": "2026-12-03",
        "cost_weight": 2.5,
    }


def test_a_report_of_an_earlier_day_says_nothing_is_spent_today() -> None:
    view = budget_view(_report("2026-12-02"), FakeClock(NOW))
    assert view["spent_today"] == 0.0 and view["day"] == "2026-12-03"
    assert view["held"] == 0.065 and view["in_flight"] == 1
