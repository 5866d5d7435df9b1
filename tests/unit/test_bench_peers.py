"""The pure parts of bench/peers.py: percentiles, the sweep's rule, the ratio table, targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.peers import (
    keep_only_logs,
    latency_summary,
    max_sustained,
    next_rate,
    percentile,
    ratio_rows,
    sustained,
    targets,
)

LADDER = [10.0, 20.0, 40.0, 80.0, 160.0]


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) == 0.0
    # order does not matter, and a small sample's p99 is its largest value
    assert percentile([5.0, 1.0, 3.0], 0.99) == 5.0
    assert latency_summary([3.0, 1.0, 2.0]) == {"p50": 2.0, "p95": 3.0, "p99": 3.0, "max": 3.0}


def test_a_step_holds_only_with_every_answer_and_p99_under_the_bound() -> None:
    assert sustained(100, 100, 249.9)
    assert not sustained(100, 100, 250.0)
    assert not sustained(100, 99, 10.0)  # one error or timeout is enough
    assert not sustained(0, 0, 0.0)


def test_the_sweep_climbs_until_the_first_failure_then_bisects() -> None:
    history: list[tuple[float, bool]] = []
    seen = []
    outcome = {10.0: True, 20.0: True, 40.0: True, 80.0: False, 60.0: True, 70.0: False}
    while (rate := next_rate(history, LADDER, refine=2)) is not None:
        seen.append(rate)
        history.append((rate, outcome[rate]))
    # 160 is never tried: the ladder stops at its first failure
    assert seen == [10.0, 20.0, 40.0, 80.0, 60.0, 70.0]
    assert max_sustained(history) == (60.0, False)


def test_the_sweep_still_runs_the_cpu_rate_after_an_early_failure() -> None:
    history = [(10.0, True), (20.0, False)]
    assert next_rate(history, LADDER, refine=0) == 40.0
    history.append((40.0, False))
    assert next_rate(history, LADDER, refine=0) is None
    # a pass above the lowest failure is noise, not the limit
    assert max_sustained([(10.0, True), (20.0, False), (40.0, True)]) == (10.0, False)


def test_the_sweep_stops_when_no_whole_rate_fits_or_nothing_held() -> None:
    assert (
        next_rate(
            [(10.0, True), (20.0, True), (40.0, True), (41.0, False)], [10.0, 20.0, 40.0, 41.0], 3
        )
        is None
    )
    assert next_rate([(10.0, False), (40.0, False)], LADDER, refine=2) is None
    assert max_sustained([(10.0, False)]) == (0.0, False)


def test_a_sweep_that_never_fails_says_its_top_is_the_ladders() -> None:
    history = [(r, True) for r in LADDER]
    assert next_rate(history, LADDER, refine=2) is None
    assert max_sustained(history) == (160.0, True)


def _system(p50: float, p99: float, rate: float, cpu: float, idle: float) -> dict[str, object]:
    return {
        "c1": {
            "latency_ms": {"p50": p50 + 1, "p99": p99 + 1},
            "overhead_ms": {"p50": p50, "p99": p99},
        },
        "max_sustained_per_s": rate,
        "cpu_ms_per_request_at_40": cpu,
        "idle": {"cpu_percent_of_core": idle},
        "rss_mb": {"idle": 100.0},
    }


def test_the_ratio_table_divides_by_litellm_from_the_same_run() -> None:
    results = {
        "litellm": _system(10.0, 20.0, 70.0, 14.0, 0.2),
        "platform": _system(5.0, 30.0, 140.0, 0.0, 5.0),
    }
    rows = ratio_rows(results)
    assert rows[0] == ["", "litellm", "platform", "platform/litellm"]
    by_label = {row[0]: row for row in rows[1:]}
    assert by_label["c=1 overhead p50 ms"] == ["c=1 overhead p50 ms", "10.0", "5.0", "0.50x"]
    assert by_label["max sustained req/s"][-1] == "2.00x"
    assert by_label["c=32 req/s"][1:] == ["-", "-", "-"]  # not measured: no ratio invented
    results["litellm"]["cpu_ms_per_request_at_40"] = 0.0
    assert {row[0]: row for row in ratio_rows(results)}["CPU ms/req at 40/s"][-1] == "-"


def test_targets_are_judged_against_litellm() -> None:
    verdicts = {
        t["target"]: t["verdict"]
        for t in targets(
            {
                "litellm": _system(10.0, 20.0, 70.0, 14.0, 0.2),
                "platform": _system(6.0, 30.0, 210.0, 7.0, 2.9),
            }
        )
    }
    assert list(verdicts.values()) == ["met", "NOT met", "met", "met", "met", "reported"]
    without_peer = targets({"platform": _system(6.0, 30.0, 210.0, 7.0, 3.5)})
    assert [t["verdict"] for t in without_peer] == [
        "n/a",
        "n/a",
        "n/a",
        "n/a",
        "NOT met",
        "reported",
    ]
    assert targets({"litellm": _system(1, 1, 1, 1, 1)}) == []
    # no rate sustained is no target met, even beside a LiteLLM that sustained none
    none = targets({"litellm": _system(1, 1, 0, 1, 1), "platform": _system(1, 1, 0, 1, 1)})
    assert none[2]["verdict"] == "NOT met"


@pytest.mark.parametrize("q", [0.0, 0.001])
def test_the_lowest_percentile_is_the_smallest_value(q: float) -> None:
    assert percentile([3.0, 2.0, 9.0], q) == 2.0


def test_hops_are_the_spans_between_a_runs_steps_in_the_window() -> None:
    from bench._hops import STEPS, fold, hop_summary, render_hops

    steps = [s for s, _ in STEPS]
    records: list[tuple[str, str, int]] = []
    # r1 and r2 in the window, every step; r1's hops 1, 2, 3... ms, r2's twice that.
    for run, scale in (("r1", 1), ("r2", 2)):
        t = 1000
        for i, step in enumerate(steps):
            t += i * scale
            records.append((step, run, t))
    records.append((steps[3], "r1", 999_999))  # a step seen again (a resend) keeps the first
    records += [(steps[0], "r3", 1000), (steps[1], "r3", 1001)]  # never admitted: left out
    records += [(s, "r4", 5000 + i) for i, s in enumerate(steps)]  # outside the window
    records.append(("workflow_assessed", "r1", 2000))  # not a step of the answer's path
    runs: dict[str, dict[str, int]] = {}
    fold(records, runs)
    rows = hop_summary(runs, since_ms=0, until_ms=4000)
    assert [r["hop"] for r in rows] == [
        f"{a} -> {b}" for a, b in zip(steps, steps[1:], strict=False)
    ]
    assert all(r["runs"] == 2 for r in rows)
    # hop i: r1 took i ms, r2 2i ms; the median of two is their mean
    assert [r["p50_ms"] for r in rows] == [1.5 * i for i in range(1, len(steps))]
    assert [r["p90_ms"] for r in rows] == [2 * i for i in range(1, len(steps))]
    assert rows[2]["by"] == "budget"
    assert hop_summary(runs, since_ms=10_000, until_ms=20_000) == []
    assert "task_requested -> task_admitted" in "\n".join(render_hops(rows))


def test_a_finished_run_keeps_the_logs_and_drops_the_systems_state(tmp_path: Path) -> None:
    files = {
        "fake_llm.log": True,
        "litellm.log": True,
        "litellm.yaml": True,
        "broker/kafka/broker.log": True,
        "broker/kafka/server.properties": True,
        "broker/kafka/data/x.events-0/00000000000000000000.log": False,
        "broker/kafka/data/__consumer_offsets-1/00000000000000000000.index": False,
        "data/router.log": True,
        "data/clickhouse/store/part.bin": False,
        "data/clickhouse-ingest/batch.avro": False,
        "data/faust/budget/v1/tables/x": False,
    }
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    keep_only_logs(tmp_path)
    assert {name: (tmp_path / name).exists() for name in files} == files
    assert not (tmp_path / "broker/kafka/data").exists()
