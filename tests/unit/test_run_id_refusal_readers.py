"""The router's refusal of a request under a run id another goal used (a workflow_failed of
the refused goal under that run id) is no end of the run that id names: the gateway's run
index keeps the run its own goal's, and the improvement service neither ends the run with
it nor hands the run (its feedback, its pattern) to the refused goal, whatever the order the
topics are read in."""

from __future__ import annotations

import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest

from services.gateway.runs import RunIndex
from services.improvement.patterns import PatternSettings
from services.improvement.state import ImprovementState
from services.router.service import Router
from streams.clock import FakeClock
from streams.events import (
    AutomationCreated,
    Event,
    FeedbackReceived,
    RequestReceived,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
    is_run_id_refusal,
    run_id_refusal_id,
    terminal_event_id,
)
from streams.kafka import KafkaSettings
from streams.signatures import signature_of
from tests.samples import RecordingProducer
from tests.unit.test_improvement_commands import _delivery, _service

RUN = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"  # a uuid two goals' clients sent
MESSAGE = "why does my python code raise KeyError"
SIGNATURE = signature_of(MESSAGE, "code")


def _request(goal: str, run: str = RUN) -> RequestReceived:
    return RequestReceived(source="sdk", run_id=run, goal_id=goal, user_id=f"u-{goal}",
                           message=MESSAGE, context={"specialty": "code"})  # fmt: skip


async def _refused(monkeypatch, goal: str, run: str = RUN) -> WorkflowFailed:
    """What the router answers ``goal``'s request under ``run``, g1's run."""
    monkeypatch.setenv("ORCH_ROUTER_POLICY", "static")
    producer = RecordingProducer()
    router = Router(SimpleNamespace(producer=producer, clock=FakeClock()))  # type: ignore[arg-type]
    router.learn(RouteDecided(source="router", run_id=run, goal_id="g1", specialty="code",
                              action="reuse"))  # fmt: skip
    await router.handle(_request(goal, run), None)  # type: ignore[arg-type]
    [refusal] = producer.sent
    assert isinstance(refusal, WorkflowFailed) and (refusal.goal_id, refusal.reason) == (
        goal,
        "invalid",
    )
    return refusal


def _g1_run(run: str = RUN, quality: float = 0.9) -> list[Event]:
    """g1's run of ``run``: asked, routed, answered and assessed."""
    common = {"source": "test", "run_id": run, "goal_id": "g1", "user_id": "u-g1"}
    done = {**common, "agent_id": "code_g1", "specialty": "code"}
    return [
        RequestReceived(**common, message=MESSAGE, context={"specialty": "code"}),
        RouteDecided(source="router", run_id=run, goal_id="g1", specialty="code", action="reuse"),
        WorkflowCompleted(**done, event_id=terminal_event_id(run), text="an answer"),
        WorkflowAssessed(**done, quality=quality, method="world"),
    ]


# -- what a refusal is --------------------------------------------------------------------
async def test_a_refusal_is_told_from_the_runs_own_end_by_the_event_alone(monkeypatch):
    refusal = await _refused(monkeypatch, "g2")
    assert is_run_id_refusal(refusal)
    # The id is the one the router derived from 87a8b95 on: refusals already on the log
    # are still recognised.
    old_ns = uuid.UUID("c2d9e4f1-7a3b-4c5d-8e6f-a1b2c3d4e5f6")
    assert refusal.event_id == str(uuid.uuid5(old_ns, f"run id taken\x00g2\x00{RUN}"))
    # The run's own failures are not refusals, an invalid one included, nor is another
    # goal's refusal under another goal's id.
    own = refusal.model_copy(update={"event_id": terminal_event_id(RUN), "goal_id": "g1"})
    assert not is_run_id_refusal(own)
    assert not is_run_id_refusal(refusal.model_copy(update={"goal_id": "g3"}))
    assert not is_run_id_refusal(refusal.model_copy(update={"reason": "timeout"}))
    assert not is_run_id_refusal(_g1_run()[2])


