"""A sender's clock does not defeat the improvement service's limits: the feedback rate is
counted by the service's clock, and a verdict stamped far ahead counts as made now; a
restart folding the same log reaches the same decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.improvement.service import ImprovementService
from streams.events import (
    Event,
    FeedbackDecided,
    FeedbackReceived,
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
