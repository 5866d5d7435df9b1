"""Admission tokens in the budget's rules: slots and money set aside for a router instance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.budget.state import BudgetDefaults, BudgetState
from streams.events import (
    AdmissionGranted,
    AdmissionReturned,
    BudgetTicked,
    GoalAgentsChanged,
    LlmCallCompleted,
    TaskAdmitted,
    TaskRequested,
    WorkflowCompleted,
    WorkflowFailed,
)
from streams.llm import ModelPrice, PriceTable

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
# Free tokens: every hold is the 0.01 floor.
DEFAULTS = BudgetDefaults(
    task_reserve_usd=0.01,
    prices=PriceTable({}, ModelPrice(0.0, 0.0)),
    admission_tokens=4,
    admission_token_seconds=5.0,
    llm_timeout_s=30.0,
)


def _state(**limits: object) -> BudgetState:
    state = BudgetState.new("g1", DEFAULTS)
    for k, v in limits.items():
        setattr(state, k, v)
    return state


def _task(i: int, **fields: object) -> TaskRequested:
    base: dict[str, object] = {
        "event_id": f"task-{i}",
        "source": "router",
        "run_id": f"r{i}",
        "goal_id": "g1",
        "user_id": "u1",
        "agent_id": "a1",
        "specialty": "code",
        "message": f"task {i}",
        "occurred_at": NOW,
    }
    return TaskRequested(**(base | fields))


def _done(i: int) -> WorkflowCompleted:
    return WorkflowCompleted(
        source="loader", run_id=f"r{i}", goal_id="g1", specialty="code", text="ok", occurred_at=NOW
    )


def _grant(state: BudgetState, i: int, want: int = 4, holder: str = "R1") -> AdmissionGranted:
    out = state.handle(_task(i, want_tokens=want, holder=holder), NOW, DEFAULTS).events
    grants = [e for e in out if isinstance(e, AdmissionGranted)]
    assert len(grants) == 1, out
    return grants[0]


def test_a_router_asking_gets_tokens_from_free_slots_each_holding_a_slot_and_money() -> None:
    state = _state(max_concurrent=4)
    out = state.handle(_task(1, want_tokens=8, holder="R1"), NOW, DEFAULTS).events
    admitted = [e for e in out if isinstance(e, TaskAdmitted)]
    grant = next(e for e in out if isinstance(e, AdmissionGranted))
    assert [a.run_id for a in admitted] == ["r1"] and admitted[0].token is None
    # Three slots were free after the task's own, but unused tokens take at most half the
    # goal's slots: two, not the eight asked for.
    assert (grant.holder, len(grant.tokens), grant.hold_usd) == ("R1", 2, 0.01)
    assert grant.bind_by == NOW + timedelta(seconds=5)
    assert state.busy() == 3 and abs(state.reserved() - 0.03) < 1e-9
    # One slot is left for the budget's own admissions; then the goal is full and the next
    # task waits although no task but r1 and r2 runs.
    assert [e.run_id for e in state.handle(_task(2), NOW, DEFAULTS).events] == ["r2"]
    assert state.handle(_task(3), NOW, DEFAULTS).events == []
    assert state.summary(NOW)["queued"] == 1


def test_a_bound_token_is_the_runs_slot_and_no_second_admission_is_sent() -> None:
    state = _state(max_concurrent=2)
    grant = _grant(state, 1, want=1)
    out = state.handle(_task(2, token=grant.tokens[0]), NOW, DEFAULTS).events
    assert out == []  # the router admitted it itself
    assert state.busy() == 2 and "r2" in state.in_flight and not state.tokens
    # Its end frees the slot: a waiting task is admitted.
    assert state.handle(_task(3), NOW, DEFAULTS).events == []
    admitted = state.handle(_done(2), NOW, DEFAULTS).events
    assert [e.run_id for e in admitted if isinstance(e, TaskAdmitted)] == ["r3"]


def test_no_tokens_while_tasks_wait_and_none_past_the_money() -> None:
    state = _state(max_concurrent=1)
    state.handle(_task(1), NOW, DEFAULTS)
    state.handle(_task(2), NOW, DEFAULTS)  # waits
    state.handle(_done(1), NOW, DEFAULTS)  # r2 admitted
    state.handle(_task(3), NOW, DEFAULTS)  # waits
    out = state.handle(_task(4, want_tokens=4, holder="R1"), NOW, DEFAULTS).events
    assert not any(isinstance(e, AdmissionGranted) for e in out)
    # Money: 0.035 USD a day, 0.01 a hold: the task and two tokens fit, a third does not.
    rich = _state(max_concurrent=10, max_daily_cost=0.035)
    grant = _grant(rich, 9, want=4)
    assert len(grant.tokens) == 2
    assert rich.reserved() <= rich.max_daily_cost + 1e-12


def test_a_holder_never_holds_more_than_the_setting_however_often_it_asks() -> None:
    state = _state(max_concurrent=40)
    assert len(_grant(state, 1, want=4).tokens) == 4
    out = state.handle(_task(2, want_tokens=4, holder="R1"), NOW, DEFAULTS).events
    assert not any(isinstance(e, AdmissionGranted) for e in out)
    # Another instance has its own.
    assert len(_grant(state, 3, want=4, holder="R2").tokens) == 4


def test_returned_tokens_free_their_slots_only_the_holders_own() -> None:
    state = _state(max_concurrent=3)
    grant = _grant(state, 1, want=2)
    assert state.busy() == 3
    state.handle(
        AdmissionReturned(source="router", goal_id="g1", holder="R2", tokens=grant.tokens),
        NOW,
        DEFAULTS,
    )
    assert state.busy() == 3  # not R2's to give back
    state.handle(
        AdmissionReturned(source="router", goal_id="g1", holder="R1", tokens=grant.tokens),
        NOW,
        DEFAULTS,
    )
    assert state.busy() == 1 and not state.tokens
    # A binding of a returned token holds nothing: no task of it can have started.
    assert state.handle(_task(5, token=grant.tokens[0]), NOW, DEFAULTS).events == []
    assert state.busy() == 1


def _tick(at: datetime) -> BudgetTicked:
    return BudgetTicked(source="budget", goal_id="g1", occurred_at=at)


def test_an_unused_token_lapses_only_once_a_task_it_let_start_would_have_ended() -> None:
    state = _state(max_concurrent=2)
    grant = _grant(state, 1, want=1)
    state.handle(_done(1), NOW, DEFAULTS)
    # bind_by + the LLM timeout + 30 s grace: a task started at bind_by is over by then.
    end = grant.bind_by + timedelta(seconds=60)
    state.handle(_tick(end), end, DEFAULTS)
    assert state.busy() == 1  # exactly at the end, still held
    later = end + timedelta(seconds=1)
    # Lease time is the earlier of the budget's clock and the goal's event time.
    state.handle(_task(7, occurred_at=later), later, DEFAULTS)
    state.handle(_tick(later), later, DEFAULTS)
    assert not state.tokens


def test_a_replayed_binding_sends_the_admission_with_the_tokens_start_deadline() -> None:
    """The router may die after the budget has its binding and before the loader has its
    admission: the router's replay (same task id) gets the admission from the budget."""
    state = _state(max_concurrent=2)
    grant = _grant(state, 1, want=1)
    binding = _task(2, token=grant.tokens[0], deadline_at=NOW + timedelta(seconds=60))
    assert state.handle(binding, NOW, DEFAULTS).events == []
    again = state.handle(binding, NOW + timedelta(seconds=1), DEFAULTS).events
    admitted = [e for e in again if isinstance(e, TaskAdmitted)]
    assert [a.run_id for a in admitted] == ["r2"]
    assert admitted[0].token == grant.tokens[0]
    assert admitted[0].start_by == grant.bind_by
    assert admitted[0].deadline_at == NOW + timedelta(seconds=60)


