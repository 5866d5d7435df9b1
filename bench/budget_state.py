"""What one event costs the budget's state machine, by how many runs wait for a slot.

    python -m bench.budget_state                 # 0, 100 and 1,000 waiting runs
    python -m bench.budget_state --waiting 0 500 --events 1000

A goal at its concurrency limit with N runs queued (the queue's cap is
``ORCH_BUDGET_MAX_QUEUE``, 1,000 by default); then ``--events`` workflow_completed events
of runs it does not know, each of which makes the budget look at every waiting run (for
its deadline) and at the free slots. Printed per depth: the mean time of
``BudgetState.handle`` and of reading and writing the goal's record (``from_dict`` and
``to_dict``, what the service does around every event), beside the same at no waiting
run: the baseline, measured in the same run. No broker; one process, one core.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Runs as `python bench/budget_state.py` too, not only with -m.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.budget.state import BudgetDefaults, BudgetState, RunStore  # noqa: E402
from streams.clock import FakeClock  # noqa: E402
from streams.events import TaskRequested, WorkflowCompleted  # noqa: E402
from streams.llm import ModelPrice, PriceTable  # noqa: E402

DEFAULTS = BudgetDefaults(task_reserve_usd=0.01, prices=PriceTable({}, ModelPrice(0.0, 0.0)))


def _task(i: int) -> TaskRequested:
    return TaskRequested(
        source="router",
        run_id=f"run-{i}",
        goal_id="g1",
        user_id="u1",
        agent_id="a1",
        specialty="support",
        message=f"how do I reset my password, case {i}",
    )


def measure(waiting: int, events: int) -> dict[str, float]:
    clock = FakeClock()
    state = BudgetState.new("g1", DEFAULTS, RunStore())
    state.max_concurrent = 1
    state.max_daily_cost = 1e9
    for i in range(waiting + 1):  # one runs, the rest wait
        state.handle(_task(i), clock.now(), DEFAULTS)
    assert len(state.queue) == waiting, (len(state.queue), waiting)
    done = [
        WorkflowCompleted(
            source="loader", run_id=f"other-{j}", goal_id="g1", specialty="support", text="ok"
        )
        for j in range(events)
    ]
    start = time.perf_counter()
    for event in done:
        state.handle(event, clock.now(), DEFAULTS)
    handle = (time.perf_counter() - start) / events
    raw = state.to_dict()
    start = time.perf_counter()
    for _ in range(events):
        BudgetState.from_dict(raw, state.runs, DEFAULTS).to_dict()
    record = (time.perf_counter() - start) / events
    return {"waiting": waiting, "handle_ms": handle * 1e3, "record_ms": record * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--events", type=int, default=300)
    args = parser.parse_args(argv)
    if args.events < 1 or any(n < 0 for n in args.waiting):
        parser.error("--events must be >= 1 and --waiting >= 0")
    base = measure(0, args.events)
    print(f"{'waiting':>8} {'handle ms':>10} {'x baseline':>10} {'record ms':>10}")
    for row in [base] + [measure(n, args.events) for n in args.waiting if n]:
        ratio = row["handle_ms"] / base["handle_ms"] if base["handle_ms"] else float("nan")
        print(
            f"{row['waiting']:>8.0f} {row['handle_ms']:>10.3f} {ratio:>10.1f}"
            f" {row['record_ms']:>10.3f}"
        )


if __name__ == "__main__":
    main()
