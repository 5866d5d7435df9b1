"""Budgets under concurrency, LRU loading, degradation and crashes, all through real processes."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from services.budget.state import BudgetDefaults
from streams.budgets import read_budget
from streams.client import OrchestratorClient
from streams.clock import OffsetFileClock
from streams.errors import BudgetExceededError, RunRejected
from streams.events import AgentRetired, DeadLetter, LlmCallCompleted
from streams.llm import PriceTable
from tests.e2e.conftest import Platform, budget_shows, events_until, set_budget

pytestmark = pytest.mark.e2e


async def test_fifty_concurrent_asks_spawn_exactly_max_agents(platform, client):
    goal = "g-max-agents"
    await set_budget(platform, client, goal, max_agents=3)
    results = await asyncio.gather(
        *[
            client.ask(f"task {i}", goal_id=goal, user_id="u1", context={"specialty": f"s{i}"})
            for i in range(50)
        ],
        return_exceptions=True,
    )
    answers = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(answers) == 3
    assert len(failures) == 47
    assert all(isinstance(f, BudgetExceededError) and f.limit == "max_agents" for f in failures)
    assert all("max_agents is 3" in f.detail for f in failures)
    spawned = [e for e in await platform.events("agent_spawned") if e.goal_id == goal]
    assert len(spawned) == 3
    await budget_shows(platform, goal, agents=3)


async def test_a_goal_at_its_agent_limit_answers_through_its_best_agent(platform, client):
    """max_agents=1: the goal's one agent serves requests of other specialties (secondary
    routing, tier legacy_routing) instead of refusing them; nothing more is spawned, and
    the policy is told which specialty served. A request that pins a specialty is still
    refused: it asked for that specialty, not any answer."""
    goal = "g-one-agent"
    await set_budget(platform, client, goal, max_agents=1)
    first = await client.ask("Fix this python bug in my function", goal_id=goal, user_id="u1")
    assert first.specialty == "code" and first.degradation_tier == "llm"
    asks = [
        "Solve the equation 2x + 3 = 7",
        "Write a short poem about rain",
        "My order has not arrived, where is my refund",
        "Analyze this dataset and plot the trend of the mean",
        "Research the history of the printing press",
        "Solve this integral and explain the derivative",
    ]
    answers = await asyncio.gather(*[client.ask(m, goal_id=goal, user_id="u1") for m in asks])
    assert {a.agent_id for a in answers} == {first.agent_id}
    assert {a.degradation_tier for a in answers} == {"legacy_routing"}
    assert {a.specialty for a in answers} == {"code"}  # who answered
    runs = {a.run_id for a in answers}
    completed = [e for e in await platform.events("workflow_completed") if e.run_id in runs]
    assert len(completed) == len(asks)
    assert {e.meta["requested_specialty"] for e in completed} >= {"math", "writing"}
    decided = [e for e in await platform.events("route_decided") if e.run_id in runs]
    secondary = [e for e in decided if e.action == "secondary"]
    assert len(secondary) == len(asks)
    assert {(e.specialty, e.agent_id) for e in secondary} == {("code", first.agent_id)}
    spawned = [e for e in await platform.events("agent_spawned") if e.goal_id == goal]
    assert len(spawned) == 1
    # Pinned to a specialty the goal has no agent of: refused, as before.
    with pytest.raises(BudgetExceededError) as refused:
        await client.ask("Solve x", goal_id=goal, user_id="u1", context={"specialty": "math"})
    assert refused.value.limit == "max_agents"


async def test_max_concurrent_holds_under_a_burst(platform, client):
    goal = "g-concurrent"
    await set_budget(platform, client, goal, max_concurrent=2)
    platform.llm.configure(latency_ms=150)
    try:
        answers = await asyncio.gather(
            *[
                client.ask(f"Explain the history of topic {i}", goal_id=goal, user_id="u1")
                for i in range(12)
            ]
        )
    finally:
        platform.llm.configure(latency_ms=0)
    assert len(answers) == 12 and all(a.degradation_tier == "llm" for a in answers)
    runs = {a.run_id for a in answers}
    admitted = {
        e.run_id: e.occurred_at for e in await platform.events("task_admitted") if e.run_id in runs
    }
    ended = {
        e.run_id: e.occurred_at
        for e in await platform.events("workflow_completed")
        if e.run_id in runs
    }
    assert set(admitted) == set(ended) == runs
    # At every admission, fewer than 2 other runs of the goal were admitted and not yet ended.
    for run, start in admitted.items():
        overlapping = [r for r in runs if r != run and admitted[r] <= start < ended[r]]
        assert len(overlapping) <= 1, (run, overlapping)


async def test_redelivered_llm_cost_is_charged_once(platform, client):
    goal = f"g-redeliver-{uuid.uuid4().hex[:6]}"
    await set_budget(platform, client, goal, max_agents=5)
    call = LlmCallCompleted(
        source="test", run_id="r-1", goal_id=goal, model="gpt-4o-mini", cost_usd=0.25
    )
    producer = client._producer  # the SDK's own producer; the event is sent twice as is
    await producer.send(call)
    await producer.send(call)
    # Same key, same partition: once this marker is counted, the duplicate was seen too.
    marker = call.model_copy(update={"event_id": str(uuid.uuid4()), "cost_usd": 0.5})
    await producer.send(marker)
    deadline = time.monotonic() + 20
    while True:
        view = await read_budget(platform.settings, goal)
        if (view and view["spent_today"] >= 0.75) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert view["spent_today"] == pytest.approx(0.75)


async def test_lru_evicts_the_least_recently_used_and_reloads_it_lazily(platform, client):
    goal = "g-lru"
    first = await client.ask("hello", goal_id=goal, user_id="u1", context={"specialty": "lru0"})
    for i in range(1, 51):
        await client.ask("hello", goal_id=goal, user_id="u1", context={"specialty": f"lru{i}"})
    evicted = [e.agent_id for e in await platform.events("agent_evicted")]
    assert first.agent_id in evicted
    again = await client.ask(
        "hello again", goal_id=goal, user_id="u1", context={"specialty": "lru0"}
    )
    assert again.agent_id == first.agent_id  # the same agent, from the registry
    loads = [e for e in await platform.events("agent_loaded") if e.agent_id == first.agent_id]
    assert len(loads) == 2
    assert all(e.active_agents <= 50 for e in await platform.events("agent_loaded"))


async def test_llm_down_answers_from_a_lower_tier_and_says_so(platform, client):
    platform.llm.configure(mode="down")
    try:
        keyword = await client.ask("I need a refund for my order", goal_id="g-down", user_id="u1")
        static = await client.ask("hello there", goal_id="g-down", user_id="u1")
    finally:
        platform.llm.configure(mode="ok")
    assert keyword.degradation_tier == "keyword"
    assert keyword.text.startswith("[degraded: keyword tier")
    assert keyword.cost_usd == 0
    assert static.degradation_tier == "static_fallback"
    assert static.text.startswith("[degraded: static fallback")
    await asyncio.sleep(1.2)  # the breaker's cool-down in this platform
    back = await client.ask("hello there", goal_id="g-down", user_id="u1")
    assert back.degradation_tier == "llm"


async def test_bad_bytes_go_to_dead_letter_and_the_router_keeps_serving(platform, client):
    junk = b"\x00\x01 not an event"
    await client._producer.send_raw("request_received", junk, key=b"junk")
    answer = await client.ask("still there?", goal_id="g-dead", user_id="u1")
    assert answer.text
    # The junk went to another partition than the ask: its letter may come after the answer.
    letters = await events_until(platform, "dead_letter", lambda e: e.payload == junk)
    assert len(letters) == 1 and isinstance(letters[0], DeadLetter)
    assert letters[0].source == "router" and "C3 01" in letters[0].reason


async def test_loader_killed_mid_request_still_ends_in_exactly_one_terminal_event(platform, client):
    platform.llm.configure(latency_ms=2500)
    ask = asyncio.create_task(
        client.ask("Explain why the sky is blue", goal_id="g-crash", user_id="u1", timeout=60)
    )
    try:
        deadline = time.monotonic() + 20
        started = []
        while not started and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            started = [
                e for e in await platform.events("workflow_started") if e.goal_id == "g-crash"
            ]
        assert started, "the task never reached the loader"
        platform.kill("loader")
        platform.llm.configure(latency_ms=0)
        platform.start_service("loader")
        answer = await ask
    finally:
        platform.llm.configure(latency_ms=0)
    assert answer.degradation_tier == "llm"
    terminals = [
        *await platform.events("workflow_completed", run_id=answer.run_id),
        *await platform.events("workflow_failed", run_id=answer.run_id),
    ]
    # One terminal event id: a task replayed after the kill sends the same id again, and
    # every reader takes the two records for one (docs/architecture.md, at-least-once).
    assert len({t.event_id for t in terminals}) == 1, terminals


async def test_daily_cost_stops_a_goal_and_the_next_utc_day_reopens_it(platform, client):
    goal = "g-daily"
    # Each task holds its worst case (512 tokens and the prompt bound at the platform's
    # dear price) until its cost is known: the cap leaves room for that plus a few answers.
    prices = PriceTable.from_json(platform.environ["ORCH_LLM_PRICES"])
    worst = BudgetDefaults(prices=prices).task_worst_case("Write a short poem number 10", {})
    cap = round(worst + 0.08, 6)
    await set_budget(platform, client, goal, max_daily_cost=cap)
    stopped = None
    for i in range(40):
        try:
            await client.ask(f"Write a short poem number {i}", goal_id=goal, user_id="u1")
        except BudgetExceededError as exc:
            stopped = exc
            break
    assert stopped is not None and stopped.limit == "max_daily_cost"
    deadline = time.monotonic() + 20
    while True:  # the report follows the refusal's record within ORCH_BUDGET_REPORT_SECONDS
        view = await read_budget(platform.settings, goal)
        if view["spent_today"] + worst + 0.02 > cap or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    # Never more than the cap, and what was admitted could never have passed it.
    assert view["spent_today"] + worst + 0.02 > cap >= view["spent_today"] + view["held"]
    moved = OffsetFileClock(str(platform.clock_file))  # the budget's clock, a day on
    platform.move_clock(86400)
    try:
        await asyncio.sleep(0.5)
        # The judge grades every answer (ORCH_JUDGE_SAMPLE=1) after it ends: its calls may
        # still hold their worst case when the day turns, and holds count whatever the day,
        # until the calls report. While they do, a task is refused, or queued (and its
        # deadline, set by this unmoved client, has passed on the budget's moved clock).
        # Their cost is yesterday's (they were held then): the new day starts at nothing.
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = await client.ask("Write one more poem", goal_id=goal, user_id="u1")
                break
            except (BudgetExceededError, RunRejected) as exc:
                assert exc.limit == "max_daily_cost" or exc.reason == "timeout", exc
                view = await read_budget(platform.settings, goal, moved)
                assert view["spent_today"] == 0, view
                assert time.monotonic() < deadline, view
                await asyncio.sleep(0.5)
        assert answer.degradation_tier == "llm"
    finally:
        platform.move_clock(-86400)


def _stop_loader(platform: Platform) -> None:
    """A clean stop (SIGTERM): the loader leaves its group at once, so the next one need not
    wait out a killed one's session (6 s) before it is given the tasks."""
    for instance in platform.instances_of("loader"):
        platform.stop(instance)


