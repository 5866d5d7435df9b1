"""The dashboard of `orchestrator metrics`: one SQL view of the event log per metric.

The views (``metric_*``, infra/clickhouse/002_metrics.sql) are what the analytics sink
publishes for reading; the queries go to its SQL surface, nothing is counted on the side.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import Any

from streams.clock import Clock, SystemClock
from streams.sql import SqlSource, quote_string

__all__ = ["compute_metrics", "format_metrics", "metric_queries"]

# The table refuses events before this instant, so "all time" starts here.
_BEGINNING = datetime(2000, 1, 1, tzinfo=UTC)


def _ts(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("metric windows need timezone-aware datetimes")
    return quote_string(when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])


def _view(name: str, **params: str | datetime) -> str:
    args = ", ".join(
        f"{key} = {_ts(value) if isinstance(value, datetime) else quote_string(value)}"
        for key, value in params.items()
    )
    return f"SELECT * FROM {name}({args})"


def metric_queries(
    *,
    now: datetime,
    since: datetime | None = None,
    trend_days: int = 7,
    top_goals: int = 10,
) -> dict[str, str]:
    """Every metric's SQL: windows are [since, now); "today" is the UTC day of ``now``."""
    if trend_days < 1 or top_goals < 1:
        raise ValueError("trend_days and top_goals must be at least 1")
    window: dict[str, str | datetime] = {"since": since or _BEGINNING, "until": now}
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    trend_start = today - timedelta(days=trend_days - 1)
    return {
        "agents_spawned_today": _view(
            "metric_event_count", event_type="agent_spawned", since=today, until=now
        ),
        "active_agents": _view("metric_active_agents", until=now),
        "patterns_discovered": _view("metric_patterns_discovered", **window),
        "automations_created": _view(
            "metric_event_count", event_type="automation_created", **window
        ),
        "user_feedback_items": _view(
            "metric_event_count", event_type="feedback_received", **window
        ),
        "cost_by_day": _view("metric_cost_by_day", since=trend_start, until=now),
        "response_time": _view("metric_response_time", **window),
        "user_satisfaction": _view("metric_user_satisfaction", **window),
        "success_by_specialty": _view("metric_success_by_specialty", **window),
        "spend_by_goal": _view("metric_spend_by_goal", **window) + f" LIMIT {int(top_goals)}",
        "answers_by_tier": _view("metric_answers_by_tier", **window),
    }


def _records(source: SqlSource, sql: str) -> list[dict[str, Any]]:
    result = source.query(sql)
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def _one(source: SqlSource, sql: str) -> dict[str, Any]:
    rows = _records(source, sql)
    return rows[0] if rows else {}


def _float(value: Any) -> float | None:
    # A server may render 64-bit numbers as strings in JSON; nan means "no data".
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _int(value: Any) -> int:
    return int(value or 0)


