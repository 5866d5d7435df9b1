"""The drift benchmark's measure: requests until the policy is back near the new oracle."""

from __future__ import annotations

from bench.drift import WINDOW, measure, recovery
from local.world import World


def test_recovery_counts_requests_after_the_change_until_the_window_is_back() -> None:
    n = 600
    best = [1.0] * n
    got = [1.0] * 200 + [0.5] * 150 + [1.0] * 250  # changed at 200, back from 350 on
    back = recovery(got, best, 200)
    assert back is not None and 150 + WINDOW * 0.5 <= back <= 150 + WINDOW
    assert recovery([0.5] * n, best, 200) is None
    # Only the marked requests count (the types whose best choice changed).
    marked = [i % 2 == 0 for i in range(n)]
    mixed = [1.0 if (i % 2 or i >= 300) else 0.5 for i in range(n)]
    assert recovery(mixed, best, 200, only=marked) is not None
    assert recovery(mixed, best, 200) is not None


def test_a_drift_world_is_measured_at_each_half_life_and_change_threshold() -> None:
    world = World.random(301, drift=True)
    result = measure(world, 1500, seed=1, half_lives=(0.0, 250.0), changes=(12.0,))
    assert result["drift_at"] == [d.after for d in world.drift]
    assert list(result["policies"]) == ["never forgets", "half-life 250", "change 12"]
    for row in result["policies"].values():
        assert len(row["recovery"]) == len(row["recovery_changed_types"]) == 1
        assert 0.5 < row["final_vs_oracle"] < 1.2
