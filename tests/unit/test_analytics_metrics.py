"""Metric windows, SQL parameters and the dashboard's assembly, without an engine."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta

import pytest

from services.cli.common import parse_duration
from services.cli.dashboard import compute_metrics, format_metrics, metric_queries
from streams.clock import FakeClock
from streams.sql import QueryResult

NOW = datetime(2026, 11, 20, 15, 30, 0, 250000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("2w", 1209600), ("1.5h", 5400)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "1y", "1 hour"])
def test_bad_durations_say_how(text):
    with pytest.raises(ValueError, match="ms, s, m, h, d, w"):
        parse_duration(text)


def _params(sql: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+) = '([^']*)'", sql))


def test_windows_today_and_trend_bounds():
    sql = metric_queries(now=NOW, since=NOW - timedelta(hours=24), trend_days=7)
    assert _params(sql["response_time"]) == {
        "since": "2026-11-19 15:30:00.250",
        "until": "2026-11-20 15:30:00.250",
    }
    assert _params(sql["agents_spawned_today"]) == {
        "event_type": "agent_spawned",
        "since": "2026-11-20 00:00:00.000",
        "until": "2026-11-20 15:30:00.250",
    }
    assert _params(sql["cost_by_day"])["since"] == "2026-11-14 00:00:00.000"
    assert _params(sql["active_agents"]) == {"until": "2026-11-20 15:30:00.250"}
    assert sql["spend_by_goal"].endswith("LIMIT 10")


def test_all_time_starts_where_the_table_does():
    sql = metric_queries(now=NOW)
    assert _params(sql["answers_by_tier"])["since"] == "2000-01-01 00:00:00.000"


def test_naive_times_are_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        metric_queries(now=datetime(2026, 1, 1))


class CannedSource:
    """Answers each metric view with fixed rows, the way ClickHouse shapes them."""

    def __init__(self, rows: dict[str, QueryResult]) -> None:
        self.rows = rows
        self.seen: list[str] = []

    def query(self, sql: str, *, readonly: bool = True) -> QueryResult:
        assert readonly
        self.seen.append(sql)
        view = re.match(r"SELECT \* FROM (\w+)\(", sql)
        assert view is not None
        name = view.group(1)
        if name == "metric_event_count":
            name += ":" + _params(sql)["event_type"]
        return self.rows[name]


def canned() -> CannedSource:
    days = [date(2026, 11, 14) + timedelta(days=i) for i in range(7)]
    costs = [0, 0, 0, 0.3, 0, 0.2, 0.15]
    by_day = list(zip(days, costs, strict=True))
    return CannedSource(
        {
            "metric_event_count:agent_spawned": QueryResult(["events"], [(2,)]),
            "metric_event_count:automation_created": QueryResult(["events"], [(1,)]),
            "metric_event_count:feedback_received": QueryResult(["events"], [(5,)]),
            "metric_active_agents": QueryResult(["active_agents"], [(3,)]),
            "metric_patterns_discovered": QueryResult(["patterns"], [(4,)]),
            "metric_cost_by_day": QueryResult(["day", "cost_usd"], by_day),
            "metric_response_time": QueryResult(
                ["answers", "avg_ms", "p95_ms"], [(5, 400.0, 1000.0)]
            ),
            "metric_user_satisfaction": QueryResult(
                ["scored", "satisfied", "satisfaction"], [(4, 2, 0.5)]
            ),
            "metric_success_by_specialty": QueryResult(
                ["specialty", "completed", "failed", "success_rate"],
                [("code", 2, 0, 1.0), ("math", 3, 1, 0.75)],
            ),
            "metric_spend_by_goal": QueryResult(
                ["goal_id", "spend_usd", "llm_calls"], [("g2", 0.35, 2), ("g1", 0.3, 2)]
            ),
            "metric_answers_by_tier": QueryResult(
                ["degradation_tier", "answers"], [("llm", 3), ("keyword", 1)]
            ),
        }
    )


def test_dashboard_is_assembled_from_the_views():
    metrics = compute_metrics(canned(), now=NOW)

    assert metrics["agents_spawned_today"] == 2
    assert metrics["active_agents"] == 3
    assert metrics["patterns_discovered"] == 4
    assert metrics["automations_created"] == 1
    assert metrics["user_feedback_items"] == 5
    assert metrics["cost_today_usd"] == 0.15
    assert [d["day"] for d in metrics["cost_trend"]][-1] == "2026-11-20"
    assert metrics["cost_change_vs_yesterday_pct"] == pytest.approx(-25.0)
    assert metrics["response_time_ms"] == {"answers": 5, "avg": 400.0, "p95": 1000.0}
    assert metrics["user_satisfaction"] == {"scored": 4, "satisfied": 2, "share": 0.5}
    assert metrics["success_rate_by_specialty"][1] == {
        "specialty": "math",
        "completed": 3,
        "failed": 1,
        "success_rate": 0.75,
    }
    assert [g["goal_id"] for g in metrics["spend_by_goal"]] == ["g2", "g1"]
    assert metrics["answers_by_tier"] == {"llm": 3, "keyword": 1}
    assert metrics["window"] == {"since": None, "until": "2026-11-20T15:30:00.250000+00:00"}
    json.dumps(metrics)  # the CLI prints it with --json


def test_json_renderings_of_numbers_and_empty_windows_are_understood():
    source = canned()
    # A ClickHouse server may quote 64-bit integers in JSON; an empty window gives nulls.
    source.rows["metric_response_time"] = QueryResult(
        ["answers", "avg_ms", "p95_ms"], [("0", None, None)]
    )
    source.rows["metric_user_satisfaction"] = QueryResult(
        ["scored", "satisfied", "satisfaction"], [("0", "0", None)]
    )
    source.rows["metric_cost_by_day"] = QueryResult(
        ["day", "cost_usd"], [("2026-11-19", 0), ("2026-11-20", 0.5)]
    )
    metrics = compute_metrics(source, now=NOW, since=timedelta(hours=1))

    assert metrics["response_time_ms"] == {"answers": 0, "avg": None, "p95": None}
    assert metrics["user_satisfaction"]["share"] is None
    assert metrics["cost_change_vs_yesterday_pct"] is None  # no spend yesterday: no ratio
    assert metrics["window"]["since"] == "2026-11-20T14:30:00.250000+00:00"


def test_now_comes_from_the_clock_when_not_given():
    source = canned()
    compute_metrics(source, clock=FakeClock(NOW))
    assert all("2026-11-20 15:30:00.250" in sql for sql in source.seen)


def test_text_rendering_shows_every_metric():
    text = format_metrics(compute_metrics(canned(), now=NOW))
    for label in (
        "agents spawned today   2",
        "active agents          3",
        "cost today             $0.1500 (-25% vs yesterday)",
        "avg 400.0 ms, p95 1,000.0 ms over 5 answers",
        "user satisfaction      50% (2 of 4 scored >= 4)",
        "math 75% (3/4)",
        "g2 $0.3500",
        "llm 3, keyword 1",
    ):
        assert label in text
