"""Load as a signal: a model with too many answers in flight is left out of the choice."""

from __future__ import annotations

import asyncio

import pytest

from services.router.policy import Features, LearnedPolicy
from services.router.settings import RouterSettings
from streams.events import RouteDecided, TaskRequested, WorkflowCompleted
from tests.unit.test_router_models import _request, _router, _spawned

FEATURES = Features(frozenset({"refund", "order", "want"}), "customer_support")


def _prefers_strong(router) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(router.policy.template, LearnedPolicy)
    router.policy.template.epsilon0 = router.policy.template.epsilon_min = 0.0
    for _ in range(40):  # quality only: strong is the better arm
        router.policy.update("g1", FEATURES, "customer_support@strong", 0.90)
        router.policy.update("g1", FEATURES, "customer_support@cheap", 0.80)


async def _route(router, producer, clock, run: str, message: str = "") -> RouteDecided:  # type: ignore[no-untyped-def]
    """The decision on request ``run`` (``_request``'s refund, or ``message``)."""
    producer.sent.clear()
    request = _request(clock, run)
    if message:
        request = request.model_copy(update={"message": message})
    await asyncio.wait_for(router.handle(request, None), 2)
    (decided,) = producer.of(RouteDecided)
    return decided


async def test_a_busy_model_is_left_out_until_its_answers_come_back(monkeypatch) -> None:
    monkeypatch.setenv("ORCH_ROUTER_MODEL_BUSY", "2")
    router, producer, clock = _router(monkeypatch)
    _prefers_strong(router)
    router.learn(_spawned("cs_strong", "strong"))
    router.learn(_spawned("cs_cheap", "cheap"))
    first = await _route(router, producer, clock, "r1")
    second = await _route(router, producer, clock, "r2")
    assert first.model == second.model == "strong"  # the better arm while it has room
    third = await _route(router, producer, clock, "r3")
    # Two answers in flight on strong: the policy chooses among cheap's arms.
    assert third.model == "cheap" and third.scores["busy:strong"] == 2.0
    assert third.probability == 1.0  # exact for the arms it was offered
    (task,) = producer.of(TaskRequested)
    assert task.agent_id == "cs_cheap"
    # One of strong's answers comes back: it is offered again.
    router.learn(
        WorkflowCompleted(
            source="loader",
            run_id="r1",
            goal_id="g1",
            user_id="u1",
            agent_id="cs_strong",
            specialty="customer_support",
            text="done",
            cost_usd=0.001,
            latency_ms=900.0,
        )
    )
    fourth = await _route(router, producer, clock, "r4")
    assert fourth.model == "strong" and not any(k.startswith("busy:") for k in fourth.scores)


async def test_when_every_model_is_busy_all_are_offered_and_off_by_default(monkeypatch) -> None:
    monkeypatch.setenv("ORCH_ROUTER_MODEL_BUSY", "1")
    router, producer, clock = _router(monkeypatch)
    _prefers_strong(router)
    router.learn(_spawned("cs_strong", "strong"))
    router.learn(_spawned("cs_cheap", "cheap"))
    assert (await _route(router, producer, clock, "r1")).model == "strong"
    assert (await _route(router, producer, clock, "r2")).model == "cheap"
    # Both busy: nothing to prefer, the policy's own choice.
    both = await _route(router, producer, clock, "r3")
    assert both.model == "strong" and not any(k.startswith("busy:") for k in both.scores)

    monkeypatch.delenv("ORCH_ROUTER_MODEL_BUSY")
    router, producer, clock = _router(monkeypatch)
    _prefers_strong(router)
    router.learn(_spawned("cs_strong", "strong"))
    for run in ("r1", "r2", "r3", "r4"):
        assert (await _route(router, producer, clock, run)).model == "strong"


@pytest.mark.parametrize("bad", ["-1", "1.5", "lots", "nan"])
def test_a_bad_busy_threshold_is_refused_by_name(monkeypatch, bad: str) -> None:
    monkeypatch.setenv("ORCH_ROUTER_MODEL_BUSY", bad)
    with pytest.raises(ValueError, match="ORCH_ROUTER_MODEL_BUSY"):
        RouterSettings.from_env()


async def test_a_request_the_busy_model_serves_much_better_waits_for_it(monkeypatch) -> None:
    monkeypatch.setenv("ORCH_ROUTER_MODEL_BUSY", "1")
    monkeypatch.setenv("ORCH_ROUTER_BUSY_MARGIN", "0.05")
    router, producer, clock = _router(monkeypatch)
    assert isinstance(router.policy.template, LearnedPolicy)
    router.policy.template.epsilon0 = router.policy.template.epsilon_min = 0.0
    # A refund: strong 0.90, cheap 0.80 (a tenth given up: more than the margin).
    _prefers_strong(router)
    # A password reset: strong 0.90, cheap 0.88 (within the margin).
    close = Features(frozenset({"password", "reset"}), "customer_support")
    for _ in range(40):
        router.policy.update("g1", close, "customer_support@strong", 0.90)
        router.policy.update("g1", close, "customer_support@cheap", 0.88)
    router.learn(_spawned("cs_strong", "strong"))
    router.learn(_spawned("cs_cheap", "cheap"))
    assert (await _route(router, producer, clock, "r1")).model == "strong"
    # strong is busy now. A refund still goes to it, nothing named busy ...
    refund = await _route(router, producer, clock, "r2")
    assert refund.model == "strong" and not any(k.startswith("busy:") for k in refund.scores)
    # ... a reset, which cheap serves nearly as well, goes to cheap, and says why.
    decided = await _route(router, producer, clock, "r3", "password reset")
    assert decided.model == "cheap" and decided.scores["busy:strong"] == 2.0
    assert decided.probability == 1.0  # exact for the arms it was offered


@pytest.mark.parametrize("bad", ["-0.1", "much", "nan"])
def test_a_bad_busy_margin_is_refused_by_name(monkeypatch, bad: str) -> None:
    monkeypatch.setenv("ORCH_ROUTER_BUSY_MARGIN", bad)
    with pytest.raises(ValueError, match="ORCH_ROUTER_BUSY_MARGIN"):
        RouterSettings.from_env()
