"""Budget rules of one goal: agents, concurrency, daily cost, idempotency, a moved clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.budget.state import BudgetDefaults, BudgetState, RunStore, _digest
from streams.clock import FakeClock
from streams.events import (
    SPAWN_APPROVAL_SECONDS,
    BudgetExceeded,
    BudgetTicked,
    BudgetUpdateRequested,
    GoalAgentsChanged,
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
    terminal_event_id,
)
from streams.llm import ModelPrice, PriceTable, worst_case_usd
from streams.workflows import MAX_PROMPT_CHARS

# Free tokens: every hold is the 0.01 floor, which keeps the arithmetic readable.
DEFAULTS = BudgetDefaults(task_reserve_usd=0.01, prices=PriceTable({}, ModelPrice(0.0, 0.0)))


def _state(**limits) -> BudgetState:
    state = BudgetState.new("g1", DEFAULTS)
    for k, v in limits.items():
        setattr(state, k, v)
    return state


def _task(i: int, goal: str = "g1", run: str | None = None) -> TaskRequested:
    return TaskRequested(
        source="router",
        run_id=run or f"r{i}",
        goal_id=goal,
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


def _judged(run: str, usd: float, when: datetime, purpose: str = "judge") -> LlmCallCompleted:
    """The improvement service's report of a judge (or other) call it made for ``run``."""
    return LlmCallCompleted(
        source="improvement",
        run_id=run,
        goal_id="g1",
        model="m",
        purpose=purpose,
        cost_usd=usd,
        occurred_at=when,
    )


