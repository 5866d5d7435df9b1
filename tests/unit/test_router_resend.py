"""The router sends a task or spawn request again, same id, until it sees a decision on it.

Chaos seed 5 (rerun on the Faust fixes): the budget, paused past its session and back,
never applied one `task_requested` its group had committed past; the run had no outcome.
The budget decides once per event id, so the same event sent again is either a replay
(the same decision again, or nothing while the task waits in its queue) or the decision
it never made.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace

from services.router.service import Router
from streams.clock import FakeClock
from streams.events import (
    AgentSpawned,
    RequestReceived,
    SpawnRequested,
    TaskAdmitted,
    TaskRequested,
    WorkflowFailed,
)
from tests.integration.waiting import until
from tests.samples import RecordingProducer


def _router(monkeypatch, resend: str = "5") -> tuple[Router, RecordingProducer, FakeClock]:
    monkeypatch.setenv("ORCH_ROUTER_RESEND_SECONDS", resend)
    monkeypatch.setenv("ORCH_ROUTER_POLICY", "static")
    producer, clock = RecordingProducer(), FakeClock()
    return Router(SimpleNamespace(producer=producer, clock=clock)), producer, clock  # type: ignore[arg-type]


def _request(clock: FakeClock, run: str = "r1", timeout_s: float = 30) -> RequestReceived:
    return RequestReceived(
        source="test",
        run_id=run,
        goal_id="g1",
        user_id="u1",
        message="why does my python code raise KeyError",
        context={"specialty": "code"},
        occurred_at=clock.now(),
        deadline_at=clock.now() + timedelta(seconds=timeout_s),
    )


def _agent() -> AgentSpawned:
    return AgentSpawned(
        source="spawner",
        goal_id="g1",
        agent_id="code_1",
        specialty="code",
        system_prompt="You fix code.",
        temperature=0.2,
    )


async def test_a_task_with_no_decision_is_sent_again_until_the_budget_decides(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    await router.handle(_request(clock), None)  # type: ignore[arg-type]
    [task] = producer.of(TaskRequested)
    clock.advance(4)
    assert await router.resend_unanswered() == 0
    clock.advance(1.5)
    assert await router.resend_unanswered() == 1
    again = producer.of(TaskRequested)[-1]
    assert again == task  # the same event: the budget sees its id and decides once
    router.learn(TaskAdmitted.caused_by(task, source="budget"))
    clock.advance(10)
    assert await router.resend_unanswered() == 0
    assert len(producer.of(TaskRequested)) == 2


async def test_a_task_is_sent_a_last_time_past_its_deadline_then_left_to_the_budget(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    await router.handle(_request(clock, timeout_s=12), None)  # type: ignore[arg-type]
    sends = []
    for _ in range(6):
        clock.advance(5.1)
        sends.append(await router.resend_unanswered())
    # At 5.1 and 10.2 s within the deadline, at 15.3 s past it (the last), then never.
    assert sends == [1, 1, 1, 0, 0, 0]


async def test_the_sending_backs_off_while_the_budget_is_only_slow(monkeypatch):
    # A slow budget reads every task sent again: each is sent again after 5, 5, 10, 20, 40,
    # then every 80 s (was every 5 s), and once more right past its deadline.
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    await router.handle(_request(clock, timeout_s=400), None)  # type: ignore[arg-type]
    at = []
    for tenth in range(1, 4200):
        clock.advance(0.1)
        if await router.resend_unanswered():
            at.append(round(tenth / 10))
    assert at == [5, 10, 20, 40, 80, 160, 240, 320, 400, 405]


async def test_an_outcome_ends_the_sending_too(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    await router.handle(_request(clock), None)  # type: ignore[arg-type]
    [task] = producer.of(TaskRequested)
    router.learn(WorkflowFailed.caused_by(task, source="budget", reason="timeout", detail="x"))
    clock.advance(6)
    assert await router.resend_unanswered() == 0


async def test_a_spawn_request_is_sent_again_while_requests_wait_for_it(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    routing = asyncio.create_task(router.handle(_request(clock), None))  # type: ignore[arg-type]
    await until(lambda: bool(producer.of(SpawnRequested)), "the spawn request", 10.0)
    await asyncio.sleep(0.01)  # and time to send more than it should
    [spawn] = producer.of(SpawnRequested)
    assert spawn.context == {}  # the request's context goes only to its own task
    clock.advance(5.5)
    assert await router.resend_unanswered() == 1
    assert producer.of(SpawnRequested) == [spawn, spawn]
    router.learn(_agent())  # the spawn happened: the waiting request gets its task
    await asyncio.wait_for(routing, 5)
    assert [t.agent_id for t in producer.of(TaskRequested)] == ["code_1"]
    assert producer.of(TaskRequested)[0].context == {"specialty": "code"}
    clock.advance(5.5)
    # Now the task is the one without a decision; the spawn request is done.
    assert await router.resend_unanswered() == 1
    assert isinstance(producer.sent[-1], TaskRequested)


async def test_zero_turns_it_off(monkeypatch):
    router, producer, clock = _router(monkeypatch, resend="0")
    router.learn(_agent())
    await router.handle(_request(clock), None)  # type: ignore[arg-type]
    clock.advance(60)
    assert await router.resend_unanswered() == 0
