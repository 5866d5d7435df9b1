"""The loader gives back a task the router admitted with a token that it may not start:
its agent is retired (a revival needs a place under max_agents only the budget gives) or
the token's start deadline passed. The budget then decides the task like any other."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from services.loader.service import Loader
from streams.clock import FakeClock
from streams.codec import default_codec
from streams.events import (
    AgentRetired,
    AgentSpawned,
    Event,
    GoalAgentsChanged,
    LlmCallCompleted,
    TaskAdmitted,
    TaskRequested,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)
from streams.kafka import EventProducer, KafkaSettings
from streams.llm import InMemoryLLM, LLMSettings, ModelPrice, PriceTable
from streams.runtime import ServiceContext

PRICES = PriceTable({}, ModelPrice(1.0, 2.0))
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class _Broker:
    """What AIOKafkaProducer.send gives the real EventProducer: a future per record,
    failing while the broker is down; what it acknowledged, decoded."""

    def __init__(self) -> None:
        self.down = False
        self.acked: list[Event] = []
        self.codec = default_codec()

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.down:
            future.set_exception(KafkaConnectionError("broker down"))
        else:
            self.acked.append(self.codec.decode(value))
            future.set_result(None)
        return future

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.acked if isinstance(e, kind)]


def _loader(*, retired: bool = False) -> tuple[Loader, _Broker, InMemoryLLM, FakeClock]:
    settings = KafkaSettings("127.0.0.1:1", "")
    producer = EventProducer(settings)
    broker = _Broker()
    producer._producer = broker  # type: ignore[assignment]
    clock = FakeClock(NOW)
    ctx = ServiceContext("loader", settings, clock, producer)
    llm = InMemoryLLM(prices=PRICES)
    loader = Loader(ctx, llm, LLMSettings(base_url="http://x", prices=PRICES), capacity=4)
    loader.learn(
        AgentSpawned(
            source="spawner",
            goal_id="g1",
            agent_id="a1",
            specialty="code",
            system_prompt="You are a coder.",
            temperature=0.2,
        )
    )
    if retired:
        loader.learn(
            AgentRetired(
                source="loader", goal_id="g1", agent_id="a1", specialty="code", reason="idle"
            )
        )
    return loader, broker, llm, clock


def _token_task(
    clock: FakeClock, run: str = "r1", *, start_in: float = 5.0, deadline_in: float = 30.0
) -> TaskAdmitted:
    """What the router sends when it admits a task with a token."""
    now = clock.now()
    return TaskAdmitted(
        source="router",
        run_id=run,
        goal_id="g1",
        user_id="u1",
        agent_id="a1",
        specialty="code",
        message="a question",
        context={"specialty": "code"},
        requested_at=now,
        deadline_at=now + timedelta(seconds=deadline_in),
        token="tok-1",
        start_by=now + timedelta(seconds=start_in),
    )


def _budget_admission(back: TaskRequested) -> TaskAdmitted:
    """The budget's own admission of a task given back: no token, no start deadline."""
    return TaskAdmitted.caused_by(
        back,
        event_id=str(uuid.uuid4()),
        source="budget",
        occurred_at=back.occurred_at,
        token=None,
        start_by=None,
    )


_RUN_EVENTS = (WorkflowStarted, LlmCallCompleted, WorkflowCompleted, WorkflowFailed)


def _assert_given_back(broker: _Broker, llm: InMemoryLLM, task: TaskAdmitted) -> TaskRequested:
    assert llm.calls == []
    assert [e for e in broker.acked if isinstance(e, _RUN_EVENTS)] == []
    [back] = broker.of(TaskRequested)
    assert back.given_back is True
    assert (back.run_id, back.token, back.goal_id, back.agent_id) == (
        task.run_id,
        task.token,
        task.goal_id,
        task.agent_id,
    )
    assert (back.message, back.context, back.deadline_at) == (
        task.message,
        task.context,
        task.deadline_at,
    )
    assert back.source == "loader"
    return back


async def _answered(loader: Loader, broker: _Broker, llm: InMemoryLLM, back: TaskRequested) -> None:
    """The budget's admission of the given-back task is run here, and answered."""
    before = len(llm.calls)
    await asyncio.wait_for(loader.handle(_budget_admission(back)), 10)
    assert len(llm.calls) == before + 1
    [done] = broker.of(WorkflowCompleted)
    assert done.run_id == back.run_id and done.text
    assert [e.run_id for e in broker.of(WorkflowStarted)] == [back.run_id]
    assert broker.of(WorkflowFailed) == []


