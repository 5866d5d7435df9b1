"""Admission tokens on the whole platform: the router admits, the budget's limits still hold.

One platform with ``ORCH_ADMISSION_TOKENS`` on (every service its own process, the real
broker): answers are admitted by the router with tokens the budget granted, a goal's
``max_concurrent`` holds for the runs the loader actually starts, and a router killed
while holding tokens loses no request and keeps no slot for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from local.fake_openai import FakeOpenAIServer
from streams.client import OrchestratorClient
from tests.e2e.conftest import (
    SERVICES,
    Platform,
    budget_shows,
    events_until,
    running_platform,
    set_budget,
)

pytestmark = pytest.mark.e2e

TOKENS = {"ORCH_ADMISSION_TOKENS": "4"}


@pytest.fixture(scope="module")
def token_platform(
    kafka_bootstrap: str, fake_llm: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    yield from running_platform(
        kafka_bootstrap, fake_llm, tmp_path_factory, dict.fromkeys(SERVICES, 1), TOKENS
    )


@pytest.fixture
async def client(token_platform: Platform) -> AsyncIterator[OrchestratorClient]:
    async with OrchestratorClient(token_platform.settings, source="e2e") as c:
        yield c


async def test_the_router_admits_with_tokens_and_max_concurrent_holds(token_platform, client):
    platform, goal = token_platform, "g-tokens"
    await set_budget(platform, client, goal, max_concurrent=4)
    # One at a time first: the budget grants tokens while nothing waits.
    warm = [
        await client.ask(f"Explain topic {i} in a sentence", goal_id=goal, user_id="u1")
        for i in range(4)
    ]
    platform.llm.configure(latency_ms=150)
    try:
        burst = await asyncio.gather(
            *[
                client.ask(f"Explain the history of topic {i}", goal_id=goal, user_id="u1")
                for i in range(16)
            ]
        )
    finally:
        platform.llm.configure(latency_ms=0)
    answers = [*warm, *burst]
    assert all(a.degradation_tier == "llm" for a in answers)
    runs = {a.run_id for a in answers}
    admitted = [e for e in await platform.events("task_admitted") if e.run_id in runs]
    by_router = {e.run_id for e in admitted if e.source == "router"}
    assert by_router, "no task was admitted with a token"
    assert all(e.token and e.start_by for e in admitted if e.source == "router")
    grants = [e for e in await platform.events("admission_granted") if e.goal_id == goal]
    assert grants and all(len(g.tokens) <= 2 for g in grants)  # half of max_concurrent
    # What the loader started, and when each run ended: never more than 4 at once.
    started = {
        e.run_id: e.occurred_at
        for e in await platform.events("workflow_started")
        if e.run_id in runs
    }
    ended = {
        e.run_id: e.occurred_at
        for e in await platform.events("workflow_completed")
        if e.run_id in runs
    }
    assert set(started) == set(ended) == runs
    for run, start in started.items():
        overlapping = [r for r in runs if r != run and started[r] <= start < ended[r]]
        assert len(overlapping) <= 3, (run, overlapping)
    # Every slot of an ended run is back.
    await budget_shows(platform, goal, in_flight=0, queued=0)


async def test_a_router_killed_with_tokens_loses_no_request(token_platform, client):
    platform, goal = token_platform, "g-tokens-kill"
    await set_budget(platform, client, goal, max_concurrent=4)
    for i in range(3):
        await client.ask(f"Explain topic {i} briefly", goal_id=goal, user_id="u1")
    # The grant is on its own topic, sent beside the admissions: waited for, not assumed.
    await events_until(platform, "admission_granted", lambda e: e.goal_id == goal)
    platform.llm.configure(latency_ms=1500)
    try:
        asks = [
            asyncio.create_task(
                client.ask(f"Explain the sky number {i}", goal_id=goal, user_id="u1", timeout=90)
            )
            for i in range(6)
        ]
        await asyncio.sleep(0.8)
        platform.kill("router")  # SIGKILL, with tokens and requests in flight
        platform.start_service("router", **TOKENS)
        answers = await asyncio.gather(*asks)
    finally:
        platform.llm.configure(latency_ms=0)
    assert all(a.degradation_tier == "llm" for a in answers)
    terminals = [
        *await platform.events("workflow_completed"),
        *await platform.events("workflow_failed"),
    ]
    for answer in answers:
        ids = {t.event_id for t in terminals if t.run_id == answer.run_id}
        assert len(ids) == 1, (answer.run_id, ids)
    # The new router serves the goal beside the dead one's tokens, which lapse by themselves.
    after = await client.ask("Explain one more thing", goal_id=goal, user_id="u1", timeout=60)
    assert after.degradation_tier == "llm"
    await budget_shows(platform, goal, in_flight=0, queued=0)
