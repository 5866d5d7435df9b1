"""Chaos benchmark: invariants 1-3 of the design measured under kills, pauses and outages.

The platform runs as processes (every service, the analytics sink included) on a
fresh topic prefix and data dir, against a broker the benchmark starts for itself
(its own port and data dir: killing it never touches anyone else's broker) and a
fake LLM whose answers are sometimes slow and sometimes fail. Steady traffic over
several goals with tight limits goes through the SDK while a seeded schedule
SIGKILLs, SIGSTOPs/SIGCONTs and restarts each service and the broker. After a
settle period it reads every topic to the end and the ClickHouse event log, and
reports what it measured; the exit code is 0 only when every invariant held.

    python -m bench.chaos --minutes 3 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

# Runs as `python bench/chaos.py` too, not only with -m.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from bench._console import console as bench_console  # noqa: E402
from local.platform import Instance, Launcher  # noqa: E402
from streams.config import BROKER_VARIABLES, broker_env  # noqa: E402
from streams.events import (  # noqa: E402
    AgentRetired,
    AgentSpawned,
    Event,
    LlmCallCompleted,
    RequestReceived,
    TaskAdmitted,
    WorkflowCompleted,
    WorkflowFailed,
)

__all__ = [
    "SERVICES",
    "TARGETS",
    "ChaosConfig",
    "Fault",
    "GoalSpec",
    "LlmCall",
    "compute_report",
    "main",
    "make_schedule",
    "print_report",
    "run_chaos",
]

ROOT = Path(__file__).resolve().parent.parent
# Start order as `orchestrator up` uses it: the sink first, the router last but one.
SERVICES = ("analytics", "budget", "spawner", "loader", "router", "improvement")
TARGETS = (*SERVICES, "broker")
Action = Literal["kill", "pause"]

# The loader's LLM timeout: no task runs past its deadline plus this.
LLM_TIMEOUT_S = 10.0
# What every answered LLM call costs: the fake LLM reports this usage, the platform
# prices it with this table (USD per 1M tokens), and so does the benchmark.
PROMPT_TOKENS = 100
COMPLETION_TOKENS = 50
PRICES = {"default": [40.0, 120.0], "gpt-4o-mini": [40.0, 120.0]}
_EPS = 1e-9

# (text, the specialty the static keyword policy gives it); goals take turns through them.
KINDS = (
    "Why does my python function raise a KeyError? case",
    "Summarize this article for me, part",
    "Explain the history of topic",
    "I need a refund for my order",
)
_TAG = re.compile(r"\[chaos (?P<goal>[\w.-]+) r(?P<index>\d+)\]")


# -- what the run is made of -----------------------------------------------------------------


@dataclass(frozen=True)
class GoalSpec:
    goal_id: str
    max_concurrent: int
    max_daily_cost: float
    max_agents: int


# Daily caps for a 3-minute run at 3 requests/s (scaled with both, see `goals_for`): at
# about $0.016 a request (an answer and its judge, $0.01 + $0.006) each goal reaches its
# cap during the run, so the cap is tested, not only the concurrency and agent limits.
DEFAULT_GOALS = (
    GoalSpec("chaos-a", max_concurrent=2, max_daily_cost=0.80, max_agents=4),
    GoalSpec("chaos-b", max_concurrent=3, max_daily_cost=0.20, max_agents=2),
    GoalSpec("chaos-c", max_concurrent=1, max_daily_cost=0.25, max_agents=1),
    GoalSpec("chaos-d", max_concurrent=4, max_daily_cost=0.40, max_agents=3),
)


def goals_for(minutes: float, rate: float) -> tuple[GoalSpec, ...]:
    """The default goals with their daily caps scaled to the run's length and rate."""
    scale = max(0.2, minutes / 3.0) * max(0.2, rate / 3.0)
    return tuple(
        GoalSpec(g.goal_id, g.max_concurrent, round(g.max_daily_cost * scale, 4), g.max_agents)
        for g in DEFAULT_GOALS
    )


@dataclass(frozen=True)
class Fault:
    """At ``at_s`` seconds into the traffic, ``action`` on ``target`` for ``hold_s`` seconds.

    kill: SIGKILL, then started again ``hold_s`` later. pause: SIGSTOP, SIGCONT ``hold_s`` later.
    """

    at_s: float
    target: str
    action: Action
    hold_s: float


@dataclass(frozen=True)
class LlmCall:
    """One call the fake LLM answered (and so billed): for whom, why, and its price."""

    goal_id: str
    index: int  # the request's index in the traffic; -1 when the call names none
    purpose: str  # answer, spawn_prompt, judge, other
    cost_usd: float
    at: datetime
    request_id: str | None = None  # the caller's X-Client-Request-Id (a loader call's cost id)


@dataclass
class ChaosConfig:
    seed: int = 1
    minutes: float = 3.0
    rate: float = 3.0  # requests per second, over every goal
    faults_per_target: int = 0  # 0: max(2, round(minutes / 2))
    broker_faults: bool | None = None  # None: only when the bench runs its own broker
    own_broker: bool = True
    settle_s: float = 90.0
    ask_timeout_s: float = 30.0
    goals: tuple[GoalSpec, ...] = DEFAULT_GOALS
    keep: bool = False
    env: tuple[tuple[str, str], ...] = ()  # the services' settings, over the bench's own

    @property
    def per_target(self) -> int:
        return self.faults_per_target or max(2, round(self.minutes / 2))


# -- the schedule (pure) ---------------------------------------------------------------------


def make_schedule(
    seed: int,
    minutes: float,
    targets: Sequence[str] = TARGETS,
    per_target: int = 2,
    *,
    start_frac: float = 0.08,
    end_frac: float = 0.75,
) -> list[Fault]:
    """``per_target`` faults for each target inside [start_frac, end_frac] of the run.

    Each target's window is cut into ``per_target`` equal slots and one fault (with its
    hold) fits inside each slot, so a target's faults never overlap; different targets'
    faults may. Every target with two or more faults is both killed and paused. The
    same seed gives the same schedule.
    """
    rng = random.Random(seed)
    total = minutes * 60.0
    lo, hi = start_frac * total, end_frac * total
    out: list[Fault] = []
    for target in targets:
        slot = (hi - lo) / per_target
        first: Action = rng.choice(("kill", "pause"))
        for i in range(per_target):
            if i == 0:
                action = first
            elif i == 1:
                action = "pause" if first == "kill" else "kill"
            else:
                action = rng.choice(("kill", "pause"))
            if target == "broker":
                hold = rng.uniform(5.0, 20.0) if action == "kill" else rng.uniform(4.0, 12.0)
            else:
                hold = rng.uniform(1.0, 8.0) if action == "kill" else rng.uniform(3.0, 15.0)
            hold = min(hold, 0.8 * slot)
            start = lo + i * slot + rng.uniform(0.0, max(0.0, slot - hold))
            out.append(Fault(round(start, 2), target, action, round(hold, 2)))
    return sorted(out, key=lambda f: (f.at_s, f.target))