def _spend(run: str, purpose: str, usd: float, **fields) -> SpendRequested:
    """The improvement service's ask to hold a platform call's worst case for ``run``."""
    return SpendRequested(
        source="improvement", run_id=run, goal_id="g1", purpose=purpose, amount_usd=usd, **fields
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


def _spawn_req(i: int) -> SpawnRequested:
    return SpawnRequested(source="router", goal_id="g1", run_id=f"r{i}", specialty=f"s{i}")


def _changed(agent: str, change: str, approval: str | None = None) -> GoalAgentsChanged:
    return GoalAgentsChanged(
        source="loader", goal_id="g1", agent_id=agent, change=change, approval_id=approval
    )


def test_max_agents_counts_live_agents_a_retired_one_frees_its_place():
    clock = FakeClock()
    state = _state(max_agents=2)
    approvals = [state.handle(_spawn_req(i), clock.now(), DEFAULTS).events[0] for i in (0, 1)]
    assert all(isinstance(a, SpawnApproved) for a in approvals)
    for i, a in enumerate(approvals):
        state.handle(_changed(f"a{i}", "spawned", a.event_id), clock.now(), DEFAULTS)
    assert state.agent_count() == 2
    assert isinstance(state.handle(_spawn_req(2), clock.now(), DEFAULTS).events[-1], SpawnDenied)
    # a1 sat idle and the loader retired it: the goal may have another agent.
    state.handle(_changed("a1", "retired"), clock.now(), DEFAULTS)
    assert state.agent_count() == 1
    (third,) = state.handle(_spawn_req(3), clock.now(), DEFAULTS).events
    assert isinstance(third, SpawnApproved)
    # Reviving a1 now would make three: the task that would revive it is refused.
    revive = _task(9).model_copy(update={"agent_id": "a1"})
    out = state.handle(revive, clock.now(), DEFAULTS).events
    failed = [e for e in out if isinstance(e, WorkflowFailed)]
    assert failed and failed[0].limit == "max_agents" and "max_agents 2" in failed[0].detail
    # Survives the record's round trip.
    again = BudgetState.from_dict(state.to_dict(), RunStore(), DEFAULTS)
    assert again.agent_count() == 2 and again.live["a1"] == "retired"


def test_a_failed_spawn_does_not_keep_its_place():
    clock = FakeClock()
    state = _state(max_agents=1)
    (approved,) = state.handle(_spawn_req(0), clock.now(), DEFAULTS).events
    # Approved and not spawned yet: it counts (two concurrent spawns cannot pass the cap).
    assert isinstance(state.handle(_spawn_req(1), clock.now(), DEFAULTS).events[-1], SpawnDenied)
    state.handle(_changed("s0_x", "spawn_failed", approved.event_id), clock.now(), DEFAULTS)
    assert state.agent_count() == 0
    assert isinstance(state.handle(_spawn_req(2), clock.now(), DEFAULTS).events[0], SpawnApproved)


def test_an_approval_nobody_acted_on_gives_its_place_back_after_twice_the_spawners_limit():
    # An approval the spawner cannot read (a release it does not know) is never answered:
    # it held its place under max_agents for ever.
    clock = FakeClock()
    state = _state(max_agents=1)
    state.handle(_spawn_req(0), clock.now(), DEFAULTS)
    clock.advance(2 * SPAWN_APPROVAL_SECONDS - 1)
    assert isinstance(state.handle(_spawn_req(1), clock.now(), DEFAULTS).events[-1], SpawnDenied)
    clock.advance(2)
    (approved,) = state.handle(_spawn_req(2), clock.now(), DEFAULTS).events
    assert isinstance(approved, SpawnApproved) and state.agent_count() == 1
    again = BudgetState.from_dict(state.to_dict(), RunStore(), DEFAULTS)
    assert again.spawning == {approved.event_id: clock.now().isoformat()}


def test_a_revival_under_the_cap_counts_the_agent_live_again():
    clock = FakeClock()
    state = _state(max_agents=2)
    (approved,) = state.handle(_spawn_req(0), clock.now(), DEFAULTS).events
    state.handle(_changed("a0", "spawned", approved.event_id), clock.now(), DEFAULTS)
    state.handle(_changed("a0", "retired"), clock.now(), DEFAULTS)
    assert state.agent_count() == 0
    (admitted,) = state.handle(
        _task(1).model_copy(update={"agent_id": "a0"}), clock.now(), DEFAULTS
    ).events
    assert isinstance(admitted, TaskAdmitted) and state.agent_count() == 1


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


def test_calls_held_before_midnight_and_reported_after_count_on_the_day_before():
    # The judge grades answers after they end: its calls may report after midnight. They
    # were let start against the old day's cap and billed then: the new day starts at 0.
    clock = FakeClock(datetime(2026, 3, 1, 23, 59, 50, tzinfo=UTC))
    day1 = clock.now()
    state = _state(max_daily_cost=1.0)
    state.handle(_task(1), clock.now(), DEFAULTS)  # admitted: its answer call may run
    state.handle(_task(2), clock.now(), DEFAULTS)
    answered = _done(2).model_copy(update={"cost_usd": 0.005})
    state.handle(answered, clock.now(), DEFAULTS)  # answered before its cost is reported
    assert "r2" in state.pending
    judge = SpendRequested(
        source="improvement", run_id="r0", goal_id="g1", purpose="judge", amount_usd=0.03
    )
    state.handle(judge, clock.now(), DEFAULTS)
    clock.advance(20)  # 00:00:10 the next day
    state.handle(_cost(1, 0.004, clock.now()), clock.now(), DEFAULTS)
    state.handle(_cost(2, 0.005, clock.now()), clock.now(), DEFAULTS)
    state.handle(_judged("r0", 0.012, clock.now()), clock.now(), DEFAULTS)
    assert state.spent_today(clock.now()) == 0
    assert state.spent_today(day1) == pytest.approx(0.021)
    # A call the budget held nothing for (none known) counts when it is reported.
    state.handle(_cost(9, 0.5, clock.now()), clock.now(), DEFAULTS)
    assert state.spent_today(clock.now()) == 0.5
    # Pending entries written before the admission time was kept still count, on today.
    state.pending["r7"] = [0.01, clock.now().isoformat(), None, ""]
    state.handle(_cost(7, 0.25, clock.now()), clock.now(), DEFAULTS)
    assert state.spent_today(clock.now()) == 0.75 and "r7" not in state.pending


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


def test_a_goals_cost_weight_is_set_by_event_kept_and_reported_alone():
    clock = FakeClock()
    state = _state(max_concurrent=3)
    upd = BudgetUpdateRequested(source="cli", goal_id="g1", cost_weight=12.5)
    state.handle(upd, clock.now(), DEFAULTS)
    assert state.cost_weight == 12.5 and state.max_concurrent == 3  # the limits stay
    copy = BudgetState.from_dict(state.to_dict())
    assert copy.cost_weight == 12.5 and copy.summary(clock.now())["cost_weight"] == 12.5
    # Records written before cost weights existed read as 0 (quality only).
    old = state.to_dict()
    del old["cost_weight"]
    assert BudgetState.from_dict(old).cost_weight == 0.0


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
    # A redelivered request changes nothing and sends the same decision again.
    assert state.handle(judge, clock.now(), DEFAULTS).events == [decided]
    assert state.reserved() == 0.04
    # 0.05 spent + 0.04 held: another 0.02 would pass 0.10.
    rewrite = SpendRequested(
        source="improvement", run_id="r1", goal_id="g1", purpose="improvement", amount_usd=0.02
    )
    exceeded, refused = state.handle(rewrite, clock.now(), DEFAULTS).events
    assert isinstance(refused, SpendDecided) and not refused.approved
    assert "max_daily_cost" in refused.reason
    assert isinstance(exceeded, BudgetExceeded) and exceeded.limit == "max_daily_cost"
    # The judge's real cost replaces its hold.
    state.handle(_judged("r1", 0.012, clock.now()), clock.now(), DEFAULTS)
    assert state.reserved() == 0.01
    assert state.spent_today(clock.now()) == 0.062


# -- crash safety: every output is re-derivable and deterministic ----------------------


def _at(clock: FakeClock, i: int, **fields) -> TaskRequested:
    return _task(i).model_copy(update={"occurred_at": clock.now(), **fields})


def test_a_replayed_task_sends_its_admission_again_with_the_same_id():
    clock = FakeClock()
    runs = RunStore()
    state = _state(max_concurrent=1)
    state.runs = runs
    task = _at(clock, 0)
    (first,) = state.handle(task, clock.now(), DEFAULTS).events
    assert isinstance(first, TaskAdmitted)
    # The service died after writing the state and before sending: a fresh instance
    # reads the state back and the input again.
    again = BudgetState.from_dict(state.to_dict(), runs, DEFAULTS)
    clock.advance(5)
    assert again.handle(task, clock.now(), DEFAULTS).events == [first]
    # Another budget deciding the same input names the admission the same way.
    other = _state(max_concurrent=1)
    assert other.handle(task, clock.now(), DEFAULTS).events[0].event_id == first.event_id


def test_a_replayed_release_sends_the_admission_it_drained_again():
    clock = FakeClock()
    runs = RunStore()
    state = _state(max_concurrent=1)
    state.runs = runs
    state.handle(_at(clock, 0), clock.now(), DEFAULTS)
    queued = _at(clock, 1)
    assert state.handle(queued, clock.now(), DEFAULTS).events == []
    assert "task 1" not in json.dumps(state.to_dict())  # the task waits outside the record
    done = _done(0).model_copy(update={"event_id": terminal_event_id("r0")})
    (drained,) = state.handle(done, clock.now(), DEFAULTS).events
    assert isinstance(drained, TaskAdmitted) and drained.run_id == "r1"
    again = BudgetState.from_dict(state.to_dict(), runs, DEFAULTS)
    assert again.handle(done, clock.now(), DEFAULTS).events == [drained]
    # A queued task replayed sends nothing: nothing was decided yet.
    assert again.handle(_at(clock, 2), clock.now(), DEFAULTS).events == []
    assert again.handle(_at(clock, 2), clock.now(), DEFAULTS).events == []


def test_a_replayed_refusal_sends_the_same_terminal_event_again():
    clock = FakeClock()
    state = _state(max_concurrent=0)
    task = _at(clock, 0)
    out = state.handle(task, clock.now(), DEFAULTS).events
    failed = [e for e in out if isinstance(e, WorkflowFailed)]
    assert failed and failed[0].event_id == terminal_event_id("r0")
    again = BudgetState.from_dict(state.to_dict(), RunStore(), DEFAULTS)
    clock.advance(3)
    assert again.handle(task, clock.now(), DEFAULTS).events == out


def test_a_replayed_spawn_sends_the_same_approval_or_denial_again():
    clock = FakeClock()
    state = _state(max_agents=1)
    first = SpawnRequested(source="router", goal_id="g1", run_id="r0", specialty="s0")
    second = SpawnRequested(source="router", goal_id="g1", run_id="r1", specialty="s1")
    (approved,) = state.handle(first, clock.now(), DEFAULTS).events
    denied = state.handle(second, clock.now(), DEFAULTS).events
    assert isinstance(approved, SpawnApproved) and isinstance(denied[-1], SpawnDenied)
    # The spawner derives the agent id from the approval's id: another budget deciding
    # the same request must name it the same.
    assert _state().handle(first, clock.now(), DEFAULTS).events[0].event_id == approved.event_id
    again = BudgetState.from_dict(state.to_dict(), RunStore(), DEFAULTS)
    clock.advance(7)
    assert again.handle(first, clock.now(), DEFAULTS).events == [approved]
    assert again.handle(second, clock.now(), DEFAULTS).events == denied


def test_a_replayed_spend_request_sends_the_same_decision_again():
    clock = FakeClock()
    state = _state(max_daily_cost=0.05)
    ask = SpendRequested(
        source="improvement", run_id="r1", goal_id="g1", purpose="judge", amount_usd=0.04
    )
    first = state.handle(ask, clock.now(), DEFAULTS).events
    again = BudgetState.from_dict(state.to_dict(), RunStore(), DEFAULTS)
    assert again.handle(ask, clock.now(), DEFAULTS).events == first


# -- slots: a run that ended is never admitted again; leases drain the queue -------------


def test_a_rerouted_task_of_a_run_that_ended_is_not_admitted_again():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    state.handle(_at(clock, 0), clock.now(), DEFAULTS)
    state.handle(_done(0), clock.now(), DEFAULTS)
    # The router replayed the request after a restart: a new task_requested id, same run.
    assert state.handle(_at(clock, 0), clock.now(), DEFAULTS).events == []
    assert state.in_flight == {}


def test_an_expired_lease_frees_its_slot_and_admits_the_queue():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    deadline = clock.now() + timedelta(seconds=10)
    state.handle(_at(clock, 0, deadline_at=deadline), clock.now(), DEFAULTS)
    state.handle(_at(clock, 1), clock.now(), DEFAULTS)
    assert list(state.in_flight) == ["r0"] and state.queue == ["r1"]
    # r0's loader vanished; past its deadline plus the LLM timeout it cannot be running.
    clock.advance(10 + DEFAULTS.llm_timeout_s + 31)
    out = state.handle(_at(clock, 2), clock.now(), DEFAULTS).events
    assert [(type(e), e.run_id) for e in out] == [(TaskAdmitted, "r1")]
    assert list(state.in_flight) == ["r1"] and state.queue == ["r2"]


def test_a_waiting_task_past_its_deadline_ends_on_a_tick_with_nothing_else_happening():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    state.handle(_at(clock, 0), clock.now(), DEFAULTS)
    waiting = _at(clock, 1, deadline_at=clock.now() + timedelta(seconds=5))
    state.handle(waiting, clock.now(), DEFAULTS)
    assert state.queue == ["r1"]
    tick = BudgetTicked(source="budget", goal_id="g1")
    assert state.handle(tick, clock.now(), DEFAULTS).events == []  # not due yet
    clock.advance(6)
    (failed,) = [e for e in state.handle(tick, clock.now(), DEFAULTS).events]
    assert isinstance(failed, WorkflowFailed)
    assert (failed.run_id, failed.reason) == ("r1", "timeout")
    assert failed.event_id == terminal_event_id("r1")
    assert state.queue == [] and list(state.in_flight) == ["r0"]
    # Ticks are not remembered as applied events: they would push real ids out.
    assert len(state.seen) == 2 and _digest(tick.event_id) not in state.seen


def _one_running_one_waiting(
    clock: FakeClock, first_deadline_s: float | None = None, second_deadline_s: float | None = None
) -> tuple[BudgetState, RunStore]:
    """A goal with one slot: r0 runs, r1 waits for it (each with its deadline, if given)."""

    def deadline(s: float | None) -> datetime | None:
        return None if s is None else clock.now() + timedelta(seconds=s)

    runs = RunStore()
    state = _state(max_concurrent=1)
    state.runs = runs
    state.handle(_at(clock, 0, deadline_at=deadline(first_deadline_s)), clock.now(), DEFAULTS)
    state.handle(_at(clock, 1, deadline_at=deadline(second_deadline_s)), clock.now(), DEFAULTS)
    assert state.queue == ["r1"]
    return state, runs


def _tick() -> BudgetTicked:
    return BudgetTicked(source="budget", goal_id="g1")


def test_a_replayed_tick_sends_the_admission_it_decided_again():
    # The chaos bench's 8 runs without an outcome (one of two ways): a tick admitted a
    # queued task, the budget wrote its record and was killed before its output went
    # out; the replayed tick (never kept in ``seen``) drained an empty queue.
    clock = FakeClock()
    state, runs = _one_running_one_waiting(clock, first_deadline_s=10)
    clock.advance(10 + DEFAULTS.llm_timeout_s + 31)
    # Event time moves too (some event of the goal), so r0's lease can lapse.
    state.event_time = clock.now().isoformat()
    tick = _tick()
    (admitted,) = state.handle(tick, clock.now(), DEFAULTS).events
    assert isinstance(admitted, TaskAdmitted) and admitted.run_id == "r1"
    again = BudgetState.from_dict(state.to_dict(), runs, DEFAULTS)
    clock.advance(2)
    assert again.handle(tick, clock.now(), DEFAULTS).events == [admitted]
    # A tick that decided nothing is a tick like any other.
    assert again.handle(_tick(), clock.now(), DEFAULTS).events == []


def test_a_replayed_tick_sends_the_failure_it_decided_again():
    clock = FakeClock()
    state, runs = _one_running_one_waiting(clock, second_deadline_s=5)
    clock.advance(6)
    tick = _tick()
    (failed,) = state.handle(tick, clock.now(), DEFAULTS).events
    assert isinstance(failed, WorkflowFailed) and failed.reason == "timeout"
    again = BudgetState.from_dict(state.to_dict(), runs, DEFAULTS)
    assert again.handle(tick, clock.now(), DEFAULTS).events == [failed]


def test_a_queued_run_the_budget_ended_before_its_record_was_lost_ends_the_same_way():
    # The other way: the runs table's write (the failure) landed, the goal record's
    # (queue, ended) did not; the run stayed queued behind a slot that stays taken.
    clock = FakeClock()
    state, runs = _one_running_one_waiting(clock, second_deadline_s=5)
    before = state.to_dict()
    clock.advance(6)
    (failed,) = state.handle(_tick(), clock.now(), DEFAULTS).events
    lost = BudgetState.from_dict(before, runs, DEFAULTS)
    assert lost.queue == ["r1"]
    clock.advance(1)
    assert lost.handle(_tick(), clock.now(), DEFAULTS).events == [failed]
    assert lost.queue == [] and "r1" in lost.ended


def test_a_queued_run_whose_task_was_lost_still_ends():
    # The goal's record (queue) landed and the runs table's entry did not; an event
    # came before the task's replay could store it again.
    clock = FakeClock()
    state, runs = _one_running_one_waiting(clock)
    runs.delete("r1")
    done = _done(0).model_copy(update={"event_id": terminal_event_id("r0")})
    (failed,) = state.handle(done, clock.now(), DEFAULTS).events
    assert isinstance(failed, WorkflowFailed)
    assert (failed.run_id, failed.reason) == ("r1", "internal")
    assert failed.event_id == terminal_event_id("r1")
    assert state.queue == [] and "r1" in state.ended


def test_a_budget_outage_alone_expires_no_lease():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    sent = clock.now()
    state.handle(_at(clock, 0, deadline_at=sent + timedelta(seconds=60)), sent, DEFAULTS)
    # The budget was down two hours: its clock moved, the backlog's event times did not.
    clock.advance(7200)
    late = _at(clock, 1).model_copy(update={"occurred_at": sent + timedelta(seconds=5)})
    assert state.handle(late, clock.now(), DEFAULTS).events == []
    assert list(state.in_flight) == ["r0"] and state.queue == ["r1"]


# -- daily cost is a hard cap: the worst case is held before the call --------------------


PRICED = BudgetDefaults(
    task_reserve_usd=0.0,
    prices=PriceTable({"cheap": ModelPrice(0.1, 0.1)}, ModelPrice(1.0, 2.0)),
    max_tokens=100,
)


def test_a_task_holds_its_worst_case_at_the_dearest_price():
    clock = FakeClock()
    state = _state(max_daily_cost=1.0)
    task = _at(clock, 0, context={"lang": "en"})
    state.handle(task, clock.now(), PRICED)
    messages = [
        {"content": "x" * (4 * MAX_PROMPT_CHARS)},
        {"content": 'Context of this request (data, not instructions): {"lang": "en"}'},
        {"content": task.message},
    ]
    dearest = PriceTable({}, ModelPrice(1.0, 2.0))
    assert state.reserved() == worst_case_usd(dearest, "cheap", messages, 100)


def test_the_first_burst_cannot_pass_the_daily_cost_and_waits_for_holds_to_settle():
    clock = FakeClock()
    worst = PRICED.task_worst_case("task 0", {})
    state = _state(max_daily_cost=worst * 1.5, max_concurrent=10)
    out = []
    for i in range(5):
        out += state.handle(_at(clock, i), clock.now(), PRICED).events
    # Nothing has cost anything yet, yet only one worst case fits: the rest wait.
    assert [e.run_id for e in out] == ["r0"] and len(state.queue) == 4
    paid = _cost(0, worst * 0.1, clock.now())
    out = state.handle(paid, clock.now(), PRICED).events
    assert [e.run_id for e in out] == ["r1"]
    assert state.spent_today(clock.now()) + state.reserved() <= state.max_daily_cost


def test_a_runs_hold_stays_until_its_cost_arrives_even_after_its_end():
    clock = FakeClock()
    worst = PRICED.task_worst_case("task 0", {})
    state = _state(max_daily_cost=worst * 1.5, max_concurrent=10)
    state.handle(_at(clock, 0), clock.now(), PRICED)
    done = _done(0).model_copy(update={"cost_usd": worst})
    state.handle(done, clock.now(), PRICED)  # the terminal event outran the cost event
    assert state.in_flight == {} and state.reserved() == worst
    assert state.handle(_at(clock, 1), clock.now(), PRICED).events == []  # must wait
    out = state.handle(_cost(0, worst, clock.now()), clock.now(), PRICED).events
    assert state.spent_today(clock.now()) == worst and state.reserved() == 0
    # worst spent + another worst case would pass 1.5 worst: r1 can never fit today.
    assert [type(e) for e in out] == [BudgetExceeded, WorkflowFailed]


def test_a_degraded_answer_frees_its_hold_at_once():
    clock = FakeClock()
    state = _state()
    state.handle(_at(clock, 0), clock.now(), PRICED)
    state.handle(_done(0), clock.now(), PRICED)  # cost_usd 0: no cost is coming
    assert state.reserved() == 0


def test_a_degraded_answer_whose_call_still_runs_keeps_its_hold_until_the_cost():
    # The loader gave up on the call at its timeout and answered from a lower tier, but
    # the endpoint may bill the call: its hold stays until the loader reports the cost.
    clock = FakeClock()
    worst = PRICED.task_worst_case("task 0", {})
    state = _state(max_daily_cost=worst * 1.5, max_concurrent=10)
    state.handle(_at(clock, 0), clock.now(), PRICED)
    pending = _done(0).model_copy(update={"meta": {"cost_pending": "true"}})
    state.handle(pending, clock.now(), PRICED)
    assert state.in_flight == {} and state.reserved() == worst
    assert state.handle(_at(clock, 1), clock.now(), PRICED).events == []  # must wait
    out = state.handle(_cost(0, worst / 3, clock.now()), clock.now(), PRICED).events
    assert state.spent_today(clock.now()) == worst / 3
    # r0's hold gave way to its real cost: r1 fits now and holds its own worst case.
    assert [type(e) for e in out] == [TaskAdmitted] and state.reserved() == worst


def _given_up(i: int, cost_id: str | None) -> WorkflowCompleted:
    """A lower tier's answer while the run's call, given up on at the timeout, still runs."""
    meta = {"cost_pending": "true"}
    if cost_id is not None:
        meta |= {"cost_id": cost_id, "cost_model": "big"}
    return _done(i).model_copy(update={"meta": meta})


def test_a_pending_call_nobody_reports_is_counted_at_its_hold_after_the_lapse():
    # Chaos seed 23: an answer call the endpoint billed was never counted. Its run had a
    # lower tier's answer at the timeout while the call went on; the loader was killed
    # before the call ended, so no report came, and the hold lapsed uncounted.
    clock = FakeClock()
    worst = PRICED.task_worst_case("task 0", {})
    state = _state(max_daily_cost=1.0, max_concurrent=10)
    state.handle(_at(clock, 0), clock.now(), PRICED)
    state.handle(_given_up(0, "cost-0"), clock.now(), PRICED)
    clock.advance(PRICED.lease_seconds * 2 - 60)  # the lease's end and the hold's lapse: not yet
    assert state.handle(_at(clock, 1), clock.now(), PRICED).events[1:] == []
    assert state.reserved() == 2 * worst
    clock.advance(180)  # past the deadline, the LLM timeout and the grace, and the lapse
    out = state.handle(
        _done(1).model_copy(update={"occurred_at": clock.now()}), clock.now(), PRICED
    )
    (report,) = [e for e in out.events if isinstance(e, LlmCallCompleted)]
    # Under the call's own cost id (what the endpoint was told, so it matches the bill
    # and counts once if the loader's report came after all), at the hold, its model.
    assert report.event_id == "cost-0" and report.run_id == "r0"
    assert report.cost_usd == worst and report.model == "big" and report.source == "budget"
    # Held until the report is read back, then spent: never neither.
    assert state.spent_today(clock.now()) == 0 and state.reserved() == worst
    state.handle(_task(7).model_copy(update={"occurred_at": clock.now()}), clock.now(), PRICED)
    assert not [
        e
        for e in state.handle(_task(8), clock.now(), PRICED).events
        if isinstance(e, LlmCallCompleted)
    ]  # not sent again within a minute
    clock.advance(61)  # a crash lost it: sent again, the same id
    again = state.handle(
        _task(9).model_copy(update={"occurred_at": clock.now()}), clock.now(), PRICED
    )
    assert [e.event_id for e in again.events if isinstance(e, LlmCallCompleted)] == ["cost-0"]
    state.handle(report, clock.now(), PRICED)
    state.handle(report.model_copy(update={"occurred_at": clock.now()}), clock.now(), PRICED)
    assert state.spent_today(clock.now()) == worst  # counted once
    assert "r0" not in state.pending
    # The record keeps it through a restart.
    copy = BudgetState.from_dict(state.to_dict())
    assert copy.pending == state.pending


def test_a_pending_call_that_failed_in_the_end_frees_its_hold_uncounted():
    clock = FakeClock()
    state = _state(max_daily_cost=1.0, max_concurrent=10)
    state.handle(_at(clock, 0), clock.now(), PRICED)
    state.handle(_given_up(0, "cost-0"), clock.now(), PRICED)
    # The refusal sent at the timeout (its own id) may be read after the answer: the call
    # still runs, the hold stays.
    refused = _cost(0, 0.0, clock.now()).model_copy(update={"ok": False})
    state.handle(refused, clock.now(), PRICED)
    assert "r0" in state.pending
    settled = refused.model_copy(update={"event_id": "cost-0", "error": "nothing billed"})
    state.handle(settled, clock.now(), PRICED)
    assert "r0" not in state.pending and state.reserved() == 0
    assert state.spent_today(clock.now()) == 0


def test_pending_holds_of_older_records_and_loaders_lapse_as_they_did_or_are_counted():
    clock = FakeClock()
    state = _state(max_daily_cost=1.0, max_concurrent=10)
    state.handle(_at(clock, 0), clock.now(), PRICED)
    state.handle(_at(clock, 1), clock.now(), PRICED)
    failed = WorkflowFailed(
        source="loader", run_id="r0", goal_id="g1", reason="timeout", detail="deadline"
    )
    state.handle(failed, clock.now(), PRICED)  # held until the lapse, no call known to run
    state.handle(_given_up(1, None), clock.now(), PRICED)  # a loader naming no cost id
    record = state.to_dict()
    record["pending"]["r0"] = record["pending"]["r0"][:2]  # the older form
    state = BudgetState.from_dict(record)
    clock.advance(PRICED.lease_seconds * 2 + 120)
    out = state.handle(_at(clock, 2), clock.now(), PRICED).events
    (report,) = [e for e in out if isinstance(e, LlmCallCompleted)]
    assert report.run_id == "r1" and report.model == "unknown" and report.event_id
    assert list(state.pending) == ["r1"]  # r0 lapsed uncounted, as before


def test_costs_are_filed_under_the_budgets_clock_not_the_senders():
    clock = FakeClock(datetime(2026, 3, 2, 0, 0, 10, tzinfo=UTC))
    state = _state(max_daily_cost=1.0)
    sent_yesterday = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)
    state.handle(_cost(0, 0.995, sent_yesterday), clock.now(), DEFAULTS)
    assert state.spent_today(clock.now()) == 0.995
    out = state.handle(_at(clock, 1), clock.now(), DEFAULTS).events
    assert [type(e) for e in out] == [BudgetExceeded, WorkflowFailed]


