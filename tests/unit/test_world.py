"""Simulated worlds: shipped files load, traffic is reproducible, the responder plays the matrix."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest

from local.fake_openai import FakeOpenAIServer, Usage
from local.world import Arm, World, WorldError
from services.improvement.assess import judge_messages, parse_grade
from streams.llm import LLMSettings, OpenAILLM, PriceTable, estimate_tokens

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "bench" / "worlds").glob("*.json"))


def _answer_request(system: str, user: str) -> dict:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }


def test_three_worlds_ship_and_load_with_normalised_shares():
    assert {p.stem for p in SHIPPED} >= {"support-desk", "research-lab", "mixed-bag"}
    for path in SHIPPED:
        world = World.load(path)
        assert world.name == path.stem
        assert sum(t.share for t in world.request_types) == pytest.approx(1.0)
        assert 0 < world.oracle_reward() <= 1
        # A round trip through the file format keeps the world.
        assert World.from_dict(json.loads(json.dumps(world.to_dict()))) == world


def test_shipped_worlds_differ_in_structure():
    worlds = {p.stem: World.load(p) for p in SHIPPED}
    lab = worlds["research-lab"]
    best = Counter(lab.best_specialty(t.name) for t in lab.request_types)
    assert best.most_common(1)[0] == ("research", 3)  # one specialty dominates
    bag = worlds["mixed-bag"]
    assert len(bag.request_types) >= 8 and bag.noise >= 0.15  # many types, noisy
    assert worlds["support-desk"].repetition >= 0.3  # repetitive: automations can save


def test_sampling_is_deterministic_and_repeats_the_declared_share():
    world = World.load(ROOT / "bench/worlds/support-desk.json")
    a = world.sample_requests(2000, seed=3)
    assert a == World.load(ROOT / "bench/worlds/support-desk.json").sample_requests(2000, seed=3)
    assert a != world.sample_requests(2000, seed=4)
    repeats = [r for r in a if r.repeat]
    assert len(repeats) / len(a) == pytest.approx(world.repetition, abs=0.04)
    firsts = {r.message for r in a if not r.repeat}
    assert all(r.message in firsts for r in repeats)
    shares = Counter(r.request_type for r in a if not r.repeat)
    fresh = sum(shares.values())
    for t in world.request_types:
        assert shares[t.name] / fresh == pytest.approx(t.share, abs=0.05)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_responder_identifies_type_and_specialty(path: Path):
    world = World.load(path)
    respond = world.responder(seed=1)
    for request in world.sample_requests(200, seed=1)[:200]:
        for specialty in world.specialties:
            system = f"You are a {specialty} specialist in the {world.name} world."
            text, usage, extra = respond(_answer_request(system, request.message))
            assert extra["request_type"] == request.request_type
            assert extra["specialty"] == specialty
            assert 0.0 <= float(extra["quality"]) <= 1.0
            assert usage is not None and usage.completion_tokens == world.cost[specialty]


def test_types_are_recognised_in_a_fresh_world_and_by_similarity():
    path = ROOT / "bench/worlds/support-desk.json"
    request = World.load(path).sample_requests(50, seed=9)[7]
    fresh = World.load(path)  # never generated that message: the templates recognise it
    assert fresh.identify(request.message) == request.request_type
    assert fresh.identify("I want a refund for order 12, it arrived broken, thanks") == "refund"
    assert fresh.identify("what is the capital of Peru") is None


def test_spawn_prompts_keep_the_specialty_identifiable():
    world = World.load(ROOT / "bench/worlds/support-desk.json")
    respond = world.responder()
    spawn = _answer_request(
        "You write system prompts for specialist AI agents.",
        "Specialty: customer_support\nWhat it does: resolves questions\nA typical request: hi",
    )
    prompt, _, extra = respond(spawn)
    assert prompt.startswith("You are a customer_support specialist") and extra == {}
    _, _, extra = respond(_answer_request(prompt, "I want a refund for order 5, it arrived late"))
    assert extra["specialty"] == "customer_support" and extra["request_type"] == "refund"
    # The spawner's template and the loader's fallback write the role with spaces.
    legacy = "You are a customer support specialist: you resolve customer questions."
    assert world.specialty_in(legacy) == "customer_support"


def test_quality_is_deterministic_per_message_specialty_and_seed():
    world = World.load(ROOT / "bench/worlds/mixed-bag.json")
    message = world.sample_requests(1, seed=0)[0].message
    assert world.quality_of(message, "code", 1) == world.quality_of(message, "code", 1)
    values = {world.quality_of(message, "code", s) for s in range(20)}
    assert len(values) > 10  # the noise moves with the seed


def _clipped_mean(mean: float, sd: float) -> float:
    """E[min(1, max(0, X))] for X ~ N(mean, sd): the mean of a clipped quality."""

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    def pdf(x: float) -> float:
        return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    a, b = (0 - mean) / sd, (1 - mean) / sd
    inside = mean * (cdf(b) - cdf(a)) + sd * (pdf(a) - pdf(b))
    return inside + (1 - cdf(b))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_sampled_quality_matches_the_matrix(path: Path):
    world = World.load(path)
    requests = world.sample_requests(3000, seed=2)
    for t in world.request_types:
        # The noise is drawn once per (message, specialty): count each message once.
        messages = sorted({r.message for r in requests if r.request_type == t.name})
        for specialty in world.specialties:
            got = [world.quality_of(m, specialty, 5)[1] for m in messages]  # type: ignore[index]
            expected = _clipped_mean(world.quality[t.name][specialty], world.noise)
            tolerance = 4 * world.noise / len(got) ** 0.5 + 0.005
            assert statistics.fmean(got) == pytest.approx(expected, abs=tolerance)


def test_feedback_comes_at_the_declared_rate_and_tracks_quality():
    world = World.load(ROOT / "bench/worlds/mixed-bag.json")
    scores = [world.feedback_score(str(i), 0.9, seed=1) for i in range(4000)]
    given = [s for s in scores if s is not None]
    assert len(given) / len(scores) == pytest.approx(world.feedback_probability, abs=0.03)
    assert statistics.fmean(given) > 4
    low = [world.feedback_score(str(i), 0.1, seed=1) for i in range(4000)]
    assert statistics.fmean(s for s in low if s is not None) < 2


@pytest.mark.parametrize("seed", range(12))
def test_random_worlds_are_valid_and_reproducible(seed: int):
    world = World.random(seed)
    assert world == World.random(seed)
    assert World.from_dict(world.to_dict()) == world
    assert 3 <= len(world.specialties) <= 6 and 4 <= len(world.request_types) <= 9
    requests = world.sample_requests(300, seed=seed)
    fresh = World.random(seed)  # recognises by its templates, not by what it generated
    assert all(fresh.identify(r.message) == r.request_type for r in requests)
    for t in world.request_types:
        ranked = sorted(world.quality[t.name].values(), reverse=True)
        assert ranked[0] - ranked[1] >= 0.15 - 1e-9  # a best specialty exists to be learned


def test_random_worlds_differ_by_seed():
    assert World.random(1).to_dict() != World.random(2).to_dict()


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"specialties": ["code"]}, "specialties"),
        ({"quality": {}}, "quality"),
        ({"cost": {"customer_support": 1}}, "cost"),
        ({"noise": 2}, "noise"),
        ({"colour": "blue"}, "unknown field"),
    ],
)
def test_invalid_worlds_say_where_they_are_wrong(change: dict, where: str):
    data = World.load(ROOT / "bench/worlds/support-desk.json").to_dict()
    data.update(change)
    with pytest.raises(WorldError, match=where):
        World.from_dict(data)


def test_bad_template_slot_is_refused():
    data = World.load(ROOT / "bench/worlds/support-desk.json").to_dict()
    data["request_types"][0]["examples"] = ["refund {order}"]
    with pytest.raises(WorldError, match="slot"):
        World.from_dict(data)


async def test_the_fake_server_plays_the_world_through_the_openai_client():
    world = World.load(ROOT / "bench/worlds/research-lab.json")
    request = world.sample_requests(1, seed=0)[0]
    async with FakeOpenAIServer(responder=world.responder(seed=0)) as server:
        llm = OpenAILLM(LLMSettings(base_url=server.base_url, api_key="k"))
        try:
            done = await llm.complete(
                [
                    {"role": "system", "content": "You are a research specialist."},
                    {"role": "user", "content": request.message},
                ]
            )
        finally:
            await llm.aclose()
    assert done.meta["request_type"] == request.request_type
    assert done.meta["specialty"] == "research"
    expected = world.quality_of(request.message, "research", 0)
    assert expected is not None and float(done.meta["quality"]) == pytest.approx(expected[1], 1e-3)
    assert done.completion_tokens == world.cost["research"]


def test_the_oracle_scores_the_best_specialty_on_the_same_message():
    world = World.load(ROOT / "bench/worlds/research-lab.json")
    for request in world.sample_requests(50, seed=4):
        best = world.best_specialty(request.request_type)
        assert world.oracle_quality(request, 4) == world.quality_of(request.message, best, 4)[1]  # type: ignore[index]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_the_upper_bound_is_the_best_draw_and_never_below_the_oracle(path: Path):
    world = World.load(path)
    for request in world.sample_requests(200, seed=3):
        bound = world.upper_bound_quality(request, 3)
        draws = [world.quality_of(request.message, s, 3)[1] for s in world.specialties]  # type: ignore[index]
        assert bound == max(draws)
        assert bound >= world.oracle_quality(request, 3)


# -- models ---------------------------------------------------------------------------------

TWO_MODELS = ROOT / "bench/worlds/support-desk-two-models.json"
DRIFT = ROOT / "bench/worlds/research-lab-drift.json"
FIRST_FORMAT = {
    "name",
    "description",
    "specialties",
    "request_types",
    "quality",
    "noise",
    "cost",
    "feedback_probability",
    "repetition",
}


def _support_desk(**changes: object) -> dict:
    data = World.load(ROOT / "bench/worlds/support-desk.json").to_dict()
    data.update(changes)
    return data


def _body(system: str, user: str, model: str | None = "gpt-4o-mini") -> dict:
    body = _answer_request(system, user)
    if model is None:
        del body["model"]
    else:
        body["model"] = model
    return body


def test_worlds_of_the_first_format_write_the_same_file():
    for name in ("support-desk", "research-lab", "mixed-bag"):
        data = World.load(ROOT / "bench" / "worlds" / f"{name}.json").to_dict()
        assert set(data) == FIRST_FORMAT


def test_the_two_model_world_prices_its_models_for_the_platform():
    world = World.load(TWO_MODELS)
    assert world.model_prices() == {"small": [0.15, 0.6], "large": [2.5, 10.0]}
    table = PriceTable.from_json(json.dumps(world.model_prices()))
    assert table.price("small").input_per_m == 0.15 and table.price("large").output_per_m == 10.0
    assert World.load(ROOT / "bench/worlds/support-desk.json").model_prices() == {}


def test_the_cheap_model_is_good_enough_for_at_least_half_the_traffic():
    world = World.load(TWO_MODELS)
    # Quality alone: the strong model everywhere.
    assert {world.best_arm(t.name).model for t in world.request_types} == {"large"}
    # A cent worth 0.3 quality: the cheap model on the easy types, the strong on the hard.
    arms = {t.name: world.best_arm(t.name, cost_weight=30.0) for t in world.request_types}
    cheap = sum(t.share for t in world.request_types if arms[t.name].model == "small")
    assert cheap >= 0.5
    assert arms["login_bug"] == world.best_arm("login_bug")  # hard: large, whatever it costs
    assert arms["refund"].model == "small" and arms["refund"].specialty == "customer_support"


def test_model_deltas_adjust_the_matrix_per_type_and_clip():
    data = _support_desk(
        models={
            "small": {"price": [0.1, 0.2], "quality": {"refund": -0.95, "login_bug": 0.5}},
            "large": {"price": [1, 2]},
        }
    )
    world = World.from_dict(data)
    assert world.mean_quality("refund", "customer_support") == 0.9
    assert world.mean_quality("refund", "customer_support", model="large") == 0.9
    assert world.mean_quality("refund", "customer_support", model="small") == pytest.approx(0.0)
    assert world.mean_quality("login_bug", "code", model="small") == 1.0  # 0.88 + 0.5, clipped
    assert world.mean_quality("complaint", "writing", model="small") == 0.55  # no delta: 0
    # A model the world does not list answers as the matrix says.
    assert world.mean_quality("refund", "customer_support", model="gpt-4o") == 0.9
    assert world.best_specialty("refund", model="small") == "customer_support"
    assert world.oracle_reward("refund", model="small") == pytest.approx(0.0)
    assert (
        world.oracle_reward(model="small")
        < world.oracle_reward()
        == world.oracle_reward(model="large")
    )


def test_quality_is_deterministic_per_model_and_unlisted_models_draw_as_before():
    world = World.load(TWO_MODELS)
    messages = [r.message for r in world.sample_requests(100, seed=1)]
    for message in messages:
        small = world.quality_of(message, "code", 2, model="small")
        assert small == world.quality_of(message, "code", 2, model="small")
        assert world.quality_of(message, "code", 2, model="gpt-4o") == world.quality_of(
            message, "code", 2
        )
    small = [world.quality_of(m, "code", 2, model="small") for m in messages]
    large = [world.quality_of(m, "code", 2, model="large") for m in messages]
    assert sum(a != b for a, b in zip(small, large, strict=True)) > 90  # own noise per model


def test_sampled_quality_per_model_matches_matrix_plus_delta():
    world = World.load(TWO_MODELS)
    requests = world.sample_requests(3000, seed=2)
    for request_type in ("login_bug", "refund"):
        messages = sorted({r.message for r in requests if r.request_type == request_type})
        got = [world.quality_of(m, "code", 5, model="small")[1] for m in messages]  # type: ignore[index]
        mean = world.mean_quality(request_type, "code", model="small")
        assert mean == pytest.approx(
            world.quality[request_type]["code"] - (0.3 if request_type == "login_bug" else 0.03)
        )
        tolerance = 4 * world.noise / len(got) ** 0.5 + 0.005
        assert statistics.fmean(got) == pytest.approx(
            _clipped_mean(mean, world.noise), abs=tolerance
        )


def test_the_responder_answers_as_the_requested_model():
    world = World.load(TWO_MODELS)
    respond = world.responder(seed=4)
    message = world.sample_requests(1, seed=4)[0].message
    system = "You are a code specialist in the support desk."
    text, usage, extra = respond(_body(system, message, "small"))
    assert text.startswith("[code @ small] answer to a ")
    assert extra["model"] == "small" and extra["specialty"] == "code"
    expected = world.quality_of(message, "code", 4, model="small", request_index=0)
    assert expected is not None and extra["quality"] == f"{expected[1]:.4f}"
    assert usage is not None and usage.completion_tokens == round(world.cost["code"] * 0.9)
    assert usage.completion_tokens == world.answer_tokens("code", model="small")
    text, usage, extra = respond(_body(system, message, "large"))
    assert text.startswith("[code @ large] answer to a ")
    assert usage is not None and usage.completion_tokens == world.cost["code"]
    # An unlisted, missing or malformed model gets no adjustment and no tag.
    for model in ("gpt-4o-mini", None, 5):
        text, usage, extra = respond(_body(system, message, model))  # type: ignore[arg-type]
        assert text.startswith("[code] answer to a ") and "model" not in extra
        assert extra["quality"] == f"{world.quality_of(message, 'code', 4)[1]:.4f}"  # type: ignore[index]


def test_the_responder_can_keep_the_quality_to_itself():
    world = World.load(TWO_MODELS)
    message = world.sample_requests(1, seed=0)[0].message
    respond = world.responder(reveal_quality=False)
    text, _, extra = respond(_body("You are a code specialist.", message, "small"))
    assert "quality" not in extra and extra["specialty"] == "code" and "@ small" in text


def test_answer_cost_follows_the_model_price_and_tokens():
    world = World.load(TWO_MODELS)
    message = "I want a refund for order 12, it arrived late"
    prompt = estimate_tokens(
        f"You are a code specialist in the {world.name} world. Answer the user's request"
        " directly, precisely and within your scope."
    ) + estimate_tokens(message)
    small = world.answer_cost_usd(message, "code", model="small")
    assert small == pytest.approx((prompt * 0.15 + round(420 * 0.9) * 0.6) / 1e6)
    large = world.answer_cost_usd(message, "code", model="large")
    assert large == pytest.approx((prompt * 2.5 + 420 * 10.0) / 1e6)
    assert world.answer_cost_usd(message, "code", model="gpt-4o") == 0.0  # unpriced


def test_best_arm_in_a_world_without_models_is_the_best_specialty():
    world = World.load(ROOT / "bench/worlds/mixed-bag.json")
    for t in world.request_types:
        arm = world.best_arm(t.name, cost_weight=1000.0)
        assert arm == Arm(world.best_specialty(t.name), None, world.oracle_reward(t.name), 0.0)
    with pytest.raises(ValueError, match="cost_weight"):
        world.best_arm("bugfix", cost_weight=-1.0)
    with pytest.raises(ValueError, match="cost_weight"):
        world.best_arm("bugfix", cost_weight=math.nan)
    with pytest.raises(KeyError):
        world.best_arm("no_such_type")


def test_the_oracle_arm_scores_the_best_arm_on_the_same_message():
    world = World.load(TWO_MODELS)
    for request in world.sample_requests(50, seed=6):
        arm = world.oracle_arm(request, 6, cost_weight=30.0)
        best = world.best_arm(request.request_type, cost_weight=30.0, message=request.message)
        assert (arm.specialty, arm.model, arm.cost_usd) == (
            best.specialty,
            best.model,
            best.cost_usd,
        )
        drawn = world.quality_of(request.message, arm.specialty, 6, model=arm.model)
        assert drawn is not None and arm.quality == drawn[1]
        assert arm.reward(30.0) == pytest.approx(arm.quality - 30.0 * arm.cost_usd)
        # The quality-only oracle on the strong model is the oracle of the first format.
        assert (
            world.oracle_quality(request, 6, model="large") == world.oracle_arm(request, 6).quality
        )


@pytest.mark.parametrize(
    ("models", "where"),
    [
        ([1], "models: want"),
        ({"small": [1, 2]}, "models.small: want"),
        ({"small": {"quality": {"refund": 0.1}}}, r"models.small.price: want"),
        ({"small": {"price": [1]}}, r"models.small.price: want"),
        ({"small": {"price": "cheap"}}, r"models.small.price: want"),
        ({"small": {"price": [-1, 2]}}, r"models.small.price\[0\]"),
        ({"small": {"price": ["a", 2]}}, r"models.small.price\[0\]"),
        ({"small": {"price": [1, math.nan]}}, r"models.small.price\[1\]"),
        ({"small": {"price": [1, 10**400]}}, r"models.small.price\[1\]"),
        ({"small": {"price": [1, True]}}, r"models.small.price\[1\]"),
        ({"small": {"price": [1, 2], "quality": {"nope": 0.1}}}, "models.small.quality.nope"),
        ({"small": {"price": [1, 2], "quality": {"refund": 2}}}, "models.small.quality.refund"),
        ({"small": {"price": [1, 2], "quality": {"refund": "x"}}}, "models.small.quality.refund"),
        ({"small": {"price": [1, 2], "quality": [0.1]}}, "models.small.quality: want"),
        ({"small": {"price": [1, 2], "tokens": 0}}, "models.small.tokens"),
        ({"small": {"price": [1, 2], "tokens": -2}}, "models.small.tokens"),
        ({"small": {"price": [1, 2], "tokens": True}}, "models.small.tokens"),
        ({"small": {"price": [1, 2], "colour": 1}}, "models.small: unknown field"),
        ({"bad name]": {"price": [1, 2]}}, r"models.bad name\]: not a model name"),
        ({"": {"price": [1, 2]}}, "not a model name"),
        ({"default": {"price": [1, 2]}}, "models.default: not a model name"),
    ],
)
def test_invalid_models_say_where_they_are_wrong(models: object, where: str):
    with pytest.raises(WorldError, match=where):
        World.from_dict(_support_desk(models=models))


def test_model_names_as_providers_spell_them_are_valid():
    models = {"gpt-4o-mini": {"price": [0.15, 0.6]}, "meta/llama-3.1:8b": {"price": [0, 0]}}
    world = World.from_dict(_support_desk(models=models))
    assert World.from_dict(world.to_dict()) == world
    assert world.model_prices()["meta/llama-3.1:8b"] == [0.0, 0.0]


# -- drift ----------------------------------------------------------------------------------


def _drifting(**changes: object) -> World:
    """support-desk without noise, refund moving to general at request 2."""
    data = _support_desk(noise=0.0, judge={"noise": 0.0, "bias": 0.0})
    data["drift"] = [
        {"after": 2, "quality": {"refund": {"general": 0.95, "customer_support": 0.3}}}
    ]
    data.update(changes)
    return World.from_dict(data)


def test_the_drift_world_ships_and_changes_its_best_specialties():
    world = World.load(DRIFT)
    assert [d.after for d in world.drift] == [800, 1600]
    assert [world.phase_at(i) for i in (0, 799, 800, 1599, 1600, 10**6)] == [0, 0, 1, 1, 2, 2]
    assert world.best_specialty("statistics") == "research"
    assert world.best_specialty("statistics", request_index=800) == "data_analysis"
    assert world.best_specialty("grant", request_index=1599) == "research"
    assert world.best_specialty("grant", request_index=1600) == "writing"
    # A drift point keeps earlier changes: phase 2 still has phase 1's statistics.
    assert world.mean_quality("statistics", "data_analysis", request_index=5000) == 0.88
    assert world.oracle_reward() == world.oracle_reward(request_index=799)
    with pytest.raises(ValueError, match="request_index"):
        world.phase_at(-1)


def test_the_oracle_of_a_request_is_that_of_its_phase():
    world = World.load(DRIFT)
    requests = world.sample_requests(1000, seed=1)
    for i, request in list(enumerate(requests))[790:810]:
        best = world.best_specialty(request.request_type, request_index=i)
        drawn = world.quality_of(request.message, best, 1, request_index=i)
        assert drawn is not None
        assert world.oracle_quality(request, 1, request_index=i) == drawn[1]
        assert world.upper_bound_quality(request, 1, request_index=i) >= drawn[1]


def test_the_responder_counts_answers_to_know_the_phase():
    world = _drifting()
    respond = world.responder()
    agent = "You are a customer_support specialist."
    refund = "I want a refund for order 5, it arrived late"

    def answer() -> dict[str, str]:
        return respond(_body(agent, refund))[2]

    assert answer() == {
        "quality": "0.9000",
        "request_type": "refund",
        "specialty": "customer_support",
        "world": "support-desk",
        "phase": "0",
    }
    # Neither a spawn, a judge, a plain call nor an unknown message moves the count.
    respond(_body("You write system prompts.", "Specialty: code\nWhat it does: code"))
    respond(_body(*judge_messages(refund, "[customer_support] answer to a refund request.")))
    respond(_body("Be brief.", refund))
    respond(_body(agent, "what is the capital of Peru"))
    assert answer()["quality"] == "0.9000"
    third = answer()
    assert third["quality"] == "0.3000" and third["phase"] == "1"
    # Each responder counts for itself.
    assert world.responder()(_body(agent, refund))[2]["quality"] == "0.9000"


def test_drift_replaces_model_deltas_for_the_types_it_names():
    world = _drifting(
        models={"small": {"price": [0.1, 0.4], "quality": {"refund": -0.1, "login_bug": -0.2}}},
        drift=[{"after": 10, "models": {"small": {"quality": {"refund": -0.5}}}}],
    )
    assert world.mean_quality("refund", "customer_support", model="small") == pytest.approx(0.8)
    late = {"model": "small", "request_index": 10}
    assert world.mean_quality("refund", "customer_support", **late) == pytest.approx(0.4)  # type: ignore[arg-type]
    assert world.mean_quality("login_bug", "code", **late) == pytest.approx(0.68)  # type: ignore[arg-type]
    assert world.mean_quality("refund", "customer_support", request_index=10) == 0.9
    assert World.from_dict(world.to_dict()) == world


@pytest.mark.parametrize(
    ("drift", "where"),
    [
        ({"after": 1}, "drift: want a list"),
        (["x"], r"drift\[0\]: want"),
        ([{"quality": {"refund": {"code": 0.5}}}], r"drift\[0\].after"),
        ([{"after": 0, "quality": {"refund": {"code": 0.5}}}], r"drift\[0\].after"),
        ([{"after": 1.5, "quality": {"refund": {"code": 0.5}}}], r"drift\[0\].after"),
        ([{"after": True, "quality": {"refund": {"code": 0.5}}}], r"drift\[0\].after"),
        ([{"after": "9", "quality": {"refund": {"code": 0.5}}}], r"drift\[0\].after"),
        ([{"after": 10**400, "quality": {"refund": {"code": 0.5}}}], r"drift\[0\].after"),
        (
            [
                {"after": 5, "quality": {"refund": {"code": 0.5}}},
                {"after": 5, "quality": {"refund": {"code": 0.6}}},
            ],
            r"drift\[1\].after: must be larger",
        ),
        ([{"after": 5, "quality": {"nope": {"code": 0.5}}}], r"drift\[0\].quality.nope"),
        ([{"after": 5, "quality": {"refund": {"nope": 0.5}}}], r"drift\[0\].quality.refund.nope"),
        ([{"after": 5, "quality": {"refund": {"code": 1.5}}}], r"drift\[0\].quality.refund.code"),
        ([{"after": 5, "quality": {"refund": 0.5}}], r"drift\[0\].quality.refund: want"),
        ([{"after": 5}], "changes nothing"),
        ([{"after": 5, "quality": {"refund": {}}}], "changes nothing"),
        ([{"after": 5, "models": {"ghost": {"quality": {"refund": 0.1}}}}], "models.ghost"),
        ([{"after": 5, "quality": {"refund": {"code": 0.5}}, "when": 3}], "unknown field"),
    ],
)
def test_invalid_drift_says_where_it_is_wrong(drift: object, where: str):
    with pytest.raises(WorldError, match=where):
        World.from_dict(_support_desk(drift=drift))


def test_drift_of_a_model_delta_needs_the_model_and_a_valid_delta():
    models = {"small": {"price": [0.1, 0.4]}}
    ok = [{"after": 5, "models": {"small": {"quality": {"refund": -0.2}}}}]
    assert World.from_dict(_support_desk(models=models, drift=ok)).drift[0].after == 5
    bad = [{"after": 5, "models": {"small": {"quality": {"refund": -2}}}}]
    with pytest.raises(WorldError, match=r"drift\[0\].models.small.quality.refund"):
        World.from_dict(_support_desk(models=models, drift=bad))
    extra = [{"after": 5, "models": {"small": {"price": [1, 1]}}}]
    with pytest.raises(WorldError, match=r"drift\[0\].models.small: unknown field"):
        World.from_dict(_support_desk(models=models, drift=extra))


# -- the judge ------------------------------------------------------------------------------


def _judge(respond, message: str, answer: str, model: str = "gpt-4o") -> tuple[str, Usage]:
    messages = judge_messages(message, answer)
    text, usage, extra = respond({"model": model, "messages": messages})
    assert extra == {} and usage is not None
    return text, usage


def test_the_judge_grades_an_answer_from_its_true_quality():
    world = World.load(TWO_MODELS)
    respond = world.responder(seed=3)
    for request in world.sample_requests(60, seed=3):
        for model in ("small", "large", "gpt-4o-mini"):
            answer, _, _ = respond(_body("You are a code specialist.", request.message, model))
            grade, usage = _judge(respond, request.message, answer)
            listed = model if model != "gpt-4o-mini" else None
            expected = world.judge_grade(request.message, "code", 3, model=listed)
            assert grade == str(expected) and parse_grade(grade) == expected
            prompt = sum(
                estimate_tokens(m["content"]) for m in judge_messages(request.message, answer)
            )
            assert usage.prompt_tokens == prompt and 0 < usage.completion_tokens <= 3


def test_judge_grades_follow_quality_with_the_declared_noise_and_bias():
    world = World.load(TWO_MODELS)
    messages = sorted({r.message for r in world.sample_requests(2000, seed=1)})
    errors = []
    for message in messages:
        quality = world.quality_of(message, "customer_support", 1, model="small")[1]  # type: ignore[index]
        grade = world.judge_grade(message, "customer_support", 1, model="small")
        assert grade is not None and 1 <= grade <= 10
        assert grade == world.judge_grade(message, "customer_support", 1, model="small")
        errors.append((grade - 1) / 9 - quality)
    assert abs(statistics.fmean(errors)) < 0.02  # unbiased by default
    assert 0.06 < statistics.pstdev(errors) < 0.16  # noise 0.1, plus rounding to a grade
    exact = World.from_dict(_support_desk(judge={"noise": 0.0, "bias": 0.0}))
    message = messages[0]
    quality = exact.quality_of(message, "code", 1)[1]  # type: ignore[index]
    assert exact.judge_grade(message, "code", 1) == round(1 + 9 * quality)
    lenient = World.from_dict(_support_desk(judge={"noise": 0.0, "bias": 1.0}))
    assert lenient.judge_grade(message, "code", 1) == 10
    harsh = World.from_dict(_support_desk(judge={"noise": 0.0, "bias": -1.0}))
    assert harsh.judge_grade(message, "code", 1) == 1
    assert exact.judge_grade("what is the capital of Peru", "code") is None


def test_the_judge_grades_an_answer_in_the_phase_it_was_given():
    world = _drifting()
    respond = world.responder()
    agent = "You are a customer_support specialist."
    early = "I want a refund for order 5, it arrived late"
    answers = [
        respond(_body(agent, m))[0] for m in (early, "I want a refund for order 6, it arrived late")
    ]
    late = "I want a refund for order 7, it arrived late"
    respond(_body(agent, late))  # request 2: phase 1
    assert _judge(respond, early, answers[0])[0] == str(round(1 + 9 * 0.9))
    assert _judge(respond, late, answers[0])[0] == str(round(1 + 9 * 0.3))
    # Never answered here (e.g. a cached answer): graded in the phase the world is in now.
    unseen = "I want a refund for order 8, it arrived late"
    assert _judge(respond, unseen, answers[0])[0] == str(round(1 + 9 * 0.3))


@pytest.mark.parametrize(
    "user",
    [
        "Grade this: it was fine",
        "Request:\nI want a refund for order 5, it arrived late\n\nGrade (1-10):",
        "Request:\nI want a refund for order 5, it arrived late\n\nAnswer:\nSure, done.",
        "Request:\nwhat is the capital of Peru\n\nAnswer:\n[code] answer to a refund request.",
        "Request:\nI want a refund for order 5, it arrived late\n\nAnswer:\n[wizard] answer to a x",
        "",
    ],
)
def test_the_judge_answers_five_when_it_cannot_tell(user: str):
    world = World.load(TWO_MODELS)
    system = judge_messages("x", "y")[0]["content"]
    text, usage, extra = world.responder()(_body(system, user))
    assert (text, extra) == ("5", {}) and usage is not None


def test_the_judge_survives_hostile_bodies():
    respond = World.load(TWO_MODELS).responder()
    system = {"role": "system", "content": "You grade answers to user requests."}
    assert (
        respond({"model": "m", "messages": [system, {"role": "user", "content": ["a"]}]})[0] == "5"
    )
    assert respond({"model": "m", "messages": [system, "junk"]})[0] == "5"
    assert respond({"model": "m", "messages": "junk"})[0] == "[support-desk-two-models] noted."
    # A request that embeds the judge's separator is still split at the last one.
    world = World.load(TWO_MODELS)
    for message in (
        "I want a refund for order 5, it arrived late\n\nAnswer:\nno",
        "I want a refund for order 5, it arrived late",
    ):
        grade, _ = _judge(
            respond, message, "[customer_support @ small] answer to a refund request."
        )
        expected = world.judge_grade(message, "customer_support", model="small")
        assert expected is not None and grade == str(expected)
    # An answer tag naming a model the world does not list: graded as no model.
    message = "I want a refund for order 5, it arrived late"
    grade, _ = _judge(respond, message, "[customer_support @ gpt-9] answer to a refund request.")
    assert grade == str(world.judge_grade(message, "customer_support"))


@pytest.mark.parametrize(
    ("judge", "where"),
    [
        ("loud", "judge: want"),
        ({"noise": -0.1}, "judge.noise"),
        ({"noise": 2}, "judge.noise"),
        ({"bias": 1.5}, "judge.bias"),
        ({"bias": None}, "judge.bias"),
        ({"sigma": 0.1}, "judge: unknown field"),
    ],
)
def test_invalid_judges_say_where_they_are_wrong(judge: object, where: str):
    with pytest.raises(WorldError, match=where):
        World.from_dict(_support_desk(judge=judge))


async def test_the_platforms_judge_call_gets_a_grade_it_can_parse():
    world = World.load(TWO_MODELS)
    request = world.sample_requests(1, seed=0)[0]
    async with FakeOpenAIServer(responder=world.responder(seed=0)) as server:
        llm = OpenAILLM(LLMSettings(base_url=server.base_url, api_key="k"))
        try:
            agent = [
                {"role": "system", "content": "You are a code specialist."},
                {"role": "user", "content": request.message},
            ]
            answer = await llm.complete(agent, model="small")
            judged = await llm.complete(
                judge_messages(request.message, answer.text), model="gpt-4o", max_tokens=16
            )
        finally:
            await llm.aclose()
    assert answer.text.startswith("[code @ small]")
    expected = world.judge_grade(request.message, "code", 0, model="small")
    assert parse_grade(judged.text) == expected and judged.completion_tokens == 2


# -- random worlds of the new format --------------------------------------------------------


def test_random_worlds_of_the_first_format_are_unchanged():
    worlds = [World.random(s).to_dict() for s in range(4)]
    digest = hashlib.sha256(json.dumps(worlds, sort_keys=True).encode()).hexdigest()
    assert digest == "86551d9b8044c47cb5b98b810f4380f345365b3f68d138b85bb588f5546b0804"
    assert World.random(3, models=0, drift=False) == World.random(3)
    assert set(World.random(3).to_dict()) == FIRST_FORMAT


@pytest.mark.parametrize("seed", range(12))
def test_random_two_model_worlds_have_easy_and_hard_types(seed: int):
    world = World.random(seed, models=2)
    assert world == World.random(seed, models=2)
    assert World.from_dict(world.to_dict()) == world
    assert world.name == f"random-{seed}-2m" and world.quality == World.random(seed).quality
    assert world.model_prices() == {"small": [0.15, 0.6], "large": [2.5, 10.0]}
    n = len(world.request_types)
    gaps = {
        t.name: world.oracle_reward(t.name, model="large")
        - world.oracle_reward(t.name, model="small")
        for t in world.request_types
    }
    easy = [t for t, gap in gaps.items() if gap <= 0.05 + 1e-9]
    assert len(easy) in (n // 2, (n + 1) // 2)
    assert all(0.2 - 1e-9 <= gap <= 0.4 + 1e-9 for t, gap in gaps.items() if t not in easy)
    for t in world.request_types:  # cheaper per answer, whatever the specialty
        for s in world.specialties:
            message = t.examples[0]
            small = world.answer_cost_usd(message, s, model="small")
            assert small < world.answer_cost_usd(message, s, model="large") / 10


@pytest.mark.parametrize("seed", range(12))
def test_random_drift_worlds_change_a_best_specialty(seed: int):
    world = World.random(seed, drift=True)
    assert world == World.random(seed, drift=True) and World.from_dict(world.to_dict()) == world
    assert world.name == f"random-{seed}-drift"
    (change,) = world.drift
    assert 600 <= change.after <= 1200
    (moved,) = change.quality
    before = world.best_specialty(moved, request_index=change.after - 1)
    after = world.best_specialty(moved, request_index=change.after)
    assert before != after
    for index in (0, change.after):  # a best specialty to be learned in either phase
        ranked = sorted(
            (world.mean_quality(moved, s, request_index=index) for s in world.specialties),
            reverse=True,
        )
        assert ranked[0] - ranked[1] >= 0.15 - 1e-9
    both = World.random(seed, models=2, drift=True)
    assert both.name == f"random-{seed}-2m-drift" and both.models and both.drift


def test_random_worlds_take_zero_or_two_models():
    with pytest.raises(ValueError, match="models"):
        World.random(1, models=1)


def test_the_responder_writes_an_instruction_from_a_poor_rating_only():
    """The improvement service's request for an instruction is not an agent's answer: a poor
    rating gets a style instruction the guard accepts, a good one NONE, and neither the
    agent prompt a spawn gets (its user message has a "Specialty:" line too)."""
    from services.improvement.instructions import instruction_messages
    from streams.guard import guard_instruction

    respond = World.load(TWO_MODELS).responder()
    for score in (1, 2, None):
        text, usage, extra = respond({"messages": instruction_messages("code", score, "")})
        assert guard_instruction(text).ok and not text.startswith("You are") and extra == {}
        assert usage is not None and usage.completion_tokens > 0
    for score in (3, 5):
        text, _, extra = respond({"messages": instruction_messages("code", score, "great")})
        assert text == "NONE" and extra == {}
