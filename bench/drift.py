"""Drift: how fast the routing policy follows a world whose quality matrix changes.

    python -m bench.drift                       # research-lab-drift + 3 random drift worlds
    python -m bench.drift --half-lives 0 300 600 --requests 3000

A world's ``drift`` entries (docs/worlds.md) change which specialty is best for a type
after N requests. The policy (the router's own) forgets with a half-life counted in
updates (``ORCH_ROUTER_HALF_LIFE``; 0 never forgets). For each half-life, on the same
requests, it prints:

- after each drift point, the requests until the policy's reward, in a sliding window of
  100, is back to 90% of the oracle's in the same window (the oracle knows the new matrix
  at once): "never" when it is not within the run;
- the mean reward over the last 500 requests against the oracle's (what forgetting costs
  where nothing changes: the shipped worlds without drift are measured the same way).

The policy alone, no Kafka, like ``bench/learning.py --offline``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from local.world import World
from services.router.policy import LearnedPolicy, features_of
from streams.config import ROOT

__all__ = ["changed_types", "main", "recovery", "recoveries", "simulate_drift"]

RANDOM_SEEDS = (301, 302, 303)
HALF_LIVES = (0.0, 250.0)
CHANGES = (8.0, 12.0)
WINDOW = 100
TARGET_AFTER = 400  # requests to get back to 90% of the new oracle (issue 12)


def simulate_drift(
    world: World, requests: int, seed: int, half_life: float, change: float = 0.0
) -> tuple[list[float], list[float], list[str]]:
    """Per request: the policy's reward and the oracle's, each in the phase the request
    falls in, and the request's type. ``change``: the policy's change threshold."""
    policy = LearnedPolicy(rng=random.Random(seed), half_life=half_life, change_threshold=change)
    arms = list(world.specialties)
    got, best, kinds = [], [], []
    for i, request in enumerate(world.sample_requests(requests, seed)):
        features = features_of(request.message)
        arm = policy.choose(features, arms).specialty
        judged = world.quality_of(request.message, arm, seed, request_index=i)
        reward = judged[1] if judged else 0.0
        policy.update(features, arm, reward)
        got.append(reward)
        best.append(world.oracle_quality(request, seed, request_index=i))
        kinds.append(request.request_type)
    return got, best, kinds


def recovery(
    got: list[float],
    best: list[float],
    start: int,
    share: float = 0.9,
    only: list[bool] | None = None,
) -> int | None:
    """Requests after ``start`` until the policy's mean over the last ``WINDOW`` requests
    (all of them after ``start``; of them, those ``only`` marks) is at least ``share`` of
    the oracle's on the same requests; None if never."""
    picked = [i for i in range(start, len(got)) if only is None or only[i]]
    size = WINDOW if only is None else WINDOW // 4
    for k in range(size, len(picked) + 1):
        window = picked[k - size : k]
        mine = statistics.fmean(got[i] for i in window)
        oracle = statistics.fmean(best[i] for i in window)
        if oracle > 0 and mine >= share * oracle:
            return window[-1] + 1 - start
    return None


def changed_types(world: World, index: int) -> set[str]:
    """Types whose best specialty at request ``index`` differs from the one just before."""
    return {
        t.name
        for t in world.request_types
        if world.best_specialty(t.name, request_index=index)
        != world.best_specialty(t.name, request_index=max(0, index - 1))
    }


def _label(half_life: float, change: float) -> str:
    if change:
        return f"change {change:g}"
    return f"half-life {half_life:g}" if half_life else "never forgets"


def recoveries(
    world: World, got: list[float], best: list[float], kinds: list[str]
) -> dict[str, list[int | None]]:
    """For each drift point within the requests: :func:`recovery` over all of them, and
    over the requests of the types whose best specialty changed there (None: none did)."""
    points = [d.after for d in world.drift if d.after < len(got)]
    changed = {at: changed_types(world, at) for at in points}
    return {
        "recovery": [recovery(got, best, at) for at in points],
        "recovery_changed_types": [
            recovery(got, best, at, only=[k in changed[at] for k in kinds]) if changed[at] else None
            for at in points
        ],
    }


def measure(
    world: World,
    requests: int,
    seed: int,
    half_lives: tuple[float, ...],
    changes: tuple[float, ...] = (),
) -> dict[str, Any]:
    final = min(500, max(1, requests // 4))
    rows = {}
    configs = [(h, 0.0) for h in half_lives] + [(0.0, c) for c in changes]
    for half_life, change in configs:
        got, best, kinds = simulate_drift(world, requests, seed, half_life, change)
        rows[_label(half_life, change)] = {
            **recoveries(world, got, best, kinds),
            "final_vs_oracle": round(
                statistics.fmean(got[-final:]) / statistics.fmean(best[-final:]), 4
            ),
        }
    return {
        "world": world.name,
        "requests": requests,
        "drift_at": [d.after for d in world.drift],
        "policies": rows,
    }


def _table(results: list[dict[str, Any]]) -> Table:
    table = Table(
        title=f"drift: requests back to 90% of the new oracle, all / the changed types"
        f" (windows of {WINDOW} / {WINDOW // 4}); last 500 vs the oracle"
    )
    table.add_column("world")
    table.add_column("drift at", justify="right")
    labels = list(results[0]["policies"]) if results else []
    for label in labels:
        table.add_column(label, justify="right")
    for r in results:
        cells = []
        for label in labels:
            row = r["policies"][label]
            back = ", ".join(
                f"{'never' if a is None else a}/{'never' if b is None else b}"
                for a, b in zip(row["recovery"], row["recovery_changed_types"], strict=True)
            )
            cells.append(f"{back or '-'} | {row['final_vs_oracle'] * 100:.1f}%")
        table.add_row(r["world"], ", ".join(map(str, r["drift_at"])) or "-", *cells)
    return table


def _worlds(paths: list[str], seeds: list[int], with_static: bool) -> list[World]:
    files = paths or sorted(str(p) for p in (ROOT / "bench" / "worlds").glob("*.json"))
    worlds = [World.load(p) for p in files]
    chosen = [w for w in worlds if w.drift or (with_static and not w.models)]
    return chosen + [World.random(s, drift=True) for s in seeds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--half-lives", type=float, nargs="*", default=list(HALF_LIVES))
    parser.add_argument(
        "--changes",
        type=float,
        nargs="*",
        default=list(CHANGES),
        help="change thresholds of the policy's change detector (ORCH_ROUTER_CHANGE_THRESHOLD)",
    )
    parser.add_argument("--worlds", nargs="*", default=[], help="world files (default: shipped)")
    parser.add_argument("--random", type=int, nargs="*", default=list(RANDOM_SEEDS))
    parser.add_argument("--no-static", action="store_true", help="skip worlds without drift")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    half_lives = tuple(args.half_lives)
    changes = tuple(args.changes)
    if any(not h >= 0 for h in half_lives):
        parser.error("--half-lives must be >= 0")
    if any(not c > 0 for c in changes):
        parser.error("--changes must be > 0")
    results = [
        measure(w, args.requests, args.seed, half_lives, changes)
        for w in _worlds(args.worlds, args.random, not args.no_static)
    ]
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        Console(width=240).print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