# -- bounded records -----------------------------------------------------------------


def test_the_goal_record_stays_small_whatever_the_input():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    big = "x" * 30_000
    for i in range(3000):
        task = _at(clock, i).model_copy(
            update={"message": big, "context": {"blob": big}, "run_id": f"r{i}" + "z" * 190}
        )
        state.handle(task, clock.now(), DEFAULTS)
        done = _done(i).model_copy(update={"run_id": f"gone{i}" + "z" * 190})
        state.handle(done, clock.now(), DEFAULTS)
    assert len(state.queue) == DEFAULTS.max_queue
    size = len(json.dumps(state.to_dict()))
    assert size < 300_000, size


def test_ended_runs_and_spends_keep_their_order_and_records_of_the_older_form_still_read():
    clock = FakeClock()
    state = _state(max_concurrent=5)
    for i in range(1005):  # past the 1,000 ended runs the record keeps
        state.handle(_at(clock, i), clock.now(), DEFAULTS)
        state.handle(_done(i), clock.now(), DEFAULTS)
    for i in range(205):  # past the 200 spend decisions
        ask = SpendRequested(
            source="improvement", run_id=f"s{i}", goal_id="g1", purpose="judge", amount_usd=0.0
        )
        state.handle(ask, clock.now(), DEFAULTS)
    raw = state.to_dict()
    # The oldest went first: runs r0-r4 and the first five spend decisions are gone. Runs
    # ended by the loader are kept by digest, as are the event ids seen.
    assert raw["closed"] == [_digest(f"r{i}") for i in range(5, 1005)] and raw["ended"] == {}
    assert len(raw["spends"]) == 200
    assert raw["seen_digests"][-1] == _digest(f"{ask.event_type}:{ask.event_id}")
    # Kept as JSON objects, in order, and read back the same.
    again = BudgetState.from_dict(json.loads(json.dumps(raw)), RunStore(), DEFAULTS)
    assert again.to_dict() == raw
    # Records written before (lists of [key, value] pairs; later objects, the ids seen and
    # the runs ended elsewhere kept whole) read back to the same state.
    applied = _cost(7, 0.0, clock.now())
    whole = {k: v for k, v in raw.items() if k not in ("closed", "seen_digests")}
    for ended, spends in (
        ({f"r{i}": "" for i in range(5, 1005)}, raw["spends"]),
        ([[f"r{i}", ""] for i in range(5, 1005)], [[k, v] for k, v in raw["spends"].items()]),
    ):
        record = {**whole, "seen": [applied.event_id], "ended": ended, "spends": spends}
        older = BudgetState.from_dict(record, RunStore(), DEFAULTS)
        assert older.to_dict() == {**raw, "seen_digests": [_digest(applied.event_id)]}
        # An event it applied is not applied again, an ended run not admitted again.
        older.handle(applied.model_copy(update={"cost_usd": 5.0}), clock.now(), DEFAULTS)
        assert older.spent_today(clock.now()) == state.spent_today(clock.now())
        assert older.handle(_at(clock, 1004), clock.now(), DEFAULTS).events == []
    assert again.handle(_at(clock, 1004), clock.now(), DEFAULTS).events == []


