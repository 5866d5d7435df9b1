"""The improvement service on the real broker: assessment, patterns, feedback, versions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from services.improvement.http import SlackSettings
from services.improvement.instructions import ADJUSTMENTS
from services.improvement.service import ImprovementConfig, serve
from services.improvement.versions import CanaryPolicy
from streams.clock import SystemClock
from streams.errors import InvalidRequest
from streams.events import (
    AutomationCreated,
    DeadLetter,
    Event,
    FeedbackDecided,
    FeedbackReceived,
    ImprovementApplied,
    ImprovementAvailable,
    ImprovementRolledBack,
    LlmCallCompleted,
    PatternDiscovered,
    PromotionDecided,
    PromotionRequested,
    RequestReceived,
    RollbackRequested,
    SpendDecided,
    SpendRequested,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowVersionSaved,
)
from streams.kafka import BACKGROUND_FETCH, EventConsumer, EventProducer, KafkaSettings
from streams.keys import mint_key
from streams.llm import InMemoryLLM
from streams.runtime import run_service
from streams.versions import list_versions, request_rollback
from tests.slack import slash_command

pytestmark = pytest.mark.broker

SECRET = "test-signing-secret"
OUTPUTS = (
    "workflow_assessed",
    "pattern_discovered",
    "automation_created",
    "dead_letter",
    "feedback_received",
    "improvement_available",
    "workflow_version_saved",
    "improvement_applied",
    "improvement_rolled_back",
    "llm_call_completed",
    "feedback_decided",
    "promotion_decided",
)


@dataclass
class Instance:
    task: asyncio.Task[None]
    stop: asyncio.Event
    port_file: Path


@dataclass
class Platform:
    settings: KafkaSettings
    producer: EventProducer
    port: int
    instances: list[Instance]
    seen: list[Event] = field(default_factory=list)
    spend_asked: list[SpendRequested] = field(default_factory=list)
    broke_goals: set[str] = field(default_factory=set)  # goals whose holds are refused
    budget_delay_s: float = 0.0  # how long the budget takes to decide a hold

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.seen if isinstance(e, kind)]

    async def until(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check():
            assert loop.time() < deadline, f"timed out; saw {[e.event_type for e in self.seen]}"
            await asyncio.sleep(0.05)

    async def each(self, kind: type[Event], count: int = 1) -> list[Event]:
        """The events of one kind once ``count`` have come. Each kind is its own topic,
        read apart from the others: one seen says nothing of another's arrival."""
        await self.until(lambda: len(self.of(kind)) >= count)
        return self.of(kind)

    async def run(
        self, run_id: str, message: str, *, user: str = "u1", goal: str = "g1", **done: object
    ) -> None:
        """A request and its completion, as the router and loader would send them."""
        await self.producer.send(
            RequestReceived(source="t", run_id=run_id, goal_id=goal, user_id=user, message=message)
        )
        fields: dict[str, object] = {
            "agent_id": "a1",
            "specialty": "code",
            "text": f"answer about {message}",
            "meta": {"workflow_version": "1"},
        }
        fields.update(done)
        await self.producer.send(
            WorkflowCompleted(source="t", run_id=run_id, goal_id=goal, user_id=user, **fields)  # type: ignore[arg-type]
        )


def _judge_or_rewrite(messages: list[dict[str, str]]) -> str:
    if "grade" in messages[0]["content"].lower():
        return "Grade: 8"
    return "Always include a runnable example and a test."


def _start(
    settings: KafkaSettings,
    port_file: Path,
    llm: InMemoryLLM | None,
    config: ImprovementConfig | None = None,
) -> Instance:
    config = dataclasses.replace(
        config or ImprovementConfig(canary=CanaryPolicy(share=0.5, min_runs=10, promote_runs=1000)),
        http_port=0,
        port_file=port_file,
        slack=SlackSettings(SECRET),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_service(
            "improvement",
            partial(serve, config=config, llm=llm),
            settings=settings,
            clock=SystemClock(),
            stop=stop,
        )
    )
    return Instance(task, stop, port_file)


# The service's view of the log fetches in batches: the broker holds each of its fetches up
# to ORCH_BACKGROUND_FETCH_MAX_WAIT_MS (500 ms) for 64 KB that a test's few events never
# make, so every step through the view (a run known, a proposal read back, a canary's runs)
# waited about half a second. It is a latency setting (any value >= 0 is allowed), no
# part of a decision: the services these tests start use 100 ms.
VIEW_FETCH_WAIT_MS = 100


