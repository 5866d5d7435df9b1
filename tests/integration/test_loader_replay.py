"""A loader that takes over tasks an earlier owner already answered calls no LLM and answers
nothing twice: the state a SIGKILL leaves (answer on Kafka, offset not committed), on the real
broker with a real HTTP LLM endpoint. Another goal's run under an answered run id is answered."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from local.fake_openai import FakeOpenAIServer
from services.loader.service import main as loader_main
from streams.clock import SystemClock
from streams.events import (
    AgentSpawned,
    Event,
    LlmCallCompleted,
    TaskAdmitted,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    terminal_event_id,
)
from streams.kafka import EventConsumer, EventProducer, KafkaSettings
from streams.runtime import run_service

pytestmark = pytest.mark.broker


def _task(run_id: str, goal: str = "g1") -> TaskAdmitted:
    now = datetime.now(UTC)
    return TaskAdmitted(
        source="budget",
        run_id=run_id,
        goal_id=goal,
        user_id="u1",
        agent_id=f"code_replay_{goal}",
        specialty="code",
        message=f"question of {run_id}",
        requested_at=now,
        deadline_at=now + timedelta(seconds=60),
    )


async def test_a_replayed_task_that_was_answered_is_not_answered_or_paid_again(
    settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
):
    llm = FakeOpenAIServer(port=0).start_in_thread()
    monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    answered, fresh, lost = _task("r-answered"), _task("r-fresh"), _task("r-lost")
    # Goal g2's own run under the run id g1's answered run has (its producer chose the id).
    theirs = _task("r-answered", "g2")
    # An attempt that started (and may have paid for its call) when its loader was killed.
    cut_off = WorkflowStarted(
        source="loader", run_id="r-lost", goal_id="g1", agent_id="code_replay_g1", specialty="code"
    )
    earlier = WorkflowCompleted(
        event_id=terminal_event_id("r-answered"),
        source="loader",
        run_id="r-answered",
        goal_id="g1",
        agent_id="code_replay_g1",
        specialty="code",
        text="the earlier owner's answer",
    )
    async with EventProducer(settings) as producer:
        for goal in ("g1", "g2"):
            await producer.send(
                AgentSpawned(
                    source="spawner",
                    goal_id=goal,
                    agent_id=f"code_replay_{goal}",
                    specialty="code",
                    system_prompt="You are a coder.",
                    temperature=0.2,
                )
            )
        # What a loader killed after answering and before committing leaves behind.
        await producer.send_many([answered, earlier, fresh, cut_off, lost, theirs])
    watcher = EventConsumer(
        settings,
        [WorkflowCompleted.topic, WorkflowFailed.topic, LlmCallCompleted.topic],
        group_id=None,
        source="t",
    )
    await watcher.start()
    stop = asyncio.Event()
    service = asyncio.create_task(
        run_service("loader", loader_main, settings=settings, clock=SystemClock(), stop=stop)
    )
    seen: list[Event] = []

    def costs_of(goal: str, run: str) -> int:
        return sum(
            isinstance(e, LlmCallCompleted) and (e.goal_id, e.run_id) == (goal, run) for e in seen
        )

    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        # The answers and the costs are topics of their own, read side by side: each is
        # waited for, the costs as well as the answers.
        while not (
            {("g1", "r-fresh"), ("g1", "r-lost"), ("g2", "r-answered")}
            <= {(e.goal_id, e.run_id) for e in seen if not isinstance(e, LlmCallCompleted)}
            and costs_of("g1", "r-fresh") >= 1
            and costs_of("g1", "r-lost") >= 2
            and costs_of("g2", "r-answered") >= 1
        ):
            assert loop.time() < deadline, f"a task not answered or costed; saw {seen}"
            assert not service.done(), service
            async for batch in watcher.batches(timeout_ms=200, idle=True):
                seen.extend(d.event for d in batch)
                break
        await asyncio.sleep(1.0)  # time for a second answer to show up, if there were one
        async for batch in watcher.batches(timeout_ms=500, idle=True):
            seen.extend(d.event for d in batch)
            if not batch:  # read up to what is there
                break
    finally:
        stop.set()
        await asyncio.wait_for(service, 60)
        await watcher.stop()
        llm.stop()
    costs = [e for e in seen if isinstance(e, LlmCallCompleted)]
    seen = [e for e in seen if not isinstance(e, LlmCallCompleted)]
    by_run = {
        run: [e for e in seen if e.run_id == run and e.goal_id == "g1"]
        for run in ("r-answered", "r-fresh")
    }
    assert [e.text for e in by_run["r-answered"]] == ["the earlier owner's answer"]  # type: ignore[union-attr]
    assert len(by_run["r-fresh"]) == 1 and by_run["r-fresh"][0].event_id == terminal_event_id(
        "r-fresh"
    )
    (their_answer,) = [e for e in seen if e.goal_id == "g2"]
    assert isinstance(their_answer, WorkflowCompleted) and their_answer.run_id == "r-answered"
    assert their_answer.agent_id == "code_replay_g2"
    # The fresh task, the cut-off one and g2's, not g1's answered one.
    assert llm.requests == 3
    # The cut-off attempt may have paid for its call: it is counted, at the repeat's cost,
    # under an id of its own attempt (so its loader's own report would count once).
    lost_costs = [c for c in costs if c.run_id == "r-lost"]
    assert len(lost_costs) == 2 and len({c.event_id for c in lost_costs}) == 2
    assert len({c.cost_usd for c in lost_costs}) == 1 and lost_costs[0].cost_usd > 0
    assert sum("earlier attempt" in (c.error or "") for c in lost_costs) == 1
    assert [c.run_id for c in costs].count("r-fresh") == 1
    assert [(c.goal_id, c.run_id) for c in costs].count(("g2", "r-answered")) == 1
