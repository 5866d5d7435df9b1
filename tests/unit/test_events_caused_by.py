"""Event.caused_by: the one way an event is made from the event it follows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from streams.events import RequestReceived, TaskAdmitted, TaskRequested, WorkflowFailed

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _request() -> TaskRequested:
    return TaskRequested(
        event_id="e-1",
        source="router",
        run_id="r-1",
        goal_id="g1",
        user_id="alice",
        agent_id="a-1",
        specialty="math",
        message="2+2?",
        context={"tone": "short"},
        requested_at=AT,
        deadline_at=AT + timedelta(seconds=30),
        occurred_at=AT,
    )


def test_the_envelope_and_the_shared_fields_come_from_the_cause() -> None:
    cause = _request()
    admitted = TaskAdmitted.caused_by(cause, event_id="e-2", source="budget", occurred_at=AT)
    own = {"event_id", "event_type", "source", "occurred_at"}
    # What only a request says (tokens asked for, a task given back) stays on the request;
    # what only an admission says (a token's start deadline) is not in the request.
    shared = cause.model_dump(exclude=own | {"want_tokens", "holder", "given_back"})
    assert admitted.model_dump(exclude=own | {"start_by"}) == shared
    assert admitted.start_by is None
    # What an event says of itself is its own, never the cause's.
    assert (admitted.event_id, admitted.source, admitted.event_type) == (
        "e-2",
        "budget",
        "task_admitted",
    )


def test_fields_given_override_and_fields_the_target_lacks_are_dropped() -> None:
    failed = WorkflowFailed.caused_by(
        _request(), source="loader", reason="timeout", detail="deadline", agent_id="a-9"
    )
    assert (failed.run_id, failed.goal_id, failed.user_id) == ("r-1", "g1", "alice")
    assert (failed.agent_id, failed.specialty, failed.reason) == ("a-9", "math", "timeout")
    assert not hasattr(failed, "message")


def test_a_reason_outside_the_named_ones_is_refused() -> None:
    request = RequestReceived(
        source="sdk", run_id="r-2", goal_id="g1", user_id="bob", message="hi", occurred_at=AT
    )
    with pytest.raises(ValidationError, match="reason"):
        WorkflowFailed.caused_by(request, source="router", reason="tired", detail="")
