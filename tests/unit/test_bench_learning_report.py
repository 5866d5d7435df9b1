"""The learning benchmark's report: each way of answering is measured on its own."""

from __future__ import annotations

import io

from rich.console import Console

from bench.learning import Outcome, _by_route, print_report


def _outcome(i: int, automation: str, cost: float, latency: float, reward: float) -> Outcome:
    return Outcome(
        index=i,
        run_id=f"r{i}",
        request_type="t",
        repeat=False,
        specialty="s",
        reward=reward,
        oracle=0.9,
        cost_usd=cost,
        tier="automation_cache" if automation == "cache" else "llm",
        automation=automation,
        failed=False,
        latency_ms=latency,
    )


def test_each_way_of_answering_gets_its_own_cost_latency_and_reward():
    outcomes = [
        _outcome(0, "", 0.002, 40.0, 0.8),
        _outcome(1, "", 0.004, 60.0, 0.6),
        _outcome(2, "cache", 0.0, 3.0, 0.9),
        _outcome(3, "route", 0.003, 50.0, 0.7),
    ]
    routes = _by_route(outcomes)
    assert routes["policy"] == {
        "requests": 2,
        "cost_per_request_usd": 0.003,
        "p50_latency_ms": 50.0,
        "mean_reward": 0.7,
    }
    assert routes["response_cache"]["cost_per_request_usd"] == 0.0
    assert routes["response_cache"]["requests"] == 1
    assert routes["direct_route"]["mean_reward"] == 0.7

    result = {
        "world": "w",
        "window": 2,
        "final_window": 4,
        "seed": 0,
        "requests": 4,
        "oracle": {"curve": [0.9, 0.9], "final": 0.9},
        "runs": {
            "learned": {
                "curve": [0.7, 0.8],
                "final": 0.75,
                "vs_oracle": 0.8333,
                "cost_per_request_usd": 0.00225,
                "automations_created": 2,
                "cached_answers": 1,
                "direct_routed": 1,
                "failed": 0,
                "by_route": routes,
            }
        },
        "notes": [],
    }
    buffer = io.StringIO()
    print_report(result, Console(file=buffer, width=120))
    text = buffer.getvalue()
    assert "response cache" in text and "direct route" in text and "policy" in text


def test_outcomes_are_written_a_line_each_with_always_strong_beside(tmp_path):
    import json

    from bench.learning import _write_outcomes
    from local.world import World
    from streams.config import ROOT

    world = World.load(ROOT / "bench/worlds/support-desk-two-models.json")
    sample = world.sample_requests(3, seed=2)
    outcomes = [_outcome(i, "", 0.001, 10.0, 0.5) for i in (2, 0)]
    _write_outcomes(tmp_path, world, sample, 2, {"learned": {"outcomes": outcomes}})
    lines = (tmp_path / f"{world.name}-seed2-learned.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows] == [2, 0]
    for row in rows:
        request = sample[row["index"]]
        strong = world.strong_arm(request, 2, request_index=row["index"])
        assert row["message"] == request.message
        assert (row["strong_quality"], row["strong_usd"]) == (strong.quality, strong.cost_usd)
        assert row["reward"] == 0.5 and row["cost_usd"] == 0.001
