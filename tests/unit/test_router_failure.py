"""A request the router fails on still ends, with a terminal event that says why."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.router.service import Router
from streams.clock import FakeClock
from streams.events import (
    RequestReceived,
    WorkflowCompleted,
    WorkflowFailed,
    terminal_event_id,
)
from tests.samples import RecordingProducer


async def test_a_routing_bug_ends_the_request_as_an_internal_failure_and_is_raised():
    producer = RecordingProducer()
    router = Router(SimpleNamespace(producer=producer, clock=FakeClock()))  # type: ignore[arg-type]

    def broken(request: RequestReceived) -> None:
        raise KeyError("scores")

    router.choose = broken  # type: ignore[method-assign]
    request = RequestReceived(
        source="test", run_id="r1", goal_id="g1", user_id="u1", message="hello"
    )
    with pytest.raises(KeyError):  # the consumer then dead-letters the request
        await router.handle(request, None)  # type: ignore[arg-type]
    [failed] = producer.sent
    assert isinstance(failed, WorkflowFailed)
    assert failed.run_id == "r1" and failed.reason == "internal"
    assert "KeyError" in failed.detail
    assert failed.event_id == terminal_event_id("r1")  # a replay sends the same outcome


async def test_a_request_that_already_ended_is_not_routed_again():
    producer = RecordingProducer()
    router = Router(SimpleNamespace(producer=producer, clock=FakeClock()))  # type: ignore[arg-type]
    request = RequestReceived(
        source="test", run_id="r1", goal_id="g1", user_id="u1", message="hello"
    )
    # Replayed after a restart: its answer is already in the log the router folded.
    router.learn(
        WorkflowCompleted(
            source="loader", run_id="r1", goal_id="g1", specialty="general", text="hi"
        )
    )
    await router.handle(request, None)  # type: ignore[arg-type]
    assert producer.sent == []


def _pinning(asked: str) -> RequestReceived:
    return RequestReceived(
        source="test",
        run_id="r1",
        goal_id="g1",
        user_id="u1",
        message="fix this python bug",
        context={"specialty": asked},
    )


@pytest.mark.parametrize("asked", ["x/y", "../code", "Code Review", "a" * 49, "c\u00f6de"])
async def test_a_pinned_specialty_that_is_no_specialty_name_fails_the_request_by_name(asked: str):
    # context specialty=x/y once became the agent's specialty and the workflow id g1/x/y,
    # which the improvement service could not save a version of: it crashed on feedback.
    producer = RecordingProducer()
    router = Router(SimpleNamespace(producer=producer, clock=FakeClock()))  # type: ignore[arg-type]
    await router.handle(_pinning(asked), None)  # type: ignore[arg-type]
    [failed] = producer.sent  # one terminal event, and no route, spawn or task
    assert isinstance(failed, WorkflowFailed)
    assert failed.reason == "invalid" and failed.event_id == terminal_event_id("r1")
    assert "is not a specialty name" in failed.detail and failed.specialty is None


def test_a_pinned_specialty_name_is_still_forced_whatever_its_case():
    router = Router(SimpleNamespace(producer=RecordingProducer(), clock=FakeClock()))  # type: ignore[arg-type]
    specialty, _, decision, _ = router.choose(_pinning(" Customer_Support "))
    assert specialty == decision.specialty == "customer_support"
    assert decision.policy == "forced"
