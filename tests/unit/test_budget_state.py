"""Budget rules of one goal: agents, concurrency, daily cost, idempotency, a moved clock."""

from __future__ import annotations

from datetime import UTC, datetime

from services.budget.state import BudgetDefaults, BudgetState
from streams.clock import FakeClock
from streams.events import (
    BudgetExceeded,
    BudgetUpdateRequested,
    LlmCallCompleted,
    SpawnApproved,
    SpawnDenied,
    SpawnRequested,
    SpendDecided,
    SpendRequested,
    TaskAdmitted,
    TaskRequested,
    WorkflowCompleted,
    WorkflowFailed,
)

DEFAULTS = BudgetDefaults(task_reserve_usd=0.01)


def _state(**limits) -> BudgetState:
    state = BudgetState.new("g1", DEFAULTS)
    for k, v in limits.items():
        setattr(state, k, v)
    return state


def _task(i: int) -> TaskRequested:
    return TaskRequested(
        source="router",
        run_id=f"r{i}",
        goal_id="g1",
        user_id="u1",
        agent_id="a1",
        specialty="code",
        message=f"task {i}",
    )


def _done(i: int) -> WorkflowCompleted:
    return WorkflowCompleted(
        source="loader", run_id=f"r{i}", goal_id="g1", specialty="code", text="ok"
    )


def _cost(i: int, usd: float, when: datetime) -> LlmCallCompleted:
    return LlmCallCompleted(
        source="loader", run_id=f"r{i}", goal_id="g1", model="m", cost_usd=usd, occurred_at=when
    )


def test_spawns_stop_at_max_agents_with_the_limit_named():
    clock = FakeClock()
    state = _state(max_agents=3)
    out = []
    for i in range(10):
        req = SpawnRequested(source="router", goal_id="g1", run_id=f"r{i}", specialty=f"s{i}")
        out.extend(state.handle(req, clock.now(), DEFAULTS).events)
    approved = [e for e in out if isinstance(e, SpawnApproved)]
    denied = [e for e in out if isinstance(e, SpawnDenied)]
    assert len(approved) == 3 and len(denied) == 7
    assert all(d.limit == "max_agents" for d in denied)
    assert sum(isinstance(e, BudgetExceeded) for e in out) == 7


def test_concurrency_queues_beyond_the_limit_and_admits_on_release():
    clock = FakeClock()
    state = _state(max_concurrent=2)
    admitted = []
    for i in range(5):
        admitted += [e for e in state.handle(_task(i), clock.now(), DEFAULTS).events]
    assert [e.run_id for e in admitted] == ["r0", "r1"]
    assert all(isinstance(e, TaskAdmitted) for e in admitted)
    assert len(state.queue) == 3
    nxt = state.handle(_done(0), clock.now(), DEFAULTS).events
    assert [e.run_id for e in nxt] == ["r2"] and len(state.in_flight) == 2
    # A redelivered terminal event releases nothing more.
    assert state.handle(_done(0), clock.now(), DEFAULTS).events == []
    assert len(state.in_flight) == 2


def test_redelivered_llm_cost_is_charged_once():
    clock = FakeClock()
    state = _state()
    call = _cost(1, 0.5, clock.now())
    state.handle(call, clock.now(), DEFAULTS)
    state.handle(call, clock.now(), DEFAULTS)
    assert state.spent_today(clock.now()) == 0.5


def test_daily_cost_stops_the_goal_and_the_next_utc_day_reopens_it():
    clock = FakeClock(datetime(2026, 3, 1, 23, 0, tzinfo=UTC))
    state = _state(max_daily_cost=1.0)
    state.handle(_cost(0, 0.995, clock.now()), clock.now(), DEFAULTS)
    out = state.handle(_task(1), clock.now(), DEFAULTS).events
    failed = [e for e in out if isinstance(e, WorkflowFailed)]
    assert failed and failed[0].limit == "max_daily_cost" and failed[0].reason == "budget_exceeded"
    clock.advance(3600)  # past midnight UTC
    out = state.handle(_task(2), clock.now(), DEFAULTS).events
    assert [type(e) for e in out] == [TaskAdmitted]