@asynccontextmanager
async def _platform(
    settings: KafkaSettings,
    tmp_path: Path,
    llm: InMemoryLLM | None,
    instances: int = 1,
    config: ImprovementConfig | None = None,
) -> AsyncIterator[Platform]:
    # Read when each instance starts its view (BACKGROUND_FETCH is the services' own dict).
    before = BACKGROUND_FETCH["fetch_max_wait_ms"]
    BACKGROUND_FETCH["fetch_max_wait_ms"] = VIEW_FETCH_WAIT_MS
    try:
        async with _serving(settings, tmp_path, llm, instances, config) as plat:
            yield plat
    finally:
        BACKGROUND_FETCH["fetch_max_wait_ms"] = before


@asynccontextmanager
async def _serving(
    settings: KafkaSettings,
    tmp_path: Path,
    llm: InMemoryLLM | None,
    instances: int,
    config: ImprovementConfig | None,
) -> AsyncIterator[Platform]:
    started = [_start(settings, tmp_path / f"port{i}", llm, config) for i in range(instances)]
    watcher = EventConsumer(settings, OUTPUTS, group_id=None, source="test")
    await watcher.start()
    async with EventProducer(settings) as producer:
        loop = asyncio.get_running_loop()
        ready_by = loop.time() + 60  # a loaded CI machine starts a service slowly
        while loop.time() < ready_by:  # the port is written once the service is ready
            if all(i.port_file.exists() or i.task.done() for i in started):
                break
            await asyncio.sleep(0.05)
        assert not any(i.task.done() for i in started), started
        assert all(i.port_file.exists() for i in started), "not ready within 60 s"
        plat = Platform(settings, producer, int(started[0].port_file.read_text()), started)

        async def _watch() -> None:
            async for batch in watcher.batches(timeout_ms=50):
                plat.seen.extend(d.event for d in batch)

        async def _budget() -> None:
            """The budget's side of a platform call's hold: approved, like a goal with money."""
            async for batch in holds.batches(timeout_ms=50):
                for d in batch:
                    asked = d.event
                    assert isinstance(asked, SpendRequested)
                    plat.spend_asked.append(asked)
                    await asyncio.sleep(plat.budget_delay_s)
                    await producer.send(
                        SpendDecided(
                            source="budget",
                            run_id=asked.run_id,
                            goal_id=asked.goal_id,
                            request_id=asked.event_id,
                            approved=asked.goal_id not in plat.broke_goals,
                        )
                    )

        holds = EventConsumer(settings, ["spend_requested"], group_id=None, source="test")
        await holds.start()
        watching = asyncio.create_task(_watch())
        budget = asyncio.create_task(_budget())
        try:
            yield plat
        finally:
            budget.cancel()
            await holds.stop()
            watching.cancel()
            for instance in started:
                instance.stop.set()
            await asyncio.wait_for(asyncio.gather(*(i.task for i in started)), 20)
            await watcher.stop()


@pytest.fixture
async def platform(settings: KafkaSettings, tmp_path: Path) -> AsyncIterator[Platform]:
    async with _platform(settings, tmp_path, None) as plat:
        yield plat


@pytest.fixture
async def platform_llm(settings: KafkaSettings, tmp_path: Path) -> AsyncIterator[Platform]:
    """The service with an in-memory LLM that judges ("Grade: 8") and rewrites prompts."""
    async with _platform(settings, tmp_path, InMemoryLLM(_judge_or_rewrite)) as plat:
        yield plat


