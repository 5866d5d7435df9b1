"""A request through router, budget, spawner and loader processes on the real broker."""

from __future__ import annotations

import pytest

from streams.errors import InvalidRequest

pytestmark = pytest.mark.e2e


async def test_ask_gets_an_llm_answer_with_cost_and_tier(platform, client):
    answer = await client.ask(
        "Why does my python function raise a KeyError?", goal_id="g-basic", user_id="u1"
    )
    assert answer.degradation_tier == "llm"
    assert answer.specialty == "code"
    assert answer.agent_id and answer.agent_id.startswith("code_")
    # The fake server's answer echoes the question, so this text came over HTTP from it.
    assert "answer to: Why does my python function raise a KeyError?" in answer.text
    assert answer.cost_usd > 0
    assert answer.latency_ms > 0

    completed = await platform.events("workflow_completed", run_id=answer.run_id)
    assert len(completed) == 1 and completed[0].text == answer.text
    calls = await platform.events("llm_call_completed", run_id=answer.run_id)
    # This run spawned the goal's code agent, whose system prompt the LLM wrote first;
    # the improvement service's judge graded the answer, paid by the answer's goal.
    by_purpose = {c.purpose: c for c in calls}
    assert {"answer", "spawn_prompt"} <= set(by_purpose) <= {"answer", "spawn_prompt", "judge"}
    assert by_purpose["spawn_prompt"].goal_id == "g-basic"
    if "judge" in by_purpose:
        assert by_purpose["judge"].goal_id == "g-basic"  # the judge is paid by its run's goal
    answer_call = next(c for c in calls if c.purpose == "answer")
    assert answer_call.cost_usd == pytest.approx(answer.cost_usd)
    assert answer_call.prompt_tokens > 0 and answer_call.completion_tokens > 0


async def test_first_request_spawns_and_the_next_reuses(platform, client):
    first = await client.ask("Summarize this article for me", goal_id="g-reuse", user_id="u1")
    second = await client.ask("Rewrite this email draft", goal_id="g-reuse", user_id="u2")
    assert first.specialty == second.specialty == "writing"
    assert first.agent_id == second.agent_id

    spawned = [e for e in await platform.events("agent_spawned") if e.goal_id == "g-reuse"]
    assert [e.agent_id for e in spawned] == [first.agent_id]
    assert spawned[0].prompt_source == "llm"  # the fake LLM wrote its system prompt
    decisions = await platform.events("route_decided", run_id=second.run_id)
    assert [d.action for d in decisions] == ["reuse"]
    assert decisions[0].criteria["specialty_match"] == 1.0


async def test_invalid_requests_are_refused_before_sending(platform, client):
    with pytest.raises(InvalidRequest, match="message is empty"):
        await client.ask("   ", goal_id="g1", user_id="u1")
    with pytest.raises(InvalidRequest, match="limit is 32768"):
        await client.ask("x" * 40000, goal_id="g1", user_id="u1")
    with pytest.raises(InvalidRequest, match="invalid identifier"):
        await client.ask("hello", goal_id="bad goal!", user_id="u1")
    with pytest.raises(InvalidRequest, match="unknown budget field"):
        await client.set_budget("g1", max_agent=3)
