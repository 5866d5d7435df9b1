"""Drift: how fast the routing policy follows a world whose quality matrix changes.

    python -m bench.drift                       # research-lab-drift + 3 random drift worlds
    python -m bench.drift --half-lives 0 300 600 --requests 3000
    python -m bench.drift --hide-truth --judge-sample 0.2   # a sampled judge and feedback

A world's ``drift`` entries (docs/worlds.md) change which specialty is best for a type
after N requests. The policy (the router's own) forgets with a half-life counted in
updates (``ORCH_ROUTER_HALF_LIFE``; 0 never forgets). For each half-life, on the same
requests, it prints:

- after each drift point, the requests until the policy's reward, in a sliding window of
  100, is back to 90% of the oracle's in the same window (the oracle knows the new matrix
  at once): "never" when it is not within the run;
- the mean reward over the last 500 requests against the oracle's (what forgetting costs
  where nothing changes: the shipped worlds without drift are measured the same way).

With ``--hide-truth`` the policy never sees the world's quality: it learns from the
world's judge on a share of the answers (``--judge-sample``, chosen by the router's rule,
``--judge-rule``) and from the users' feedback at the world's rate, as ``bench.priced
--hide-truth`` does; the recovery is still measured on the true quality.

The policy alone, no Kafka, like ``bench/learning.py --offline``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._console import console as bench_console  # noqa: E402
from bench.priced import DEFAULT_JUDGE_RULE, JUDGE_RULES, simulate_priced  # noqa: E402
from local.world import World  # noqa: E402
from services.router.policy import LearnedPolicy, features_of  # noqa: E402
from streams.config import ROOT  # noqa: E402

__all__ = ["changed_types", "main", "recovery", "recoveries", "simulate_drift", "summarise"]

RANDOM_SEEDS = (301, 302, 303)
HALF_LIVES = (0.0, 250.0)
CHANGES = (8.0, 12.0)
WINDOW = 100
TARGET_AFTER = 400  # requests to get back to 90% of the new oracle (issue 12)


def simulate_drift(
    world: World,
    requests: int,
    seed: int,
    half_life: float,
    change: float = 0.0,
    *,
    judge_sample: float | None = None,
    judge_rule: str = DEFAULT_JUDGE_RULE,
) -> tuple[list[float], list[float], list[str]]:
    """Per request: the policy's reward and the oracle's, each in the phase the request
    falls in, and the request's type. ``change``: the policy's change threshold.
    ``judge_sample``: the truth hidden, the policy taught by a judge on that share of the
    answers and by the users' feedback (the reward is still the true quality)."""
    policy = LearnedPolicy(rng=random.Random(seed), half_life=half_life, change_threshold=change)
    sample = world.sample_requests(requests, seed)
    if judge_sample is not None:
        run = simulate_priced(
            world, policy, sample, seed, 0.0, judge_sample=judge_sample, judge_rule=judge_rule
        )
        best = [world.oracle_quality(r, seed, request_index=i) for i, r in enumerate(sample)]
        return run.quality, best, [r.request_type for r in sample]
    arms = list(world.specialties)
    got, best, kinds = [], [], []
    for i, request in enumerate(sample):
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
    *,
    judge_sample: float | None = None,
    judge_rule: str = DEFAULT_JUDGE_RULE,
) -> dict[str, Any]:
    final = min(500, max(1, requests // 4))
    rows = {}
    configs = [(h, 0.0) for h in half_lives] + [(0.0, c) for c in changes]
    for half_life, change in configs:
        got, best, kinds = simulate_drift(
            world,
            requests,
            seed,
            half_life,
            change,
            judge_sample=judge_sample,
            judge_rule=judge_rule,
        )
        rows[_label(half_life, change)] = {
            **recoveries(world, got, best, kinds),
            "final_vs_oracle": round(
                statistics.fmean(got[-final:]) / statistics.fmean(best[-final:]), 4
            ),
        }
    return {
        "world": world.name,
        "seed": seed,
        "requests": requests,
        "drift_at": [d.after for d in world.drift],
        "judge_sample": judge_sample,
        "judge_rule": judge_rule if judge_sample is not None else None,
        "policies": rows,
    }


def _table(results: list[dict[str, Any]]) -> Table:
    share = results[0]["judge_sample"] if results else None
    hidden = (
        ""
        if share is None
        else f"; truth hidden: judge on {share * 100:g}% ({results[0]['judge_rule']}) + feedback"
    )
    table = Table(
        title=f"drift: requests back to 90% of the new oracle, all / the changed types"
        f" (windows of {WINDOW} / {WINDOW // 4}); last 500 vs the oracle{hidden}"
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
        name = (
            r["world"] if len({x["seed"] for x in results}) == 1 else f"{r['world']} s{r['seed']}"
        )
        table.add_row(name, ", ".join(map(str, r["drift_at"])) or "-", *cells)
    summary = summarise(results)
    if any(v["points"] for v in summary.values()):
        table.add_section()
        table.add_row(
            f"changed types back within {TARGET_AFTER}",
            "",
            *(
                f"{v['within_target']} of {v['points']} (median {v['median']})"
                for v in summary.values()
            ),
        )
    return table


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy, over every world and seed: the drift points whose changed types were
    back within ``TARGET_AFTER`` requests, of how many, and the median requests it took
    ("never" counting as the longest)."""
    out: dict[str, dict[str, Any]] = {}
    for label in results[0]["policies"] if results else []:
        backs = [b for r in results for b in r["policies"][label]["recovery_changed_types"]]
        known = [b for b in backs if b is not None]
        ranked = sorted(known) + [None] * (len(backs) - len(known))
        middle = ranked[len(ranked) // 2] if ranked else None
        out[label] = {
            "points": len(backs),
            "within_target": sum(1 for b in known if b <= TARGET_AFTER),
            "median": "never" if middle is None and ranked else middle,
        }
    return out


def _worlds(paths: list[str], seeds: list[int], with_static: bool) -> list[World]:
    files = paths or sorted(str(p) for p in (ROOT / "bench" / "worlds").glob("*.json"))
    worlds = [World.load(p) for p in files]
    chosen = [w for w in worlds if w.drift or (with_static and not w.models)]
    return chosen + [World.random(s, drift=True) for s in seeds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--seed", type=int, nargs="+", default=[1], help="request seeds; each world runs each"
    )
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
    parser.add_argument(
        "--hide-truth",
        action="store_true",
        help="learn only from a sampled judge and the users' feedback (see --judge-sample)",
    )
    parser.add_argument(
        "--judge-sample",
        type=float,
        default=0.2,
        help="with --hide-truth: the share of answers the judge grades (default 0.2)",
    )
    parser.add_argument("--judge-rule", choices=JUDGE_RULES, default=DEFAULT_JUDGE_RULE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 0.0 <= args.judge_sample <= 1.0:
        parser.error("--judge-sample must be between 0 and 1")
    judge_sample = args.judge_sample if args.hide_truth else None
    half_lives = tuple(args.half_lives)
    changes = tuple(args.changes)
    if any(not h >= 0 for h in half_lives):
        parser.error("--half-lives must be >= 0")
    if any(not c > 0 for c in changes):
        parser.error("--changes must be > 0")
    results = [
        measure(
            w,
            args.requests,
            seed,
            half_lives,
            changes,
            judge_sample=judge_sample,
            judge_rule=args.judge_rule,
        )
        for w in _worlds(args.worlds, args.random, not args.no_static)
        for seed in args.seed
    ]
    if args.json:
        summary = summarise(results)
        sys.stdout.write(json.dumps({"runs": results, "summary": summary}, indent=2) + "\n")
    else:
        bench_console().print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
