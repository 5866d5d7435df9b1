"""The spawner on the real broker when the broker fails a send in the middle of a spawn."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaTimeoutError

from services.budget.state import BudgetState
from services.spawner import service as spawner
from services.spawner.design import agent_id_for
from streams.clock import SystemClock
from streams.config import broker_env
from streams.events import (
    SPAWN_APPROVAL_SECONDS,
    AgentSpawned,
    Event,
    GoalAgentsChanged,
    SpawnApproved,
    SpawnDenied,
)
from streams.kafka import EventConsumer, EventProducer, KafkaSettings
from streams.runtime import ServiceContext
from streams.topics import PARTITIONS, partition_for
from tests.unit.test_budget_state import DEFAULTS, _spawn_req


class NoticeFailsOnce(EventProducer):
    """A broker that fails the first send carrying the budget's "spawned" notice, after
    ``agent_spawned`` was acknowledged (a leader move between two sends does that)."""

    failed = 0

    def _trip(self, events: Iterable[Event]) -> None:
        notice = any(isinstance(e, GoalAgentsChanged) and e.change == "spawned" for e in events)
        if notice and not self.failed:
            self.failed += 1
            raise KafkaTimeoutError("the broker moved the partition's leader")

    async def send(self, event: Event) -> None:
        self._trip([event])
        await super().send(event)

    async def send_many(self, events: Iterable[Event]) -> None:
        events = list(events)
        self._trip(events)
        await super().send_many(events)


async def _read(settings: KafkaSettings, topics: list[str]) -> list[Any]:
    view = EventConsumer(settings, topics, group_id=None, source="test")
    await view.start()
    out: list[Any] = []
    try:
        for _ in range(4):
            for records in (await view.raw.getmany(timeout_ms=500)).values():
                for record in records:
                    decoded = await view.decode(record)
                    if decoded is not None:
                        out.append(decoded.event)
    finally:
        await view.stop()
    return out


async def _spawn(
    settings: KafkaSettings, producer: EventProducer, approval: SpawnApproved
) -> tuple[list[GoalAgentsChanged], list[AgentSpawned]]:
    """Run the spawner on ``approval`` until the budget's notice of it is on the topic."""
    await producer.start()
    stop = asyncio.Event()
    ctx = ServiceContext("spawner", settings, SystemClock(), producer)
    task = asyncio.create_task(spawner.main(ctx, stop))
    notices: list[GoalAgentsChanged] = []
    spawned: list[AgentSpawned] = []
    try:
        async with EventProducer(settings) as client:
            await client.send(approval)
        for _ in range(60):
            await asyncio.sleep(1)
            seen = await _read(settings, [AgentSpawned.topic, GoalAgentsChanged.topic])
            notices = [e for e in seen if isinstance(e, GoalAgentsChanged)]
            spawned = [e for e in seen if isinstance(e, AgentSpawned)]
            if notices:
                break
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await producer.stop()
    return notices, spawned


@pytest.fixture
def no_llm(monkeypatch: Any, tmp_path: Any, kafka_bootstrap: str) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)  # template prompts: no LLM call
    # The spawner's store goes to tmp_path; the broker stays the session's, with its login.
    for name, value in broker_env(kafka_bootstrap).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))


async def test_a_failed_send_after_the_agent_exists_never_frees_its_slot(
    settings: KafkaSettings, no_llm: None
) -> None:
    clock = SystemClock()
    budget = BudgetState.new("g1", DEFAULTS)
    budget.max_agents = 1
    (approval,) = budget.handle(_spawn_req(0), clock.now(), DEFAULTS).events
    assert isinstance(approval, SpawnApproved)

    producer = NoticeFailsOnce(settings, client_id="spawner-test")
    notices, spawned = await _spawn(settings, producer, approval)

    assert producer.failed == 1  # the fault did happen
    assert len({e.agent_id for e in spawned}) == 1  # the agent is live
    # The budget hears that it was spawned, never that it failed, and so holds the limit.
    assert [e.change for e in notices] == ["spawned"]
    for notice in notices:
        budget.handle(notice, clock.now(), DEFAULTS)
    assert budget.agent_count() == 1
    assert isinstance(budget.handle(_spawn_req(1), clock.now(), DEFAULTS).events[-1], SpawnDenied)


@pytest.mark.parametrize("ahead", [False, True], ids=["past", "future"])
async def test_an_approval_older_than_the_budget_keeps_its_place_makes_no_agent(
    settings: KafkaSettings, no_llm: None, ahead: bool
) -> None:
    # The budget gives an unanswered approval's place back after 2 x SPAWN_APPROVAL_SECONDS;
    # one the spawner reads after SPAWN_APPROVAL_SECONDS (it was down, or behind) would
    # make an agent past max_agents. One stamped that far ahead of the clock is as stale
    # (one stamped in year 8999 was never stale).
    stamped = SystemClock().now() - timedelta(seconds=SPAWN_APPROVAL_SECONDS + 60)
    if ahead:
        stamped = datetime(8999, 1, 1, tzinfo=UTC)
    approval = SpawnApproved.model_validate(
        {**_approval_of(_spawn_req(0)).model_dump(), "occurred_at": stamped}
    )
    notices, spawned = await _spawn(settings, EventProducer(settings), approval)
    assert [e.change for e in notices] == ["spawn_failed"]
    assert spawned == []


def _approval_of(request: Any) -> SpawnApproved:
    budget = BudgetState.new("g1", DEFAULTS)
    (approval,) = budget.handle(request, SystemClock().now(), DEFAULTS).events
    assert isinstance(approval, SpawnApproved)
    return approval


async def test_an_agent_is_kept_on_its_goals_partition(
    settings: KafkaSettings, no_llm: None
) -> None:
    # The instance that owns a goal's approvals after a rebalance must have recovered that
    # goal's agents, or a redelivered approval looks new (and one read too late is reported
    # spawn_failed for a live agent). The registry entry went to the partition of the
    # agent id's hash: another instance's, in general.
    requests = (_spawn_req(i) for i in range(50))
    approval = next(
        a
        for a in map(_approval_of, requests)
        if partition_for(a.goal_id, PARTITIONS)
        != partition_for(agent_id_for(a.specialty, a.event_id, a.goal_id), PARTITIONS)
    )
    notices, spawned = await _spawn(settings, EventProducer(settings), approval)
    assert [e.change for e in notices] == ["spawned"]
    (agent,) = {e.agent_id for e in spawned}
    changelog = settings.topic(f"{spawner.APP_NAME}-registry-changelog")
    consumer = AIOKafkaConsumer(changelog, **settings.client_args(), auto_offset_reset="earliest")
    await consumer.start()
    try:
        written = {}
        for _ in range(10):
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    written[record.key] = tp.partition
    finally:
        await consumer.stop()
    keys = [k for k in written if k is not None and agent.encode() in k]
    assert keys, written
    assert {written[k] for k in keys} == {partition_for(approval.goal_id, PARTITIONS)}