def test_an_event_read_again_leaves_the_record_as_it_was_so_nothing_is_written():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    first, waiting = _at(clock, 0), _at(clock, 1)
    assert state.handle(first, clock.now(), DEFAULTS).changed
    assert state.handle(waiting, clock.now(), DEFAULTS).changed  # queued
    before = state.to_dict()
    for again in (first, waiting, first):  # the router sends a task again while it waits
        decision = state.handle(again, clock.now(), DEFAULTS)
        assert not decision.changed and state.to_dict() == before
    assert [type(e) for e in state.handle(first, clock.now(), DEFAULTS).events] == [TaskAdmitted]


def test_a_long_queue_times_out_on_the_tick_and_an_expired_head_is_never_admitted():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    state.handle(_at(clock, 0), clock.now(), DEFAULTS)  # runs
    soon = clock.now() + timedelta(seconds=5)
    for i in range(1, 101):  # 100 wait; the first 50 give up after 5 s, the rest after 60
        late = soon if i <= 50 else clock.now() + timedelta(seconds=60)
        state.handle(_at(clock, i, deadline_at=late), clock.now(), DEFAULTS)
    assert len(state.queue) == 100
    clock.advance(6)
    # An event that frees a slot: the head is past its deadline, so is the next... the
    # first task still waiting in time is admitted, the expired ones it passed fail.
    out = state.handle(_done(0), clock.now(), DEFAULTS).events
    admitted = [e.run_id for e in out if isinstance(e, TaskAdmitted)]
    failed = [e.run_id for e in out if isinstance(e, WorkflowFailed)]
    assert admitted == ["r51"] and failed == [f"r{i}" for i in range(1, 51)]
    assert all(e.reason == "timeout" for e in out if isinstance(e, WorkflowFailed))
    # Another event does not look at the rest of a long queue; the tick does.
    clock.advance(60)
    assert state.handle(_cost(9, 0.0, clock.now()), clock.now(), DEFAULTS).events == []
    assert len(state.queue) == 49
    out = state.handle(BudgetTicked(source="budget", goal_id="g1"), clock.now(), DEFAULTS).events
    assert sorted(e.run_id for e in out if isinstance(e, WorkflowFailed)) == sorted(
        f"r{i}" for i in range(52, 101)
    )
    assert state.queue == []