# -- the report (pure) -----------------------------------------------------------------------


def _peak(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at once; an interval ending when another starts does not overlap."""
    points: list[tuple[float, int]] = []
    for start, end in intervals:
        points.append((start, 1))
        points.append((end, -1))
    points.sort(key=lambda p: (p[0], p[1]))  # ends before starts at the same instant
    best = now = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def compute_report(
    events: Sequence[Event],
    sent: Mapping[str, str],
    goals: Sequence[GoalSpec],
    llm_calls: Sequence[LlmCall],
    *,
    clickhouse: Mapping[str, tuple[int, int]] | None,
    budget_views: Mapping[str, Mapping[str, Any] | None],
    index_of: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The invariants from what was read back.

    ``events``: every event on Kafka. ``sent``: run_id -> goal_id of every request the
    client built (whether or not its send succeeded). ``llm_calls``: the calls the fake
    LLM answered. ``clickhouse``: event_id -> (rows, rows seen through FINAL), None when
    it could not be read. ``budget_views``: the budget service's own view per goal.
    ``index_of``: run_id -> the traffic index carried in its message.
    """
    # By type and id: a copy of an event is one event, but two outcomes of one run under
    # its one terminal id (a completion and a failure) are two.
    unique: dict[tuple[str, str], Event] = {}
    for e in events:
        unique.setdefault((e.event_type, e.event_id), e)
    by_type: dict[str, list[Event]] = defaultdict(list)
    for e in unique.values():
        by_type[e.event_type].append(e)

    # Invariant 1: one terminal event per request that reached Kafka.
    on_kafka: set[str] = set()
    for e in by_type["request_received"]:
        if e.run_id is not None and e.run_id in sent:
            on_kafka.add(e.run_id)
    terminals: dict[str, list[Event]] = defaultdict(list)
    for e in (*by_type["workflow_completed"], *by_type["workflow_failed"]):
        if e.run_id is not None:
            terminals[e.run_id].append(e)
    counts = Counter(min(len(terminals.get(r, [])), 2) for r in on_kafka)
    conflicting = sum(
        1
        for r in on_kafka
        if len({t.event_type for t in terminals.get(r, [])}) > 1
        or len({getattr(t, "reason", "") for t in terminals.get(r, [])}) > 1
    )
    none_ids = sorted(r for r in on_kafka if not terminals.get(r))
    multi_ids = sorted(r for r in on_kafka if len(terminals.get(r, [])) > 1)
    outcomes = Counter(
        "completed"
        if isinstance(t, WorkflowCompleted)
        else f"failed:{t.reason}" + (f":{t.limit}" if t.limit else "")
        for r in on_kafka
        for t in terminals.get(r, [])[:1]
        if isinstance(t, WorkflowCompleted | WorkflowFailed)
    )
    stages = (
        "request_received",
        "route_decided",
        "task_requested",
        "task_admitted",
        "workflow_started",
        "llm_call_completed",
    )
    reached: dict[str, int] = defaultdict(int)
    for i, stage in enumerate(stages):
        for e in by_type[stage]:
            if e.run_id in on_kafka:
                reached[e.run_id] = max(reached[e.run_id], i)
    stuck = Counter(stages[reached[r]] for r in none_ids)
    requests = {
        "created": len(sent),
        "on_kafka": len(on_kafka),
        "never_reached_kafka": len(sent) - len(on_kafka),
        "one_terminal": counts[1],
        "no_terminal": counts[0],
        "two_or_more": counts[2],
        "conflicting_outcomes": conflicting,
        "outcomes": dict(sorted(outcomes.items())),
        "without_terminal_last_step": {k: stuck[k] for k in stages if stuck[k]},
        "admitted_by": dict(
            sorted(
                Counter(e.source for e in by_type["task_admitted"] if e.run_id in on_kafka).items()
            )
        ),
        "examples_without_terminal": none_ids[:5],
        "examples_with_several": multi_ids[:5],
    }

    # Invariant 2: limits, per goal.
    end_of_log = max((_ts(e.occurred_at) for e in unique.values()), default=0.0) + 1.0
    admitted: dict[str, list[TaskAdmitted]] = defaultdict(list)
    for e in by_type["task_admitted"]:
        if isinstance(e, TaskAdmitted):
            admitted[e.run_id].append(e)
    paid_by_goal_day: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for call in llm_calls:
        paid_by_goal_day[call.goal_id][call.at.astimezone(UTC).date().isoformat()] += call.cost_usd
    counted_by_goal_day: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in by_type["llm_call_completed"]:
        if isinstance(e, LlmCallCompleted) and e.goal_id:
            day = e.occurred_at.astimezone(UTC).date().isoformat()
            counted_by_goal_day[e.goal_id][day] += e.cost_usd
    goal_rows: dict[str, dict[str, Any]] = {}
    for spec in goals:
        g = spec.goal_id
        runs = [r for r, ts in admitted.items() if ts[0].goal_id == g]
        intervals = []
        until_terminal = []
        for r in runs:
            start = min(_ts(a.occurred_at) for a in admitted[r])
            ends = [_ts(t.occurred_at) for t in terminals.get(r, []) if _ts(t.occurred_at) >= start]
            # A run admitted and never ended (or ended before it was admitted) holds its slot.
            end = min(ends) if ends else end_of_log
            until_terminal.append((start, end))
            # ... but it cannot run past its deadline plus the LLM timeout: the loader starts
            # no task past its deadline and its call ends within the timeout, which is when
            # the budget's lease gives the slot back (plus a grace). A loader that was down
            # longer sends that run's timeout failure later; the run never ran meanwhile.
            # (A task admitted with an admission token starts by its start_by or not at all.)
            deadlines = [
                min(d for d in (a.deadline_at, a.start_by) if d is not None)
                for a in admitted[r]
                if a.deadline_at is not None or a.start_by is not None
            ]
            if deadlines:
                end = min(end, _ts(min(deadlines)) + LLM_TIMEOUT_S)
            intervals.append((start, max(start, end)))
        spawned = {
            e.agent_id: _ts(e.occurred_at)
            for e in sorted(by_type["agent_spawned"], key=lambda e: e.occurred_at)
            if isinstance(e, AgentSpawned) and e.goal_id == g
        }
        retired = {
            e.agent_id: _ts(e.occurred_at)
            for e in by_type["agent_retired"]
            if isinstance(e, AgentRetired) and e.agent_id in spawned
        }
        agents = [(t, retired.get(a, end_of_log)) for a, t in spawned.items()]
        view = budget_views.get(g)
        paid_days = paid_by_goal_day.get(g, {})
        counted_days = counted_by_goal_day.get(g, {})
        goal_rows[g] = {
            "max_concurrent": spec.max_concurrent,
            "peak_concurrent": _peak(intervals),
            "peak_admitted_until_terminal": _peak(until_terminal),
            "admitted_runs": len(runs),
            "readmitted_runs": sum(1 for r in runs if len(admitted[r]) > 1),
            "max_daily_cost": spec.max_daily_cost,
            "peak_daily_paid": round(max(paid_days.values(), default=0.0), 6),
            "peak_daily_counted": round(max(counted_days.values(), default=0.0), 6),
            "max_agents": spec.max_agents,
            "peak_agents": _peak(agents),
            "budget_spent_today": None if view is None else view.get("spent_today"),
            "budget_in_flight_at_end": None if view is None else view.get("in_flight"),
            "budget_queued_at_end": None if view is None else view.get("queued"),
        }

    # Invariant 3: every event in ClickHouse once, as queries see it.
    kafka_ids = {event_id for _, event_id in unique}
    if clickhouse is None:
        ch: dict[str, Any] = {"read": False, "kafka_events": len(kafka_ids)}
    else:
        ch_ids = set(clickhouse)
        ch = {
            "read": True,
            "kafka_events": len(kafka_ids),
            "rows": sum(n for n, _ in clickhouse.values()),
            "rows_final": sum(f for _, f in clickhouse.values()),
            "distinct_ids": len(ch_ids),
            "missing": len(kafka_ids - ch_ids),
            "counted_twice": sum(max(0, f - 1) for _, f in clickhouse.values()),
            "duplicate_rows_before_merge": sum(max(0, n - 1) for n, _ in clickhouse.values()),
            "not_on_kafka": len(ch_ids - kafka_ids),
            "examples_missing": sorted(kafka_ids - ch_ids)[:5],
        }

    # Cost: what the LLM billed against what the platform counted.
    paid = sum(c.cost_usd for c in llm_calls)
    counted_events = sum(
        e.cost_usd for e in by_type["llm_call_completed"] if isinstance(e, LlmCallCompleted)
    )
    views = [v for v in budget_views.values() if v is not None]
    budget_counted = (
        sum(float(v.get("spent_today") or 0.0) for v in views) if len(views) == len(goals) else None
    )
    purposes: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for c in llm_calls:
        purposes[c.purpose]["paid_usd"] += c.cost_usd
        purposes[c.purpose]["paid_calls"] += 1
    for e in by_type["llm_call_completed"]:
        if isinstance(e, LlmCallCompleted) and e.ok:
            purposes[e.purpose]["counted_usd"] += e.cost_usd
            purposes[e.purpose]["counted_calls"] += 1
    answer_calls: Counter[int] = Counter(
        c.index for c in llm_calls if c.purpose == "answer" and c.index >= 0
    )
    cost = {
        "paid_to_llm": round(paid, 6),
        "counted_by_budget": None if budget_counted is None else round(budget_counted, 6),
        "llm_call_completed_sum": round(counted_events, 6),
        "llm_calls_answered": len(llm_calls),
        "by_purpose": {
            p: {k: round(v, 6) for k, v in sorted(row.items())}
            for p, row in sorted(purposes.items())
        },
        "runs_with_repeated_llm_call": sum(1 for n in answer_calls.values() if n > 1),
        "repeated_llm_calls": sum(n - 1 for n in answer_calls.values() if n > 1),
    }
    # Answers given up on at the timeout name the call that still ran: the budget holds
    # its worst case until its report comes, or counts that itself at the hold's lapse.
    pending_ids = frozenset(
        e.meta.get("cost_id", "")
        for e in by_type["workflow_completed"]
        if isinstance(e, WorkflowCompleted) and e.meta.get("cost_pending") == "true"
    )
    reports = by_type["llm_call_completed"]
    cost["answer_calls_by_id"] = reconcile_calls(llm_calls, reports, held_ids=pending_ids)
    cost["judge_calls_by_id"] = reconcile_calls(llm_calls, reports, "judge")
    if index_of is not None:
        cost["runs_with_llm_call"] = len(answer_calls)
        cost["requests_indexed"] = len(index_of)

    leaks = [g for g, row in goal_rows.items() if row["budget_in_flight_at_end"] not in (0,)]
    invariants = {
        "1 one terminal event per request": (
            requests["no_terminal"] == 0 and requests["two_or_more"] == 0,
            f"{requests['no_terminal']} without, {requests['two_or_more']} with two or more",
        ),
        "2 max_concurrent": _limit(goal_rows, "peak_concurrent", "max_concurrent"),
        "2 max_daily_cost (paid)": _limit(goal_rows, "peak_daily_paid", "max_daily_cost"),
        "2 max_agents": _limit(goal_rows, "peak_agents", "max_agents"),
        "2 no slot held after the end": (
            not leaks,
            "none" if not leaks else "held or unknown: " + ", ".join(leaks),
        ),
        "3 ClickHouse exactly once": (
            bool(ch.get("read")) and ch.get("missing") == 0 and ch.get("counted_twice") == 0,
            "not read"
            if not ch.get("read")
            else f"{ch['missing']} missing, {ch['counted_twice']} counted twice",
        ),
        "paid cost = counted cost": _paid_is_counted(paid, budget_counted, cost),
    }
    return {
        "requests": requests,
        "goals": goal_rows,
        "clickhouse": ch,
        "cost": cost,
        "invariants": {k: {"ok": ok, "detail": d} for k, (ok, d) in invariants.items()},
        "ok": all(ok for ok, _ in invariants.values()),
    }


def _limit(rows: Mapping[str, Mapping[str, Any]], peak: str, limit: str) -> tuple[bool, str]:
    over = [
        f"{g} {row[peak]:g} > {row[limit]:g}"
        for g, row in rows.items()
        if row[peak] > row[limit] + _EPS
    ]
    return not over, "; ".join(over) or "no goal over"


# -- the fake LLM ----------------------------------------------------------------------------


def _paid_is_counted(
    paid: float, counted: float | None, cost: Mapping[str, Any]
) -> tuple[bool, str]:
    """Paid = counted, call by call, but for the budget's two designed differences (see
    reconcile_calls); each is named in the detail when it occurs."""
    if counted is None:
        return False, f"paid ${paid:.4f}, budget counted unknown"
    rows = [cost.get("answer_calls_by_id", {}), cost.get("judge_calls_by_id", {})]
    over = sum(float(r.get("worst_case_over_billed_usd", 0.0)) for r in rows)
    held = sum(float(r.get("held_not_yet_counted_usd", 0.0)) for r in rows)
    n_over = sum(int(r.get("counted_at_worst_case_by_budget", 0)) for r in rows)
    n_held = sum(int(r.get("held_not_yet_counted", 0)) for r in rows)
    # Calls without a cost id cannot be matched one by one: their totals still must agree.
    unexplained = sum(int(r.get("unexplained", 0)) for r in rows if not r.get("billed_without_id"))
    detail = f"paid ${paid:.4f}, budget counted ${counted:.4f}"
    if n_over:
        detail += (
            f"; {n_over} call(s) whose loader died mid-call counted at their worst case"
            f" (+${over:.4f})"
        )
    if n_held:
        detail += f"; {n_held} call(s) still held, counted when their hold lapses (-${held:.4f})"
    if unexplained:
        detail += f"; {unexplained} call(s) differ unexplained"
    ok = not unexplained and abs(counted - (paid + over - held)) < 1e-6
    return ok, detail


def reconcile_calls(
    calls: Sequence[LlmCall],
    reports: Sequence[Event],
    purpose: str = "answer",
    held_ids: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Calls of ``purpose`` matched one by one: the loader (and the judge) send each call's
    cost id as its X-Client-Request-Id, and its cost report (or the one a later attempt
    files for it) carries the same id. What the endpoint billed and nobody counted, and what
    was counted (at an estimate: an attempt killed mid-call) that the endpoint never billed.

    Two differences are the budget's design, and are told apart from the rest: a call given
    up on at the timeout whose loader died before it ended is counted by the budget's own
    report at the call's worst case (no one alive knows what it cost), and one whose hold
    has not lapsed yet is still held, not yet counted (``held_ids``: the cost ids answers
    named as pending)."""
    billed: dict[str, float] = defaultdict(float)
    for call in calls:
        if call.purpose == purpose and call.request_id:
            billed[call.request_id] += call.cost_usd
    first: dict[str, LlmCallCompleted] = {}
    for e in reports:
        if isinstance(e, LlmCallCompleted) and e.purpose == purpose and e.cost_usd > 0:
            first.setdefault(e.event_id, e)  # the first counts, as in the budget
    counted = {i: float(e.cost_usd) for i, e in first.items()}
    by_budget = {i for i, e in first.items() if e.source == "budget"}
    not_counted = [i for i in billed if i not in counted]
    not_billed = [i for i in counted if i not in billed]
    differ = [i for i in billed if i in counted and abs(billed[i] - counted[i]) > 1e-9]
    estimated = [i for i in (*not_billed, *differ) if i in by_budget]
    held = [i for i in not_counted if i in held_ids]
    return {
        "billed_without_id": sum(1 for c in calls if c.purpose == purpose and not c.request_id),
        "billed_not_counted": len(not_counted),
        "billed_not_counted_usd": round(sum(billed[i] for i in not_counted), 6),
        "counted_not_billed": len(not_billed),
        "counted_not_billed_usd": round(sum(counted[i] for i in not_billed), 6),
        "amount_differs": len(differ),
        "examples_not_counted": not_counted[:5],
        "examples_not_billed": not_billed[:5],
        # The budget's design: counted at the worst case after the loader died mid-call.
        "counted_at_worst_case_by_budget": len(estimated),
        "worst_case_over_billed_usd": round(
            sum(counted[i] - billed.get(i, 0.0) for i in estimated), 6
        ),
        # The budget's design: billed, its hold waiting for the report until it lapses.
        "held_not_yet_counted": len(held),
        "held_not_yet_counted_usd": round(sum(billed[i] for i in held), 6),
        "unexplained": len(not_counted)
        - len(held)
        + len(not_billed)
        + len(differ)
        - len(estimated),
    }


class LlmLedger:
    """The fake LLM's answers: fixed usage, and a record of every call it answered."""

    def __init__(self) -> None:
        from streams.llm import PriceTable

        self._prices = PriceTable.from_json(json.dumps(PRICES))
        self._lock = threading.Lock()
        self.calls: list[LlmCall] = []

    def respond(self, body: dict[str, Any]) -> tuple[str, Any, dict[str, str]]:
        from local.fake_openai import Usage, client_request_id
        from streams.llm import default_answer

        messages = [
            {"role": str(m.get("role")), "content": str(m.get("content") or "")}
            for m in body.get("messages", [])
            if isinstance(m, dict)
        ]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = "\n".join(m["content"] for m in messages if m["role"] == "user")
        if system.startswith("You write system prompts"):
            purpose = "spawn_prompt"
        elif system.startswith("You grade answers"):
            purpose = "judge"
        else:
            purpose = "answer"
        found = _TAG.search(user)
        if found is None and purpose == "answer":
            purpose = "other"
        model = str(body.get("model") or "")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        completion = COMPLETION_TOKENS
        if isinstance(max_tokens, int) and max_tokens > 0:
            completion = min(completion, max_tokens)
        usage = Usage(PROMPT_TOKENS, completion)
        call = LlmCall(
            goal_id=found["goal"] if found else "",
            index=int(found["index"]) if found else -1,
            purpose=purpose,
            cost_usd=self._prices.cost_usd(model, usage.prompt_tokens, usage.completion_tokens),
            at=datetime.now(UTC),
            request_id=client_request_id(),
        )
        with self._lock:
            self.calls.append(call)
        text = "7" if purpose == "judge" else default_answer(messages, model)
        return text, usage, {}


async def llm_weather(server: Any, rng: random.Random, stop: asyncio.Event) -> Counter[str]:
    """Every second, some calls slow (2-6 s), some failing (500/503), now and then a hang."""
    seen: Counter[str] = Counter()
    while not stop.is_set():
        roll = rng.random()
        if roll < 0.03:
            server.configure(mode="hang", hang_s=15.0, latency_ms=0.0, fail_next=0)
            seen["hang"] += 1
        elif roll < 0.18:
            server.configure(mode="ok", latency_ms=0.0, fail_next=rng.randint(1, 3))
            server.configure(fail_status=rng.choice((500, 503)))
            seen["failing"] += 1
        elif roll < 0.40:
            server.configure(mode="ok", latency_ms=rng.uniform(2000.0, 6000.0), fail_next=0)
            seen["slow"] += 1
        else:
            server.configure(mode="ok", latency_ms=0.0, fail_next=0)
            seen["ok"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    server.configure(mode="ok", latency_ms=0.0, fail_next=0)
    return seen


# -- processes -------------------------------------------------------------------------------


def _free_port_pair() -> int:
    """A port p with p + 1 free too (the broker's controller listens on p + 1)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports found")


_BROKER_VARS = frozenset(BROKER_VARIABLES)


class OwnBroker:
    """A KRaft broker for this run only: its own port and data dir, via local.localkafka."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port_pair()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in _BROKER_VARS}
        self.env.update({"ORCH_DATA_DIR": str(data_dir), "ORCH_KAFKA_PORT": str(self.port)})
        self.starts = 0

    def client_env(self) -> dict[str, str]:
        """The variables that send a process to this broker, its credentials included."""
        return broker_env(self.bootstrap, data_dir=self.data_dir)

    def _launcher(self, command: str, timeout: float = 120.0) -> None:
        argv = [sys.executable, "-m", "local.localkafka", command, "--timeout", str(timeout)]
        done = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"localkafka {command} failed: {done.stderr[-2000:]}")

    def up(self) -> None:
        self._launcher("up")
        self.starts += 1

    def down(self) -> None:
        self._launcher("down")

    def pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "kafka" / "broker.pid").read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"kafka.Kafka" in cmd and str(self.data_dir).encode() in cmd else None

    def signal(self, sig: int) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 10
            while self.pid() is not None and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.1)
        return True