@pytest.mark.parametrize(("goal", "run"), [("g1", "a:b"), ("g1:a", "b"), ("g1", "b")])
def test_refusal_ids_are_apart_for_every_goal_and_run(goal: str, run: str) -> None:
    others = {("g1", "a:b"), ("g1:a", "b"), ("g1", "b")} - {(goal, run)}
    mine = run_id_refusal_id(goal, run)
    assert all(run_id_refusal_id(g, r) != mine for g, r in others)
    assert mine != terminal_event_id(run)


# -- the gateway's run index --------------------------------------------------------------
def _index() -> RunIndex:
    return RunIndex(KafkaSettings.from_env(), lookback=timedelta(hours=1))


async def test_the_gateway_keeps_a_run_its_goals_after_another_goals_refusal(monkeypatch):
    # The newest terminal event decided the run's goal: after g2's refusal, g1's key got
    # 403 "run is not of goal g1" on feedback about its own run.
    refusal = await _refused(monkeypatch, "g2")
    done = _g1_run()[2]
    ended_first, in_flight = _index(), _index()
    for event in (done, refusal):
        ended_first._apply(event)  # noqa: SLF001
    for event in (refusal, done):  # refused while g1's run was in flight
        in_flight._apply(event)  # noqa: SLF001
    assert await ended_first.lookup(RUN, wait=0) == "g1"
    assert await in_flight.lookup(RUN, wait=0) == "g1"
    alone = _index()  # g1's run ended before the index's lookback
    alone._apply(refusal)  # noqa: SLF001
    assert alone.goal_of(RUN) is None  # g2 has no run of that id to give feedback on


# -- the improvement service ---------------------------------------------------------------
def _fold(state: ImprovementState, events: list[Event]) -> None:
    for event in events:
        state.apply(event)


async def test_a_refusal_neither_ends_a_run_nor_takes_its_outcome(monkeypatch):
    # The refusal set the run's failed_at and outcome_done: g1's answer never counted as its
    # pattern's outcome, and five good runs each refused once to another goal earned nothing.
    clock = FakeClock()
    with_refusals, without = (ImprovementState(PatternSettings(), clock) for _ in range(2))
    for i in range(5):
        run = f"run-{i}"
        events = _g1_run(run)
        refusal = await _refused(monkeypatch, "g2", run)
        _fold(with_refusals, [events[0], refusal, *events[1:]])  # in flight when refused
        _fold(without, events)
        clock.advance(1)
    run = with_refusals.run("run-0")
    assert run is not None and run.failed_at is None and run.completed_at is not None
    kinds = {
        e.kind for e in with_refusals.learner.earned(SIGNATURE) if isinstance(e, AutomationCreated)
    }
    assert kinds == {"response_cache", "direct_route"}
    # Nothing of it is in what a snapshot writes: a restart folds the same.
    assert with_refusals.dump() == without.dump()


async def test_a_refusal_read_first_does_not_hand_the_run_to_the_refused_goal(monkeypatch):
    # The topics are folded in any order: read before g1's request, the refusal made the
    # run g2's (its user, its goal), and with it the feedback on it and its pattern.
    refusal = await _refused(monkeypatch, "g2")
    service, _, _ = _service()
    for event in (refusal, *_g1_run()):
        service._view_event(event)  # noqa: SLF001
    run = service.state.run(RUN)
    assert run is not None and (run.goal_id, run.user_id) == ("g1", "u-g1")
    assert service.state.learner.occurrences(SIGNATURE, "g1") == 1
    assert service.state.learner.occurrences(SIGNATURE, "g2") == 0


async def test_feedback_after_a_refusal_read_first_is_the_run_owners(monkeypatch):
    refusal = await _refused(monkeypatch, "g2")
    service, _, _ = _service()
    for event in (refusal, *_g1_run()):
        service._view_event(event)  # noqa: SLF001
    verdicts = {}
    for user in ("u-g1", "u-g2"):
        feedback = FeedbackReceived(source="sdk", run_id=RUN, user_id=user, score=5, text="")
        out = await service.on_feedback(feedback, _delivery(feedback))
        verdicts[user] = [(e.accepted, e.error_type) for e in out if hasattr(e, "accepted")]
    assert verdicts == {"u-g1": [(True, None)], "u-g2": [(False, "NotRunOwner")]}