async def test_assessments_patterns_and_automations(platform: Platform):
    message = "How do I write a python decorator with arguments?"
    for i in range(3):
        await platform.run(f"p{i}", message, meta={"quality": "0.9", "workflow_version": "1"})
    await platform.run("k1", "anything", degradation_tier="keyword", meta={})
    await platform.until(lambda: len(platform.of(WorkflowAssessed)) == 4)
    assessed = {e.run_id: e for e in platform.of(WorkflowAssessed)}
    assert {(a.quality, a.method) for r, a in assessed.items() if r.startswith("p")} == {
        (0.9, "world")
    }
    assert (assessed["k1"].quality, assessed["k1"].method) == (0.3, "heuristic")
    await platform.until(lambda: len(platform.of(AutomationCreated)) == 2)
    (found,) = await platform.each(PatternDiscovered)
    assert isinstance(found, PatternDiscovered) and found.occurrences == 3
    autos = platform.of(AutomationCreated)
    assert {(a.kind, a.agent_id, a.signature) for a in autos} == {  # type: ignore[attr-defined]
        ("response_cache", "a1", found.signature),
        ("direct_route", "a1", found.signature),
    }
    # More runs of the same pattern: assessed, but never discovered or automated again.
    await platform.run("p3", message, meta={"quality": "0.95"})
    await platform.until(lambda: len(platform.of(WorkflowAssessed)) == 5)
    await asyncio.sleep(1.5)
    assert len(platform.of(PatternDiscovered)) == 1 and len(platform.of(AutomationCreated)) == 2


async def test_feedback_ownership_http_and_slack(platform: Platform):
    await platform.run("r1", "Fix the flaky test in my parser", meta={"quality": "0.5"})
    await platform.run("r2", "Explain list comprehensions", user="slack:U123")
    await platform.until(lambda: len(platform.of(WorkflowAssessed)) == 2)

    # Through the SDK's path, straight onto the topic: not the owner, so refused with a
    # verdict that says why (and dead-lettered).
    foreign = FeedbackReceived(source="sdk", run_id="r1", user_id="u2", score=1, text="bad")
    await platform.producer.send(foreign)
    await platform.until(lambda: len(platform.of(DeadLetter)) == 1)
    (dead,) = platform.of(DeadLetter)
    assert isinstance(dead, DeadLetter)
    assert dead.original_topic == "feedback_received" and dead.error_type == "NotRunOwner"
    assert "does not own run 'r1'" in dead.reason
    await platform.until(lambda: len(platform.of(FeedbackDecided)) == 1)
    (refused,) = platform.of(FeedbackDecided)
    assert isinstance(refused, FeedbackDecided)
    assert (refused.feedback_id, refused.accepted, refused.error_type) == (
        foreign.event_id,
        False,
        "NotRunOwner",
    )

    key_u1, issued = mint_key("g1", "u1", source="test")
    key_u2, issued2 = mint_key("g1", "u2", source="test")
    await platform.producer.send_many([issued, issued2])
    url = f"http://127.0.0.1:{platform.port}"
    async with aiohttp.ClientSession() as http:

        async def improve(body: dict[str, object], key: str = key_u1) -> tuple[int, dict[str, str]]:
            headers = {"Authorization": f"Bearer {key}"}
            async with http.post(f"{url}/improve", json=body, headers=headers) as resp:
                return resp.status, json.loads(await resp.text())

        known_by = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < known_by:  # the service reads the key's event
            if (await improve({"run_id": "nope", "score": 1}))[0] != 401:
                break
            await asyncio.sleep(0.05)
        assert (await improve({"run_id": "r1", "score": 1}, "orch_bad"))[0] == 401
        assert (await improve({"run_id": "r1", "score": 1}, key_u2))[0] == 403
        assert (await improve({"run_id": "nope", "score": 1}))[0] == 404
        assert (await improve({"run_id": "r1"}))[0] == 400
        status, body = await improve(
            {"run_id": "r1", "score": 1, "text": "Always add a runnable example"}
        )
        assert status == 200, body
        assert body["accepted"] and body["improvement_id"].startswith("imp_")

        signed, headers = slash_command(SECRET, "r2 4 nice, thanks")
        async with http.post(f"{url}/slack/commands", data=signed, headers=headers) as resp:
            assert resp.status == 200 and "recorded" in await resp.text()
        unsigned, headers = slash_command("wrong-secret", "r2 1 bad")
        async with http.post(f"{url}/slack/commands", data=unsigned, headers=headers) as resp:
            assert resp.status == 401

    await platform.until(lambda: len(platform.of(ImprovementApplied)) == 1)
    sent = {(e.channel, e.user_id) for e in await platform.each(FeedbackReceived, 3)}  # type: ignore[attr-defined]
    assert sent == {("sdk", "u2"), ("http", "u1"), ("slack", "slack:U123")}
    (available,) = await platform.each(ImprovementAvailable)
    assert isinstance(available, ImprovementAvailable)
    # Without an LLM only named adjustments apply: the platform's words, never the user's.
    assert (available.workflow_id, available.run_id, available.kind) == (
        "g1/code",
        "r1",
        "instructions",
    )
    assert available.proposal == ADJUSTMENTS["examples"]
    (saved,) = await platform.each(WorkflowVersionSaved)
    assert isinstance(saved, WorkflowVersionSaved)
    assert (saved.version, saved.parent_version, saved.change_source) == (2, 1, "user")
    assert saved.changes["instructions"] == ADJUSTMENTS["examples"]
    assert "system_prompt" not in saved.changes
    assert "runnable example" not in json.dumps(saved.changes)
    (applied,) = platform.of(ImprovementApplied)
    assert isinstance(applied, ImprovementApplied)
    assert (applied.workflow_id, applied.version, applied.traffic_share) == ("g1/code", 2, 0.5)
    # The refused feedback changed nothing: one improvement, from the owner's feedback.
    assert len(platform.of(DeadLetter)) == 1

    # Promoting it to every goal needs an operator.
    improvement_id = available.improvement_id
    ask = PromotionRequested(source="t", user_id="u1", improvement_id=improvement_id, scope="all")
    await platform.producer.send(ask)
    await platform.until(lambda: len(platform.of(PromotionDecided)) == 1)
    (no,) = platform.of(PromotionDecided)
    assert isinstance(no, PromotionDecided)
    assert (no.request_id, no.accepted, no.error_type) == (ask.event_id, False, "NotOperator")
    _, ops = mint_key("ops", "admin", "operator", source="test")
    await platform.producer.send(ops)
    await asyncio.sleep(0.5)
    # An operator approving the saved improvement (again) changes nothing: it said so.
    again = PromotionRequested(source="t", user_id="admin", improvement_id=improvement_id)
    await platform.producer.send(again)
    await platform.until(lambda: len(platform.of(PromotionDecided)) == 2)
    same = platform.of(PromotionDecided)[1]
    assert isinstance(same, PromotionDecided) and same.accepted
    assert "already approved: saved as v2 of goal g1's workflow g1/code" in same.reason
    yes = PromotionRequested(
        source="t", user_id="admin", improvement_id=improvement_id, scope="all"
    )
    await platform.producer.send(yes)
    await platform.until(lambda: len(platform.of(PromotionDecided)) == 3)
    assert platform.of(PromotionDecided)[2].accepted  # type: ignore[attr-defined]
    await platform.until(lambda: len(platform.of(WorkflowVersionSaved)) == 2)
    # The promotion's proposal is on its own topic: seen or not, the version says nothing.
    assert len(await platform.each(ImprovementAvailable, 2)) == 2  # the approval made none
    everyone = platform.of(WorkflowVersionSaved)[1]
    assert isinstance(everyone, WorkflowVersionSaved)
    assert everyone.workflow_id == "code" and everyone.goal_id is None
    assert everyone.changes["instructions"] == ADJUSTMENTS["examples"]


