"""Learning benchmark: learned vs static routing vs the oracle, on shipped and unseen worlds.

    python bench/learning.py                      # the whole platform, 2,000 requests a world
    python bench/learning.py --offline            # the routing policy alone, no Kafka (seconds)
    python bench/learning.py --worlds bench/worlds/support-desk.json --random 0 --requests 400

Target (issue 5): after 2,000 requests the learned router's mean reward over the last
500 is at least 90% of the oracle's on every world, shipped or unseen.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from local.world import World
from services.cli.bench_learning import default_runs, print_report, run_learning
from services.router.policy import LearnedPolicy, Policy, StaticPolicy, features_of
from streams.signatures import signature_of

__all__ = ["simulate", "simulate_world"]

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.90
# Seeds of the unseen worlds: nothing in the router was tuned on them.
RANDOM_SEEDS = (101, 102)


def simulate(world: World, policy: Policy, requests: int, seed: int) -> tuple[list[float], float]:
    """Rewards of a policy that learns from every answer at once, with no platform; and the
    share of completion tokens a response cache consulted *after* the policy's choice would
    save (an identical message answered before by the chosen specialty, whose signature has
    the improvement service's default pattern: 3 runs, mean quality >= 0.6)."""
    arms = list(world.specialties)
    rewards = []
    answered: set[tuple[str, str]] = set()
    runs: dict[str, list[float]] = defaultdict(list)
    tokens = saved = 0
    for request in world.sample_requests(requests, seed):
        features = features_of(request.message)
        arm = policy.choose(features, arms).specialty
        judged = world.quality_of(request.message, arm, seed)
        reward = judged[1] if judged else 0.0
        policy.update(features, arm, reward)
        rewards.append(reward)
        signature = signature_of(request.message, arm)
        past = runs[signature]
        tokens += world.cost[arm]
        if (request.message, arm) in answered and len(past) >= 3 and statistics.fmean(past) >= 0.6:
            saved += world.cost[arm]
        answered.add((request.message, arm))
        past.append(reward)
    return rewards, saved / tokens if tokens else 0.0


def simulate_world(world: World, requests: int, seed: int, **policy_args: Any) -> dict[str, Any]:
    """Offline counterpart of ``run_learning``'s result: final means over the last quarter."""
    final = min(500, max(1, requests // 4))
    oracle = [world.oracle_quality(r, seed) for r in world.sample_requests(requests, seed)]
    policy = LearnedPolicy(rng=random.Random(seed), **policy_args)
    learned, cache_saving = simulate(world, policy, requests, seed)
    static, _ = simulate(world, StaticPolicy(), requests, seed)
    best = statistics.fmean(oracle[-final:])
    runs = {
        name: {"final": statistics.fmean(values[-final:])}
        for name, values in (("learned", learned), ("static", static))
    }
    for stats in runs.values():
        stats["vs_oracle"] = stats["final"] / best
    return {
        "world": world.name,
        "oracle": {"final": best},
        "runs": runs,
        "automations": {"cache_after_policy_token_saving": cache_saving},
    }


def _worlds(paths: list[str], random_seeds: list[int]) -> list[World]:
    files = paths or sorted(str(p) for p in (ROOT / "bench" / "worlds").glob("*.json"))
    return [World.load(p) for p in files] + [World.random(s) for s in random_seeds]


def _table(results: list[dict[str, Any]], requests: int, offline: bool) -> Table:
    final = min(500, max(1, requests // 4))
    how = "policy alone, offline" if offline else "whole platform"
    table = Table(title=f"learning: mean reward over the last {final} of {requests} ({how})")
    for column in ("world", "learned", "static", "oracle", "learned/oracle", "static/oracle"):
        table.add_column(column, justify="left" if column == "world" else "right")
    if offline:
        table.add_column("cache after policy saves", justify="right")
    else:
        table.add_column("$/1k req", justify="right")
        table.add_column("$/1k w/o autom.", justify="right")
        table.add_column("saved", justify="right")
    table.add_column("target", justify="center")
    for r in results:
        learned, static = r["runs"]["learned"], r["runs"]["static"]
        row = [
            r["world"],
            f"{learned['final']:.3f}",
            f"{static['final']:.3f}",
            f"{r['oracle']['final']:.3f}",
            f"{learned['vs_oracle'] * 100:.1f}%",
            f"{static['vs_oracle'] * 100:.1f}%",
        ]
        if offline:
            row.append(f"{r['automations']['cache_after_policy_token_saving'] * 100:.1f}%")
        else:
            effect = r.get("automations") or {}
            cost = effect.get("cost_per_request_usd", {})
            row += [
                f"{learned['cost_per_request_usd'] * 1000:.4f}",
                f"{cost['without'] * 1000:.4f}" if cost else "not run",
                f"{effect['cost_saving'] * 100:.1f}%" if effect else "-",
            ]
        row.append("met" if learned["vs_oracle"] >= TARGET else "MISSED")
        table.add_row(*row)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--worlds", nargs="*", default=[], help="world files (default: shipped)")
    parser.add_argument(
        "--random", type=int, nargs="*", default=list(RANDOM_SEEDS), help="seeds of unseen worlds"
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--offline", action="store_true", help="the policy alone, no platform")
    parser.add_argument("--no-automation-baseline", action="store_true")
    parser.add_argument("--json", action="store_true", help="machine-readable results only")
    parser.add_argument("--save", type=Path, help="also write the full results as JSON here")
    args = parser.parse_args(argv)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    console = Console(stderr=args.json)
    results = []
    for world in _worlds(args.worlds, args.random):
        if args.offline:
            result = simulate_world(world, args.requests, args.seed)
        else:
            result = run_learning(
                world,
                args.requests,
                args.seed,
                runs=default_runs(not args.no_automation_baseline),
                concurrency=args.concurrency,
                progress=not args.json,
            )
            if not args.json:
                print_report(result, console)
        results.append(result)
    if args.save:
        args.save.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        console.print(_table(results, args.requests, args.offline))
    return 0 if all(r["runs"]["learned"]["vs_oracle"] >= TARGET for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
