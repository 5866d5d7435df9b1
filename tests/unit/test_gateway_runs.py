"""The gateway's run index: one key's flood of runs never makes another goal's feedback 404."""

from __future__ import annotations

from datetime import timedelta

from services.gateway.runs import RunIndex
from streams.kafka import KafkaSettings


def _index(**caps: int) -> RunIndex:
    return RunIndex(KafkaSettings.from_env(), lookback=timedelta(hours=1), **caps)


async def test_one_goals_flood_of_runs_never_evicts_another_goals_run():
    index = _index()  # the defaults: 200,000 runs, 50,000 of one goal
    index.note("victim-run", "victim")
    for i in range(index.capacity):
        index.note(f"attacker-run-{i}", "attacker")
    # What /v1/feedback asks: the victim's run is still its goal's.
    assert await index.lookup("victim-run", wait=0) == "victim"
    assert index.goal_of(f"attacker-run-{index.capacity - 1}") == "attacker"
    assert index.goal_of("attacker-run-0") is None  # the attacker's own oldest went


def test_past_capacity_the_goal_holding_the_most_loses_its_oldest():
    index = _index(capacity=100, per_goal=60)
    for i in range(30):
        index.note(f"a{i}", "a")
    for i in range(60):
        index.note(f"b{i}", "b")
    for i in range(20):
        index.note(f"c{i}", "c")
    assert all(index.goal_of(f"a{i}") == "a" for i in range(30))
    assert all(index.goal_of(f"c{i}") == "c" for i in range(20))
    assert [index.goal_of(f"b{i}") for i in (9, 10)] == [None, "b"]  # b held the most


def test_a_run_noted_again_is_its_goals_newest_and_kept_once():
    index = _index(capacity=10, per_goal=3)
    for run in ("r1", "r2", "r3", "r1", "r4"):
        index.note(run, "g")
    assert [index.goal_of(r) for r in ("r1", "r2", "r3", "r4")] == ["g", None, "g", "g"]
    index.note("r4", "other")  # a terminal event naming another goal: the latest word counts
    assert index.goal_of("r4") == "other"
    for i in range(3):
        index.note(f"x{i}", "g")
    assert index.goal_of("r4") == "other" and index.goal_of("r1") is None