@dataclass
class _Child:
    name: str
    instance: Instance
    state: Literal["up", "down", "paused"] = "up"
    started: float = field(default_factory=time.monotonic)
    exits: int = 0  # exits on its own in a row (a crash loop backs off as `up` would)
    retry_at: float = 0.0

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.instance.proc is not None
        return self.instance.proc


class ChaosServices:
    """Every service as one instance of the platform launcher; killed, paused, resumed, and
    restarted (the same instance, its log appended to) when it dies."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.launcher = Launcher(log_dir, environ=env, stop_timeout=20.0)
        self.children: dict[str, _Child] = {}
        self.unplanned_exits: Counter[str] = Counter()
        self.starts: Counter[str] = Counter()

    def start(self, name: str) -> None:
        before = self.children.get(name)
        if before is None:
            instance = self.launcher.start(name)
        else:
            instance = self.launcher.restart(before.instance)
        self.children[name] = _Child(name, instance, exits=before.exits if before else 0)
        self.starts[name] += 1

    def kill(self, name: str) -> None:
        child = self.children[name]
        child.state = "down"
        if child.proc.poll() is None:
            self.launcher.send(child.instance, signal.SIGKILL)
            child.proc.wait(10)

    def pause(self, name: str) -> None:
        child = self.children[name]
        if child.proc.poll() is None:
            self.launcher.send(child.instance, signal.SIGSTOP)
            child.state = "paused"

    def resume(self, name: str) -> None:
        child = self.children[name]
        if child.state == "paused" and child.proc.poll() is None:
            self.launcher.send(child.instance, signal.SIGCONT)
        child.state = "up"

    def watch(self) -> list[str]:
        """Restart services that exited on their own, backing off as `orchestrator up` does.

        Returns the names of the services that exited since the last call.
        """
        from services.cli.supervisor import restart_delay

        exited = []
        now = time.monotonic()
        for name, child in list(self.children.items()):
            if child.state != "up" or child.proc.poll() is None:
                continue
            if child.retry_at == 0.0:  # just noticed
                self.unplanned_exits[name] += 1
                exited.append(name)
                child.exits = 1 if now - child.started > 30.0 else child.exits + 1
                child.retry_at = now + restart_delay(child.exits, cap=10.0)
            elif now >= child.retry_at:
                self.start(name)
        return exited

    def stop_all(self) -> None:
        """SIGCONT what is paused, SIGTERM all, SIGKILL what is left after 20 s."""
        self.launcher.stop_all()


# -- the run ---------------------------------------------------------------------------------


@dataclass
class _Traffic:
    sent: dict[str, str] = field(default_factory=dict)  # run_id -> goal_id
    index_of: dict[str, int] = field(default_factory=dict)  # run_id -> traffic index
    client: Counter[str] = field(default_factory=Counter)  # what the SDK's ask returned


def _recording_client(settings: Any, traffic: _Traffic) -> Any:
    from streams.client import OrchestratorClient

    class RecordingClient(OrchestratorClient):
        """Records every request it builds, before it is sent."""

        def request(self, message: str, **kwargs: Any) -> RequestReceived:
            event = super().request(message, **kwargs)
            traffic.sent[event.run_id] = event.goal_id
            found = _TAG.search(message)
            if found is not None:
                traffic.index_of[event.run_id] = int(found["index"])
            return event

    return RecordingClient(settings, source="bench-chaos")


async def _traffic(
    settings: Any,
    cfg: ChaosConfig,
    traffic: _Traffic,
    stop_at: float,
    progress: Progress,
    bar: Any,
) -> None:
    from streams.errors import RunFailed, RunTimeout

    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    async with _recording_client(settings, traffic) as client:

        async def one(i: int) -> None:
            goal = cfg.goals[i % len(cfg.goals)].goal_id
            text = KINDS[(i // len(cfg.goals)) % len(KINDS)]
            try:
                await asyncio.wait_for(
                    client.ask(
                        f"[chaos {goal} r{i}] {text} {i}",
                        goal_id=goal,
                        user_id=f"u{i % 5}",
                        timeout=cfg.ask_timeout_s,
                    ),
                    cfg.ask_timeout_s + 30.0,
                )
                traffic.client["answered"] += 1
            except RunFailed as exc:
                traffic.client[f"failed:{exc.reason}"] += 1
            except (RunTimeout, TimeoutError):
                traffic.client["timeout"] += 1
            except Exception as exc:  # a send refused while the broker is away, ...
                traffic.client[f"error:{type(exc).__name__}"] += 1
            progress.update(bar, **_fields(traffic))

        start = loop.time()
        i = 0
        while loop.time() < stop_at:
            due = start + i / cfg.rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if len(pending) < 500:  # an outage must not pile up unbounded asks
                task = asyncio.create_task(one(i))
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:
                traffic.client["not_sent:backlog"] += 1
            i += 1
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _fields(traffic: _Traffic) -> dict[str, Any]:
    c = traffic.client
    failed = sum(v for k, v in c.items() if k.startswith("failed:"))
    errors = sum(v for k, v in c.items() if k.startswith("error:"))
    return {
        "sent": len(traffic.sent),
        "ok": c["answered"],
        "failed": failed,
        "timeout": c["timeout"],
        "errors": errors,
    }


async def _faults(
    schedule: list[Fault],
    services: ChaosServices,
    broker: OwnBroker | None,
    t0: float,
    log: list[dict[str, Any]],
    progress: Progress,
) -> None:
    loop = asyncio.get_running_loop()

    async def one(f: Fault) -> None:
        await asyncio.sleep(max(0.0, t0 + f.at_s - loop.time()))
        at = round(loop.time() - t0, 1)
        entry: dict[str, Any] = {**asdict(f), "done_at_s": at}
        try:
            if f.target == "broker":
                assert broker is not None
                sig = signal.SIGKILL if f.action == "kill" else signal.SIGSTOP
                entry["hit"] = await asyncio.to_thread(broker.signal, sig)
                await asyncio.sleep(f.hold_s)
                if f.action == "kill":
                    await asyncio.to_thread(broker.up)
                else:
                    await asyncio.to_thread(broker.signal, signal.SIGCONT)
            else:
                (services.kill if f.action == "kill" else services.pause)(f.target)
                entry["hit"] = True
                await asyncio.sleep(f.hold_s)
                if f.action == "kill":
                    services.start(f.target)
                else:
                    services.resume(f.target)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        entry["back_at_s"] = round(loop.time() - t0, 1)
        log.append(entry)
        progress.console.log(
            f"{f.action} {f.target} at {at:.0f}s, back after {entry['back_at_s'] - at:.0f}s"
            + (f" [red]{entry['error']}[/]" if "error" in entry else "")
        )

    # Faults of one target never overlap (see make_schedule); different targets' may.
    await asyncio.gather(*(one(f) for f in schedule))


async def _watchdog(services: ChaosServices, stop: asyncio.Event, progress: Progress) -> None:
    while not stop.is_set():
        for name in services.watch():
            progress.console.log(f"[yellow]{name} exited on its own; restarting it[/]")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def read_log(settings: Any, timeout: float = 180.0) -> tuple[list[Event], dict[str, int]]:
    """Every committed record of every catalog topic, decoded; and counts of what was read."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.codec import default_codec
    from streams.errors import DecodeError
    from streams.topics import CATALOG

    codec = default_codec()
    consumer = AIOKafkaConsumer(
        **settings.client_args(),
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    events: list[Event] = []
    stats: Counter[str] = Counter()
    try:
        parts: list[TopicPartition] = []
        await consumer._client.force_metadata_update()  # noqa: SLF001
        for spec in CATALOG:
            found = consumer.partitions_for_topic(settings.topic(spec.name)) or set()
            parts.extend(TopicPartition(settings.topic(spec.name), p) for p in sorted(found))
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        remaining = {tp for tp in parts if ends[tp] > 0}
        deadline = time.monotonic() + timeout
        while remaining:
            if time.monotonic() > deadline:
                stats["partitions_not_read_to_end"] = len(remaining)
                break
            batch = await consumer.getmany(*remaining, timeout_ms=300)
            for tp, records in batch.items():
                for r in records:
                    stats["records"] += 1
                    try:
                        events.append(codec.decode(r.value, topic=settings.logical(tp.topic)))
                    except DecodeError:
                        stats["undecodable"] += 1
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return events, dict(stats)


def read_clickhouse(info_file: Path) -> dict[str, tuple[int, int]]:
    """event_id -> (rows, rows seen through FINAL), through the sink's query server."""
    from streams.sql import RemoteQueries

    source = RemoteQueries(info_file=info_file, timeout=120.0)
    raw = source.query("SELECT event_id, count() FROM events GROUP BY event_id")
    final = source.query("SELECT event_id, count() FROM events FINAL GROUP BY event_id")
    seen = {str(r[0]): int(r[1]) for r in final.rows}
    return {str(r[0]): (int(r[1]), seen.get(str(r[0]), 0)) for r in raw.rows}


async def _terminal_runs(settings: Any) -> set[str]:
    from streams.registry import read_topics_to_end

    got = await read_topics_to_end(
        settings, [WorkflowCompleted.topic, WorkflowFailed.topic], timeout=60
    )
    return {e.run_id for e in got if e.run_id}


async def _apply_budgets(settings: Any, cfg: ChaosConfig, timeout: float = 120.0) -> None:
    """Send every goal's limits and wait until the budget service's view shows them."""
    from streams.budgets import read_budget
    from streams.client import OrchestratorClient

    async with OrchestratorClient(settings, source="bench-chaos") as client:
        for g in cfg.goals:
            await client.set_budget(
                g.goal_id,
                max_concurrent=g.max_concurrent,
                max_daily_cost=g.max_daily_cost,
                max_agents=g.max_agents,
            )
    deadline = time.monotonic() + timeout
    waiting = {g.goal_id: g for g in cfg.goals}
    while waiting:
        for goal_id, g in list(waiting.items()):
            view = await read_budget(settings, goal_id)
            if (
                view is not None
                and view.get("max_concurrent") == g.max_concurrent
                and view.get("max_agents") == g.max_agents
                and abs(float(view.get("max_daily_cost", -1)) - g.max_daily_cost) < _EPS
            ):
                del waiting[goal_id]
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"the budget service never applied the limits of {sorted(waiting)}")
        await asyncio.sleep(1.0)


