"""The platform learns from its own events: a recurring request becomes a cached automation."""

from __future__ import annotations

import asyncio
import time

import pytest

from local.fake_openai import Usage
from streams.llm import default_answer
from streams.signatures import signature_of
from tests.e2e.conftest import events_until

pytestmark = pytest.mark.e2e


def _good_answers(body: dict) -> tuple[str, Usage, dict[str, str]]:
    """A real HTTP answer that also says its (simulated) quality, as a world would."""
    text = default_answer(body["messages"], body.get("model", "m"))
    return text, Usage(prompt_tokens=40, completion_tokens=20), {"quality": "0.9"}


async def test_a_recurring_request_is_answered_from_cache_at_no_llm_cost(platform, client):
    platform.llm.responder = _good_answers
    try:
        goal, message = "g-auto", "How do I reset my account password?"
        first = [await client.ask(message, goal_id=goal, user_id="u1") for _ in range(3)]
        assert all(a.degradation_tier == "llm" and a.cost_usd > 0 for a in first)
        assessed = await events_until(
            platform, "workflow_assessed", lambda e: e.run_id == first[-1].run_id
        )
        assert assessed[0].method == "world" and assessed[0].quality == 0.9
        patterns = await events_until(
            platform,
            "pattern_discovered",
            lambda e: e.goal_id == goal and e.specialty == first[0].specialty,
        )
        assert len(patterns) == 1 and patterns[0].occurrences >= 3
        caches = await events_until(
            platform,
            "automation_created",
            lambda e: e.goal_id == goal and e.kind == "response_cache",
        )
        assert len(caches) == 1

        # The router folds the automation in from the log, a moment after it is there:
        # asked again until it answers from the cache (each miss is one more LLM answer).
        deadline = time.monotonic() + 30
        while True:
            llm_calls_before = platform.llm.requests
            cached = await client.ask(message, goal_id=goal, user_id="u1")
            if cached.degradation_tier != "llm" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert cached.degradation_tier == "automation_cache"
        assert cached.cost_usd == 0
        assert cached.text == first[0].text
        assert platform.llm.requests == llm_calls_before  # no LLM call was made
        completed = await platform.events("workflow_completed", run_id=cached.run_id)
        assert completed[0].automation_id == caches[0].automation_id
    finally:
        platform.llm.responder = None


async def test_a_cached_answer_is_served_only_to_the_goal_it_was_computed_for(platform, client):
    platform.llm.responder = _good_answers
    try:
        message = "Where do I change the billing address on my invoices?"
        goal_a, goal_b = "g-cache-a", "g-cache-b"
        first = [await client.ask(message, goal_id=goal_a, user_id="u1") for _ in range(3)]
        assert all(a.degradation_tier == "llm" for a in first)
        signature = signature_of(message, first[0].specialty)
        caches = await events_until(
            platform,
            "automation_created",
            lambda e: (e.goal_id, e.kind, e.signature) == (goal_a, "response_cache", signature),
        )
        assert len(caches) == 1
        a_runs = {a.run_id for a in first}

        async def cached_from(answer) -> str | None:
            (done,) = await platform.events("workflow_completed", run_id=answer.run_id)
            return done.meta.get("cached_from_run")

        # Goal A is served from its own cache once the router has folded the automation in.
        deadline = time.monotonic() + 20
        while True:
            again = await client.ask(message, goal_id=goal_a, user_id="u1")
            if again.degradation_tier == "automation_cache" or time.monotonic() > deadline:
                break
            a_runs.add(again.run_id)
            await asyncio.sleep(0.3)
        assert again.degradation_tier == "automation_cache"
        assert await cached_from(again) in a_runs

        # Goal B sends the same message again and again: never A's answer, nor A's cache
        # (A's runs earned A's automation only). Once B's own runs earn B's cache, B is
        # served from it, its own answer.
        b_runs: set[str] = set()
        b_hits: list[str | None] = []
        deadline = time.monotonic() + 30
        while not b_hits and time.monotonic() < deadline:
            answer = await client.ask(message, goal_id=goal_b, user_id="u2")
            source = await cached_from(answer)
            assert source not in a_runs, "goal B was served goal A's answer"
            assert answer.agent_id != first[0].agent_id  # A's agent belongs to goal A
            if answer.degradation_tier == "automation_cache":
                b_hits.append(source)
            else:
                assert answer.degradation_tier == "llm" and answer.cost_usd > 0
                b_runs.add(answer.run_id)
            await asyncio.sleep(0.3)
        assert b_runs, "B's first answer must come from the LLM, not from A's cache"
        assert b_hits and b_hits[0] in b_runs
        # A is still served A's own answer.
        last = await client.ask(message, goal_id=goal_a, user_id="u1")
        assert last.degradation_tier == "automation_cache" and await cached_from(last) in a_runs
    finally:
        platform.llm.responder = None