async def test_feedback_is_rate_limited_per_user(settings: KafkaSettings, tmp_path: Path):
    config = ImprovementConfig(http_port=None, feedback_limit=2, feedback_window_s=3600)
    async with _platform(settings, tmp_path, None, config=config) as platform:
        await platform.run("r1", "Summarise this paper", meta={"quality": "0.7"})
        await platform.until(lambda: len(platform.of(WorkflowAssessed)) == 1)
        sent = [
            FeedbackReceived(source="sdk", run_id="r1", user_id="u1", score=4, text=f"ok {i}")
            for i in range(4)
        ]
        for event in sent:
            await platform.producer.send(event)
        await platform.until(lambda: len(platform.of(FeedbackDecided)) == 4)
        verdicts = {e.feedback_id: e for e in platform.of(FeedbackDecided)}  # type: ignore[attr-defined]
        accepted = [e for e in sent if verdicts[e.event_id].accepted]
        limited = [verdicts[e.event_id] for e in sent if not verdicts[e.event_id].accepted]
        assert len(accepted) == 2 and len(limited) == 2
        assert {v.error_type for v in limited} == {"RateLimited"}  # type: ignore[attr-defined]


async def test_feedback_stamped_ahead_or_behind_is_rate_limited_all_the_same(
    settings: KafkaSettings, tmp_path: Path
):
    # The window was counted back from each feedback's own occurred_at: a sender stamping
    # its feedback hours apart (or in year 8999) found every window empty, and passed.
    config = ImprovementConfig(http_port=None, feedback_limit=2, feedback_window_s=3600)
    async with _platform(settings, tmp_path, None, config=config) as platform:
        await platform.run("r1", "Summarise this paper", meta={"quality": "0.7"})
        await platform.until(lambda: len(platform.of(WorkflowAssessed)) == 1)
        now = SystemClock().now()
        stamps = [now + timedelta(hours=h) for h in (-5, -2, 2, 5)]
        stamps.append(datetime(8999, 1, 1, tzinfo=UTC))
        sent = [
            FeedbackReceived(
                source="sdk", run_id="r1", user_id="u1", score=4, text=f"ok {i}", occurred_at=at
            )
            for i, at in enumerate(stamps)
        ]
        for event in sent:
            await platform.producer.send(event)
        await platform.until(lambda: len(platform.of(FeedbackDecided)) == len(sent))
        verdicts = {e.feedback_id: e for e in platform.of(FeedbackDecided)}  # type: ignore[attr-defined]
        limited = [verdicts[e.event_id] for e in sent if not verdicts[e.event_id].accepted]
        assert len(limited) == len(sent) - 2
        assert {v.error_type for v in limited} == {"RateLimited"}  # type: ignore[attr-defined]


