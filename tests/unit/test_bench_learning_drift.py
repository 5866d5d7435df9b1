"""The learning benchmark on a world that drifts: the world's clock follows the benchmark's
requests, and the summary says how soon each run was back near the new oracle."""

from __future__ import annotations

import io

from rich.console import Console

from bench.learning import Outcome, _drift, print_report
from local.world import World
from streams.config import ROOT

DRIFTING = ROOT / "bench" / "worlds" / "research-lab-drift.json"


def _outcome(index: int, request_type: str, reward: float) -> Outcome:
    return Outcome(
        index=index,
        run_id=f"r{index}",
        request_type=request_type,
        repeat=False,
        specialty="research",
        reward=reward,
        oracle=0.0,
        cost_usd=0.0,
        tier="llm",
        automation="",
        failed=False,
        latency_ms=10.0,
    )


def test_a_run_that_follows_the_change_recovers_one_that_keeps_the_old_best_does_not() -> None:
    world = World.load(DRIFTING)
    requests = world.sample_requests(1400, 1)
    oracle = [world.oracle_quality(r, 1, request_index=i) for i, r in enumerate(requests)]

    def kept_old_best(i: int) -> float:
        # The best specialty before any drift, scored in the phase the request falls in.
        old = world.best_specialty(requests[i].request_type, request_index=0)
        judged = world.quality_of(requests[i].message, old, 1, request_index=i)
        return judged[1] if judged else 0.0

    runs = {
        "follows": {
            "outcomes": [_outcome(i, r.request_type, oracle[i]) for i, r in enumerate(requests)]
        },
        "stuck": {
            "outcomes": [
                _outcome(i, r.request_type, kept_old_best(i)) for i, r in enumerate(requests)
            ]
        },
    }
    drift = _drift(world, requests, oracle, runs)
    assert drift["at"] == [800]  # the second point (1600) is past the run's end
    follows, stuck = drift["runs"]["follows"], drift["runs"]["stuck"]
    assert follows["recovery"] == [100] and follows["recovery_changed_types"][0] <= 200
    assert stuck["recovery_changed_types"] == [None]  # statistics stays with research
    buffer = io.StringIO()
    print_report(
        {
            "world": world.name,
            "window": 100,
            "final_window": 350,
            "seed": 1,
            "requests": len(requests),
            "oracle": {"curve": [], "final": 0.8},
            "runs": {},
            "notes": [],
            "drift": drift,
        },
        Console(file=buffer, width=200),
        curve=False,
    )
    assert "drift at 800: stuck back to 90% of the new oracle after" in buffer.getvalue()
    assert "never" in buffer.getvalue()


def test_the_world_llm_takes_its_clock_from_the_caller() -> None:
    world = World.load(DRIFTING)
    statistics = next(r for r in world.sample_requests(400, 2) if r.request_type == "statistics")
    asking = [0]
    respond = world.responder(2, request_index=lambda: asking[0])
    ask = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a research specialist."},
            {"role": "user", "content": statistics.message},
        ],
    }
    before = float(respond(ask)[2]["quality"])
    for _ in range(5):  # answers counted by the world do not move its clock now
        respond(ask)
    assert float(respond(ask)[2]["quality"]) == before
    asking[0] = 900  # past the drift at 800: research is worse at statistics
    after = respond(ask)[2]
    assert after["phase"] == "1" and float(after["quality"]) < before - 0.1
