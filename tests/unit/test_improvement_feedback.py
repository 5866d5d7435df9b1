"""Feedback rules, the run join, and the HTTP and Slack front doors against the real Bolt app."""

from __future__ import annotations

from datetime import timedelta

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.improvement.errors import NotRunOwner, UnknownRun
from services.improvement.feedback import (
    clean_proposal,
    parse_slack_command,
    slack_platform_user,
    template_prompt,
    wants_improvement,
)
from services.improvement.http import SlackSettings, build_app
from services.improvement.patterns import PatternSettings
from services.improvement.state import ImprovementState
from streams.clock import FakeClock
from streams.errors import InvalidRequest
from streams.events import (
    FeedbackReceived,
    RequestReceived,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
)
from tests.slack import slash_command

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


def test_when_feedback_asks_for_an_improvement():
    assert wants_improvement(1, "")
    assert wants_improvement(2, "fine")
    assert not wants_improvement(5, "great, thanks")
    assert wants_improvement(4, "answers should be shorter")
    assert wants_improvement(None, "please include an example")
    assert not wants_improvement(None, "ok")


def test_template_rule_appends_one_instruction_once():
    new = template_prompt("You are a coder.", "Always include a runnable example")
    assert new == (
        "You are a coder.\n\nUsers asked for this; follow it: Always include a runnable example"
    )
    assert template_prompt(new, "Always include a runnable example") is None
    assert "rated poorly" in (template_prompt("You are a coder.", "") or "")
    assert clean_proposal("```\nYou are a precise coder who shows tests.\n```") == (
        "You are a precise coder who shows tests."
    )
    assert clean_proposal("ok") is None


def test_slack_command_text_and_user_mapping():
    assert parse_slack_command("r-1 2 too long") == parse_slack_command("r-1  2  too long")
    parsed = parse_slack_command("r-1 2 too long")
    assert (parsed.run_id, parsed.score, parsed.text) == ("r-1", 2, "too long")
    assert parse_slack_command("r-1 more examples please").score is None
    assert parse_slack_command("r-1 5").text == ""
    for bad in ("", "r-1", "r-1 9 nope"):
        with pytest.raises(ValueError):
            parse_slack_command(bad)
    assert slack_platform_user("U123", {}) == "slack:U123"
    assert slack_platform_user("U123", {"U123": "alice"}) == "alice"


def test_runs_join_in_any_order():
    clock = FakeClock()
    events = [
        RequestReceived(source="t", run_id="r1", goal_id="g1", user_id="u1", message="sort csv"),
        RouteDecided(source="t", run_id="r1", specialty="data_analysis", action="reuse"),
        WorkflowCompleted(
            source="t",
            run_id="r1",
            goal_id="g1",
            user_id="u1",
            agent_id="a1",
            specialty="data_analysis",
            text="done",
            meta={"workflow_version": "1"},
            occurred_at=clock.now(),
        ),
        WorkflowAssessed(source="t", run_id="r1", specialty="data_analysis", quality=0.7),
    ]
    for order in (events, list(reversed(events))):
        state = ImprovementState(PatternSettings(), clock)
        for e in order:
            state.apply(e)
        run = state.run("r1")
        assert run is not None and run.outcome_done and run.version_done
        assert run.user_id == "u1" and run.workflow_id == "data_analysis"
        assert state.learner.occurrences(run.signature or "") == 1
        assert state.dirty_flows == {"data_analysis"}
    failed = ImprovementState(PatternSettings(), clock)
    failed.apply(
        RequestReceived(source="t", run_id="r2", goal_id="g1", user_id="u1", message="x y")
    )
    failed.apply(RouteDecided(source="t", run_id="r2", specialty="math", action="spawn"))
    failed.apply(
        WorkflowFailed(
            source="t",
            run_id="r2",
            goal_id="g1",
            reason="timeout",
            detail="slow",
            occurred_at=clock.now() - timedelta(seconds=5),
        )
    )
    run = failed.run("r2")
    assert run is not None and run.outcome_done and run.workflow_id == "math"


class _Sink:
    """Owns run r1 (user u1) and slack:U123's run r2; everything else is unknown."""

    def __init__(self) -> None:
        self.sent: list[FeedbackReceived] = []

    async def submit(
        self, run_id: str, user_id: str, score: int | None, text: str, channel: str
    ) -> FeedbackReceived:
        owners = {"r1": "u1", "r2": "slack:U123"}
        if run_id not in owners:
            raise UnknownRun(run_id)
        if owners[run_id] != user_id:
            raise NotRunOwner(run_id, user_id)
        if score is not None and not 1 <= score <= 5:
            raise InvalidRequest("score: must be 1-5")
        event = FeedbackReceived(
            source="t", run_id=run_id, user_id=user_id, score=score, text=text, channel=channel
        )
        self.sent.append(event)
        return event


async def test_http_improve_statuses():
    sink = _Sink()
    async with TestClient(TestServer(build_app(sink, None))) as client:
        ok = await client.post("/improve", json={"run_id": "r1", "user_id": "u1", "text": "hi"})
        assert ok.status == 202
        assert (await ok.json())["event_id"] == sink.sent[0].event_id
        assert (
            await client.post("/improve", json={"run_id": "r1", "user_id": "u2", "score": 1})
        ).status == 403
        assert (
            await client.post("/improve", json={"run_id": "zz", "user_id": "u1", "score": 1})
        ).status == 404
        for bad in (
            {"run_id": "r1", "user_id": "u1"},
            {"run_id": "r1"},
            [1],
            {"run_id": "r1", "user_id": "u1", "score": "5"},
        ):
            assert (await client.post("/improve", json=bad)).status == 400
        assert (await client.post("/improve", data=b"{not json")).status == 400
        assert (
            await client.post("/improve", json={"run_id": "r1", "user_id": "u1", "score": 9})
        ).status == 400
        disabled = await client.post("/slack/commands", data=b"x")
        assert disabled.status == 404 and "SLACK_SIGNING_SECRET" in await disabled.text()
    assert len(sink.sent) == 1


async def test_slack_signed_command_is_accepted_and_a_bad_signature_refused():
    sink = _Sink()
    app = build_app(sink, SlackSettings(SECRET))
    async with TestClient(TestServer(app)) as client:
        body, headers = slash_command(SECRET, "r2 2 answers should cite sources")
        ok = await client.post("/slack/commands", data=body, headers=headers)
        assert ok.status == 200, await ok.text()
        assert "recorded" in await ok.text()
        (event,) = sink.sent
        assert (event.run_id, event.user_id, event.score, event.channel) == (
            "r2",
            "slack:U123",
            2,
            "slack",
        )
        assert event.text == "answers should cite sources"

        body, headers = slash_command("not-the-secret", "r2 1 bad")
        refused = await client.post("/slack/commands", data=body, headers=headers)
        assert refused.status == 401
        body, headers = slash_command(SECRET, "r2 1 bad")
        tampered = await client.post("/slack/commands", data=body + b"x", headers=headers)
        assert tampered.status == 401

        body, headers = slash_command(SECRET, "r1 1 not mine", user_id="U999")
        foreign = await client.post("/slack/commands", data=body, headers=headers)
        assert foreign.status == 200 and "does not own" in await foreign.text()
    assert len(sink.sent) == 1
