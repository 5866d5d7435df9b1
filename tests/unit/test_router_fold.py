"""The router's knowledge does not depend on the order its topics are read in.

After a restart the router folds decisions, answers and assessments from several
topics read side by side, so a run's assessment can come before its decision.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

from services.router.policy import features_of
from services.router.service import Router
from streams.clock import FakeClock
from streams.events import (
    AutomationCreated,
    Event,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
)
from streams.signatures import exact_key, signature_of

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MESSAGES = ["refund my invoice", "python loop error", "reset my login", "refund my invoice"]
SPECIALTIES = ["customer_support", "code", "customer_support", "customer_support"]


def _log() -> list[Event]:
    out: list[Event] = [
        AutomationCreated(
            source="improvement",
            automation_id="auto-1",
            goal_id="g",  # the goal whose runs earned it: the only one it serves
            kind="response_cache",
            signature=signature_of(MESSAGES[0], SPECIALTIES[0]),
            specialty=SPECIALTIES[0],
            ttl_seconds=3600,
            occurred_at=T0,
        )
    ]
    for i, (message, specialty) in enumerate(zip(MESSAGES, SPECIALTIES, strict=True)):
        run = f"r{i}"
        out += [
            RouteDecided(
                source="router",
                run_id=run,
                goal_id="g",
                specialty=specialty,
                action="reuse",
                policy="learned",
                probability=0.9,
                features=features_of(message).as_list(),
                request_key=exact_key(message, specialty),
                signature=signature_of(message, specialty),
            ),
            WorkflowCompleted(
                source="loader",
                run_id=run,
                goal_id="g",
                agent_id=f"{specialty}_1",
                specialty=specialty,
                text=f"answer {i}",
                cost_usd=0.001,
                degradation_tier="llm",
            ),
            WorkflowAssessed(
                source="improvement", run_id=run, specialty=specialty, quality=0.5 + 0.1 * i
            ),
        ]
    return out


def _fold(events: list[Event]) -> Router:
    router = Router(SimpleNamespace(producer=None, clock=FakeClock(T0)))  # type: ignore[arg-type]
    for event in events:
        router.learn(event)
    return router


def test_assessments_read_before_their_decisions_still_teach_the_policy_and_the_cache():
    in_order = _fold(_log())
    # Each topic read whole, assessments first: the worst order a catch-up can see.
    log = _log()
    by_type = [e for e in log if isinstance(e, WorkflowAssessed)]
    by_type += [e for e in log if isinstance(e, WorkflowCompleted)]
    by_type += [e for e in log if isinstance(e, RouteDecided | AutomationCreated)]
    reordered = _fold(by_type)

    assert in_order.policy.version("g") == reordered.policy.version("g") == 1 + len(MESSAGES)
    probe = features_of("refund my invoice")
    for arm in set(SPECIALTIES):
        assert in_order.policy.estimate("g", probe, arm) == reordered.policy.estimate(
            "g", probe, arm
        )
    for router in (in_order, reordered):
        hit = router.automations.lookup(MESSAGES[0], SPECIALTIES[0], T0, "g")
        assert hit is not None and hit.cached is not None
        # The best of the two identical requests' answers is the one kept.
        assert hit.cached.text == "answer 3"
