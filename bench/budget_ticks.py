"""What choosing the goals to tick costs the budget each second, by how many goals are idle.

    python -m bench.budget_ticks                  # 50,000 idle goals
    python -m bench.budget_ticks --goals 1000 50000 500000 --busy 20

A real Faust table (the service's memory store) holding ``--goals`` records of goals
whose tasks all ended, ``--busy`` of them with tasks queued and running. Printed per
size: the median time of a tick's choice as the service made it before
(``services/budget/ticks.py``): every record of the table read to find the busy ones;
as it makes it now (:class:`BusyGoals`, the goals noted as their records were written);
and the rebuild from the whole table that each recovery of the table (a rebalance)
costs. No broker; one process, one core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Runs as `python bench/budget_ticks.py` too, not only with -m.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faust  # noqa: E402

from services.budget.state import BudgetDefaults, BudgetState  # noqa: E402
from services.budget.ticks import BusyGoals, is_busy  # noqa: E402

LIMIT = 10_000  # goals one tick sends for (services/budget/service.py)


def _table(goals: int, busy: int) -> Any:
    app = faust.App(f"bench-ticks-{goals}", store="memory://", broker="kafka://127.0.0.1:1")
    table = app.Table("budget", default=None, partitions=12)
    idle = BudgetState.new("g", BudgetDefaults()).to_dict()
    idle["spend"] = {"2026-05-01": 0.5}
    for i in range(goals):
        # Written to the store directly: without a running app there is no changelog.
        table.data[f"goal-{i}"] = dict(idle, goal_id=f"goal-{i}")
    for i in range(busy):
        table.data[f"goal-{i}"] = dict(
            idle, goal_id=f"goal-{i}", queue=["r1"], in_flight={"r0": []}
        )
    return table


def _median_ms(run: Callable[[], object], times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure(goals: int, busy: int, times: int) -> dict[str, float]:
    table = _table(goals, busy)

    def scan_every_record() -> list[str]:
        return [goal for goal, raw in list(table.items()) if is_busy(raw)][:LIMIT]

    kept = BusyGoals(table)
    start = time.perf_counter()
    kept.recovered(table.items())
    rebuild = time.perf_counter() - start
    assert sorted(kept.due(LIMIT)) == sorted(scan_every_record())
    return {
        "goals": goals,
        "scan_ms": _median_ms(scan_every_record, times),
        "kept_ms": _median_ms(lambda: kept.due(LIMIT), times),
        "rebuild_ms": rebuild * 1e3,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goals", type=int, nargs="+", default=[50_000])
    parser.add_argument("--busy", type=int, default=20)
    parser.add_argument("--times", type=int, default=30)
    args = parser.parse_args(argv)
    if args.times < 1 or args.busy < 0 or any(n < args.busy for n in args.goals):
        parser.error("--times must be >= 1, --busy >= 0 and every --goals >= --busy")
    print(f"{'goals':>8} {'busy':>5} {'scan ms':>9} {'kept ms':>9} {'rebuild ms':>11}")
    for goals in args.goals:
        row = measure(goals, args.busy, args.times)
        print(
            f"{goals:>8} {args.busy:>5} {row['scan_ms']:>9.2f} {row['kept_ms']:>9.3f}"
            f" {row['rebuild_ms']:>11.1f}"
        )


if __name__ == "__main__":
    main()