def test_a_replayed_ask_sends_the_same_grant_again() -> None:
    state = _state(max_concurrent=4)
    ask = _task(1, want_tokens=2, holder="R1")
    first = [e for e in state.handle(ask, NOW, DEFAULTS).events if isinstance(e, AdmissionGranted)]
    again = [e for e in state.handle(ask, NOW, DEFAULTS).events if isinstance(e, AdmissionGranted)]
    assert first == again and len(first) == 1
    assert len(state.tokens) == 2


def test_a_task_given_back_frees_its_token_slot_and_is_decided_as_any_other() -> None:
    """The loader gives back a token-admitted task of a retired agent: its revival needs a
    place under max_agents, which only the budget may give."""
    state = _state(max_concurrent=3, max_agents=1)
    state.handle(
        GoalAgentsChanged(source="spawner", goal_id="g1", agent_id="a0", change="spawned"),
        NOW,
        DEFAULTS,
    )
    state.handle(
        GoalAgentsChanged(source="loader", goal_id="g1", agent_id="a1", change="retired"),
        NOW,
        DEFAULTS,
    )
    grant = _grant(state, 1, want=1)
    state.handle(_done(1), NOW, DEFAULTS)
    binding = _task(2, token=grant.tokens[0])
    state.handle(binding, NOW, DEFAULTS)
    assert state.busy() == 1
    back = binding.model_copy(update={"event_id": "given-back-2", "given_back": True})
    out = state.handle(back, NOW, DEFAULTS).events
    failed = [e for e in out if isinstance(e, WorkflowFailed)]
    assert [(f.run_id, f.limit) for f in failed] == [("r2", "max_agents")]
    assert state.busy() == 0
    # With a place free, a given-back task is admitted by the budget, without a token.
    state2 = _state(max_concurrent=3)
    grant2 = _grant(state2, 1, want=1)
    binding2 = _task(2, token=grant2.tokens[0])
    state2.handle(binding2, NOW, DEFAULTS)
    back2 = binding2.model_copy(update={"event_id": "given-back-2", "given_back": True})
    admitted = [
        e for e in state2.handle(back2, NOW, DEFAULTS).events if isinstance(e, TaskAdmitted)
    ]
    assert [(a.run_id, a.token, a.start_by) for a in admitted] == [("r2", None, None)]
    assert state2.busy() == 2  # r1 and r2


