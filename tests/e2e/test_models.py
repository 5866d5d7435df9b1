"""Two models on the whole platform: agents on each, answers priced by the model that gave
them, and the goal's cost weight steering traffic to the cheap model where it is good."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.learning import RunSpec, run_learning

pytestmark = [pytest.mark.e2e, pytest.mark.broker, pytest.mark.usefixtures("prompt_views")]

WORLD = Path(__file__).resolve().parents[2] / "bench" / "worlds" / "support-desk-two-models.json"
REQUESTS = 240
LAST = 80
# 100 quality points per USD: `small` (0.15/0.60 USD per 1M tokens) is worth it on every
# type of this world, `large` (2.50/10.00) on none; the oracle sends all to `small`.
COST_WEIGHT = 100.0


def test_the_router_chooses_the_model_with_the_specialty_for_the_goals_cost_weight(
    kafka_bootstrap: str,
):
    result = run_learning(
        WORLD,
        REQUESTS,
        seed=5,
        runs=[RunSpec("learned", "learned", automations=False)],
        final_window=LAST,
        cost_weight=COST_WEIGHT,
    )
    run = result["runs"]["learned"]
    assert run["failed"] == 0 and run["degraded"] == 0, result
    assert run["assessed_by_world"] == REQUESTS
    # The world answered as each model (it reads the model from the call): the spawner made
    # agents on both and the loader called each agent's own model.
    share = run["model_share"]
    assert set(share) == {"small", "large"} and sum(share.values()) == pytest.approx(1.0, abs=0.01)
    assert share["small"] > 0.6, share
    # Priced by the model that answered: far cheaper than always-strong.
    assert run["cost_of_strong"] < 0.5, run
    assert run["quality_of_strong"] > 0.7, run
    # The reward counts the cost: within reach of the oracle of the same objective.
    assert run["vs_oracle"] >= 0.85, run
