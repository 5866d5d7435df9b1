"""The spawner on the real broker when the broker fails a send in the middle of a spawn."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
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
from streams.kafka import EventProducer, KafkaSettings
from streams.registry import read_topics_to_end
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


async def _read(
    settings: KafkaSettings,
) -> tuple[list[GoalAgentsChanged], list[AgentSpawned]]:
    """The notices and the agents on their topics now, each topic read to its end."""
    seen = await read_topics_to_end(settings, [AgentSpawned.topic, GoalAgentsChanged.topic])
    notices = [e for e in seen if isinstance(e, GoalAgentsChanged)]
    return notices, [e for e in seen if isinstance(e, AgentSpawned)]


async def _spawn(
    settings: KafkaSettings, producer: EventProducer, approval: SpawnApproved
) -> tuple[list[GoalAgentsChanged], list[AgentSpawned]]:
    """Run the spawner on ``approval`` until the budget's notice of it is on the topic."""
    await producer.start()
    stop = asyncio.Event()
    ctx = ServiceContext("spawner", settings, SystemClock(), producer)
    task = asyncio.create_task(spawner.main(ctx, stop))
    try:
        async with EventProducer(settings) as client:
            await client.send(approval)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (await _read(settings))[0]:
            assert loop.time() < deadline, "no notice from the spawner"
            assert not task.done(), task
            await asyncio.sleep(0.25)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await producer.stop()
    # Read again once the spawner has stopped: all it sent, whichever topic it went to.
    return await _read(settings)


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
    consumer = AIOKafkaConsumer(**settings.client_args(), enable_auto_commit=False)
    await consumer.start()
    try:
        # The spawner has stopped: every partition read up to its end, however slowly.
        await consumer._client.force_metadata_update()  # noqa: SLF001
        found = consumer.partitions_for_topic(changelog)
        assert found, f"no changelog {changelog}"
        parts = [TopicPartition(changelog, p) for p in sorted(found)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        written = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            assert loop.time() < deadline, "the registry's changelog not read to its end"
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for record in records:
                    written[record.key] = tp.partition
    finally:
        await consumer.stop()
    keys = [k for k in written if k is not None and agent.encode() in k]
    assert keys, written
    assert {written[k] for k in keys} == {partition_for(approval.goal_id, PARTITIONS)}
