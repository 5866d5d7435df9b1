"""The platform gets better with use: learned routing beats static routing on a shipped world."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.learning import RunSpec, run_learning

pytestmark = [pytest.mark.e2e, pytest.mark.broker, pytest.mark.usefixtures("prompt_views")]

WORLD = Path(__file__).resolve().parents[2] / "bench" / "worlds" / "support-desk.json"
REQUESTS = 300
LAST = 100
# Static routing sends logins to support and complaints to writing; the world's best
# specialties are code and support. Measured with seed 7 (last 100 of 300): learned
# 0.858-0.865 (99-100% of the oracle's 0.865), static 0.688.
MARGIN = 0.08


def test_learned_routing_beats_static_routing_on_the_support_desk(kafka_bootstrap: str):
    result = run_learning(
        WORLD,
        REQUESTS,
        seed=7,
        runs=[RunSpec("learned", "learned"), RunSpec("static", "static")],
        final_window=LAST,
        parallel=True,
    )
    learned, static = result["runs"]["learned"], result["runs"]["static"]
    for run in (learned, static):
        assert run["failed"] == 0 and run["degraded"] == 0
        # Every answer reached the router as the world's assessment: it learned from all.
        assert run["assessed_by_world"] == REQUESTS
    assert learned["final"] >= static["final"] + MARGIN, result
    assert learned["vs_oracle"] >= 0.9, result