def _day(value: Any) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def compute_metrics(
    source: SqlSource,
    *,
    since: timedelta | None = None,
    now: datetime | None = None,
    clock: Clock | None = None,
    trend_days: int = 7,
    top_goals: int = 10,
) -> dict[str, Any]:
    """The dashboard as a JSON-ready dict.

    ``since`` limits the windowed metrics to the last ``since`` before ``now``
    (default: all time); ``agents_spawned_today`` and ``cost_today_usd`` cover
    the UTC day of ``now``; ``active_agents`` is the state at ``now``.
    """
    now = now or (clock or SystemClock()).now()
    start = now - since if since is not None else None
    sql = metric_queries(now=now, since=start, trend_days=trend_days, top_goals=top_goals)

    days = [
        (_day(r["day"]), _float(r["cost_usd"]) or 0.0) for r in _records(source, sql["cost_by_day"])
    ]
    cost_today = days[-1][1] if days else 0.0
    cost_yesterday = days[-2][1] if len(days) > 1 else 0.0
    change = (cost_today - cost_yesterday) / cost_yesterday * 100 if cost_yesterday else None
    trend = [{"day": day, "cost_usd": cost} for day, cost in days]

    response = _one(source, sql["response_time"])
    satisfaction = _one(source, sql["user_satisfaction"])
    return {
        "window": {
            "since": start.astimezone(UTC).isoformat() if start else None,
            "until": now.astimezone(UTC).isoformat(),
        },
        "agents_spawned_today": _int(_one(source, sql["agents_spawned_today"]).get("events")),
        "active_agents": _int(_one(source, sql["active_agents"]).get("active_agents")),
        "patterns_discovered": _int(_one(source, sql["patterns_discovered"]).get("patterns")),
        "automations_created": _int(_one(source, sql["automations_created"]).get("events")),
        "user_feedback_items": _int(_one(source, sql["user_feedback_items"]).get("events")),
        "cost_today_usd": cost_today,
        "cost_trend": trend,
        "cost_change_vs_yesterday_pct": change,
        "response_time_ms": {
            "answers": _int(response.get("answers")),
            "avg": _float(response.get("avg_ms")),
            "p95": _float(response.get("p95_ms")),
        },
        "user_satisfaction": {
            "scored": _int(satisfaction.get("scored")),
            "satisfied": _int(satisfaction.get("satisfied")),
            "share": _float(satisfaction.get("satisfaction")),
        },
        "success_rate_by_specialty": [
            {
                "specialty": str(r["specialty"]),
                "completed": _int(r["completed"]),
                "failed": _int(r["failed"]),
                "success_rate": _float(r["success_rate"]),
            }
            for r in _records(source, sql["success_by_specialty"])
        ],
        "spend_by_goal": [
            {
                "goal_id": str(r["goal_id"]),
                "spend_usd": _float(r["spend_usd"]) or 0.0,
                "llm_calls": _int(r["llm_calls"]),
            }
            for r in _records(source, sql["spend_by_goal"])
        ],
        "answers_by_tier": {
            str(r["degradation_tier"]): _int(r["answers"])
            for r in _records(source, sql["answers_by_tier"])
        },
    }


def _num(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """The dashboard as plain text lines, for a terminal."""
    window = metrics["window"]
    rt, sat = metrics["response_time_ms"], metrics["user_satisfaction"]
    share = sat["share"]
    lines = [
        f"window: {window['since'] or 'all time'} .. {window['until']}",
        f"agents spawned today   {metrics['agents_spawned_today']}",
        f"active agents          {metrics['active_agents']}",
        f"patterns discovered    {metrics['patterns_discovered']}",
        f"automations created    {metrics['automations_created']}",
        f"user feedback items    {metrics['user_feedback_items']}",
        f"cost today             ${metrics['cost_today_usd']:.4f}"
        + (
            f" ({metrics['cost_change_vs_yesterday_pct']:+.0f}% vs yesterday)"
            if metrics["cost_change_vs_yesterday_pct"] is not None
            else ""
        ),
        "cost trend             "
        + "  ".join(f"{d['day'][5:]} ${d['cost_usd']:.4f}" for d in metrics["cost_trend"]),
        f"response time          avg {_num(rt['avg'], ' ms')}, p95 {_num(rt['p95'], ' ms')}"
        f" over {rt['answers']} answers",
        f"user satisfaction      {_num(None if share is None else share * 100, '%', 0)}"
        f" ({sat['satisfied']} of {sat['scored']} scored >= 4)",
        "success by specialty   "
        + (
            ", ".join(
                f"{s['specialty'] or '(none)'} {_num((s['success_rate'] or 0) * 100, '%', 0)}"
                f" ({s['completed']}/{s['completed'] + s['failed']})"
                for s in metrics["success_rate_by_specialty"]
            )
            or "-"
        ),
        "spend per goal         "
        + (
            ", ".join(f"{g['goal_id']} ${g['spend_usd']:.4f}" for g in metrics["spend_by_goal"])
            or "-"
        ),
        "answers per tier       "
        + (", ".join(f"{k} {v}" for k, v in metrics["answers_by_tier"].items()) or "-"),
    ]
    return "\n".join(lines)
