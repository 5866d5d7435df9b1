"""The quality-per-dollar benchmark's numbers, on a small two-model world."""

from __future__ import annotations

import pytest

from bench.priced import main, priced_arms, priced_world
from local.world import World


def test_a_two_model_world_is_compared_with_always_strong_and_its_oracle() -> None:
    world = World.random(201, models=2)
    assert world.strongest_model() == "large"
    arms = priced_arms(world)
    assert arms[0].endswith("@large") and len(arms) == 2 * len(world.specialties)
    result = priced_world(world, 600, seed=1, cost_weight=30.0, sweep=(0.0, 50.0))
    runs = result["runs"]
    strong, oracle = runs["always_strong"], runs["oracle"]
    assert strong["quality_of_strong"] == 1.0 and strong["cost_of_strong"] == 1.0
    assert oracle["vs_oracle_reward"] == 1.0
    # Weighing cost, the oracle pays less than always-strong for nearly its quality.
    assert oracle["cost_of_strong"] < 0.8 and oracle["quality_of_strong"] > 0.9
    # The learned policy is measured, not assumed: a number in range, on the same requests.
    learned = runs["learned"]
    assert 0.0 < learned["quality"] <= 1.0 and learned["cost_per_1k_usd"] > 0
    # A higher weight never buys a dearer mix at the oracle.
    low, high = result["curve"]
    assert high["oracle"]["cost_of_strong"] <= low["oracle"]["cost_of_strong"]
    assert set(result["targets"]) == {
        "reward >= 90% of the oracle's",
        "95% of strong's quality at <= 50% of its cost (some weight)",
    }


def test_the_command_refuses_a_negative_weight_and_worlds_without_models(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--cost-weight", "-1"])
    with pytest.raises(SystemExit):
        main(["--worlds", "bench/worlds/support-desk.json", "--random"])
    assert "no world with two or more models" in capsys.readouterr().err


class _Counting:
    """A policy that always picks the first arm and counts what it is taught."""

    def __init__(self) -> None:
        self.taught: list[float] = []

    def choose(self, features, arms, cost_weight=0.0):
        from services.router.policy import Choice

        return Choice(arms[0], 1.0, {})

    def update(self, features, arm, reward, cost=0.0):
        self.taught.append(reward)


def test_with_the_truth_hidden_only_judged_or_rated_answers_teach_and_the_judge_is_paid() -> None:
    from dataclasses import replace

    from bench.priced import judge_cost_usd, judged_world, simulate_priced

    world = replace(World.random(201, models=2), feedback_probability=0.0)
    sample = world.sample_requests(400, seed=1)
    seen = _Counting()
    truth = simulate_priced(world, seen, sample, 1, 30.0)
    assert len(seen.taught) == 400 and seen.taught == truth.quality
    # No judge and no feedback: nothing to learn from, and nothing extra paid.
    blind = _Counting()
    run = simulate_priced(world, blind, sample, 1, 30.0, judge_sample=0.0)
    assert blind.taught == [] and run.cost == truth.cost and run.quality == truth.quality
    # A judge on every answer: each is taught a grade (1-10 scaled to 0-1, not the truth)
    # and pays one judge call on top of the answer.
    judged = _Counting()
    run = simulate_priced(world, judged, sample, 1, 30.0, judge_sample=1.0)
    assert len(judged.taught) == 400 and judged.taught != truth.quality
    assert all(abs(q * 9 - round(q * 9)) < 1e-9 for q in judged.taught)
    extra = [paid - answer for paid, answer in zip(run.cost, truth.cost, strict=True)]
    assert extra == pytest.approx([judge_cost_usd(world, r, run.arms[0]) for r in sample])
    assert all(e > 0 for e in extra)
    # About a fifth judged at 20%.
    fifth = _Counting()
    simulate_priced(world, fifth, sample, 1, 30.0, judge_sample=0.2)
    assert 50 <= len(fifth.taught) <= 110
    result = judged_world(world, 400, 1, 30.0, samples=(0.0, 1.0))
    never, always = result["points"]
    assert never["judge_cost_share"] == 0.0 and 0.0 < always["judge_cost_share"] < 1.0
    assert result["truth_visible"]["vs_oracle_reward"] > 0