async def test_a_change_that_wins_on_three_goals_is_proposed_to_every_goal(
    settings: KafkaSettings, tmp_path: Path
):
    canary = CanaryPolicy(share=0.5, min_runs=6, promote_runs=6, max_runs=1000)
    config = ImprovementConfig(canary=canary, promote_goals=3)
    async with _platform(settings, tmp_path, None, config=config) as platform:
        rng = random.Random(11)
        for n, goal in enumerate(("g1", "g2", "g3")):
            await platform.run(f"{goal}-r0", "Explain python generators", goal=goal)
            # Feedback on a run the service has read (else "unknown run" after 2 s).
            await platform.until(
                lambda g=goal: any(e.run_id == f"{g}-r0" for e in platform.of(WorkflowAssessed))
            )
            await platform.producer.send(
                FeedbackReceived(
                    source="sdk",
                    run_id=f"{goal}-r0",
                    user_id="u1",
                    score=2,
                    text="more examples please",
                )
            )

            def applied(goal: str = goal) -> list[ImprovementApplied]:
                return [
                    e
                    for e in platform.of(ImprovementApplied)
                    if isinstance(e, ImprovementApplied) and e.workflow_id == f"{goal}/code"
                ]

            await platform.until(lambda: len(applied()) == 1)  # the goal's canary
            flow = {"workflow_id": f"{goal}/code"}
            for i in range(8):  # the goal's canary clearly beats its baseline
                for version, q in (("2", 0.9), ("1", 0.5)):
                    quality = f"{q + rng.uniform(-0.05, 0.05):.3f}"
                    meta = {"quality": quality, "workflow_version": version, **flow}
                    await platform.run(f"{goal}-v{version}-{i}", f"task {i}", goal=goal, meta=meta)
            await platform.until(lambda: len(applied()) == 2)
            promoted = applied()[-1]
            assert (promoted.version, promoted.traffic_share) == (2, 1.0)
            if n < 2:  # one or two goals are not evidence enough
                await asyncio.sleep(0.5)
                platform_wide = [
                    e for e in platform.of(WorkflowVersionSaved) if e.workflow_id == "code"
                ]  # type: ignore[attr-defined]
                assert platform_wide == []
        await platform.until(
            lambda: any(e.workflow_id == "code" for e in platform.of(WorkflowVersionSaved))  # type: ignore[attr-defined]
        )
        (everyone,) = [e for e in platform.of(WorkflowVersionSaved) if e.workflow_id == "code"]  # type: ignore[attr-defined]
        assert isinstance(everyone, WorkflowVersionSaved)
        assert everyone.changes["instructions"] == ADJUSTMENTS["examples"]
        assert everyone.changes["goals"] == "g1,g2,g3"
        assert everyone.change_source == "automated"

        def wins() -> list[Event]:
            return [e for e in platform.of(ImprovementAvailable) if e.kind == "goal_win"]  # type: ignore[attr-defined]

        # The goals' wins are on improvement_available, read apart from the version saved.
        await platform.until(lambda: len(wins()) >= 3)
        assert sorted(e.goal_id or "" for e in wins()) == ["g1", "g2", "g3"]