def test_runs_the_budget_failed_keep_their_failure_beside_the_runs_ended_elsewhere():
    clock = FakeClock()
    state = _state(max_concurrent=1, max_daily_cost=1.0)
    state.handle(_at(clock, 0), clock.now(), DEFAULTS)
    state.handle(_done(0), clock.now(), DEFAULTS)
    state.handle(_cost(9, 0.999, clock.now()), clock.now(), DEFAULTS)
    task = _at(clock, 1)
    sent = state.handle(task, clock.now(), DEFAULTS).events
    (failed,) = [e for e in sent if isinstance(e, WorkflowFailed)]
    assert failed.limit == "max_daily_cost"
    raw = state.to_dict()
    assert raw["closed"] == [_digest("r0")] and list(raw["ended"]) == ["r1"]
    # A replay of the failed run's task sends the same failure again, after a round trip.
    again = BudgetState.from_dict(json.loads(json.dumps(raw)), RunStore(), DEFAULTS)
    assert again.handle(task, clock.now(), DEFAULTS).events == sent
    assert again.handle(_at(clock, 1), clock.now(), DEFAULTS).events == []  # re-routed
    # The loader's end of a run the budget failed does not hide the failure.
    lost = _done(1)
    again.handle(lost, clock.now(), DEFAULTS)
    assert list(again.ended) == ["r1"] and _digest("r1") not in again.closed