async def test_a_retired_agents_token_task_is_given_back_and_the_budgets_admission_runs():
    loader, broker, llm, clock = _loader(retired=True)
    task = _token_task(clock)
    await asyncio.wait_for(loader.handle(task), 10)
    back = _assert_given_back(broker, llm, task)
    # Not revived here: the budget decides whether the goal may have the agent live again.
    assert broker.of(GoalAgentsChanged) == []
    record = loader.registry.get("a1")
    assert record is not None and record.retired
    # The same admission read again: not run, and the budget already has it back.
    await asyncio.wait_for(loader.handle(task), 10)
    assert broker.of(TaskRequested) == [back]
    assert llm.calls == []

    clock.advance(1)
    await _answered(loader, broker, llm, back)
    # Revived by the budget's admission, and said so.
    assert [(e.agent_id, e.change) for e in broker.of(GoalAgentsChanged)] == [("a1", "revived")]
    # Answered once: the token admission read once more is not given back nor run again.
    await asyncio.wait_for(loader.handle(task), 10)
    assert len(broker.of(TaskRequested)) == 1 and len(llm.calls) == 1


async def test_another_token_gives_another_give_back_id():
    loader, broker, _, clock = _loader(retired=True)
    await loader.handle(_token_task(clock, "r1"))
    await loader.handle(_token_task(clock, "r1").model_copy(update={"token": "tok-2"}))
    await loader.handle(_token_task(clock, "r2"))
    ids = [e.event_id for e in broker.of(TaskRequested)]
    assert len(set(ids)) == 3


async def test_a_token_task_past_its_start_deadline_is_given_back():
    loader, broker, llm, clock = _loader()
    task = _token_task(clock, start_in=5.0, deadline_in=30.0)
    clock.advance(5.0)  # start_by reached, deadline 25 s ahead
    await asyncio.wait_for(loader.handle(task), 10)
    back = _assert_given_back(broker, llm, task)
    assert back.occurred_at == clock.now()
    await _answered(loader, broker, llm, back)


@pytest.mark.parametrize("retired", [False, True])
async def test_a_token_task_past_its_deadline_fails_as_a_timeout(retired):
    loader, broker, llm, clock = _loader(retired=retired)
    task = _token_task(clock, start_in=5.0, deadline_in=10.0)
    clock.advance(10.0)
    await asyncio.wait_for(loader.handle(task), 10)
    assert broker.of(TaskRequested) == []  # not given back: the run ends here
    assert llm.calls == []
    [failed] = broker.of(WorkflowFailed)
    assert (failed.run_id, failed.reason) == ("r1", "timeout")
    assert broker.of(WorkflowCompleted) == []


async def test_a_live_agents_token_task_within_its_start_deadline_is_answered():
    loader, broker, llm, clock = _loader()
    task = _token_task(clock)
    clock.advance(4.9)
    await asyncio.wait_for(loader.handle(task), 10)
    assert broker.of(TaskRequested) == []
    assert len(llm.calls) == 1
    [started] = broker.of(WorkflowStarted)
    [done] = broker.of(WorkflowCompleted)
    assert started.run_id == done.run_id == "r1"
    assert broker.of(WorkflowFailed) == []
    kinds = [type(e) for e in broker.acked]
    assert (
        kinds.index(WorkflowStarted)
        < kinds.index(LlmCallCompleted)
        < kinds.index(WorkflowCompleted)
    )


async def test_a_token_task_whose_start_deadline_passes_while_its_start_waits_for_the_broker():
    # Its start went out only after start_by: the token's slot may be the budget's again,
    # so no call is made; the run fails as a timeout although its own deadline is ahead.
    loader, broker, llm, clock = _loader()
    task = _token_task(clock, start_in=5.0, deadline_in=30.0)
    broker.down = True
    running = asyncio.create_task(loader.handle(task))
    await asyncio.sleep(0.1)
    assert not running.done() and broker.acked == []
    clock.advance(6.0)
    broker.down = False
    await asyncio.wait_for(running, 10)
    assert llm.calls == []
    [failed] = broker.of(WorkflowFailed)
    assert (failed.run_id, failed.reason) == ("r1", "timeout")
    assert broker.of(WorkflowCompleted) == []