async def test_canary_rolled_back_automatically_then_manual_rollback(platform_llm: Platform):
    platform = platform_llm
    await platform.run("c0", "Parse ISO dates in python")  # no world truth: the judge grades it
    await platform.until(lambda: len(platform.of(WorkflowAssessed)) == 1)
    (judged,) = platform.of(WorkflowAssessed)
    assert isinstance(judged, WorkflowAssessed)
    assert (judged.method, judged.quality) == ("judge", round(7 / 9, 4))
    await platform.until(lambda: len(platform.of(LlmCallCompleted)) == 1)
    (judge_call,) = platform.of(LlmCallCompleted)
    assert isinstance(judge_call, LlmCallCompleted)
    # The judge served goal g1's run: g1 pays for it, within its budget, which held its
    # worst case back first.
    assert (judge_call.purpose, judge_call.goal_id, judge_call.ok) == ("judge", "g1", True)
    (hold,) = platform.spend_asked
    assert (hold.goal_id, hold.run_id, hold.purpose) == ("g1", "c0", "judge")
    assert hold.amount_usd >= judge_call.cost_usd > 0
    # A goal the budget refuses gets no judge call: its run is assessed by the heuristic.
    platform.broke_goals.add("g-broke")
    await platform.run("b0", "Parse ISO dates in python", goal="g-broke")
    await platform.until(lambda: len(platform.of(WorkflowAssessed)) == 2)
    assert platform.of(WorkflowAssessed)[1].method == "heuristic"  # type: ignore[attr-defined]
    assert len(platform.spend_asked) == 2 and len(platform.of(LlmCallCompleted)) == 1

    await platform.producer.send(
        FeedbackReceived(source="sdk", run_id="c0", user_id="u1", score=2, text="too vague")
    )
    # What the LLM wrote from a user's words waits for an operator (ORCH_IMPROVE_REVIEW).
    await platform.until(lambda: len(platform.of(ImprovementAvailable)) == 1)
    (waiting,) = platform.of(ImprovementAvailable)
    assert isinstance(waiting, ImprovementAvailable) and waiting.kind == "review"
    (told,) = await platform.each(FeedbackDecided)
    assert "waits for an operator's approval" in told.reason  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)
    assert platform.of(WorkflowVersionSaved) == []
    await platform.producer.send(
        PromotionRequested(source="t", user_id="operator", improvement_id=waiting.improvement_id)
    )
    await platform.until(lambda: len(platform.of(ImprovementApplied)) == 1)
    (approved,) = await platform.each(PromotionDecided)
    assert isinstance(approved, PromotionDecided) and approved.accepted
    assert approved.workflow_id == "g1/code"
    (saved,) = await platform.each(WorkflowVersionSaved)
    assert isinstance(saved, WorkflowVersionSaved) and saved.workflow_id == "g1/code"
    assert saved.changes["instructions"] == "Always include a runnable example and a test."
    await platform.until(lambda: len(platform.of(LlmCallCompleted)) >= 2)
    rewrite = [e for e in platform.of(LlmCallCompleted) if e.purpose == "improvement"]  # type: ignore[attr-defined]
    assert [e.goal_id for e in rewrite] == ["g1"]

    # The loader would now serve v2 to half of g1's runs; v2 is clearly worse.
    rng = random.Random(5)
    for i in range(12):
        q2, q1 = 0.35 + rng.uniform(-0.1, 0.1), 0.8 + rng.uniform(-0.1, 0.1)
        flow = {"workflow_id": "g1/code"}
        await platform.run(
            f"v2-{i}", f"task {i}", meta={"quality": f"{q2}", "workflow_version": "2", **flow}
        )
        await platform.run(
            f"v1-{i}", f"task {i}", meta={"quality": f"{q1}", "workflow_version": "1", **flow}
        )
    await platform.until(lambda: len(platform.of(ImprovementRolledBack)) == 1)
    (rolled,) = platform.of(ImprovementRolledBack)
    assert isinstance(rolled, ImprovementRolledBack)
    assert (rolled.from_version, rolled.to_version) == (2, 1) and "p=" in rolled.reason
    await platform.until(lambda: len(platform.of(ImprovementApplied)) == 2)
    restore = platform.of(ImprovementApplied)[-1]
    assert (restore.version, restore.traffic_share) == (1, 1.0)  # type: ignore[attr-defined]

    await platform.until(lambda: len(platform.of(WorkflowVersionSaved)) == 2)
    rows = await list_versions(platform.settings, "g1/code")
    assert [(r["version"], r["status"]) for r in rows] == [
        (1, "base"),
        (2, "rolled_back"),
        (3, "rollback_record"),
    ]
    assert rows[2]["change_source"] == "automated"

    with pytest.raises(InvalidRequest):
        await request_rollback(platform.settings, "g1/code", 9, "operator")
    # Sent around the check, a rollback to a version that does not exist is dead-lettered.
    await platform.producer.send(
        RollbackRequested(source="t", user_id="operator", workflow_id="g1/code", to_version=9)
    )
    await platform.until(lambda: len(platform.of(DeadLetter)) == 1)
    assert platform.of(DeadLetter)[0].error_type == "UnknownVersion"  # type: ignore[attr-defined]
    # A rollback is an operator's decision, checked where it is acted on.
    await platform.producer.send(
        RollbackRequested(source="t", user_id="mallory", workflow_id="g1/code", to_version=2)
    )
    await platform.until(lambda: len(platform.of(DeadLetter)) == 2)
    assert platform.of(DeadLetter)[1].error_type == "NotOperator"  # type: ignore[attr-defined]
    asked = await request_rollback(
        platform.settings, "g1/code", 2, "operator", reason="try it again"
    )
    assert isinstance(asked, RollbackRequested)
    await platform.until(lambda: len(platform.of(ImprovementRolledBack)) == 2)
    manual = platform.of(ImprovementRolledBack)[-1]
    assert (manual.from_version, manual.to_version, manual.user_id) == (1, 2, "operator")  # type: ignore[attr-defined]
    await platform.until(lambda: len(platform.of(WorkflowVersionSaved)) == 3)
    rows = await list_versions(platform.settings, "g1/code")
    assert {r["version"]: r["status"] for r in rows}[2] == "base"
    assert rows[-1]["change_source"] == "user" and rows[-1]["user_id"] == "operator"