def test_a_bound_runs_cost_is_charged_and_its_hold_settles_like_any_run() -> None:
    state = _state(max_concurrent=2, max_daily_cost=1.0)
    grant = _grant(state, 1, want=1)
    state.handle(_task(2, token=grant.tokens[0]), NOW, DEFAULTS)
    state.handle(
        LlmCallCompleted(
            source="loader", run_id="r2", goal_id="g1", model="m", cost_usd=0.003, occurred_at=NOW
        ),
        NOW,
        DEFAULTS,
    )
    state.handle(_done(2), NOW, DEFAULTS)
    assert abs(state.spent_today(NOW) - 0.003) < 1e-12
    assert "r2" not in state.pending and "r2" not in state.in_flight


def test_tokens_survive_the_records_round_trip() -> None:
    state = _state(max_concurrent=4)
    grant = _grant(state, 1, want=2)
    back = BudgetState.from_dict(state.to_dict(), defaults=DEFAULTS)
    assert back.tokens == state.tokens and back.grants == state.grants
    assert back.busy() == state.busy()
    assert back.handle(_task(3, token=grant.tokens[1]), NOW, DEFAULTS).events == []
    assert "r3" in back.in_flight


def test_a_binding_read_after_its_runs_end_holds_the_money_until_the_cost_comes() -> None:
    """The budget reads task_requested, workflow_completed and llm_call_completed side by
    side: a run's end may come before the binding that made it the token's."""
    state = _state(max_concurrent=2, max_daily_cost=0.03)
    grant = _grant(state, 1, want=1)
    state.handle(_done(1), NOW, DEFAULTS)
    state.handle(_done(2), NOW, DEFAULTS)  # r2's end, before its binding
    state.handle(_task(2, token=grant.tokens[0]), NOW, DEFAULTS)
    assert state.busy() == 0 and abs(state.reserved() - 0.01) < 1e-12
    state.handle(
        LlmCallCompleted(
            source="loader", run_id="r2", goal_id="g1", model="m", cost_usd=0.004, occurred_at=NOW
        ),
        NOW,
        DEFAULTS,
    )
    assert state.reserved() == 0 and abs(state.spent_today(NOW) - 0.004) < 1e-12


def test_a_task_given_back_before_its_binding_is_read_has_one_slot() -> None:
    """The router sends the binding and the admission at once: the loader may give the task
    back before the budget reads the binding. It is decided afresh; the binding that comes
    after it frees the token."""
    state = _state(max_concurrent=3)
    grant = _grant(state, 1, want=1)
    state.handle(_done(1), NOW, DEFAULTS)
    binding = _task(2, token=grant.tokens[0])
    back = binding.model_copy(update={"event_id": "given-back-2", "given_back": True})
    admitted = [e for e in state.handle(back, NOW, DEFAULTS).events if isinstance(e, TaskAdmitted)]
    assert [(a.run_id, a.token) for a in admitted] == [("r2", None)]
    assert state.busy() == 2  # r2 and the token
    assert state.handle(binding, NOW, DEFAULTS).events == []
    assert state.busy() == 1 and not state.tokens and "r2" in state.in_flight
    state.handle(_done(2), NOW, DEFAULTS)
    assert state.busy() == 0


def test_a_lapsed_bound_run_read_again_is_sent_its_admission_late_beside_its_grant() -> None:
    """Model seed 3065: the binding also asked for tokens, so reading it again sends its
    grant again; the run whose slot lapsed with no end read must still get its admission
    (late: the loader drops it if the run ran, or gives it back)."""
    state = _state(max_concurrent=4)
    grant = _grant(state, 1, want=1)
    state.handle(_done(1), NOW, DEFAULTS)
    binding = _task(2, token=grant.tokens[0], want_tokens=1, holder="R1")
    out = state.handle(binding, NOW, DEFAULTS).events
    assert [type(e) for e in out] == [AdmissionGranted]
    late = grant.bind_by + timedelta(seconds=61)
    state.handle(_task(9, occurred_at=late), late, DEFAULTS)  # the slot lapses
    assert "r2" not in state.in_flight and "r2" in state.relapsed
    again = state.handle(binding.model_copy(update={"occurred_at": late}), late, DEFAULTS).events
    admitted = [e for e in again if isinstance(e, TaskAdmitted)]
    assert [(a.run_id, a.token) for a in admitted] == [("r2", grant.tokens[0])]
    assert admitted[0].start_by is not None and admitted[0].start_by < late
    assert any(isinstance(e, AdmissionGranted) for e in again)
