"""The router's automations: identical requests answered from cache, direct routes, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.router.automations import Automations
from streams.events import AutomationCreated, RouteDecided, WorkflowAssessed, WorkflowCompleted
from streams.signatures import exact_key, signature_of

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
MSG = "Reset my account password please"
CS = "customer_support"


def _decided(run: str, message: str, specialty: str) -> RouteDecided:
    return RouteDecided(
        source="router",
        run_id=run,
        goal_id="g",
        specialty=specialty,
        action="reuse",
        request_key=exact_key(message, specialty),
        signature=signature_of(message, specialty),
    )


def _answer(run: str, tier: str = "llm") -> WorkflowCompleted:
    return WorkflowCompleted(
        source="loader",
        run_id=run,
        goal_id="g",
        agent_id="cs_1",
        specialty="customer_support",
        text="Use the reset link.",
        cost_usd=0.02,
        degradation_tier=tier,
        meta={"quality": "0.9"},
    )


def _assessed(run: str, quality: float = 0.9) -> WorkflowAssessed:
    return WorkflowAssessed(
        source="improvement", run_id=run, specialty="customer_support", quality=quality
    )


def _automation(kind: str, ttl: int = 600) -> AutomationCreated:
    return AutomationCreated(
        source="improvement",
        automation_id=f"auto-{kind}",
        kind=kind,
        signature=signature_of(MSG, "customer_support"),
        specialty="customer_support",
        agent_id="cs_1",
        goal_id="g",
        ttl_seconds=ttl,
        occurred_at=T0,
    )


def test_identical_request_is_served_from_cache_only_with_an_automation():
    auto = Automations()
    auto.learn(_decided("r1", MSG, "customer_support"))
    auto.learn(_answer("r1"))
    auto.learn(_assessed("r1"))
    assert auto.lookup(MSG, CS, T0) is None  # an answer alone is not an automation
    auto.learn(_automation("response_cache"))
    hit = auto.lookup("  reset my ACCOUNT password please ", CS, T0 + timedelta(seconds=5))
    assert hit is not None and hit.cached is not None
    assert hit.cached.text == "Use the reset link." and hit.specialty == "customer_support"
    # Same intent, different words order: not identical, so no cached answer.
    assert auto.lookup("password account reset my please", CS, T0) is None


def test_cache_expires_and_degraded_answers_are_never_cached():
    auto = Automations()
    auto.learn(_automation("response_cache", ttl=60))
    auto.learn(_decided("r1", MSG, "customer_support"))
    auto.learn(_answer("r1", tier="keyword"))
    assert auto.lookup(MSG, CS, T0) is None
    auto.learn(_assessed("r1"))
    auto.learn(_decided("r2", MSG, "customer_support"))
    auto.learn(_answer("r2"))
    assert auto.lookup(MSG, CS, T0) is None  # not assessed yet
    auto.learn(_assessed("r2", quality=0.4))
    assert auto.lookup(MSG, CS, T0) is None  # too poor to repeat
    auto.learn(_decided("r3", MSG, "customer_support"))
    auto.learn(_answer("r3"))
    auto.learn(_assessed("r3", quality=0.8))
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=30)) is not None
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=61)) is None


def test_direct_route_pins_the_agent():
    auto = Automations()
    auto.learn(_automation("direct_route"))
    hit = auto.lookup("reset my account password", CS, T0, goal_id="g")
    assert hit is not None and hit.cached is None
    assert hit.automation.agent_id == "cs_1"
    assert auto.lookup("reset my account password", CS, T0, goal_id="other") is None


def test_an_automation_serves_only_the_specialty_the_policy_chose():
    auto = Automations()
    auto.learn(_automation("response_cache"))
    auto.learn(_decided("r1", MSG, CS))
    auto.learn(_answer("r1"))
    auto.learn(_assessed("r1"))
    assert auto.lookup(MSG, CS, T0) is not None
    # The policy now prefers another specialty: the cached answer must not override it.
    assert auto.lookup(MSG, "research", T0) is None
