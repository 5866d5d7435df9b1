"""Simulated worlds: shipped files load, traffic is reproducible, the responder plays the matrix."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest

from local.fake_openai import FakeOpenAIServer
from local.world import World, WorldError
from streams.llm import LLMSettings, OpenAILLM

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