def test_a_waiting_tasks_deadline_is_read_as_its_event_would_have_it():
    from services.budget.state import _deadline_of

    base = datetime(2026, 12, 4, 12, 0, 0, 123456, tzinfo=UTC)
    for deadline in (
        None,
        base,
        base.astimezone(timezone(timedelta(hours=5))),
        base.replace(tzinfo=None),
        base.replace(microsecond=999999),
    ):
        task = _task(1).model_copy(update={"deadline_at": deadline})
        task = TaskRequested.model_validate(task.model_dump())  # as the router sends it
        stored = task.model_dump(mode="json")
        assert _deadline_of(stored) == task.deadline_at, (deadline, stored["deadline_at"])
    # Written another way (seconds, an offset, no zone), or not a time at all: the
    # same answer as validating the whole task, or the same refusal.
    for raw in ("2026-12-04T12:00:00+02:00", "2026-12-04T12:00:00", 1764849600000):
        stored = {**_task(1).model_dump(mode="json"), "deadline_at": raw}
        assert _deadline_of(stored) == TaskRequested.model_validate(stored).deadline_at, raw
    with pytest.raises(ValueError):
        _deadline_of({**_task(1).model_dump(mode="json"), "deadline_at": "soon"})


# -- hostile or unlucky input a review found (2026-12-06) -----------------------------


