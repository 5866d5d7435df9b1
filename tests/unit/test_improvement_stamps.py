"""A sender's clock does not defeat the improvement service's limits: the feedback rate is
counted by the service's clock, a goal's cost limit is the last update on the log, and a
cost, verdict, pattern decision, run or canary start stamped far ahead counts as made now;
a restart folding the same log reaches the same decisions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from services.improvement.patterns import PatternLearner, PatternSettings
from services.improvement.service import ImprovementService
from services.improvement.state import GoalSpend, ImprovementState
from services.improvement.versions import CanaryPolicy
from streams.clock import FakeClock
from streams.events import (
    AutomationCreated,
    BudgetExceeded,
    BudgetUpdateRequested,
    Event,
    FeedbackDecided,
    FeedbackReceived,
    ImprovementApplied,
    LlmCallCompleted,
    PatternDiscovered,
    RequestReceived,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowVersionSaved,
)
from streams.signatures import signature_of
from streams.versions import VersionLedger
from tests.unit.test_improvement_commands import _delivery, _routed, _service

FAR_AHEAD = datetime(8999, 1, 1, tzinfo=UTC)


def _feedback(at: datetime, text: str = "fine") -> FeedbackReceived:
    return FeedbackReceived(source="sdk", run_id="r1", user_id="u1", score=4, text=text,
                            occurred_at=at)  # fmt: skip


async def _decide(service: ImprovementService, feedback: FeedbackReceived) -> list[Event]:
    """What the service decides on ``feedback``, its verdict then read back by the view."""
    out = await service.on_feedback(feedback, _delivery(feedback))
    for event in out:
        service._view_event(event)  # noqa: SLF001
    return out


def _verdict(out: list[Event]) -> FeedbackDecided:
    verdict = next(e for e in out if isinstance(e, FeedbackDecided))
    return verdict


async def test_feedback_stamped_in_the_past_or_the_future_is_rate_limited_all_the_same():
    # The window was counted back from the feedback's own stamp: stamps an hour or more
    # apart each found their window empty, and every one of them passed the limit.
    service, _, _ = _service(feedback_limit=2, feedback_window_s=3600)
    _routed(service, "code")
    now = service.ctx.clock.now()
    stamps = [now, now + timedelta(hours=2), now - timedelta(hours=2), now + timedelta(days=1),
              FAR_AHEAD, datetime(2000, 1, 1, tzinfo=UTC)]  # fmt: skip
    verdicts = [_verdict(await _decide(service, _feedback(at))) for at in stamps]
    assert [v.accepted for v in verdicts] == [True, True, False, False, False, False]
    assert {v.error_type for v in verdicts[2:]} == {"RateLimited"}
    # A restart folds the same verdicts: the same decision on the next feedback.
    again, _, _ = _service(feedback_limit=2, feedback_window_s=3600)
    again.ctx.clock.set(now)
    _routed(again, "code")
    for verdict in verdicts:
        again._view_event(verdict)  # noqa: SLF001
    assert not _verdict(await _decide(again, _feedback(FAR_AHEAD))).accepted
    # The window moves with the service's clock, not with what feedback says.
    for each in (service, again):
        each.ctx.clock.advance(3601)
        assert _verdict(await _decide(each, _feedback(now - timedelta(days=9)))).accepted


async def test_feedback_read_again_after_its_verdict_gets_no_second_one():
    # A feedback read again (a redelivery, a signed Slack command sent to another instance)
    # was checked against the rate before its verdict on the log was: one accepted, read
    # again once the user had reached the limit, got a second verdict refusing it.
    service, _, _ = _service(feedback_limit=1, feedback_window_s=3600)
    _routed(service, "code")
    first = _feedback(service.ctx.clock.now())
    assert _verdict(await _decide(service, first)).accepted
    service.ctx.clock.advance(7200)
    assert _verdict(await _decide(service, _feedback(service.ctx.clock.now()))).accepted
    assert await service.on_feedback(first, _delivery(first)) == []


async def test_a_verdict_stamped_far_ahead_neither_locks_its_user_out_nor_forgets_others():
    # A verdict's time came from its stamp: one stamped in year 8999 stayed in every rate
    # window (its user refused for good), and as the latest time it dropped every other
    # user's times (their feedback counted from zero again).
    service, _, _ = _service(feedback_limit=1, feedback_window_s=3600)
    _routed(service, "code")
    now = service.ctx.clock.now()
    for user, feedback_id, at in (("u2", "fb-u2", now), ("u1", "fb-u1", FAR_AHEAD)):
        service._view_event(  # noqa: SLF001
            FeedbackDecided(source="improvement", run_id="r0", goal_id="g1", user_id=user,
                            feedback_id=feedback_id, accepted=True, reason="ok", occurred_at=at)
        )  # fmt: skip
    state = service.state
    hour_ago = now - timedelta(hours=1)
    assert state.feedback_count("g1", "u2", hour_ago, excluding="") == 1
    assert not _verdict(await _decide(service, _feedback(now))).accepted  # u1 within the hour
    service.ctx.clock.advance(3600 + 120)
    assert _verdict(await _decide(service, _feedback(now))).accepted


def test_a_goals_cost_limit_is_the_last_update_read_whatever_its_stamp():
    # The update stamped latest won: one stamped in year 8999 stayed the limit for good,
    # and one stamped in the past was ignored although the budget applied it.
    now = datetime.now(UTC)
    spend = GoalSpend(1.0)

    def update(usd: float, at: datetime) -> None:
        spend.apply(BudgetUpdateRequested(source="cli", goal_id="g1", max_daily_cost=usd,
                                          user_id="admin", occurred_at=at))  # fmt: skip

    update(0.0, FAR_AHEAD)
    assert spend.limit("g1") == 0.0
    update(5.0, now)
    assert spend.limit("g1") == 5.0
    update(2.0, datetime(2000, 1, 1, tzinfo=UTC))
    assert spend.limit("g1") == 2.0
    # A snapshot's limit, then what the tail says after it.
    restored = GoalSpend(1.0)
    restored.restore(spend.dump())
    assert restored.limit("g1") == 2.0
    spend = restored
    update(3.0, now - timedelta(days=1))
    assert spend.limit("g1") == 3.0


def test_a_cost_or_refusal_stamped_far_ahead_does_not_stop_todays_spend_counting():
    # A cost stamped in year 8999 made its day the latest seen: no cost of today counted
    # any more, and the copy let the platform's calls spend what the goal no longer had.
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock)
    state.spend.default_limit = 1.0
    spend = state.spend
    for at in (FAR_AHEAD, clock.now()):
        state.apply(LlmCallCompleted(source="loader", goal_id="g1", model="m", cost_usd=0.45,
                                     occurred_at=at))  # fmt: skip
    assert spend.spent("g1", clock.now().date()) == 0.9
    assert not spend.allows("g1", clock.now(), 0.2)
    state.apply(BudgetExceeded(source="budget", goal_id="g2", limit="max_daily_cost", current=1,
                               maximum=1, occurred_at=FAR_AHEAD))  # fmt: skip
    assert not spend.allows("g2", clock.now(), 0.0)  # counted for today
    clock.advance(2 * 86400)
    assert spend.allows("g1", clock.now(), 0.2) and spend.allows("g2", clock.now(), 0.0)


def test_a_pattern_decision_stamped_far_ahead_lapses_like_any_other():
    # Its decision time was its stamp: a pattern decided in year 8999 never lapsed, and
    # was never forgotten.
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(window_s=3600, ttl_seconds=7200), clock)
    learner.learn(
        PatternDiscovered(source="improvement", goal_id="g1", signature="sig", specialty="code",
                          occurrences=3, example_message="hi", occurred_at=FAR_AHEAD)
    )  # fmt: skip
    assert learner.sweep() == 0 and len(learner) == 1
    clock.advance(7200 + 61)
    assert learner.sweep() == 1 and len(learner) == 0


MESSAGE = "tell me about alpha"
SIGNATURE = signature_of(MESSAGE, "code")


def _run(
    run_id: str, at: datetime, *, quality: float = 0.9, failed: bool = False, version: str = "1"
) -> list[Event]:
    """A run of goal g1 asking MESSAGE, ended (stamped ``at``) and assessed."""
    common = {"source": "test", "run_id": run_id, "goal_id": "g1", "user_id": "u1"}
    asked = RequestReceived(**common, message=MESSAGE)
    done = {**common, "agent_id": "a1", "specialty": "code"}
    if failed:
        return [asked, WorkflowFailed(**done, reason="llm_failure", detail="down", occurred_at=at)]
    return [
        asked,
        WorkflowCompleted(
            **done, text="an answer", meta={"workflow_version": version}, occurred_at=at
        ),
        WorkflowAssessed(**done, quality=quality, method="world"),
    ]


def _fold(state: ImprovementState, events: list[Event]) -> None:
    for event in events:
        state.apply(event)


def test_a_run_stamped_far_ahead_leaves_the_pattern_window_like_any_other():
    # A run's end was its stamp: one stamped in year 8999 stayed in its pattern's window for
    # good, so two runs a day later (or any time) made a pattern of three.
    clock = FakeClock()
    state = ImprovementState(PatternSettings(window_s=3600), clock)
    _fold(state, _run("r0", FAR_AHEAD))
    assert state.learner.occurrences(SIGNATURE, "g1") == 1
    clock.advance(2 * 3600)
    assert state.learner.occurrences(SIGNATURE, "g1") == 0
    for i in (1, 2):
        _fold(state, _run(f"r{i}", clock.now()))
    assert state.learner.occurrences(SIGNATURE, "g1") == 2
    assert state.learner.earned(SIGNATURE) == []  # two runs in the window: no pattern


def test_a_failure_stamped_far_ahead_is_not_the_most_recent_outcome_for_good():
    # The last outcomes of a pattern are its latest by end time: a failure stamped in year
    # 8999 stayed the latest, and the pattern never earned an automation however well it ran.
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock)
    _fold(state, _run("r0", FAR_AHEAD, failed=True))
    clock.advance(120)
    for i in range(1, 6):
        _fold(state, _run(f"r{i}", clock.now(), quality=0.9))
        clock.advance(1)
    earned = state.learner.earned(SIGNATURE)
    kinds = {e.kind for e in earned if isinstance(e, AutomationCreated)}
    assert kinds == {"response_cache", "direct_route"}


def _canary(at: datetime) -> list[Event]:
    """Version 2 of workflow ``code`` on half the runs, started (stamped) at ``at``."""
    return [
        WorkflowVersionSaved(source="improvement", workflow_id="code", version=2, parent_version=1,
                             changes={"system_prompt": "Be careful.", "improvement_id": "imp1"},
                             occurred_at=at),
        ImprovementApplied(source="improvement", improvement_id="imp1", workflow_id="code",
                           version=2, traffic_share=0.5, occurred_at=at),
    ]  # fmt: skip


def test_a_run_stamped_far_ahead_is_no_run_of_every_later_canary():
    # A base run stamped in year 8999, ended before any canary, counted as one of the base's
    # runs since every canary started.
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock)
    _fold(state, _run("old", FAR_AHEAD, quality=0.1))
    clock.advance(120)
    _fold(state, _canary(clock.now()))
    _fold(state, _run("base", clock.now(), quality=0.8) + _run("new", clock.now(), version="2"))
    assert state.flow("code").samples() == ([0.9], [0.8])


POLICY = CanaryPolicy(share=0.5, min_runs=10, promote_runs=20, max_runs=200)


def test_a_canary_started_far_ahead_is_judged_and_a_restart_judges_it_alike():
    # A canary counted runs since its start's stamp: one stamped in year 8999, with nothing
    # after it on its topic, counted none, and was never rolled back nor promoted.
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock)
    started = _canary(FAR_AHEAD)
    _fold(state, started)
    clock.advance(61)  # it counts from the clock when read, plus a minute
    rng = random.Random(3)
    runs: list[Event] = []
    for i in range(12):
        runs += _run(f"c{i}", clock.now(), version="2", quality=0.3 + rng.uniform(-0.05, 0.05))
        runs += _run(f"b{i}", clock.now(), version="1", quality=0.8 + rng.uniform(-0.05, 0.05))
        clock.advance(1)
    cut = len(runs) // 2
    _fold(state, runs[:cut])
    snapshot = state.dump()
    _fold(state, runs[cut:])
    ledger = state.flow("code")
    canary, control = ledger.samples()
    assert len(canary) == len(control) == 12
    verdict, decided = ledger.evaluate(clock.now(), POLICY)
    assert verdict is not None and verdict.action == "rollback"
    # A restart an hour later, from the snapshot and the tail, counts the same runs: the
    # start's bound is the one the live service read it with, not the restart's clock.
    again = ImprovementState(PatternSettings(), FakeClock(clock.now() + timedelta(hours=1)))
    again.restore(snapshot)
    _fold(again, runs[cut:])
    assert again.flow("code").samples() == (canary, control)
    assert again.flow("code").evaluate(clock.now(), POLICY)[1] == decided
    # What serves is every reader's: the CLI's fold (no clock) agrees before and after.
    cli = VersionLedger("code")
    for event in started:
        cli.apply(event)
    assert (cli.state.base, cli.state.canary) == (ledger.state.base, ledger.state.canary) == (1, 2)
    for event in decided:
        cli.apply(event)
        state.apply(event)
        again.apply(event)
    for each in (cli, state.flow("code"), again.flow("code")):
        assert (each.state.base, each.state.canary, each.state.share) == (1, None, 0.0)


def test_a_version_5_snapshot_bounds_a_canary_start_far_ahead_by_the_restore_clock():
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock)
    _fold(state, _canary(FAR_AHEAD))
    dumped = state.dump()
    for _, ledger in dumped["flows"]:
        del ledger["starts"]  # what version 5 wrote
    clock.advance(3600)
    again = ImprovementState(PatternSettings(), clock)
    again.restore(dumped)
    since = clock.now() + timedelta(seconds=60)
    assert again.flow("code").state.canary_since == since
    _fold(again, _run("new", since, version="2") + _run("base", since, quality=0.8))
    assert again.flow("code").samples() == ([0.9], [0.8])