def test_reservations_keep_concurrent_tasks_inside_the_daily_cost():
    clock = FakeClock()
    state = _state(max_daily_cost=0.035, max_concurrent=10)
    out = []
    for i in range(10):
        out += state.handle(_task(i), clock.now(), DEFAULTS).events
    admitted = [e for e in out if isinstance(e, TaskAdmitted)]
    # 0.01 held per task: only three fit under 0.035 even though none has cost anything yet.
    assert len(admitted) == 3
    assert all(e.limit == "max_daily_cost" for e in out if isinstance(e, WorkflowFailed))


def test_limits_change_by_event_and_state_survives_a_round_trip():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    state.handle(_task(0), clock.now(), DEFAULTS)
    state.handle(_task(1), clock.now(), DEFAULTS)
    upd = BudgetUpdateRequested(source="cli", goal_id="g1", max_concurrent=5)
    out = state.handle(upd, clock.now(), DEFAULTS).events
    assert [e.run_id for e in out] == ["r1"]
    copy = BudgetState.from_dict(state.to_dict())
    assert copy.to_dict() == state.to_dict()
    assert copy.handle(upd, clock.now(), DEFAULTS).events == []  # seen ids survive too


def test_spawns_hold_their_prompt_cost_and_stop_at_the_daily_cost():
    clock = FakeClock()
    state = _state(max_daily_cost=0.025)
    out = []
    for i in range(4):
        req = SpawnRequested(source="router", goal_id="g1", run_id=f"r{i}", specialty=f"s{i}")
        out += state.handle(req, clock.now(), DEFAULTS).events
    # 0.01 held per approved spawn: two fit under 0.025, the others are denied by cost.
    assert sum(isinstance(e, SpawnApproved) for e in out) == 2
    denied = [e for e in out if isinstance(e, SpawnDenied)]
    assert [d.limit for d in denied] == ["max_daily_cost", "max_daily_cost"]
    prompt = LlmCallCompleted(
        source="spawner",
        run_id="r0",
        goal_id="g1",
        model="m",
        cost_usd=0.001,
        purpose="spawn_prompt",
    )
    state.handle(prompt, clock.now(), DEFAULTS)
    assert state.reserved() == 0.01  # r0's hold gave way to its real cost
    clock.advance(120)
    state.handle(_task(9), clock.now(), DEFAULTS)  # any event lets stale holds lapse
    assert "r1" not in state.spawn_holds


def test_a_platform_call_is_held_before_it_is_made_and_refused_past_the_cap():
    clock = FakeClock()
    state = _state(max_daily_cost=0.10)
    state.handle(_task(1), clock.now(), DEFAULTS)  # holds 0.01 for the running task
    state.handle(_cost(0, 0.05, clock.now()), clock.now(), DEFAULTS)
    judge = SpendRequested(
        source="improvement", run_id="r1", goal_id="g1", purpose="judge", amount_usd=0.03
    )
    (decided,) = state.handle(judge, clock.now(), DEFAULTS).events
    assert isinstance(decided, SpendDecided) and decided.approved
    assert decided.request_id == judge.event_id
    assert state.reserved() == 0.04  # the task's 0.01 and the judge's worst case
    # A redelivered request changes nothing and decides nothing again.
    assert state.handle(judge, clock.now(), DEFAULTS).events == []
    # 0.05 spent + 0.04 held: another 0.02 would pass 0.10.
    rewrite = SpendRequested(
        source="improvement", run_id="r1", goal_id="g1", purpose="improvement", amount_usd=0.02
    )
    exceeded, refused = state.handle(rewrite, clock.now(), DEFAULTS).events
    assert isinstance(refused, SpendDecided) and not refused.approved
    assert "max_daily_cost" in refused.reason
    assert isinstance(exceeded, BudgetExceeded) and exceeded.limit == "max_daily_cost"
    # The judge's real cost replaces its hold.
    paid = LlmCallCompleted(
        source="improvement",
        run_id="r1",
        goal_id="g1",
        model="m",
        purpose="judge",
        cost_usd=0.012,
        occurred_at=clock.now(),
    )
    state.handle(paid, clock.now(), DEFAULTS)
    assert state.reserved() == 0.01
    assert state.spent_today(clock.now()) == 0.062
