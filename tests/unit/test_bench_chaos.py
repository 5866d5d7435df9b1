"""The chaos benchmark's pure parts: the seeded fault schedule and the invariant report."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from rich.console import Console

from bench.chaos import (
    DEFAULT_GOALS,
    TARGETS,
    Fault,
    GoalSpec,
    LlmCall,
    LlmLedger,
    compute_report,
    goals_for,
    make_schedule,
    print_report,
    reconcile_calls,
)
from streams.events import (
    AgentSpawned,
    LlmCallCompleted,
    RequestReceived,
    TaskAdmitted,
    WorkflowCompleted,
    WorkflowFailed,
)

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
GOAL = GoalSpec("g", max_concurrent=2, max_daily_cost=0.05, max_agents=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- schedule --------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
    assert make_schedule(7, 10, per_target=3) == make_schedule(7, 10, per_target=3)
    assert make_schedule(7, 10, per_target=3) != make_schedule(8, 10, per_target=3)


def test_every_target_is_killed_and_paused_inside_the_window_without_overlapping_itself():
    minutes = 10.0
    schedule = make_schedule(1, minutes, per_target=3)
    assert len(schedule) == 3 * len(TARGETS)
    assert [f.at_s for f in schedule] == sorted(f.at_s for f in schedule)
    for target in TARGETS:
        mine = [f for f in schedule if f.target == target]
        assert {f.action for f in mine} == {"kill", "pause"}
        for before, after in zip(mine, mine[1:], strict=False):
            assert before.at_s + before.hold_s <= after.at_s
    for f in schedule:
        assert 0.08 * minutes * 60 <= f.at_s
        assert f.at_s + f.hold_s <= 0.75 * minutes * 60 + 1e-6
        assert f.hold_s > 0


def test_a_schedule_without_the_broker_never_touches_it():
    schedule = make_schedule(2, 3, targets=("router", "loader"), per_target=2)
    assert {f.target for f in schedule} == {"router", "loader"}
    assert all(isinstance(f, Fault) for f in schedule)


# -- report ----------------------------------------------------------------------------------


def _request(run: str, t: float) -> RequestReceived:
    return RequestReceived(
        source="t", run_id=run, goal_id="g", user_id="u", message="m", occurred_at=at(t)
    )


def _admitted(run: str, t: float) -> TaskAdmitted:
    return TaskAdmitted(
        source="t",
        run_id=run,
        goal_id="g",
        agent_id="a1",
        specialty="code",
        message="m",
        occurred_at=at(t),
    )


def _completed(run: str, t: float, event_id: str | None = None) -> WorkflowCompleted:
    extra = {"event_id": event_id} if event_id else {}
    return WorkflowCompleted(
        source="t", goal_id="g", run_id=run, specialty="code", text="x", occurred_at=at(t), **extra
    )


def _cost(run: str, usd: float, t: float) -> LlmCallCompleted:
    return LlmCallCompleted(
        source="t", run_id=run, goal_id="g", model="m", cost_usd=usd, occurred_at=at(t)
    )


def _spawned(agent: str, t: float) -> AgentSpawned:
    return AgentSpawned(
        source="t",
        goal_id="g",
        agent_id=agent,
        specialty="code",
        system_prompt="p",
        temperature=0.1,
        occurred_at=at(t),
    )


def _scenario() -> tuple[list, dict[str, str], list[LlmCall]]:
    twice = _completed("r2", 6, event_id="dup-terminal")
    events = [
        _request("r1", 0),
        _admitted("r1", 1),
        _completed("r1", 5),
        _request("r2", 0),
        _admitted("r2", 2),
        twice,
        twice,  # the same event read twice is one event
        WorkflowFailed(
            source="t", goal_id="g", run_id="r2", reason="timeout", detail="d", occurred_at=at(7)
        ),
        _request("r3", 0),
        _admitted("r3", 3),  # r1, r2 and r3 all run at t = 3..5: three with max_concurrent 2
        _request("r4", 0),  # never ends
        _cost("r1", 0.03, 4),
        _cost("r2", 0.03, 5),
        _spawned("a1", 0.5),
        _spawned("a2", 0.6),  # two live agents, max_agents 1
    ]
    sent = {"r1": "g", "r2": "g", "r3": "g", "r4": "g", "r5": "g"}  # r5 never reached Kafka
    calls = [
        LlmCall("g", 1, "answer", 0.03, at(4)),
        LlmCall("g", 2, "answer", 0.03, at(5)),
        LlmCall("g", 2, "answer", 0.03, at(6)),  # r2's call made twice, paid twice
    ]
    return events, sent, calls


def test_the_report_counts_terminal_events_per_request():
    events, sent, calls = _scenario()
    report = compute_report(events, sent, [GOAL], calls, clickhouse=None, budget_views={})
    r = report["requests"]
    assert (r["created"], r["on_kafka"], r["never_reached_kafka"]) == (5, 4, 1)
    # r1 once; r2 completed and failed; r3 and r4 never ended
    assert (r["one_terminal"], r["two_or_more"], r["no_terminal"]) == (1, 1, 2)
    assert r["conflicting_outcomes"] == 1
    assert r["without_terminal_last_step"] == {"request_received": 1, "task_admitted": 1}
    assert not report["invariants"]["1 one terminal event per request"]["ok"]
    assert report["ok"] is False


def test_two_outcomes_under_one_terminal_id_are_two():
    # Chaos seed 6: the loader's answer and, later, the budget's timeout failure of the
    # same run, both under the run's terminal id (a dedupe by id alone kept only one).
    failed = WorkflowFailed(
        event_id="terminal-r1",
        source="t",
        goal_id="g",
        run_id="r1",
        reason="timeout",
        detail="d",
        occurred_at=at(9),
    )
    events = [_request("r1", 0), _admitted("r1", 1), _completed("r1", 5, "terminal-r1"), failed]
    report = compute_report(events, {"r1": "g"}, [GOAL], [], clickhouse=None, budget_views={})
    r = report["requests"]
    assert (r["two_or_more"], r["conflicting_outcomes"]) == (1, 1)


def test_the_report_finds_every_limit_overshoot():
    events, sent, calls = _scenario()
    report = compute_report(events, sent, [GOAL], calls, clickhouse=None, budget_views={})
    row = report["goals"]["g"]
    assert row["peak_concurrent"] == 3
    assert row["peak_agents"] == 2
    assert abs(row["peak_daily_paid"] - 0.09) < 1e-9
    assert abs(row["peak_daily_counted"] - 0.06) < 1e-9
    inv = report["invariants"]
    assert not inv["2 max_concurrent"]["ok"]
    assert not inv["2 max_agents"]["ok"]
    assert not inv["2 max_daily_cost (paid)"]["ok"]
    assert not inv["2 no slot held after the end"]["ok"]  # no budget view: not shown to hold
    assert report["cost"]["runs_with_repeated_llm_call"] == 1
    assert report["cost"]["repeated_llm_calls"] == 1


def test_a_run_that_ends_before_the_next_is_admitted_does_not_overlap():
    events = [_request("r1", 0), _admitted("r1", 1), _completed("r1", 2)]
    events += [_request("r2", 0), _admitted("r2", 2), _completed("r2", 3)]
    goal = GoalSpec("g", max_concurrent=1, max_daily_cost=1.0, max_agents=1)
    report = compute_report(
        events, {"r1": "g", "r2": "g"}, [goal], [], clickhouse=None, budget_views={}
    )
    assert report["goals"]["g"]["peak_concurrent"] == 1
    assert report["invariants"]["2 max_concurrent"]["ok"]


def test_clickhouse_missing_and_doubled_events_and_cost_against_the_budget():
    events = [_request("r1", 0), _admitted("r1", 1), _cost("r1", 0.01, 1.5), _completed("r1", 2)]
    ids = [e.event_id for e in events]
    clickhouse = {ids[0]: (1, 1), ids[1]: (2, 1), ids[2]: (2, 2), "elsewhere": (1, 1)}
    goal = GoalSpec("g", max_concurrent=1, max_daily_cost=1.0, max_agents=1)
    view = {"spent_today": 0.01, "in_flight": 0, "queued": 0}
    calls = [LlmCall("g", 1, "answer", 0.01, at(1))]
    report = compute_report(
        events, {"r1": "g"}, [goal], calls, clickhouse=clickhouse, budget_views={"g": view}
    )
    ch = report["clickhouse"]
    assert ch["missing"] == 1  # the terminal event never reached ClickHouse
    assert ch["counted_twice"] == 1  # two rows FINAL still shows
    assert ch["duplicate_rows_before_merge"] == 2
    assert ch["not_on_kafka"] == 1
    inv = report["invariants"]
    assert not inv["3 ClickHouse exactly once"]["ok"]
    assert inv["paid cost = counted cost"]["ok"]
    assert inv["1 one terminal event per request"]["ok"]
    assert inv["2 no slot held after the end"]["ok"]

    exact = {i: (1, 1) for i in ids}
    report = compute_report(
        events, {"r1": "g"}, [goal], calls, clickhouse=exact, budget_views={"g": view}
    )
    assert report["ok"] is True
    print_report(report, Console(file=io.StringIO(), width=140))

    cheap = {"g": {**view, "spent_today": 0.005}}
    report = compute_report(
        events, {"r1": "g"}, [goal], calls, clickhouse=exact, budget_views=cheap
    )
    assert not report["invariants"]["paid cost = counted cost"]["ok"]
    assert report["ok"] is False


def test_the_fake_llm_ledger_bills_each_answered_call_by_purpose_and_request():
    ledger = LlmLedger()
    user = {"role": "user", "content": "[chaos g r12] Explain the history of topic 12"}
    text, usage, _ = ledger.respond({"model": "gpt-4o-mini", "messages": [user], "max_tokens": 20})
    assert "answer to" in text and usage.completion_tokens == 20
    judge = [{"role": "system", "content": "You grade answers to user requests"}, user]
    assert ledger.respond({"model": "gpt-4o-mini", "messages": judge})[0] == "7"
    spawn = [{"role": "system", "content": "You write system prompts for specialist AI agents."}]
    ledger.respond({"model": "gpt-4o-mini", "messages": [*spawn, user]})
    assert [(c.goal_id, c.index, c.purpose) for c in ledger.calls] == [
        ("g", 12, "answer"),
        ("g", 12, "judge"),
        ("g", 12, "spawn_prompt"),
    ]
    # 100 prompt tokens at $40/M and 20 completion tokens at $120/M
    assert abs(ledger.calls[0].cost_usd - (100 * 40 + 20 * 120) / 1e6) < 1e-12


def test_answer_calls_are_matched_to_their_cost_reports_by_request_id():
    def report(cost_id: str, usd: float) -> LlmCallCompleted:
        return _cost("r1", usd, 1).model_copy(update={"event_id": cost_id})

    calls = [
        LlmCall("g", 1, "answer", 0.01, at(1), "c1"),  # billed and counted
        LlmCall("g", 1, "answer", 0.01, at(2), "c2"),  # billed, never counted
        LlmCall("g", 2, "answer", 0.02, at(3), "c4"),  # counted at another amount
        LlmCall("g", 2, "judge", 0.05, at(3), None),  # not an answer: not matched
    ]
    reports = [report("c1", 0.01), report("c1", 0.01), report("c3", 0.01), report("c4", 0.03)]
    out = reconcile_calls(calls, reports)
    assert out["billed_not_counted"] == 1 and out["billed_not_counted_usd"] == 0.01
    assert out["examples_not_counted"] == ["c2"]
    # c3: an attempt killed mid-call, counted at an estimate, whose call was never billed
    assert out["counted_not_billed"] == 1 and out["examples_not_billed"] == ["c3"]
    assert out["amount_differs"] == 1 and out["billed_without_id"] == 0
    assert out["unexplained"] == 3  # none of these is one of the budget's two designed cases


def test_the_budgets_designed_differences_are_told_apart_and_balance_the_cost():
    """A call whose loader died mid-call, counted by the budget at its worst case, and one
    still held awaiting its report: paid = counted holds once both are accounted for; any
    other difference does not."""
    from bench.chaos import _paid_is_counted

    def report(cost_id: str, usd: float, source: str = "loader") -> LlmCallCompleted:
        return _cost("r1", usd, 1).model_copy(update={"event_id": cost_id, "source": source})

    calls = [
        LlmCall("g", 1, "answer", 0.01, at(1), "ok"),
        LlmCall("g", 2, "answer", 0.01, at(2), "died"),  # loader killed before reporting
        LlmCall("g", 3, "answer", 0.01, at(3), "held"),  # its hold has not lapsed yet
    ]
    reports = [
        report("ok", 0.01),
        report("died", 0.0196, source="budget"),  # the budget's report at the hold
        report("died", 0.01),  # a late report under the same id: the first counted
    ]
    out = reconcile_calls(calls, reports, held_ids=frozenset({"held"}))
    assert out["counted_at_worst_case_by_budget"] == 1
    assert out["worst_case_over_billed_usd"] == 0.0096
    assert out["held_not_yet_counted"] == 1 and out["held_not_yet_counted_usd"] == 0.01
    assert out["unexplained"] == 0
    cost = {"answer_calls_by_id": out, "judge_calls_by_id": reconcile_calls(calls, [], "judge")}
    ok, detail = _paid_is_counted(0.03, 0.0296, cost)
    assert ok, detail
    assert "counted at their worst case (+$0.0096)" in detail and "still held" in detail
    # The budget's spend off by anything else: refused.
    assert not _paid_is_counted(0.03, 0.0300, cost)[0]
    # A loader's own report counted above what was billed is not the budget's design.
    loader_over = reconcile_calls(calls, [report("ok", 0.02)], held_ids=frozenset())
    assert loader_over["counted_at_worst_case_by_budget"] == 0 and loader_over["unexplained"]
    bad = {"answer_calls_by_id": loader_over, "judge_calls_by_id": {}}
    assert not _paid_is_counted(0.03, 0.02, bad)[0]


def test_daily_caps_scale_with_the_length_and_rate_of_the_run():
    assert goals_for(3, 3) == DEFAULT_GOALS
    longer = goals_for(9, 3)
    assert [g.max_daily_cost for g in longer] == [
        round(g.max_daily_cost * 3, 4) for g in DEFAULT_GOALS
    ]
    assert [g.max_concurrent for g in longer] == [g.max_concurrent for g in DEFAULT_GOALS]
