"""A run id another goal used: request_received is public and its producer picks the run
id, so a second goal's request under one is refused with a failure its client receives
(never dropped, never routed as the other goal's run), and a redelivered request of the
same goal is still routed or answered once."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

from services.router import service as router_service
from services.router.service import Router, _id
from streams.clock import FakeClock
from streams.codec import default_codec
from streams.events import (
    AgentSpawned,
    Event,
    RequestReceived,
    RouteDecided,
    TaskRequested,
    WorkflowCompleted,
    WorkflowFailed,
    is_run_id_refusal,
    terminal_event_id,
)
from tests.samples import RecordingProducer

RUN = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"  # a uuid another goal's client also sent


def _router(monkeypatch) -> tuple[Router, RecordingProducer, FakeClock]:
    monkeypatch.setenv("ORCH_ROUTER_RESEND_SECONDS", "5")
    monkeypatch.setenv("ORCH_ROUTER_POLICY", "static")
    producer, clock = RecordingProducer(), FakeClock()
    return Router(SimpleNamespace(producer=producer, clock=clock)), producer, clock  # type: ignore[arg-type]


def _request(clock: FakeClock, goal: str, run: str = RUN) -> RequestReceived:
    return RequestReceived(
        source="sdk",
        run_id=run,
        goal_id=goal,
        user_id=f"u-{goal}",
        message="why does my python code raise KeyError",
        context={"specialty": "code"},
        occurred_at=clock.now(),
        deadline_at=clock.now() + timedelta(seconds=30),
    )


def _agent(goal: str = "g1") -> AgentSpawned:
    return AgentSpawned(
        source="spawner",
        goal_id=goal,
        agent_id=f"code_{goal}",
        specialty="code",
        system_prompt="You fix code.",
        temperature=0.2,
    )


def _refusal(sent: list[Event], goal: str) -> WorkflowFailed:
    [failed] = sent
    assert isinstance(failed, WorkflowFailed)
    assert (failed.goal_id, failed.run_id, failed.reason) == (goal, RUN, "invalid")
    assert "run id" in failed.detail and "g1" not in failed.detail  # names no other goal
    # Its own id: not the run's terminal event id (another goal's outcome in analytics,
    # the budget and the client), nor another goal's refusal.
    assert failed.event_id != terminal_event_id(RUN)
    assert is_run_id_refusal(failed)  # what every reader of the terminal topics skips
    codec = default_codec()
    assert codec.decode(codec.encode(failed)) == failed
    return failed


async def test_a_request_under_a_run_id_whose_run_of_another_goal_ended_is_refused(monkeypatch):
    # It was dropped as "answered before": its client waited for ever.
    router, producer, clock = _router(monkeypatch)
    router.learn(
        WorkflowCompleted(source="loader", run_id=RUN, goal_id="g1", specialty="code", text="hi")
    )
    await router.handle(_request(clock, "g2"), None)  # type: ignore[arg-type]
    first = _refusal(producer.sent, "g2")
    producer.sent.clear()
    await router.handle(_request(clock, "g3"), None)  # type: ignore[arg-type]
    assert _refusal(producer.sent, "g3").event_id != first.event_id
    # A redelivered request of the goal whose run it was is still answered only once.
    producer.sent.clear()
    await router.handle(_request(clock, "g1"), None)  # type: ignore[arg-type]
    assert producer.sent == []


async def test_a_request_under_a_run_id_another_goal_has_in_flight_is_refused(monkeypatch):
    # Routed, it went out as the other goal's task (the same task id): the budget read it
    # as that task's replay, and the two goals' terminal events shared one id.
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent("g1"))
    router.learn(_agent("g2"))
    await router.handle(_request(clock, "g1"), None)  # type: ignore[arg-type]
    [task, _] = producer.sent
    assert isinstance(task, TaskRequested) and task.event_id == _id(RUN, "task")
    producer.sent.clear()
    await router.handle(_request(clock, "g2"), None)  # type: ignore[arg-type]
    refusal = _refusal(producer.sent, "g2")
    # Read back, the refusal ends nothing of g1's run: its task is still sent again
    # until the budget decides it.
    router.learn(refusal)
    producer.sent.clear()
    clock.advance(6)
    assert await router.resend_unanswered() == 1
    assert producer.sent == [task]
    # g1's request redelivered (a crash before its offset was committed) is routed again,
    # under the same ids.
    producer.sent.clear()
    await router.handle(_request(clock, "g1"), None)  # type: ignore[arg-type]
    assert [e.event_id for e in producer.of(TaskRequested)] == [task.event_id]
    # g2's redelivered: the same refusal again (one event, by its id).
    producer.sent.clear()
    await router.handle(_request(clock, "g2"), None)  # type: ignore[arg-type]
    assert _refusal(producer.sent, "g2") == refusal.model_copy(update={"occurred_at": clock.now()})


async def test_a_run_id_another_instance_routed_is_refused_here_and_after_a_restart(
    monkeypatch,
):
    router, producer, clock = _router(monkeypatch)
    router.learn(
        RouteDecided(source="router", run_id=RUN, goal_id="g1", specialty="code", action="reuse")
    )
    restarted, restarted_sent, _ = _router(monkeypatch)
    restarted.restore(router.dump())
    for each, sent in ((router, producer), (restarted, restarted_sent)):
        await each.handle(_request(clock, "g2"), None)  # type: ignore[arg-type]
        _refusal(sent.sent, "g2")


async def test_an_older_snapshot_without_run_owners_restores(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    old = router.dump()
    del old["run_owners"]
    router.restore(old)
    router.learn(_agent("g2"))
    await router.handle(_request(clock, "g2"), None)  # type: ignore[arg-type]
    assert producer.of(TaskRequested)


def test_one_goals_flood_of_run_ids_keeps_another_goals_owner(monkeypatch):
    monkeypatch.setattr(router_service, "_MAX_RUNS", 10)
    monkeypatch.setattr(router_service, "_MAX_RUNS_PER_GOAL", 10)
    router, _, _ = _router(monkeypatch)
    router.learn(
        RouteDecided(source="router", run_id=RUN, goal_id="g1", specialty="code", action="reuse")
    )
    for i in range(50):
        router.learn(
            RouteDecided(
                source="router", run_id=f"flood-{i}", goal_id="g3", specialty="code", action="reuse"
            )
        )
    assert router._owners.get(RUN) == "g1"
    assert len(router._owners) <= 10
    assert router._owners.get("flood-49") == "g3" and router._owners.get("flood-0") is None