async def test_a_failure_stamped_far_ahead_does_not_keep_a_pattern_from_its_automations(
    platform: Platform,
):
    # A pattern's last outcomes were its latest by their stamps: a failure stamped in year
    # 8999 stayed the latest for good, and however well its runs went the pattern never
    # earned an automation.
    message, far = "Convert this csv of invoices to json", datetime(8999, 1, 1, tzinfo=UTC)
    failed = {"source": "t", "run_id": "f0", "goal_id": "g1", "user_id": "u1"}
    await platform.producer.send(RequestReceived(**failed, message=message))
    await platform.producer.send(
        WorkflowFailed(**failed, reason="llm_failure", detail="the endpoint was down",
                       agent_id="a1", specialty="code", occurred_at=far)
    )  # fmt: skip
    # It counts as ended when read, plus a minute: runs ended by a loader two minutes ahead
    # come after it once read after it, so they are sent until the pattern earns its own
    # (far fewer than the 200 outcomes a pattern keeps, past which the failure is dropped).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    i = 0
    while len(platform.of(AutomationCreated)) < 2:
        assert loop.time() < deadline and i < 50, f"no automation after {i} good runs"
        ahead = SystemClock().now() + timedelta(minutes=2)
        await platform.run(f"ok{i}", message, meta={"quality": "0.9"}, occurred_at=ahead)
        i += 1
        await asyncio.sleep(0.1)
    assert {(e.kind, e.goal_id) for e in platform.of(AutomationCreated)} == {  # type: ignore[attr-defined]
        ("response_cache", "g1"),
        ("direct_route", "g1"),
    }


