"""A sender's clock does not defeat the improvement service's limits: the feedback rate is
counted by the service's clock, a goal's cost limit is the last update on the log, and a
cost, verdict or pattern decision stamped far ahead counts as made now; a restart folding
the same log reaches the same decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.improvement.patterns import PatternLearner, PatternSettings
from services.improvement.service import ImprovementService
from services.improvement.state import GoalSpend, ImprovementState
from streams.clock import FakeClock
from streams.events import (
    BudgetExceeded,
    BudgetUpdateRequested,
    Event,
    FeedbackDecided,
    FeedbackReceived,
    LlmCallCompleted,
    PatternDiscovered,
)
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