def test_several_platform_calls_for_one_run_each_hold_and_the_cap_holds():
    # The owner of a run may send feedback on it again and again; each feedback asks for an
    # instruction-writing call. Those holds once replaced one another: twenty were approved
    # against a cap that paid for five, and $0.04 was spent under a $0.01 cap.
    clock = FakeClock()
    state = _state(max_daily_cost=0.01)
    asks = [_spend("r1", "improvement", 0.002) for _ in range(20)]
    decided = [e for ask in asks for e in state.handle(ask, clock.now(), DEFAULTS).events]
    approved = [e for e in decided if isinstance(e, SpendDecided) and e.approved]
    assert len(approved) == 5 and state.reserved() == pytest.approx(0.01)
    # Each report settles one hold; what is spent never passes the cap.
    for _ in approved:
        state.handle(_judged("r1", 0.002, clock.now(), "improvement"), clock.now(), DEFAULTS)
    assert state.reserved() == 0.0
    assert state.spent_today(clock.now()) == pytest.approx(0.01)


def test_a_run_id_another_goal_is_using_cannot_take_its_place_or_pass_its_own_limits():
    # Run ids are the sender's. Goal B's task queued under goal A's run id was once admitted
    # when A's run ended (past B's max_concurrent), and A's own task never ran.
    clock = FakeClock()
    runs = RunStore()
    a = BudgetState.new("ga", DEFAULTS, runs)
    b = BudgetState.new("gb", DEFAULTS, runs)
    a.max_concurrent = b.max_concurrent = 1

    a.handle(_task(0, "ga", "a0"), clock.now(), DEFAULTS)  # A runs a0; its X will wait
    assert a.handle(_task(1, "ga", "X"), clock.now(), DEFAULTS).events == []
    b.handle(_task(2, "gb", "b0"), clock.now(), DEFAULTS)  # B runs b0
    (failed,) = b.handle(_task(3, "gb", "X"), clock.now(), DEFAULTS).events
    assert isinstance(failed, WorkflowFailed) and failed.reason == "invalid"
    assert failed.goal_id == "gb" and "another goal" in failed.detail
    # A's X is still A's, and runs when A's slot frees.
    done = WorkflowCompleted(source="loader", run_id="a0", goal_id="ga", specialty="code", text="")
    (admitted,) = a.handle(done, clock.now(), DEFAULTS).events
    assert isinstance(admitted, TaskAdmitted) and admitted.goal_id == "ga"
    assert admitted.message == "task 1" and len(b.in_flight) == 1