async def _budget_views(settings: Any, cfg: ChaosConfig) -> dict[str, dict[str, Any] | None]:
    from streams.budgets import read_budget

    out: dict[str, dict[str, Any] | None] = {}
    for g in cfg.goals:
        try:
            out[g.goal_id] = await asyncio.wait_for(read_budget(settings, g.goal_id), 60)
        except Exception:
            out[g.goal_id] = None
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn(
            "sent {task.fields[sent]} ok {task.fields[ok]} failed {task.fields[failed]}"
            " timeout {task.fields[timeout]} errors {task.fields[errors]}"
        ),
        TimeElapsedColumn(),
        console=console,
    )


async def run_chaos(cfg: ChaosConfig, console: Console) -> dict[str, Any]:
    """One chaos run; the report of :func:`compute_report` plus what was done."""
    from local.fake_openai import FakeOpenAIServer
    from local.localkafka import ensure_broker
    from streams.config import data_root
    from streams.kafka import KafkaSettings
    from streams.topics import create_topics

    broker_faults = cfg.own_broker if cfg.broker_faults is None else cfg.broker_faults
    if broker_faults and not cfg.own_broker:
        raise SystemExit("broker faults need the bench's own broker (drop --shared-broker)")
    targets = TARGETS if broker_faults else SERVICES
    schedule = make_schedule(cfg.seed, cfg.minutes, targets, cfg.per_target)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run_dir = data_root() / "bench" / "chaos" / f"seed{cfg.seed}-{stamp}-{uuid.uuid4().hex[:4]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    print_schedule(schedule, console)
    console.print(f"run dir (logs): {run_dir}")

    broker: OwnBroker | None = None
    services: ChaosServices | None = None
    ledger = LlmLedger()
    llm = FakeOpenAIServer(responder=ledger.respond).start_in_thread()
    fault_log: list[dict[str, Any]] = []
    traffic = _Traffic()
    weather: Counter[str] = Counter()
    started = time.monotonic()
    try:
        if cfg.own_broker:
            broker = OwnBroker(run_dir)
            console.print(f"starting the bench's own broker on {broker.bootstrap} ...")
            await asyncio.to_thread(broker.up)
            bootstrap = broker.bootstrap
            # This process's own clients (topics, traffic, the ledger's reads) too.
            os.environ.update(broker.client_env())
        else:
            bootstrap = await asyncio.to_thread(ensure_broker)
        settings = KafkaSettings(bootstrap, f"chaos{uuid.uuid4().hex[:8]}.")
        await create_topics(bootstrap, prefix=settings.prefix)
        env = {
            **{k: v for k, v in os.environ.items() if k not in _BROKER_VARS},
            **settings.env(),
            "ORCH_TOPIC_PREFIX": settings.prefix,
            "ORCH_DATA_DIR": str(run_dir),
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "chaos-key",
            "ORCH_LLM_MODEL": "gpt-4o-mini",
            "ORCH_LLM_PRICES": json.dumps(PRICES),
            # The budget holds each call's worst case before it is made: max_tokens of
            # output plus a token per prompt byte, a system prompt assumed at its longest.
            # The fake LLM bills PROMPT_TOKENS whatever the prompt, so a bound of 200
            # system-prompt tokens is still true here, and keeps a hold near a call's
            # real price instead of 70 times it (caps of a few dollars would refuse all).
            "ORCH_LLM_MAX_TOKENS": "64",
            "ORCH_BUDGET_SYSTEM_PROMPT_TOKENS": "200",
            "ORCH_LLM_TIMEOUT": str(LLM_TIMEOUT_S),
            "ORCH_LLM_MAX_RETRIES": "1",
            "ORCH_LLM_BREAKER_COOLDOWN_SECONDS": "2",
            "ORCH_ROUTER_POLICY": "static",
            "ORCH_IMPROVE_PORT": "0",
            "ORCH_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **dict(cfg.env),
        }
        services = ChaosServices(env, run_dir / "logs")
        for name in SERVICES:
            services.start(name)
        console.print("waiting for the budget service to apply the goals' limits ...")
        await _apply_budgets(settings, cfg)

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        with _progress(console) as progress:
            bar = progress.add_task("chaos", total=cfg.minutes * 60.0, **_fields(traffic))
            t0 = loop.time()
            stop_at = t0 + cfg.minutes * 60.0
            weather_task = asyncio.create_task(llm_weather(llm, random.Random(cfg.seed), stop))
            watchdog = asyncio.create_task(_watchdog(services, stop, progress))
            faults = asyncio.create_task(
                _faults(schedule, services, broker, t0, fault_log, progress)
            )
            sending = asyncio.create_task(_traffic(settings, cfg, traffic, stop_at, progress, bar))
            while not sending.done():
                progress.update(bar, completed=min(cfg.minutes * 60.0, loop.time() - t0))
                await asyncio.wait({sending}, timeout=1.0)
            await faults
            stop.set()
            weather = await weather_task
            await watchdog
            sending.result()
            # Settle: every service up, then wait until every request has an outcome.
            for name in services.watch():
                progress.console.log(f"[yellow]{name} exited on its own; restarting it[/]")
            progress.update(bar, description="settling", completed=cfg.minutes * 60.0)
            settle_end = loop.time() + cfg.settle_s
            while loop.time() < settle_end:
                services.watch()
                try:
                    ended = await _terminal_runs(settings)
                except Exception:
                    ended = set()
                if not set(traffic.sent) - ended:
                    break
                await asyncio.sleep(5.0)
            # A few more seconds for the sink and the budget to take the last events in.
            await asyncio.sleep(10.0)
        console.print("reading every topic to the end ...")
        events, read_stats = await read_log(settings)
        info_file = run_dir / "clickhouse-query.json"
        clickhouse: dict[str, tuple[int, int]] | None = None
        kafka_ids = {e.event_id for e in events}
        deadline = time.monotonic() + 60
        while True:  # the sink may still be inserting the tail
            try:
                clickhouse = await asyncio.to_thread(read_clickhouse, info_file)
            except Exception as exc:
                console.print(f"[red]ClickHouse read failed:[/] {exc}")
                clickhouse = None
            if clickhouse is not None and kafka_ids <= set(clickhouse):
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(5.0)
        views = await _budget_views(settings, cfg)
        report = compute_report(
            events,
            traffic.sent,
            cfg.goals,
            ledger.calls,
            clickhouse=clickhouse,
            budget_views=views,
            index_of=traffic.index_of,
        )
    finally:
        if services is not None:
            await asyncio.to_thread(services.stop_all)
        llm.stop()
        if broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(broker.down)
        if not cfg.keep:
            for heavy in ("kafka", "clickhouse"):
                shutil.rmtree(run_dir / heavy, ignore_errors=True)
    report["run"] = {
        "seed": cfg.seed,
        "minutes": cfg.minutes,
        "rate": cfg.rate,
        "own_broker": cfg.own_broker,
        "env": dict(cfg.env),
        "broker_faults": broker_faults,
        "broker_starts": broker.starts if broker is not None else None,
        "wall_s": round(time.monotonic() - started, 1),
        "run_dir": str(run_dir),
        "kafka_read": read_stats,
        "client": dict(sorted(traffic.client.items())),
        "llm_weather_seconds": dict(sorted(weather.items())),
        "service_starts": dict(sorted(services.starts.items())) if services else {},
        "unplanned_exits": dict(sorted(services.unplanned_exits.items())) if services else {},
    }
    report["schedule"] = [asdict(f) for f in schedule]
    report["faults_done"] = sorted(fault_log, key=lambda e: e["at_s"])
    return report


