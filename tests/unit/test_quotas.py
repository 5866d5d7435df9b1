"""Per-goal tables: one goal's entries push out only its own; past the total, the largest goal's."""

from __future__ import annotations

import random

import pytest

from streams.quotas import PerGoal


def test_a_goals_flood_pushes_out_only_its_own_entries():
    table: PerGoal[str, int] = PerGoal(per_goal=10, total=100)
    table.put("victim", "v", 1)
    pushed = [table.put("attacker", f"a{i}", i) for i in range(1_000)]
    assert table.get("victim", "v") == 1
    assert table.count_of("attacker") == 10 and len(table) == 11
    assert all(goal == "attacker" for out in pushed for goal, _, _ in out)
    assert table.keys_of("attacker") == [f"a{i}" for i in range(990, 1_000)]  # newest kept


def test_past_the_total_the_goal_holding_the_most_loses_its_oldest():
    table: PerGoal[str, None] = PerGoal(per_goal=50, total=60)
    for goal, n in (("small", 5), ("mid", 20)):
        for i in range(n):
            table.put(goal, f"{goal}{i}", None)
    for i in range(50):
        table.put("big", f"big{i}", None)
    assert len(table) == 60
    assert (table.count_of("small"), table.count_of("mid"), table.count_of("big")) == (5, 20, 35)
    assert table.keys_of("big")[0] == "big15"  # its oldest went first


def test_weights_bound_the_bytes_and_an_entry_over_a_cap_is_not_kept():
    table: PerGoal[str, str] = PerGoal(per_goal=100, total=100, total_weight=1_000)
    assert table.put("g", "huge", "x", weight=1_001) == [("g", "huge", "x")]
    assert len(table) == 0 and table.weight == 0
    table.put("victim", "v", "v", weight=100)
    for i in range(50):
        table.put("attacker", f"a{i}", "a", weight=100)
    assert table.weight <= 1_000 and table.get("victim", "v") == "v"
    assert table.count_of("attacker") == 9


@pytest.mark.parametrize("seed", range(5))
def test_it_keeps_what_a_plain_model_of_the_rules_keeps(seed: int):
    rng = random.Random(seed)
    table: PerGoal[int, int] = PerGoal(per_goal=8, total=20, per_goal_weight=40, total_weight=70)
    model: dict[str, list[tuple[int, int]]] = {}  # goal -> [(key, weight)] oldest first

    def largest(by_weight: bool, put_for: str) -> str:
        # The most; of a tie, the least name but the goal just put for.
        size = {g: sum(w for _, w in e) if by_weight else len(e) for g, e in model.items() if e}
        return min(size, key=lambda g: (-size[g], g == put_for, g))

    for step in range(3_000):
        goal, key, weight = f"g{rng.randrange(6)}", rng.randrange(15), rng.randrange(1, 12)
        if rng.random() < 0.2:
            table.pop(goal, key)
            model[goal] = [(k, w) for k, w in model.get(goal, []) if k != key]
            continue
        table.put(goal, key, step, weight)
        entries = [(k, w) for k, w in model.get(goal, []) if k != key] + [(key, weight)]
        model[goal] = entries
        while len(entries) > 8 or sum(w for _, w in entries) > 40:
            entries.pop(0)
        while sum(len(e) for e in model.values()) > 20:
            model[largest(False, goal)].pop(0)
        while sum(w for e in model.values() for _, w in e) > 70:
            model[largest(True, goal)].pop(0)
        for g in [f"g{i}" for i in range(6)]:
            assert table.keys_of(g) == [k for k, _ in model.get(g, [])], (step, g)
        assert table.weight == sum(w for e in model.values() for _, w in e)


def test_a_full_table_of_goals_holding_one_each_keeps_the_entry_just_put():
    # A tie for the most went to the least name, which could be the goal just put for:
    # its one new entry was pushed out at once, and a new goal could never get in.
    table: PerGoal[str, str] = PerGoal(per_goal=5, total=2)
    table.put("b", "k1", "b")
    table.put("c", "k2", "c")
    out = table.put("a", "k3", "a")
    assert out == [("b", "k1", "b")]
    assert table.get("a", "k3") == "a" and table.get("c", "k2") == "c"
