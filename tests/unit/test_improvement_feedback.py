"""Feedback rules, the run join, and the HTTP and Slack front doors against the real Bolt app."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from services.improvement.feedback import (
    parse_slack_command,
    slack_identity,
    wants_improvement,
)
from services.improvement.http import SlackSettings, build_app
from services.improvement.patterns import PatternSettings
from services.improvement.service import ImprovementConfig, ImprovementService
from services.improvement.state import ImprovementState
from streams.clock import FakeClock, SystemClock
from streams.errors import InvalidRequest, NotRunOwner, PromotionRefused, RateLimited, UnknownRun
from streams.events import (
    ApiKeyRevoked,
    Event,
    FeedbackDecided,
    FeedbackReceived,
    PromotionDecided,
    PromotionRequested,
    RequestReceived,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
)
from streams.keys import Identity, KeyRegistry, mint_key
from tests.samples import RecordingProducer
from tests.slack import slash_command

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


def test_when_feedback_asks_for_an_improvement():
    assert wants_improvement(1, "")
    assert wants_improvement(2, "fine")
    assert not wants_improvement(5, "great, thanks")
    assert wants_improvement(4, "answers should be shorter")
    assert wants_improvement(None, "please include an example")
    assert not wants_improvement(None, "ok")


def test_slack_command_text_and_user_mapping():
    assert parse_slack_command("r-1 2 too long") == parse_slack_command("r-1  2  too long")
    parsed = parse_slack_command("r-1 2 too long")
    assert (parsed.run_id, parsed.score, parsed.text) == ("r-1", 2, "too long")
    assert parse_slack_command("r-1 more examples please").score is None
    assert parse_slack_command("r-1 5").text == ""
    for bad in ("", "r-1", "r-1 9 nope"):
        with pytest.raises(ValueError):
            parse_slack_command(bad)
    assert slack_identity("U123", {})[1] == "slack:U123"
    assert slack_identity("U123", {"U123": "alice"})[1] == "alice"


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
    """Owns run r1 (user u1 of goal g1) and slack:U123's run r2; everything else is unknown.

    Feedback whose text says "refuse me" gets a refusing verdict, like the guard's.
    """

    def __init__(self) -> None:
        self.sent: list[FeedbackReceived] = []
        self.keys = KeyRegistry()
        self.verdicts: dict[str, FeedbackDecided | PromotionDecided] = {}
        self.limited: set[str] = set()
        self.asked: list[PromotionRequested] = []

    def key(self, goal: str, user: str, role: str = "user") -> str:
        key, event = mint_key(goal, user, "operator" if role == "operator" else "user", source="t")
        self.keys.apply(event)
        return key

    async def identify(self, key: str) -> Identity | None:
        return self.keys.authenticate(key)

    async def submit(
        self,
        run_id: str,
        user_id: str,
        score: int | None,
        text: str,
        channel: str,
        goal_id: str | None = None,
        *,
        wait: bool = False,
        event_id: str | None = None,
    ) -> FeedbackReceived:
        owners = {"r1": ("u1", "g1"), "r2": ("slack:U123", "g2")}
        if run_id not in owners:
            raise UnknownRun(f"unknown run {run_id!r}")
        if owners[run_id][0] != user_id:
            raise NotRunOwner(f"user {user_id!r} does not own run {run_id!r}")
        if goal_id is not None and owners[run_id][1] != goal_id:
            raise NotRunOwner(f"run {run_id!r} is not of goal {goal_id!r}")
        if user_id in self.limited:
            raise RateLimited(f"user {user_id!r} sent too much feedback")
        if score is not None and not 1 <= score <= 5:
            raise InvalidRequest("score: must be 1-5")
        event = FeedbackReceived(
            source="t", run_id=run_id, user_id=user_id, score=score, text=text, channel=channel
        )
        if event_id is not None:
            event = event.model_copy(update={"event_id": event_id})
        self.sent.append(event)
        refused = "refuse me" in text
        self.verdicts[event.event_id] = FeedbackDecided(
            source="t",
            run_id=run_id,
            feedback_id=event.event_id,
            accepted=not refused,
            reason="the change it asks for was refused: test" if refused else "proposed imp_1",
            improvement_id=None if refused else "imp_1",
        )
        return event

    async def approve(
        self, improvement_id: str, user_id: str, scope: str = "goal"
    ) -> PromotionRequested:
        if improvement_id not in ("imp_1", "imp_waiting"):
            raise PromotionRefused(f"unknown improvement {improvement_id!r}")
        event = PromotionRequested(
            source="t", user_id=user_id, improvement_id=improvement_id, scope=scope
        )
        self.asked.append(event)
        never_approved = scope == "all" and improvement_id == "imp_waiting"
        self.verdicts[event.event_id] = PromotionDecided(
            source="t",
            improvement_id=improvement_id,
            request_id=event.event_id,
            accepted=not never_approved,
            reason="imp_waiting was never approved" if never_approved else "",
            error_type="PromotionRefused" if never_approved else None,
            workflow_id="code" if scope == "all" else "g1/code",
        )
        return event

    async def verdict(
        self, request_id: str, timeout: float
    ) -> FeedbackDecided | PromotionDecided | None:
        return self.verdicts.get(request_id)


async def test_http_improve_statuses():
    sink = _Sink()
    u1 = {"Authorization": f"Bearer {sink.key('g1', 'u1')}"}
    async with TestClient(TestServer(build_app(sink, None))) as client:

        async def post(body: object, headers: dict[str, str] | None = None) -> int:
            return (await client.post("/improve", json=body, headers=headers or u1)).status

        ok = await client.post("/improve", json={"run_id": "r1", "text": "hi"}, headers=u1)
        assert ok.status == 200
        answer = await ok.json()
        assert answer["event_id"] == sink.sent[0].event_id
        assert (answer["accepted"], answer["improvement_id"]) == (True, "imp_1")
        refused = await client.post(
            "/improve", json={"run_id": "r1", "text": "refuse me"}, headers=u1
        )
        assert refused.status == 422 and "refused" in (await refused.json())["error"]
        # The key says who speaks: a body naming someone else is refused.
        assert await post({"run_id": "r1", "user_id": "u2", "score": 1}) == 403
        assert await post({"run_id": "zz", "score": 1}) == 404
        u2 = {"Authorization": f"Bearer {sink.key('g1', 'u2')}"}
        assert await post({"run_id": "r1", "score": 1}, u2) == 403
        other_goal = {"Authorization": f"Bearer {sink.key('g9', 'u1')}"}
        assert await post({"run_id": "r1", "score": 1}, other_goal) == 403
        for bad in (
            {"run_id": "r1"},
            {"score": 1},
            [1],
            {"run_id": "r1", "score": "5"},
            {"run_id": "r1", "score": 9},
        ):
            assert await post(bad) == 400
        assert (await client.post("/improve", data=b"{not json", headers=u1)).status == 400
        sink.limited.add("u1")
        assert await post({"run_id": "r1", "score": 1}) == 429
        disabled = await client.post("/slack/commands", data=b"x")
        assert disabled.status == 404 and "SLACK_SIGNING_SECRET" in await disabled.text()
    assert len(sink.sent) == 2


async def test_http_improve_bad_bodies_are_400_and_the_endpoint_keeps_answering():
    sink = _Sink()
    u1 = {"Authorization": f"Bearer {sink.key('g1', 'u1')}"}
    async with TestClient(TestServer(build_app(sink, None))) as client:
        for raw in (
            b"[" * 20000 + b"]" * 20000,  # deeper than the parser goes: was RecursionError, 500
            b"\x80{",  # not UTF-8
            b"{not json",
        ):
            bad = await client.post("/improve", data=raw, headers=u1)
            assert bad.status == 400, raw[:8]
            assert await bad.json() == {"error": "body must be JSON"}
        # An unknown charset was a LookupError (500): the bytes are read as JSON says they
        # are, whatever Content-Type claims, as the gateway reads them.
        json_with = {**u1, "Content-Type": "application/json; charset=x-nope"}
        garbled = await client.post("/improve", data=b"{not json", headers=json_with)
        assert garbled.status == 400 and await garbled.json() == {"error": "body must be JSON"}
        ok = await client.post("/improve", data=b'{"run_id": "r1", "score": 1}', headers=json_with)
        assert ok.status == 200 and (await ok.json())["accepted"] is True
        utf16 = '{"run_id": "r1", "text": "shorter"}'.encode("utf-16")
        ok = await client.post("/improve", data=utf16, headers=u1)
        assert ok.status == 200 and (await ok.json())["accepted"] is True
        health = await client.get("/health")
        assert health.status == 200 and (await health.json())["ok"] is True
    assert [e.run_id for e in sink.sent] == ["r1", "r1"]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dTE6cHc=",
        "Bearer orch_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Bearer not-a-key",
        "bearer orch_' OR 1=1 --",
    ],
)
async def test_http_improve_needs_a_valid_key(header: str | None):
    sink = _Sink()
    sink.key("g1", "u1")
    headers = {"Authorization": header} if header is not None else {}
    async with TestClient(TestServer(build_app(sink, None))) as client:
        resp = await client.post("/improve", json={"run_id": "r1", "score": 1}, headers=headers)
        assert resp.status == 401 and "API key" in (await resp.json())["error"]
    assert sink.sent == []


async def test_a_revoked_or_altered_key_is_refused():
    sink = _Sink()
    key = sink.key("g1", "u1")
    key_id = key.split("_")[1]
    async with TestClient(TestServer(build_app(sink, None))) as client:
        altered = key[:-1] + ("A" if key[-1] != "A" else "B")
        for bad in (altered, key.upper(), key + "x"):
            resp = await client.post(
                "/improve",
                json={"run_id": "r1", "score": 1},
                headers={"Authorization": f"Bearer {bad}"},
            )
            assert resp.status == 401
        sink.keys.apply(ApiKeyRevoked(source="t", key_id=key_id))
        resp = await client.post(
            "/improve",
            json={"run_id": "r1", "score": 1},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status == 401
    assert sink.sent == []


async def test_only_an_operator_key_approves():
    sink = _Sink()
    user = {"Authorization": f"Bearer {sink.key('g1', 'u1')}"}
    ops = {"Authorization": f"Bearer {sink.key('ops', 'admin', 'operator')}"}
    async with TestClient(TestServer(build_app(sink, None))) as client:
        assert (await client.post("/improvements/imp_1/approve")).status == 401
        assert (await client.post("/improvements/imp_1/approve", headers=user)).status == 403
        assert (await client.post("/improvements/nope/approve", headers=ops)).status == 404
        ok = await client.post("/improvements/imp_1/approve", headers=ops)
        assert ok.status == 200 and (await ok.json())["workflow_id"] == "g1/code"
    assert [a.scope for a in sink.asked] == ["goal"]


async def test_only_an_operator_key_promotes_and_promote_is_its_own_route():
    sink = _Sink()
    user = {"Authorization": f"Bearer {sink.key('g1', 'u1')}"}
    ops = {"Authorization": f"Bearer {sink.key('ops', 'admin', 'operator')}"}
    async with TestClient(TestServer(build_app(sink, None))) as client:
        assert (await client.post("/improvements/imp_1/promote")).status == 401
        no = await client.post("/improvements/imp_1/promote", headers=user)
        assert no.status == 403 and "promoting" in (await no.json())["error"]
        assert (await client.post("/improvements/nope/promote", headers=ops)).status == 404
        assert sink.asked == []  # refused at the edge: nothing sent
        waiting = await client.post("/improvements/imp_waiting/promote", headers=ops)
        assert waiting.status == 422 and "never approved" in (await waiting.json())["error"]
        ok = await client.post("/improvements/imp_1/promote", headers=ops)
        assert ok.status == 200 and (await ok.json())["workflow_id"] == "code"
    assert [(a.improvement_id, a.scope, a.user_id) for a in sink.asked] == [
        ("imp_waiting", "all", "admin"),
        ("imp_1", "all", "admin"),
    ]


def test_key_registry_stores_only_a_hash_and_knows_operators():
    registry = KeyRegistry()
    key, issued = mint_key("g1", "alice", "operator", source="t")
    assert key not in issued.model_dump_json() and issued.key_hash != key
    registry.apply(ApiKeyRevoked(source="t", key_id="ffffffffffffffff"))  # before its issue
    registry.apply(issued)
    who = registry.authenticate(key)
    assert who is not None and (who.goal_id, who.user_id, who.is_operator) == ("g1", "alice", True)
    assert registry.is_operator("alice") and not registry.is_operator("bob")
    registry.apply(ApiKeyRevoked(source="t", key_id=issued.key_id))
    assert registry.authenticate(key) is None and not registry.is_operator("alice")
    assert all("hash" not in row for row in [dict(r) for r in registry.listing()])


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


class _Deciding(RecordingProducer):
    """Sends feedback, and its verdict comes back at once, as the view would read it."""

    def __init__(self) -> None:
        super().__init__()
        self.service: ImprovementService | None = None

    async def send(self, event: Event) -> None:
        await super().send(event)
        if isinstance(event, FeedbackReceived) and self.service is not None:
            verdict = FeedbackDecided(
                source="improvement",
                run_id=event.run_id,
                user_id=event.user_id,
                feedback_id=event.event_id,
                accepted=True,
                reason="recorded",
            )
            self.service._view_event(verdict)  # noqa: SLF001


async def test_slack_and_http_feedback_leave_nothing_behind_waiting_for_a_verdict():
    # Each Slack /improve once kept a waiter for a verdict nobody asked for: one more
    # entry per command, for as long as the service ran.
    producer = _Deciding()
    ctx = SimpleNamespace(producer=producer, clock=SystemClock())
    service = ImprovementService(ctx, ImprovementConfig(http_port=None, feedback_limit=100), None)  # type: ignore[arg-type]
    producer.service = service
    key, issued = mint_key("g1", "u1", "user", source="t")
    for event in (
        issued,
        RequestReceived(source="t", run_id="r1", goal_id="g1", user_id="u1", message="hi"),
        RequestReceived(source="t", run_id="r2", goal_id="g2", user_id="slack:U123", message="x"),
    ):
        service._view_event(event)  # noqa: SLF001
    app = build_app(service, SlackSettings(SECRET))
    async with TestClient(TestServer(app)) as client:
        for n in range(30):
            body, headers = slash_command(SECRET, f"r2 2 shorter answers please {n}")
            ok = await client.post("/slack/commands", data=body, headers=headers)
            assert ok.status == 200 and "recorded" in await ok.text()
        answered = await client.post(
            "/improve",
            json={"run_id": "r1", "score": 2},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert answered.status == 200 and (await answered.json())["accepted"]
    assert len(producer.of(FeedbackReceived)) == 31
    assert service._waiters == {}  # noqa: SLF001


async def test_a_slack_user_speaks_for_the_goal_they_are_mapped_to():
    # Users are per goal: a Slack user mapped to a bare "u1" gave feedback on any goal's run
    # of a user named u1, where that goal's HTTP key is refused. A goal in the mapping binds it.
    sink = _Sink()
    users = {"UG1": "g1/u1", "UG2": "g2/u1", "UBARE": "u1"}
    app = build_app(sink, SlackSettings(SECRET, users=users))
    async with TestClient(TestServer(app)) as client:
        said = {}
        for slack_user in users:
            body, headers = slash_command(SECRET, f"r1 2 from {slack_user}", user_id=slack_user)
            answer = await client.post("/slack/commands", data=body, headers=headers)
            said[slack_user] = answer.status, await answer.text()
    assert said["UG2"][0] == 200 and "not of goal" in said["UG2"][1]
    assert "recorded" in said["UG1"][1] and "recorded" in said["UBARE"][1]
    assert [e.text for e in sink.sent] == ["from UG1", "from UBARE"]


async def test_a_signed_slack_command_is_recorded_once_and_odd_timestamps_are_refused(
    monkeypatch,
):
    sink = _Sink()
    app = build_app(sink, SlackSettings(SECRET))
    async with TestClient(TestServer(app)) as client:
        body, headers = slash_command(SECRET, "r2 2 cite sources")
        first = await client.post("/slack/commands", data=body, headers=headers)
        again = await client.post("/slack/commands", data=body, headers=headers)
        assert first.status == 200 and again.status == 401
        # The signature sent twice, a junk one first: Bolt reads the last, the check the same.
        doubled = CIMultiDict(headers)
        doubled.popall("X-Slack-Signature")
        doubled.add("X-Slack-Signature", "v0=junk")
        doubled.add("X-Slack-Signature", headers["X-Slack-Signature"])
        assert (await client.post("/slack/commands", data=body, headers=doubled)).status == 401
        for stamp in ("abc", "1e3", "", "-5", "9" * 30):
            odd = {**headers, "X-Slack-Request-Timestamp": stamp}
            assert (await client.post("/slack/commands", data=body, headers=odd)).status == 401
        # A body that trickles in is cut off at the deadline, before any signature check.
        monkeypatch.setattr("services.improvement.http.BODY_TIMEOUT_S", 0.3)
        body, headers = slash_command(SECRET, "r2 3 slow")

        async def trickle():
            yield body[:10]
            await asyncio.sleep(2)
            yield body[10:]

        slow = await client.post("/slack/commands", data=trickle(), headers=headers)
        assert slow.status == 408
    assert len(sink.sent) == 1


async def test_a_signed_slack_command_sent_to_two_instances_is_one_event():
    # Each instance remembers only the signatures it answered: the same signed command sent
    # to another (or after a restart) was a second feedback. Its event is named after the
    # signature now, so the service decides it once (see test_improvement_review.py).
    sink = _Sink()
    body, headers = slash_command(SECRET, "r2 2 cite sources")
    for _ in range(2):
        app = build_app(sink, SlackSettings(SECRET))
        async with TestClient(TestServer(app)) as client:
            assert (await client.post("/slack/commands", data=body, headers=headers)).status == 200
    first, second = sink.sent
    assert first.event_id == second.event_id
    other, headers = slash_command(SECRET, "r2 2 cite sources, please")
    app = build_app(sink, SlackSettings(SECRET))
    async with TestClient(TestServer(app)) as client:
        assert (await client.post("/slack/commands", data=other, headers=headers)).status == 200
    assert sink.sent[-1].event_id != first.event_id
