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
