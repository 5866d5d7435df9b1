"""The drift benchmark's measure: requests until the policy is back near the new oracle."""

from __future__ import annotations

import dataclasses

from bench.drift import WINDOW, measure, recovery, summarise
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


def test_with_the_truth_hidden_the_policy_learns_only_from_the_judge_and_feedback() -> None:
    """``--hide-truth``: no judge and no feedback teach nothing, so the policy stays where
    a policy shown every answer's quality does not; a judge on every answer teaches."""
    world = dataclasses.replace(World.random(301, drift=True), feedback_probability=0.0)
    seen = measure(world, 1200, seed=1, half_lives=(), changes=(12.0,))
    blind = measure(world, 1200, seed=1, half_lives=(), changes=(12.0,), judge_sample=0.0)
    judged = measure(world, 1200, seed=1, half_lives=(), changes=(12.0,), judge_sample=1.0)
    assert seen["judge_sample"] is None and judged["judge_sample"] == 1.0
    assert judged["judge_rule"] == "uncertain"
    final = {
        name: r["policies"]["change 12"]["final_vs_oracle"]
        for name, r in (("seen", seen), ("blind", blind), ("judged", judged))
    }
    assert final["blind"] < final["seen"] - 0.1
    assert final["judged"] > final["blind"] + 0.1


def test_the_summary_counts_drift_points_back_within_the_target() -> None:
    def run(backs: list[int | None]) -> dict[str, object]:
        return {"policies": {"change 12": {"recovery_changed_types": backs}}}

    summary = summarise([run([120, None]), run([400]), run([401, 900])])
    assert summary == {"change 12": {"points": 5, "within_target": 2, "median": 401}}
    # "never" ranks last: a median among the runs that never came back says so.
    assert summarise([run([None, None, 50])])["change 12"]["median"] == "never"
