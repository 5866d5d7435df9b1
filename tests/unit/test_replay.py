"""Offline replay: IPS ranks a clearly better policy above a clearly worse one."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from services.router.policy import features_of
from services.router.replay import evaluate, join_log
from streams.events import RouteDecided, WorkflowAssessed

ARMS = ["code", "writing", "research"]
# Keywords say "code" for the first kind of request, but research serves it far better.
KINDS = {
    "python error traceback question": {"code": 0.2, "writing": 0.1, "research": 0.9},
    "essay draft about rivers": {"code": 0.1, "writing": 0.8, "research": 0.3},
}


def _log(n: int, seed: int = 5) -> list:
    rng = random.Random(seed)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    events = []
    for i in range(n):
        msg = rng.choice(list(KINDS))
        arm = rng.choice(ARMS)  # a uniformly exploring live policy: p = 1/3
        run = f"r{i}"
        events.append(
            RouteDecided(
                source="router",
                run_id=run,
                goal_id="g",
                specialty=arm,
                action="reuse",
                policy="learned",
                policy_version=i + 1,
                probability=1 / 3,
                features=features_of(msg).as_list(),
                occurred_at=t0 + timedelta(seconds=i),
            )
        )
        quality = min(1.0, max(0.0, KINDS[msg][arm] + rng.gauss(0, 0.05)))
        events.append(
            WorkflowAssessed(source="improvement", run_id=run, specialty=arm, quality=quality)
        )
    return events


def test_replay_ranks_the_learned_policy_above_keywords_and_close_to_truth():
    log = join_log(_log(3000))
    assert len(log) == 3000
    static = evaluate(log, "static", ARMS)
    learned = evaluate(log, "learned", ARMS)
    # Truth: static earns (0.2 + 0.8) / 2 = 0.5; the best policy earns (0.9 + 0.8) / 2 = 0.85.
    assert static.snips == pytest.approx(0.5, abs=0.04)
    assert learned.snips == pytest.approx(0.85, abs=0.05)
    assert learned.snips > static.snips + 0.2
    # Both beat the uniformly exploring live policy; the learned one by far more.
    assert learned.beats_live and static.beats_live
    # The uniformly exploring live policy earned about (0.4 + 0.4) / 2.
    assert learned.live_mean == pytest.approx(0.4, abs=0.03)


def test_forced_and_unassessed_decisions_are_left_out():
    events = _log(10)
    events.append(
        RouteDecided(
            source="router",
            run_id="forced",
            goal_id="g",
            specialty="code",
            action="reuse",
            policy="forced",
            features=["kw:code"],
        )
    )
    events.append(
        RouteDecided(
            source="router",
            run_id="open",
            goal_id="g",
            specialty="code",
            action="reuse",
            policy="learned",
            probability=0.5,
            features=["kw:code"],
        )
    )
    assert len(join_log(events)) == 10