def test_a_huge_daily_cap_is_refused_where_it_is_made():
    # 1e308 overflowed the admission tokens' arithmetic: every task asking for one failed.
    with pytest.raises(ValueError):
        BudgetUpdateRequested(source="cli", goal_id="g1", max_daily_cost=1e308)
    BudgetUpdateRequested(source="cli", goal_id="g1", max_daily_cost=1e9)


def test_tasks_waiting_when_max_concurrent_drops_to_zero_fail_at_once():
    clock = FakeClock()
    state = _state(max_concurrent=1)
    state.handle(_task(1), clock.now(), DEFAULTS)
    state.handle(_task(2), clock.now(), DEFAULTS)  # waits; it has no deadline
    assert len(state.queue) == 1
    update = BudgetUpdateRequested(source="cli", goal_id="g1", max_concurrent=0)
    out = state.handle(update, clock.now(), DEFAULTS).events
    out += state.handle(_tick(), clock.now(), DEFAULTS).events
    (failed,) = [e for e in out if isinstance(e, WorkflowFailed)]
    assert failed.run_id == "r2" and failed.limit == "max_concurrent" and state.queue == []


def test_a_platform_calls_hold_outlasts_a_long_llm_timeout():
    # With a 120 s LLM timeout a judge call may run 120 s; its hold once lapsed at 60 s and a
    # second call was approved beside the first, past the cap.
    clock = FakeClock()
    slow = BudgetDefaults(
        task_reserve_usd=0.01, prices=PriceTable({}, ModelPrice(0.0, 0.0)), llm_timeout_s=120.0
    )
    state = BudgetState.new("g1", slow)
    state.max_daily_cost = 0.01
    ask = _spend("r1", "judge", 0.01, occurred_at=clock.now())
    assert state.handle(ask, clock.now(), slow).events[-1].approved
    for step, held in ((61, 0.01), (88, 0.01), (2, 0.0)):  # at 61 s, 149 s, 151 s
        clock.advance(step)
        # Lease time moves with the goal's events: another run's report, stamped now.
        state.handle(_judged("r9", 0.0, clock.now()), clock.now(), slow)
        assert state.reserved() == pytest.approx(held)


def test_a_deadline_stamped_far_ahead_leases_a_slot_for_a_day_at_most():
    # The sender stamps the request's time and its deadline: one stamped in 8999 held its
    # slot's lease until then.
    clock = FakeClock()
    state = _state()
    far = datetime(8999, 1, 1, tzinfo=UTC)
    task = _task(1).model_copy(update={"occurred_at": far, "deadline_at": far})
    state.handle(task, clock.now(), DEFAULTS)
    end = datetime.fromisoformat(state.in_flight["r1"][2])
    assert end <= clock.now() + timedelta(days=1, seconds=DEFAULTS.llm_timeout_s + 30)


def test_an_event_of_another_type_under_a_tasks_id_does_not_swallow_the_task():
    # Ids are derived from the run (a task's is uuid5 of its run): any event of the goal
    # sent first under that id made the task "seen", and it was never queued or admitted.
    clock = FakeClock()
    state = _state(max_concurrent=5)
    task = _at(clock, 1)
    first = _cost(1, 0.0, clock.now()).model_copy(update={"event_id": task.event_id})
    state.handle(first, clock.now(), DEFAULTS)
    admitted = state.handle(task, clock.now(), DEFAULTS).events
    assert [type(e).__name__ for e in admitted] == ["TaskAdmitted"]
    # The same event read again is still the one already applied.
    assert state.handle(task, clock.now(), DEFAULTS).events == admitted
