"""A goal's budget as the budget service publishes it: the latest ``budget_reported``.

The budget service owns each goal's record and reports its view of it (limits, agents,
running and queued tasks, today's spend, holds) to a compacted topic keyed by goal, a
moment after it changes and at once when a limit changes. Anyone may read it here
instead of the service's private table.
"""

from __future__ import annotations

from typing import Any

from streams.clock import Clock, SystemClock, utc_day
from streams.events import BudgetReported
from streams.kafka import KafkaSettings
from streams.registry import read_topics_to_end

__all__ = ["budget_view", "latest_report", "read_budget"]


async def latest_report(settings: KafkaSettings, goal_id: str) -> BudgetReported | None:
    """The goal's latest report, or None when the budget never reported the goal."""
    latest: BudgetReported | None = None
    for event in await read_topics_to_end(settings, (BudgetReported.topic,)):
        if isinstance(event, BudgetReported) and event.goal_id == goal_id:
            if latest is None or event.occurred_at >= latest.occurred_at:
                latest = event
    return latest


def budget_view(report: BudgetReported, clock: Clock | None = None) -> dict[str, Any]:
    """The report as `budget show` prints it, as of now.

    Spend is filed per UTC day: a report from an earlier day than today's says nothing
    about today, on which nothing has been spent until the budget reports again.
    """
    today = utc_day((clock or SystemClock()).now())
    stale = report.day < today
    return {
        "goal_id": report.goal_id,
        "max_agents": report.max_agents,
        "max_concurrent": report.max_concurrent,
        "max_daily_cost": report.max_daily_cost,
        "agents": report.agents,
        "in_flight": report.in_flight,
        "queued": report.queued,
        "spent_today": 0.0 if stale else report.spent_today,
        "held": report.held,
        "day": today if stale else report.day,
        "cost_weight": report.cost_weight,
    }


async def read_budget(
    settings: KafkaSettings, goal_id: str, clock: Clock | None = None
) -> dict[str, Any] | None:
    """The goal's limits and usage as last reported (:func:`budget_view`), or None."""
    report = await latest_report(settings, goal_id)
    return None if report is None else budget_view(report, clock)
