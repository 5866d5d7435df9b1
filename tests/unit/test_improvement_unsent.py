"""What the improvement service decides is in its snapshots only once it is on the log.

A snapshot is taken while handlers wait for the broker; a kill then, and the next start
restores it: a decision the state marked before its events were sent (a pattern's
automation, a paid call's cost report) was never made again, and the budget never heard
of the call. A restart from a snapshot must act as a replay of the log would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from aiokafka.errors import KafkaTimeoutError

from services.improvement.service import (
    ImprovementConfig,
    ImprovementService,
    _attempt,
    _cost_id,
    _hold_id,
)
from streams.clock import FakeClock
from streams.events import (
    AutomationCreated,
    Event,
    LlmCallCompleted,
    PatternDiscovered,
    RequestReceived,
    SpendDecided,
    WorkflowAssessed,
    WorkflowCompleted,
)
from streams.llm import Completion
from streams.snapshots import decode_state, encode_state

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class _Broker:
    """A producer whose sends wait (``hold``), fail a number of times, or go through."""

    def __init__(self, fail: int = 0) -> None:
        self.sent: list[Event] = []
        self.fail = fail
        self.hold: asyncio.Event | None = None

    async def send_many(self, events: Iterable[Event]) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.fail > 0:
            self.fail -= 1
            raise KafkaTimeoutError("the broker is away")
        self.sent += list(events)

    async def send(self, event: Event) -> None:
        await self.send_many([event])

    async def deliver(self, events: Iterable[Event], *, what: str = "") -> None:
        while True:  # as EventProducer.deliver, without the back-off
            try:
                return await self.send_many(list(events))
            except KafkaTimeoutError:
                continue


def _service(broker: _Broker | None = None) -> ImprovementService:
    ctx = SimpleNamespace(producer=broker or _Broker(), clock=FakeClock(T0 + timedelta(hours=1)))
    service = ImprovementService(ctx, ImprovementConfig(http_port=None), None)  # type: ignore[arg-type]
    service.owns = lambda key: True  # type: ignore[method-assign]  # one instance owns all
    return service


def _good_runs(n: int) -> list[Event]:
    """``n`` good answers to one repeated question of goal g0: a pattern that earns both
    its discovery and its automations."""
    out: list[Event] = []
    for i in range(n):
        common = {
            "source": "t",
            "run_id": f"run-{i}",
            "goal_id": "g0",
            "occurred_at": T0 + timedelta(seconds=i),
        }
        out += [
            RequestReceived(**common, user_id="u1", message="tell me about alpha"),  # type: ignore[arg-type]
            WorkflowCompleted(
                **common,  # type: ignore[arg-type]
                user_id="u1",
                agent_id="code-agent",
                specialty="code",
                text="an answer",
                cost_usd=0.001,
            ),
            WorkflowAssessed(**common, agent_id="code-agent", specialty="code", quality=0.9),  # type: ignore[arg-type]
        ]
    return out


def _restarted(service: ImprovementService) -> ImprovementService:
    """A new instance from a snapshot of ``service`` taken now (nothing on the log since)."""
    fresh = _service()
    fresh.restore(decode_state(encode_state(service.dump())))
    return fresh


def _kinds(events: list[Event]) -> list[str]:
    return sorted(e.event_type for e in events)


async def test_a_snapshot_taken_while_pattern_decisions_are_sent_does_not_hold_them() -> None:
    replayed = _service()
    for event in _good_runs(6):
        replayed._view_event(event)  # noqa: SLF001
    await replayed.evaluate()
    earned = _kinds(replayed.ctx.producer.sent)  # type: ignore[attr-defined]
    assert "pattern_discovered" in earned and "automation_created" in earned

    broker = _Broker()
    broker.hold = asyncio.Event()
    live = _service(broker)
    for event in _good_runs(6):
        live._view_event(event)  # noqa: SLF001
    sending = asyncio.create_task(live.evaluate())
    await asyncio.sleep(0.01)  # waiting for the broker: the snapshot is taken now
    restarted = _restarted(live)
    sending.cancel()  # killed: nothing reached the log
    await restarted.evaluate()
    assert _kinds(restarted.ctx.producer.sent) == earned  # type: ignore[attr-defined]


async def test_pattern_decisions_are_sent_again_after_a_failed_send_and_marked_once_sent() -> None:
    broker = _Broker(fail=2)
    live = _service(broker)
    for event in _good_runs(6):
        live._view_event(event)  # noqa: SLF001
    await live.evaluate()  # the broker refused twice, then took them
    sent = broker.sent
    assert {type(e) for e in sent} == {PatternDiscovered, AutomationCreated}
    live.state.dirty_signatures.update(live.state.learner)
    await live.evaluate()  # marked now that they are on the log: not made twice
    assert broker.sent == sent


async def test_a_paid_call_whose_report_was_not_sent_is_counted_after_a_restart() -> None:
    run, goal, cause = "run-1", "g0", "completed-1"
    first = _attempt(cause)
    approved = SpendDecided(
        source="budget",
        goal_id=goal,
        run_id=run,
        request_id=_hold_id(first, "judge"),
        approved=True,
        occurred_at=T0,
    )
    live = _service()
    live._view_event(approved)  # noqa: SLF001
    call = Completion("8", "m", 100, 10, 0.0123, 5.0)
    report = live._llm_call(run, goal, "judge", call, None, cause=first)  # noqa: SLF001
    restarted = _restarted(live)  # taken while the report waited for the broker; then a kill
    second = _attempt(cause)  # the cause read again: a new attempt
    restarted._view_event(  # noqa: SLF001
        approved.model_copy(update={"request_id": _hold_id(second, "judge"), "event_id": "e2"})
    )
    counted = restarted._earlier_attempts(  # noqa: SLF001
        run, goal, "judge", cause=second, estimate=0.01, model="m"
    )
    assert (
        [e.event_id for e in counted] == [report.event_id] == [_cost_id(_hold_id(first, "judge"))]
    )
    # Counted at the last paid cost, which the snapshot keeps too.
    assert counted[0].cost_usd == 0.01
    assert restarted._last_cost.get(goal, "judge") == 0.0123  # noqa: SLF001
    # Once on the log, it is counted no more.
    restarted._view_event(counted[0])  # noqa: SLF001
    third = _attempt(cause)
    again = restarted._earlier_attempts(  # noqa: SLF001
        run, goal, "judge", cause=third, estimate=0.01, model="m"
    )
    assert report.event_id not in [e.event_id for e in again]


def test_the_last_paid_cost_survives_a_snapshot() -> None:
    paid = LlmCallCompleted(
        source="improvement",
        run_id="r1",
        goal_id="g0",
        model="m",
        purpose="judge",
        prompt_tokens=10,
        completion_tokens=2,
        cost_usd=0.0002,
        occurred_at=T0,
    )
    live = _service()
    live._view_event(paid)  # noqa: SLF001
    messages = [{"role": "user", "content": "x" * 4000}]
    assert _restarted(live)._estimate("g0", "judge", messages, "m") == 0.0002  # noqa: SLF001