async def test_an_agent_idle_24_hours_is_retired_and_revived_without_a_new_spawn(platform):
    # This test's loader and client read the moved clock too (deadlines stay consistent).
    _stop_loader(platform)
    platform.start_service("loader", ORCH_CLOCK_FILE=str(platform.clock_file))
    goal = "g-idle"
    moved = OrchestratorClient(
        platform.settings, source="e2e-idle", clock=OffsetFileClock(str(platform.clock_file))
    )
    moved_by = 0.0
    try:
        async with moved as client:
            await set_budget(platform, client, goal, max_agents=1)
            first = await client.ask(
                "Write a short poem about rain", goal_id=goal, user_id="u1", timeout=40
            )
            assert first.agent_id is not None
            platform.move_clock(25 * 3600)
            moved_by = 25 * 3600
            retired: list[AgentRetired] = []
            deadline = time.monotonic() + 20
            while not retired and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                retired = [
                    e
                    for e in await platform.events("agent_retired")
                    if e.agent_id == first.agent_id
                ]
            assert retired, "the idle agent was never retired"
            assert retired[0].idle_seconds >= 24 * 3600 and retired[0].goal_id == goal
            # The next request of that specialty revives the same agent: with
            # max_agents=1 a second spawn would have been refused.
            again = await client.ask("Write a short poem about snow", goal_id=goal, user_id="u1")
            assert again.agent_id == first.agent_id and again.degradation_tier == "llm"
            spawned = [e for e in await platform.events("agent_spawned") if e.goal_id == goal]
            assert len(spawned) == 1
            # The revival is a live agent again (the report follows within a moment).
            await budget_shows(platform, goal, agents=1)
    finally:
        _stop_loader(platform)
        platform.move_clock(-moved_by)
        platform.start_service("loader")
