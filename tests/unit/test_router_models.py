"""Several models: the router chooses (specialty, model) for each goal's cost weight."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from types import SimpleNamespace

import pytest

from services.router.policy import Features, LearnedPolicy, StaticPolicy, arm_name, split_arm
from services.router.service import Router
from services.spawner.design import design_agent, writing_request
from services.spawner.service import _model_for, late_prompt_report
from streams.clock import FakeClock
from streams.events import (
    AgentSpawned,
    BudgetReported,
    LlmCallCompleted,
    RequestReceived,
    RouteDecided,
    SpawnApproved,
    SpawnRequested,
    TaskRequested,
    WorkflowAssessed,
)
from streams.llm import LLMSettings, parse_models, worst_case_usd
from tests.integration.waiting import until
from tests.samples import GivenUpLLM, RecordingProducer

MODELS = "cheap=0.15/0.6, strong=2.5/10"


def test_arm_names_read_back() -> None:
    assert arm_name("code", None) == "code" and split_arm("code") == ("code", None)
    assert split_arm(arm_name("code", "gpt-4o")) == ("code", "gpt-4o")


def test_models_are_parsed_and_their_prices_used() -> None:
    settings = LLMSettings.from_env({"ORCH_LLM_MODELS": MODELS, "ORCH_LLM_MODEL": "strong"})
    assert settings.model_names == ("cheap", "strong") and settings.default_model == "strong"
    assert settings.prices.cost_usd("cheap", 1_000_000, 0) == 0.15
    assert LLMSettings.price_table({"ORCH_LLM_MODELS": MODELS}).price("strong").output_per_m == 10
    json_form = '[{"name": "a", "input": 1, "output": 2, "base_url": "http://127.0.0.1:1/v1"}]'
    assert parse_models(json_form)[0].base_url == "http://127.0.0.1:1/v1"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("cheap", "name=input/output"),
        ("cheap=1/x", "not two numbers"),
        ("cheap=-1/2", "USD per 1M tokens"),
        ("a=1/2,a=3/4", "listed twice"),
        ("a b=1/2", "not a model name"),
        ("a=1/2@file:///etc/passwd", "not an http(s) URL"),
        ('[{"name": "a", "input": 1, "output": 2, "key": "sk-x"}]', "unknown fields"),
        ("[1, 2]", "object with a string name"),
        ("[{", "not valid JSON"),
    ],
)
def test_bad_model_lists_are_refused_naming_the_problem(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="ORCH_LLM_MODELS") as caught:
        parse_models(text)
    assert says in str(caught.value)


def test_the_cost_weight_moves_the_choice_to_the_cheaper_model() -> None:
    policy = LearnedPolicy(rng=random.Random(1), epsilon0=0.0, epsilon_min=0.0, bonus=0.0)
    features = Features(frozenset({"refund", "order"}), "customer_support")
    arms = ["customer_support@strong", "customer_support@cheap"]
    for _ in range(30):
        policy.update(features, arms[0], 0.90, cost=0.0060)
        policy.update(features, arms[1], 0.86, cost=0.0004)
    assert policy.choose(features, arms).specialty == arms[0]  # quality only
    # 20 quality points per USD: the strong model's 0.0056 USD more buys only 0.04 quality.
    assert policy.choose(features, arms, cost_weight=20.0).specialty == arms[1]
    # Snapshots written before costs were learned still restore (as cost 0).
    old = policy.dump()
    old["arms"] = [row[:3] for row in old["arms"]]
    old["words"] = [row[:4] for row in old["words"]]
    again = LearnedPolicy(rng=random.Random(1), bonus=0.0)
    again.restore(old)
    assert again.estimate(features, arms[0]) == pytest.approx(policy.estimate(features, arms[0]))


def test_static_routing_takes_the_guessed_specialty_on_the_first_model() -> None:
    features = Features(frozenset({"bug"}), "code")
    arms = ["general@strong", "general@cheap", "code@strong", "code@cheap"]
    assert StaticPolicy().choose(features, arms).specialty == "code@strong"
    assert StaticPolicy().choose(Features(frozenset(), "math"), arms).specialty == "general@strong"


def _router(monkeypatch: pytest.MonkeyPatch) -> tuple[Router, RecordingProducer, FakeClock]:
    monkeypatch.setenv("ORCH_LLM_MODELS", MODELS)
    monkeypatch.setenv("ORCH_LLM_MODEL", "strong")
    monkeypatch.setenv("ORCH_ROUTER_ARMS", "customer_support,general")
    monkeypatch.setenv("ORCH_ROUTER_RESEND_SECONDS", "0")
    producer, clock = RecordingProducer(), FakeClock()
    router = Router(SimpleNamespace(producer=producer, clock=clock))  # type: ignore[arg-type]
    return router, producer, clock


def _spawned(agent_id: str, model: str) -> AgentSpawned:
    return AgentSpawned(
        source="spawner",
        goal_id="g1",
        agent_id=agent_id,
        specialty="customer_support",
        system_prompt="You help customers.",
        temperature=0.3,
        model=model,
    )


def _request(clock: FakeClock, run: str) -> RequestReceived:
    return RequestReceived(
        source="test",
        run_id=run,
        goal_id="g1",
        user_id="u1",
        message="I want a refund for my order",
        occurred_at=clock.now(),
        deadline_at=clock.now() + timedelta(seconds=30),
    )


async def test_the_router_spawns_and_reuses_an_agent_of_the_chosen_model(monkeypatch) -> None:
    router, producer, clock = _router(monkeypatch)
    assert router.arms == [
        "customer_support@strong",
        "customer_support@cheap",
        "general@strong",
        "general@cheap",
    ]
    features = Features(frozenset({"refund", "order", "want"}), "customer_support")
    assert isinstance(router.policy.template, LearnedPolicy)
    router.policy.template.epsilon0 = router.policy.template.epsilon_min = 0.0
    for _ in range(40):  # what earlier runs taught it
        router.policy.update("g1", features, "customer_support@strong", 0.90, cost=0.0060)
        router.policy.update("g1", features, "customer_support@cheap", 0.86, cost=0.0004)
    # The goal weighs cost: 20 quality points per USD (reported by the budget).
    router.learn(
        BudgetReported(
            source="budget",
            goal_id="g1",
            max_agents=5,
            max_concurrent=5,
            max_daily_cost=1.0,
            agents=0,
            in_flight=0,
            queued=0,
            spent_today=0.0,
            held=0.0,
            day="2026-12-03",
            cost_weight=20.0,
        )
    )
    routing = asyncio.create_task(router.handle(_request(clock, "r1"), None))  # type: ignore[arg-type]
    await until(lambda: bool(producer.of(RouteDecided)), "the route's decision", 10.0)
    await asyncio.sleep(0.05)  # and time to send more than it should
    (spawn,) = producer.of(SpawnRequested)
    (decided,) = producer.of(RouteDecided)
    assert spawn.model == "cheap" and decided.model == "cheap"
    assert decided.specialty == "customer_support"
    # An agent of the same specialty on the other model does not serve this arm ...
    router.learn(_spawned("cs_strong", "strong"))
    await asyncio.sleep(0.05)
    assert not routing.done()
    # ... the one spawned on the chosen model does.
    router.learn(_spawned("cs_cheap", "cheap"))
    await asyncio.wait_for(routing, 2)
    (task,) = producer.of(TaskRequested)
    assert task.agent_id == "cs_cheap"
    # The outcome teaches the arm its quality and its cost (the router reads its own
    # decision back from the log first).
    router.learn(decided)
    before = router.policy.dump()["goals"][0][1]
    router.learn(
        WorkflowAssessed(
            source="improvement",
            run_id="r1",
            goal_id="g1",
            agent_id="cs_cheap",
            specialty="customer_support",
            quality=0.8,
            method="world",
            cost_usd=0.0005,
        )
    )
    ((goal, learned),) = router.policy.dump()["goals"]
    assert goal == "g1"
    after = {row[0]: row for row in learned["arms"]}
    old = {row[0]: row for row in before["arms"]}
    assert after["customer_support@cheap"][1] == old["customer_support@cheap"][1] + 1
    assert after["customer_support@cheap"][3] == pytest.approx(
        old["customer_support@cheap"][3] + 0.0005
    )
    # A goal that weighs quality only is served by the strong model's agent, at once.
    producer.sent.clear()
    quality_first = _request(clock, "r2").model_copy(update={"goal_id": "g1"})
    router.cost_weights["g1"] = 0.0
    await asyncio.wait_for(router.handle(quality_first, None), 2)  # type: ignore[arg-type]
    (task,) = producer.of(TaskRequested)
    assert task.agent_id == "cs_strong"


def test_the_spawner_makes_the_agent_on_an_offered_model_only() -> None:
    settings = LLMSettings.from_env({"ORCH_LLM_MODELS": MODELS, "ORCH_LLM_MODEL": "strong"})

    def approved(model: str | None) -> SpawnApproved:
        return SpawnApproved(source="budget", goal_id="g1", specialty="code", model=model)

    assert _model_for(approved("cheap"), settings) == "cheap"
    assert _model_for(approved(None), settings) == "strong"
    assert _model_for(approved("o1-pro-expensive"), settings) == "strong"  # not offered
    single = LLMSettings.from_env({"ORCH_LLM_MODEL": "gpt-4o-mini"})
    assert _model_for(approved(None), single) == "gpt-4o-mini"


@pytest.mark.parametrize("outcome", ["answer", "unsettled"])
async def test_a_prompt_call_given_up_on_at_the_timeout_is_counted_when_it_ends(outcome: str):
    producer = RecordingProducer()
    ctx = SimpleNamespace(producer=producer, clock=FakeClock())
    settings = LLMSettings.from_env({"ORCH_LLM_MODEL": "gpt-4o-mini"})
    approved = SpawnApproved(source="budget", goal_id="g1", specialty="code", message="fix it")
    llm = GivenUpLLM(settings.prices, outcome=outcome)
    late = late_prompt_report(ctx, settings, approved)  # type: ignore[arg-type]
    design = await design_agent("code", "fix it", llm, late=late)
    assert design.prompt_source == "template" and design.error  # the template served
    await until(lambda: bool(producer.of(LlmCallCompleted)), "the prompt call's report", 10.0)
    (report,) = producer.of(LlmCallCompleted)
    assert report.purpose == "spawn_prompt" and report.ok and report.cost_usd > 0
    if outcome == "unsettled":
        ask = writing_request("code")
        assert report.cost_usd == worst_case_usd(settings.prices, "gpt-4o-mini", ask, 300)


def test_a_policy_with_a_half_life_follows_a_change_one_that_never_forgets_does_not() -> None:
    features = Features(frozenset({"quarterly", "statistics"}), "research")
    arms = ["research", "data_analysis"]

    def after_change(half_life: float) -> str:
        policy = LearnedPolicy(
            rng=random.Random(3),
            epsilon0=0.0,
            epsilon_min=0.0,
            bonus=0.0,
            half_life=half_life,
            change_threshold=0.0,  # forgetting alone (the change detector: test_policy_change)
        )
        for _ in range(400):  # research was better for a long time ...
            policy.update(features, "research", 0.9)
            policy.update(features, "data_analysis", 0.6)
        for _ in range(60):  # ... then data_analysis is, and research worse
            policy.update(features, "research", 0.5)
            policy.update(features, "data_analysis", 0.9)
        return policy.choose(features, arms).specialty

    assert after_change(0.0) == "research"  # 400 old outcomes outweigh 60 new ones
    assert after_change(50.0) == "data_analysis"
    # A snapshot of a forgetting policy restores what it knew as of its last update.
    policy = LearnedPolicy(rng=random.Random(3), half_life=50.0)
    for _ in range(100):
        policy.update(features, "research", 0.9)
    again = LearnedPolicy(rng=random.Random(3), half_life=50.0)
    again.restore(policy.dump())
    assert again.estimate(features, "research") == pytest.approx(
        policy.estimate(features, "research")
    )


def test_a_specialty_learned_on_one_model_informs_it_on_another() -> None:
    """What writing@large learned of a request's words is where writing@small starts on
    them (and code@small from what code@large learned), not the small arms' overall mean."""
    from services.router.policy import LearnedPolicy, features_of

    policy = LearnedPolicy(rng=random.Random(1), form_weight=0.0)
    essay = features_of("polish the essay draft")
    other = features_of("unrelated words entirely")
    for _ in range(20):
        policy.update(essay, "writing@large", 0.9, 0.002)
        policy.update(essay, "code@large", 0.2, 0.002)
    for _ in range(10):  # the small arms' own outcomes, on other words, alike
        policy.update(other, "writing@small", 0.5, 0.0001)
        policy.update(other, "code@small", 0.5, 0.0001)
    writing = policy.estimate(essay, "writing@small")
    code = policy.estimate(essay, "code@small")
    assert writing > code + 0.3
    assert policy.choose(essay, ["writing@small", "code@small"]).scores["writing@small"] > 0.7
