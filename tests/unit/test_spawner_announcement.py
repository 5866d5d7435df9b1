"""How the spawner announces an approval's agent, and what the budget counts of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.budget.state import BudgetState
from services.spawner.service import announcement, approval_age, prompt_writer
from streams.clock import FakeClock
from streams.events import (
    SPAWN_APPROVAL_SECONDS,
    SPAWN_WRITE_SECONDS,
    AgentRetired,
    AgentSpawned,
    GoalAgentsChanged,
    SpawnApproved,
    SpawnDenied,
)
from tests.unit.test_budget_state import DEFAULTS, _spawn_req


def _approved(clock: FakeClock, budget: BudgetState, i: int) -> SpawnApproved:
    (approval,) = budget.handle(_spawn_req(i), clock.now(), DEFAULTS).events
    assert isinstance(approval, SpawnApproved)
    return approval


def _agent(approval: SpawnApproved) -> AgentSpawned:
    return AgentSpawned(
        source="spawner", goal_id="g1", agent_id=f"agent-{approval.run_id}",
        specialty=approval.specialty, system_prompt="p", temperature=0.5, model="m",
    )  # fmt: skip


def test_a_new_agent_or_one_read_again_in_time_is_announced_spawned():
    clock = FakeClock()
    budget = BudgetState.new("g1", DEFAULTS)
    approval = _approved(clock, budget, 0)
    agent = _agent(approval)
    for new, after in ((True, 10 * SPAWN_APPROVAL_SECONDS), (False, SPAWN_APPROVAL_SECONDS)):
        events = announcement(approval, agent, new=new, now=clock.now() + timedelta(seconds=after))
        assert [type(e) for e in events] == [AgentSpawned, GoalAgentsChanged]
        assert events[1].change == "spawned" and events[1].approval_id == approval.event_id


def test_an_agent_read_again_after_the_budget_gave_its_place_back_is_retired_at_once():
    # The spawner wrote the agent, could not announce it, and was back only after the
    # budget had given the approval's place back and approved another agent: announced
    # spawned, that made two agents under max_agents 1.
    clock = FakeClock()
    budget = BudgetState.new("g1", DEFAULTS)
    budget.max_agents = 1
    first = _approved(clock, budget, 0)
    clock.advance(2 * SPAWN_APPROVAL_SECONDS + 1)
    second = _approved(clock, budget, 1)  # the first approval's place was given back
    budget.handle(
        GoalAgentsChanged(
            source="spawner", goal_id="g1", agent_id="agent-r1", change="spawned",
            approval_id=second.event_id,
        ),
        clock.now(), DEFAULTS,
    )  # fmt: skip
    agent = _agent(first)
    events = announcement(first, agent, new=False, now=clock.now())
    assert [type(e) for e in events] == [AgentSpawned, AgentRetired, GoalAgentsChanged]
    again = announcement(first, agent, new=False, now=clock.now() + timedelta(seconds=9))
    assert [e.event_id for e in again] == [e.event_id for e in events]  # a resend is one
    for event in events:
        if isinstance(event, GoalAgentsChanged):
            budget.handle(event, clock.now(), DEFAULTS)
    assert budget.agent_count() == 1 and budget.live["agent-r0"] == "retired"
    assert isinstance(budget.handle(_spawn_req(2), clock.now(), DEFAULTS).events[-1], SpawnDenied)


def test_a_late_retirement_while_the_budget_still_holds_the_approval_frees_its_place():
    clock = FakeClock()
    budget = BudgetState.new("g1", DEFAULTS)
    budget.max_agents = 1
    approval = _approved(clock, budget, 0)
    clock.advance(SPAWN_APPROVAL_SECONDS + 1)
    (*_, notice) = announcement(approval, _agent(approval), new=False, now=clock.now())
    budget.handle(notice, clock.now(), DEFAULTS)
    assert budget.spawning == {} and budget.agent_count() == 0
    assert isinstance(budget.handle(_spawn_req(1), clock.now(), DEFAULTS).events[0], SpawnApproved)


def test_an_approval_read_late_gets_the_template_not_a_paid_call_its_hold_may_not_cover():
    llm = object()
    assert prompt_writer(llm, 0.0) is llm  # type: ignore[arg-type]
    assert prompt_writer(llm, SPAWN_WRITE_SECONDS) is llm  # type: ignore[arg-type]
    assert prompt_writer(llm, SPAWN_WRITE_SECONDS + 0.1) is None  # type: ignore[arg-type]
    assert prompt_writer(None, 0.0) is None


def test_an_approval_stamped_ahead_of_the_clock_is_as_old_as_it_is_ahead():
    # A valid approval stamped in year 8999 was never stale: read again at any time, its
    # agent was announced spawned (counted live), and its prompt was written by a paid call.
    clock = FakeClock()
    budget = BudgetState.new("g1", DEFAULTS)
    approval = _approved(clock, budget, 0)

    def stamped(at: datetime) -> SpawnApproved:
        return SpawnApproved.model_validate({**approval.model_dump(), "occurred_at": at})

    future = stamped(datetime(8999, 1, 1, tzinfo=UTC))
    assert approval_age(future, clock.now()) > SPAWN_APPROVAL_SECONDS
    events = announcement(future, _agent(future), new=False, now=clock.now())
    assert [type(e) for e in events] == [AgentSpawned, AgentRetired, GoalAgentsChanged]
    assert prompt_writer(object(), approval_age(future, clock.now())) is None  # type: ignore[arg-type]
    # A few seconds of clock skew leave it fresh.
    skewed = stamped(clock.now() + timedelta(seconds=2))
    assert approval_age(skewed, clock.now()) == 2.0
    events = announcement(skewed, _agent(skewed), new=False, now=clock.now())
    assert [type(e) for e in events] == [AgentSpawned, GoalAgentsChanged]
