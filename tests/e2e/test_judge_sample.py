"""With the truth hidden, the platform judges a sample of answers and learns the rest from
feedback: the judge is called for about that share, the others say `unjudged`, and the
router's policy learned from judged and fed-back answers only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.learning import RunSpec, run_learning

pytestmark = [pytest.mark.e2e, pytest.mark.broker, pytest.mark.usefixtures("prompt_views")]

WORLD = Path(__file__).resolve().parents[2] / "bench" / "worlds" / "support-desk.json"
REQUESTS = 120
SAMPLE = 0.25
# The draw is a hash of a random run id: over 120 answers the judged share has a standard
# deviation of 0.04, so 3 of them (0.12) either side.
TOLERANCE = 0.12


@pytest.mark.parametrize("rule", ["uniform", "uncertain"])
def test_the_judge_grades_its_sample_and_the_policy_learns_from_grades_and_feedback(
    kafka_bootstrap: str, rule: str
):
    result = run_learning(
        WORLD,
        REQUESTS,
        seed=3,
        # No automations: a cached answer's decision teaches nothing, which would blur the count.
        runs=[RunSpec("learned", "learned", automations=False)],
        hide_truth=True,
        judge_sample=SAMPLE,
        judge_rule=rule,
    )
    run = result["runs"]["learned"]
    assert run["failed"] == 0 and run["degraded"] == 0, run
    methods = run["assessed_by"]
    # Nothing revealed the truth, and every answer was judged or left to its feedback.
    assert set(methods) == {"judge", "unjudged"}, methods
    assert methods["judge"] + methods["unjudged"] == REQUESTS
    assert abs(methods["judge"] / REQUESTS - SAMPLE) <= TOLERANCE, methods
    # Exactly the runs whose id draws under the chance the router logged with its decision
    # (uniform: the share) were judged, each by one paid call...
    assert run["sample_mismatches"] == 0
    spread = run["judge_probability"]
    if rule == "uniform":
        assert spread["min"] == spread["max"] == SAMPLE, spread
    else:
        # Aimed: more where the policy knew the arm little, and never over the share.
        assert spread["min"] < SAMPLE < spread["max"], spread
        assert methods["judge"] <= SAMPLE * REQUESTS, methods
    assert run["judge_calls"] == methods["judge"]
    assert 0.0 < run["judge_cost_share"] < 1.0
    # ... which the world's LLM served (plus the warm-up's and the probe's, if drawn).
    served = result["truth"]["judge_calls_served"]
    assert run["judge_calls"] <= served <= run["judge_calls"] + 2, (served, run["judge_calls"])
    # The router's policy learned from the judged answers and the fed-back unjudged ones,
    # and from nothing else (support-desk's users rate one answer in ten).
    taught = run["taught_by"]
    assert taught["judged"] == methods["judge"] and taught["feedback"] > 0, taught
    assert run["policy_updates"] == taught["judged"] + taught["feedback"], (
        run["policy_updates"],
        taught,
    )
    assert run["policy_updates"] < REQUESTS
