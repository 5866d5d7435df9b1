"""Routing knowledge across goals: what a goal new to the platform gains from what other
goals learned, and what one goal that lies costs the others.

The router keeps a policy per goal (services/router/policy.py, ``GoalPolicies``): one
goal's outcomes never move another's routing until several goals agree
(``ORCH_ROUTER_PROMOTE_GOALS``). This measures that rule offline, the policies alone as in
``bench.learning --offline``. On each world, ``--goals`` goals learn ``--requests``
requests each (their own draws of the world's traffic, taken in turns); then a new goal
learns ``--new`` requests. The table gives the new goal's mean reward over its first 100
requests and over all of them, as a share of the oracle's on the same requests, for:

- ``alone``: each goal learns only from its own outcomes (``ORCH_ROUTER_PROMOTE_GOALS=0``);
- ``promoted``: the default rule (3 goals);
- ``promoted, 1 liar``: as promoted, and goal 0 scores every answer 1 - its quality;
- ``shared, 1 liar``: one policy learning from every goal (the router before 2026-12-05),
  goal 0 lying as above.

A second table gives what asking costs the router's ``choose``: 20 goals learn 600
requests each of mixed-bag, then ``choose`` is timed for a new goal and for one of them,
with promotion off (the baseline) and on, on a world request and on one of 64 words.

    python -m bench.goals [--goals 3] [--requests 600] [--new 300] [--random 501 502]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._console import console as bench_console  # noqa: E402
from local.world import World  # noqa: E402
from services.router.policy import Features, GoalPolicies, LearnedPolicy, features_of  # noqa: E402
from streams.config import ROOT  # noqa: E402

MODES = ("alone", "promoted", "promoted, 1 liar", "shared, 1 liar")
_FIRST = 100


def run(world: World, mode: str, goals: int, requests: int, new: int, seed: int) -> list[float]:
    """The new goal's rewards, request by request (the oracle's: :func:`oracle`)."""
    template = LearnedPolicy(rng=random.Random(seed))
    choose: Callable[[str, Features, list[str]], str]
    update: Callable[[str, Features, str, float], None]
    if mode.startswith("shared"):

        def choose(goal: str, features: Features, arms: list[str]) -> str:
            return template.choose(features, arms).specialty

        def update(goal: str, features: Features, arm: str, reward: float) -> None:
            template.update(features, arm, reward)

    else:
        policies = GoalPolicies(
            template,
            max_goals=10_000,
            max_word_stats=200_000,
            promote_goals=0 if mode == "alone" else 3,
        )

        def choose(goal: str, features: Features, arms: list[str]) -> str:
            return policies.choose(goal, features, arms).specialty

        def update(goal: str, features: Features, arm: str, reward: float) -> None:
            policies.update(goal, features, arm, reward)

    arms = list(world.specialties)
    liar = "g0" if "liar" in mode else None
    streams = [world.sample_requests(requests, seed * 1000 + k) for k in range(goals)]
    for i in range(requests):
        for k, stream in enumerate(streams):
            goal, message = f"g{k}", stream[i].message
            features = features_of(message)
            arm = choose(goal, features, arms)
            judged = world.quality_of(message, arm, seed)
            quality = judged[1] if judged else 0.0
            update(goal, features, arm, 1.0 - quality if goal == liar else quality)
    rewards = []
    for request in world.sample_requests(new, seed * 1000 + 999):
        features = features_of(request.message)
        arm = choose("new", features, arms)
        judged = world.quality_of(request.message, arm, seed)
        rewards.append(judged[1] if judged else 0.0)
        update("new", features, arm, rewards[-1])
    return rewards


def oracle(world: World, new: int, seed: int) -> list[float]:
    return [world.oracle_quality(r, seed) for r in world.sample_requests(new, seed * 1000 + 999)]


def choose_cost(world: World, promote: int) -> dict[tuple[str, str], float]:
    """Microseconds per ``choose``: (request, goal) -> time, after 20 goals learned."""
    arms = list(world.specialties)
    policies = GoalPolicies(
        LearnedPolicy(rng=random.Random(1)),
        max_goals=10_000,
        max_word_stats=200_000,
        promote_goals=promote,
    )
    for k in range(20):
        for request in world.sample_requests(600, k):
            features = features_of(request.message)
            arm = policies.choose(f"g{k}", features, arms).specialty
            judged = world.quality_of(request.message, arm, 1)
            policies.update(f"g{k}", features, arm, judged[1] if judged else 0.0)
    messages = [r.message for r in world.sample_requests(200, 99)]
    asks = {
        "a world request": [features_of(m) for m in messages],
        "64 words": [features_of(" ".join(messages[:40]))] * 200,
    }
    out = {}
    for label, features in asks.items():
        for goal, who in (("new", "new goal"), ("g0", "goal of 600 outcomes")):
            started = time.perf_counter()
            for _ in range(5):
                for f in features:
                    policies.choose(goal, f, arms)
            out[(label, who)] = (time.perf_counter() - started) / (5 * len(features)) * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goals", type=int, default=3, help="goals learning before the new one")
    parser.add_argument("--requests", type=int, default=600, help="requests of each of them")
    parser.add_argument("--new", type=int, default=300, help="requests of the new goal")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--random", type=int, nargs="*", default=[501, 502, 503])
    args = parser.parse_args(argv)
    files = sorted((ROOT / "bench" / "worlds").glob("*.json"))
    worlds = [World.load(p) for p in files if "two-models" not in Path(p).name]
    worlds += [World.random(s) for s in args.random]
    console = bench_console(stderr=True)
    table = Table(
        title=(
            f"a new goal after {args.goals} goals learned {args.requests} requests each: its"
            f" reward / the oracle's, first {_FIRST} and all {args.new} of its requests,"
            f" mean of seeds {' '.join(map(str, args.seeds))}"
        )
    )
    table.add_column("world")
    for mode in MODES:
        table.add_column(mode, justify="right")
    for world in worlds:
        cells = []
        for mode in MODES:
            first, whole = [], []
            for seed in args.seeds:
                best = oracle(world, args.new, seed)
                got = run(world, mode, args.goals, args.requests, args.new, seed)
                first.append(statistics.fmean(got[:_FIRST]) / statistics.fmean(best[:_FIRST]))
                whole.append(statistics.fmean(got) / statistics.fmean(best))
            cells.append(f"{statistics.fmean(first):.0%} / {statistics.fmean(whole):.0%}")
        table.add_row(world.name, *cells)
        console.print(
            f"{world.name}: " + "; ".join(f"{m} {c}" for m, c in zip(MODES, cells, strict=True))
        )
    console.print(table)
    mixed = World.load(ROOT / "bench" / "worlds" / "mixed-bag.json")
    off, on = choose_cost(mixed, 0), choose_cost(mixed, 3)
    cost = Table(title="router choose, µs (mixed-bag, 20 goals of 600 outcomes, six arms)")
    for column in ("request", "goal", "promotion off", "promotion on (3)"):
        cost.add_column(column, justify="right" if "promotion" in column else "left")
    for label, who in off:
        cost.add_row(label, who, f"{off[(label, who)]:,.0f}", f"{on[(label, who)]:,.0f}")
    console.print(cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