async def test_a_canary_started_with_a_stamp_far_ahead_is_still_judged(platform: Platform):
    # A canary counted the runs since its start's stamp: one stamped in year 8999 (a writer
    # whose clock is wrong), with nothing after it on its topic, counted none of them and
    # was never rolled back nor promoted.
    flow, far = "g1/code", datetime(8999, 1, 1, tzinfo=UTC)
    changes = {"instructions": "Answer in one line.", "improvement_id": "imp-ahead"}
    await platform.producer.send(
        WorkflowVersionSaved(source="improvement", goal_id="g1", workflow_id=flow, version=2,
                             parent_version=1, changes=changes, occurred_at=far)
    )  # fmt: skip
    await platform.producer.send(
        ImprovementApplied(source="improvement", improvement_id="imp-ahead", workflow_id=flow,
                           version=2, traffic_share=0.5, occurred_at=far)
    )  # fmt: skip
    # The start counts from the service's clock when it read it, plus a minute: runs ended
    # by a loader two minutes ahead count once read after it, so pairs are sent until then.
    rng = random.Random(9)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    i = 0
    while not platform.of(ImprovementRolledBack):
        assert loop.time() < deadline, f"never judged after {i} pairs of runs"
        ahead = SystemClock().now() + timedelta(minutes=2)
        for version, q in (("2", 0.3), ("1", 0.8)):
            quality = f"{q + rng.uniform(-0.05, 0.05):.3f}"
            meta = {"quality": quality, "workflow_version": version, "workflow_id": flow}
            await platform.run(f"v{version}-{i}", f"task {i}", meta=meta, occurred_at=ahead)
        i += 1
        await asyncio.sleep(0.1)
    (rolled,) = platform.of(ImprovementRolledBack)
    assert isinstance(rolled, ImprovementRolledBack) and rolled.workflow_id == flow
    assert (rolled.from_version, rolled.to_version) == (2, 1) and "p=" in rolled.reason
    # The CLI's reader, folding by the log alone, sees the same rollback.
    await platform.until(lambda: len(platform.of(WorkflowVersionSaved)) == 2)
    rows = await list_versions(platform.settings, flow)
    assert [(r["version"], r["status"]) for r in rows] == [
        (1, "base"),
        (2, "rolled_back"),
        (3, "rollback_record"),
    ]


async def test_two_instances_share_the_work_and_decide_once(
    settings: KafkaSettings, tmp_path: Path
):
    """Runs of four goals land on both instances; each run is assessed once, each goal's
    pattern found once (a goal's runs teach only that goal); with one instance stopped, the
    other takes over its partitions."""
    message = "Summarize this quarterly sales csv by region"
    async with _platform(settings, tmp_path, None, instances=2) as platform:
        for i in range(16):
            await platform.run(f"m{i}", message, goal=f"goal{i % 4}", meta={"quality": "0.8"})
        await platform.until(lambda: len(platform.of(AutomationCreated)) == 8)
        # Assessments and patterns are topics of their own: each is waited for itself.
        await platform.each(WorkflowAssessed, 16)
        await platform.each(PatternDiscovered, 4)
        await asyncio.sleep(1.0)  # time for a duplicate to show up, if there were one
        assert sorted(e.run_id or "" for e in platform.of(WorkflowAssessed)) == sorted(
            f"m{i}" for i in range(16)
        )
        found = platform.of(PatternDiscovered)
        assert sorted(e.goal_id or "" for e in found) == [f"goal{g}" for g in range(4)]
        earned = platform.of(AutomationCreated)
        assert sorted((e.goal_id or "", e.kind) for e in earned) == sorted(
            (f"goal{g}", kind) for g in range(4) for kind in ("direct_route", "response_cache")
        )

        first = platform.instances[0]
        first.stop.set()
        await asyncio.wait_for(first.task, 20)
        for i in range(16, 32):
            await platform.run(f"m{i}", "Draft a polite reminder email", goal=f"goal{i % 4}")
        await platform.until(lambda: len(platform.of(WorkflowAssessed)) == 32, timeout=45)
        await platform.until(lambda: len(platform.of(PatternDiscovered)) == 8)


async def test_a_stop_lets_a_judged_run_finish_with_the_budgets_late_decision(
    platform_llm: Platform,
):
    """A stop while a judge's hold waits for the budget: the view that brings the decision
    is stopped after the work, so the run is judged and paid before the service leaves
    (the view stopped first, the hold waited out the drain and the run was left undone)."""
    platform = platform_llm
    platform.budget_delay_s = 2.0
    await platform.run("s0", "Parse ISO dates in python")
    await platform.until(lambda: len(platform.spend_asked) == 1)
    (instance,) = platform.instances
    instance.stop.set()
    await asyncio.wait_for(instance.task, 30)
    (judged,) = await platform.each(WorkflowAssessed)
    assert isinstance(judged, WorkflowAssessed)
    assert (judged.run_id, judged.method) == ("s0", "judge")
    (call,) = await platform.each(LlmCallCompleted)
    assert isinstance(call, LlmCallCompleted)
    assert (call.purpose, call.goal_id, call.ok) == ("judge", "g1", True)
