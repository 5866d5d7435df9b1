"""The quality-per-dollar benchmark's numbers, on a small two-model world."""

from __future__ import annotations

import random

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

    def update(self, features, arm, reward, cost=0.0, *, detect=True):
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
    result = judged_world(world, 400, 1, 30.0, samples=(0.0, 1.0), rules=("uniform",))
    never, always = result["points"]
    assert never["judge_cost_share"] == 0.0 and 0.0 < always["judge_cost_share"] < 1.0
    assert result["truth_visible"]["vs_oracle_reward"] > 0


class _Habit:
    """A policy that picks the first arm, and the second on every tenth request."""

    def __init__(self) -> None:
        self.calls = 0

    def choose(self, features, arms, cost_weight=0.0):
        from services.router.policy import Choice

        self.calls += 1
        pick = arms[1] if self.calls % 10 == 0 else arms[0]
        return Choice(pick, 1.0, {})

    def update(self, features, arm, reward, cost=0.0, *, detect=True):
        return None


def test_the_uncertain_judge_keeps_to_its_share_and_grades_little_known_arms_more() -> None:
    from dataclasses import replace

    from bench.priced import JudgeSampler, simulate_priced
    from services.router.policy import features_of

    world = replace(World.random(201, models=2), feedback_probability=0.0)
    sample = world.sample_requests(600, seed=1)
    for share in (0.05, 0.2):
        run = simulate_priced(world, _Habit(), sample, 1, 30.0, judge_sample=share)
        judged = 0
        for i, j in enumerate(run.judged):
            judged += j
            # Never more than the share of the answers so far, at any point of the run ...
            assert judged <= share * (i + 1) + 1e-9
        # ... and the budget is used: within 0.02 under the share over the run.
        assert share - 0.02 <= judged / len(sample) <= share
        # The arm answering one request in ten is graded more often than the habit.
        rare = [j for i, j in enumerate(run.judged) if (i + 1) % 10 == 0]
        usual = [j for i, j in enumerate(run.judged) if (i + 1) % 10]
        assert sum(rare) / len(rare) > 1.5 * sum(usual) / len(usual)
    # The rule itself: a well-known arm weighs less than an unknown one and an exploration
    # more than the greedy pick; judged in turn, the unknown arm is judged more than twice
    # as often, the known one still at times (the floor), within the share overall.
    sampler = JudgeSampler(0.2, "uncertain")
    features = features_of("How do I reset my router password")
    for _ in range(50):
        sampler.learned(features, "known@large")
    assert sampler.outcomes(features, "known@large") == 50.0
    assert sampler.outcomes(features, "new@large") == 0.0
    assert sampler.weight(features, "new@large") > sampler.weight(features, "known@large")
    assert sampler.weight(features, "known@large", explored=True) > sampler.weight(
        features, "known@large"
    )
    draws = random.Random(7)
    judged = {"new@large": 0, "known@large": 0}
    for i in range(1000):
        arm = "new@large" if i % 2 else "known@large"
        judged[arm] += sampler.decide(features, arm, draws.random())
    assert sampler.judged == sum(judged.values()) and 190 <= sampler.judged <= 200
    assert judged["new@large"] > 2 * judged["known@large"] > 0
    # The uniform rule is the draw at the share, as before.
    assert JudgeSampler(0.2, "uniform").probability(features, "new@large") == 0.2


def test_the_judge_sampler_reads_what_the_router_reads_from_a_learned_policy() -> None:
    """The router aims its judge with the policy's ``known``: a sampler given the policy
    reads the same count, which moves with what the policy forgets or finds stale."""
    from bench.priced import JudgeSampler
    from services.router.policy import LearnedPolicy, features_of

    policy = LearnedPolicy(rng=random.Random(1), half_life=10.0)
    sampler = JudgeSampler(0.2, "uncertain", policy=policy)
    features = features_of("How do I reset my router password")
    for _ in range(30):
        policy.update(features, "known@large", 0.8)
    assert sampler.outcomes(features, "known@large") == policy.known(features, "known@large")
    # Forgotten at the half-life: far fewer than the 30 outcomes a counter would report.
    assert 0.0 < sampler.outcomes(features, "known@large") < 20.0
    assert sampler.outcomes(features, "new@large") == 0.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--judge-sample", "-0.1"], "'-0.1' is not a share between 0 and 1"),
        (["--judge-sample", "0.2,1.5"], "'1.5' is not a share between 0 and 1"),
        (["--judge-sample", "nan"], "'nan' is not a share between 0 and 1"),
        (["--judge-sample", "lots"], "'lots' is not a number"),
        (["--judge-rule", "busiest"], "'busiest' is not a judge rule (one of uncertain, uniform)"),
        (["--judge-rule", "uniform,uniform"], "a rule named twice"),
    ],
)
def test_the_judge_flags_refuse_bad_values_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--hide-truth", *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
