"""Two instances of the router, budget and loader share each group; stopping one loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services.cli.status import describe_groups
from streams.client import Answer, OrchestratorClient
from streams.runtime import group_id

pytestmark = pytest.mark.e2e

KINDS = (
    "Why does my python function raise a KeyError? case",
    "Summarize this article for me, part",
    "Explain the history of topic",
    "I need a refund for my order",
)
GOALS = tuple(f"g-scale-{i}" for i in range(4))


@pytest.fixture
async def client(scaled_platform) -> AsyncIterator[OrchestratorClient]:
    async with OrchestratorClient(scaled_platform.settings, source="e2e-scale") as c:
        yield c


async def _members(platform, *services: str) -> dict[str, int]:
    """Members of each service's group once the group is settled (0 while it rebalances)."""
    admin = AIOKafkaAdminClient(**platform.settings.client_args())
    await admin.start()
    try:
        groups = [group_id(platform.settings, s) for s in services]
        found = {g.group: g for g in await describe_groups(admin, groups)}
    finally:
        await admin.close()
    return {
        s: g.members if (g := found[group_id(platform.settings, s)]).state == "Stable" else 0
        for s in services
    }


async def _await_members(platform, expected: dict[str, int], timeout: float = 60.0) -> None:
    # The burst test measures a settled platform; a request sent while a group still
    # rebalances after start is the fault tests' and the chaos bench's business.
    deadline = time.monotonic() + timeout
    while (seen := await _members(platform, *expected)) != expected:
        assert time.monotonic() < deadline, f"groups {seen}, want {expected}"
        await asyncio.sleep(0.5)


async def _terminals(platform, runs: set[str]) -> Counter[str]:
    """Terminal event ids on the log per run: the invariant is exactly one each. A record
    sent again after a rebalance has the same id, and every reader takes the two for one
    (docs/architecture.md, at-least-once plus idempotence)."""
    found = [
        *await platform.events("workflow_completed"),
        *await platform.events("workflow_failed"),
    ]
    return Counter(run for run, _ in {(e.run_id, e.event_id) for e in found if e.run_id in runs})


def _ask(client: OrchestratorClient, i: int, timeout: float = 30.0):
    message = f"{KINDS[(i // len(GOALS)) % len(KINDS)]} {i}"
    return client.ask(message, goal_id=GOALS[i % len(GOALS)], user_id=f"u{i % 5}", timeout=timeout)


def _at_least(platform, wanted: dict[str, int]) -> dict[str, int]:
    """Start what is missing of ``wanted`` instances (a test before may have stopped some),
    so each test runs alone or in any order; returns ``wanted``."""
    for name, n in wanted.items():
        for _ in range(n - len(platform.instances_of(name))):
            platform.start_service(name)
    return wanted


async def test_two_instances_per_group_answer_a_burst_exactly_once(scaled_platform, client):
    await _await_members(
        scaled_platform, _at_least(scaled_platform, {"router": 2, "budget": 2, "loader": 2})
    )
    # One ask per (goal, kind) first: these spawn the agents the burst reuses.
    await asyncio.gather(*(_ask(client, i) for i in range(len(GOALS) * len(KINDS))))
    answers = await asyncio.gather(*(_ask(client, i) for i in range(80)))
    assert all(a.degradation_tier == "llm" for a in answers)
    runs = {a.run_id for a in answers}
    assert len(runs) == 80
    counts = await _terminals(scaled_platform, runs)
    assert set(counts) == runs and set(counts.values()) == {1}, counts.most_common(3)


async def test_stopping_one_loader_and_one_router_mid_traffic_loses_no_request(
    scaled_platform, client
):
    await _await_members(scaled_platform, _at_least(scaled_platform, {"router": 2, "loader": 2}))
    await asyncio.gather(*(_ask(client, i) for i in range(len(GOALS) * len(KINDS))))
    loop = asyncio.get_running_loop()
    rate, total, stop_after = 25.0, 175, 2.0
    sent_at: dict[int, float] = {}
    done_at: dict[int, float] = {}

    async def one(i: int) -> Answer:
        sent_at[i] = loop.time()
        answer = await _ask(client, 1000 + i, timeout=45)
        done_at[i] = loop.time()
        return answer

    async def stop_one(name: str) -> int | None:
        victim = await asyncio.to_thread(scaled_platform.stop_one, name, signal.SIGTERM, 30)
        return victim.returncode

    start = loop.time()
    tasks: list[asyncio.Task[Answer]] = []
    stopping: asyncio.Future[list[int | None]] | None = None
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        if stopping is None and loop.time() - start >= stop_after:
            stopped_at = loop.time()
            stopping = asyncio.gather(stop_one("loader"), stop_one("router"))
        tasks.append(asyncio.create_task(one(i)))
    assert stopping is not None
    # SIGTERM is a clean stop: both exit 0 once their in-flight work is handed over.
    assert await stopping == [0, 0]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    answers = [r for r in results if isinstance(r, Answer)]
    assert all(a.degradation_tier == "llm" for a in answers)
    # Answers keep coming: everything asked after the stop was answered too.
    after = [i for i in sent_at if sent_at[i] > stopped_at]
    assert len(after) > total / 2 and all(i in done_at for i in after)
    assert scaled_platform.alive("loader") and scaled_platform.alive("router")
    await _await_members(scaled_platform, {"router": 1, "loader": 1})
    runs = {a.run_id for a in answers}
    counts = await _terminals(scaled_platform, runs)
    assert set(counts) == runs and set(counts.values()) == {1}, counts.most_common(3)