# -- output ----------------------------------------------------------------------------------


def print_schedule(schedule: Sequence[Fault], console: Console) -> None:
    table = Table(title=f"fault schedule ({len(schedule)} faults)")
    for column in ("at s", "target", "action", "hold s"):
        table.add_column(column, justify="right" if column.endswith("s") else "left")
    for f in schedule:
        table.add_row(f"{f.at_s:.1f}", f.target, f.action, f"{f.hold_s:.1f}")
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def print_report(report: dict[str, Any], console: Console) -> None:
    r = report["requests"]
    main = Table(title="chaos: what was measured", show_header=False)
    main.add_column("measure")
    main.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("requests sent (built by the client)", r["created"]),
        ("  reached Kafka", r["on_kafka"]),
        ("  exactly one terminal event", r["one_terminal"]),
        ("  no terminal event", r["no_terminal"]),
        ("  two or more terminal events", r["two_or_more"]),
        ("  conflicting outcomes", r["conflicting_outcomes"]),
    ]
    ch = report["clickhouse"]
    rows.append(("events on Kafka (distinct ids)", ch["kafka_events"]))
    if ch.get("read"):
        rows += [
            ("  missing from ClickHouse", ch["missing"]),
            ("  counted twice (events FINAL)", ch["counted_twice"]),
            ("  duplicate rows before merge", ch["duplicate_rows_before_merge"]),
            ("  in ClickHouse, not on Kafka", ch["not_on_kafka"]),
        ]
    else:
        rows.append(("  ClickHouse", "not read"))
    c = report["cost"]
    rows += [
        ("LLM cost paid (fake LLM's answered calls)", f"${c['paid_to_llm']:.4f}"),
        (
            "cost counted by the budget",
            "?" if c["counted_by_budget"] is None else f"${c['counted_by_budget']:.4f}",
        ),
        ("cost on llm_call_completed", f"${c['llm_call_completed_sum']:.4f}"),
        ("LLM calls answered", c["llm_calls_answered"]),
        *(
            (
                f"  {purpose}: calls paid / counted, $ paid / counted",
                f"{row.get('paid_calls', 0):.0f} / {row.get('counted_calls', 0):.0f},"
                f" {row.get('paid_usd', 0.0):.4f} / {row.get('counted_usd', 0.0):.4f}",
            )
            for purpose, row in c["by_purpose"].items()
        ),
        (
            "  answer calls by id: billed not counted / counted not billed",
            "{billed_not_counted} (${billed_not_counted_usd:.4f}) / {counted_not_billed}"
            " (${counted_not_billed_usd:.4f})".format(**c["answer_calls_by_id"]),
        ),
        (
            "  judge calls by id: billed not counted / counted not billed",
            "{billed_not_counted} (${billed_not_counted_usd:.4f}) / {counted_not_billed}"
            " (${counted_not_billed_usd:.4f})".format(**c["judge_calls_by_id"]),
        ),
        ("runs whose LLM call repeated", c["runs_with_repeated_llm_call"]),
        ("repeated LLM calls", c["repeated_llm_calls"]),
    ]
    for name, value in rows:
        main.add_row(name, _cell(value))
    console.print(main)
    for purpose in ("answer", "judge"):
        by_id = c[f"{purpose}_calls_by_id"]
        for label, key in (
            ("billed not counted", "not_counted"),
            ("counted not billed", "not_billed"),
        ):
            if by_id.get(f"examples_{key}"):
                # The ids to look for on the log (and in the services' logs), to trace the path.
                console.print(f"{purpose} calls {label}: {', '.join(by_id[f'examples_{key}'])}")
    console.print(f"outcomes on Kafka (first terminal event of each request): {r['outcomes']}")
    console.print(f"tasks admitted by: {r.get('admitted_by', {})}")
    if r["without_terminal_last_step"]:
        console.print(
            f"requests without a terminal event, by the last step on Kafka:"
            f" {r['without_terminal_last_step']}"
        )
    goals = Table(title="per goal: highest reached / limit")
    for column in (
        "goal",
        "concurrent",
        "daily $ paid",
        "daily $ counted",
        "agents",
        "readmitted",
        "slots held at end",
    ):
        goals.add_column(column, justify="left" if column == "goal" else "right")
    for g, row in report["goals"].items():
        goals.add_row(
            g,
            f"{row['peak_concurrent']} / {row['max_concurrent']}",
            f"{row['peak_daily_paid']:.2f} / {row['max_daily_cost']:.2f}",
            f"{row['peak_daily_counted']:.2f}",
            f"{row['peak_agents']} / {row['max_agents']}",
            str(row["readmitted_runs"]),
            _cell(row["budget_in_flight_at_end"]),
        )
    console.print(goals)
    inv = Table(title="invariants")
    inv.add_column("invariant")
    inv.add_column("holds")
    inv.add_column("detail")
    for name, v in report["invariants"].items():
        inv.add_row(name, "[green]yes[/]" if v["ok"] else "[red]NO[/]", v["detail"])
    console.print(inv)
    run = report.get("run") or {}
    if run:
        done = report.get("faults_done") or []
        kills = sum(1 for f in done if f["action"] == "kill")
        console.print(
            f"seed {run['seed']}, {run['minutes']:g} min at {run['rate']:g}/s:"
            f" {kills} kills, {len(done) - kills} pauses;"
            f" unplanned exits {run['unplanned_exits'] or 'none'};"
            f" client saw {run['client']}; LLM weather {run['llm_weather_seconds']};"
            f" logs in {run['run_dir']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="Invariants 1-3 under kills, pauses and broker outages.",
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="traffic time")
    parser.add_argument("--seed", type=int, default=1, help="fault schedule and LLM weather")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument(
        "--faults-per-target", type=int, default=0, help="default max(2, minutes / 2)"
    )
    parser.add_argument("--settle", type=float, default=90.0, help="seconds to wait for outcomes")
    parser.add_argument(
        "--broker-faults",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="kill and pause the broker too (default: yes, on the bench's own broker)",
    )
    parser.add_argument(
        "--shared-broker",
        action="store_true",
        help="use the shared local broker (or KAFKA_BOOTSTRAP_SERVERS); no broker faults",
    )
    parser.add_argument("--keep", action="store_true", help="keep the Kafka and ClickHouse data")
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every service, over the bench's (e.g. ORCH_ADMISSION_TOKENS=4)",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0:
        parser.error("--minutes and --rate must be positive")
    if any("=" not in kv for kv in args.env):
        parser.error("--env takes KEY=VALUE")
    cfg = ChaosConfig(
        seed=args.seed,
        minutes=args.minutes,
        rate=args.rate,
        faults_per_target=args.faults_per_target,
        broker_faults=args.broker_faults,
        own_broker=not args.shared_broker,
        settle_s=args.settle,
        goals=goals_for(args.minutes, args.rate),
        keep=args.keep,
        env=tuple(tuple(kv.split("=", 1)) for kv in args.env),
    )
    import logging

    for name in ("aiokafka", "kafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    console = bench_console(stderr=True)
    report = asyncio.run(run_chaos(cfg, console))
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        print_report(report, bench_console())
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
