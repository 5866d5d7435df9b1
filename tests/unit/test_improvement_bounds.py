"""What the improvement service keeps stays bounded whatever one goal sends: patterns (their
examples, per goal and overall, decided ones once lapsed), runs (per goal: one goal's flood
never evicts another's), failed runs' messages, spend days, feedback times, dead letters
and the instructions a version copies; a snapshot restores within the same bounds."""

from __future__ import annotations

from dataclasses import fields
from datetime import timedelta
from types import SimpleNamespace

import pytest

from services.improvement.patterns import EXAMPLE_CHARS, PatternLearner, PatternSettings
from services.improvement.service import ImprovementConfig, ImprovementService
from services.improvement.state import GoalSpend, ImprovementState, RunInfo, rater
from streams.clock import FakeClock
from streams.events import (
    AutomationCreated,
    BudgetExceeded,
    DeadLetter,
    Event,
    ImprovementAvailable,
    LlmCallCompleted,
    PatternDiscovered,
    RequestReceived,
    RouteDecided,
    WorkflowFailed,
)
from streams.kafka import DEAD_LETTER_EXCERPT, Delivery
from streams.signatures import signature_of
from streams.workflows import MAX_ADJUSTMENTS, split_instructions
from tests.unit.test_improvement_commands import _service


def _words(i: int) -> str:
    """A message whose signature is its own: eight distinct content words of ``i``."""
    return " ".join(f"w{i}x{k}" for k in range(8))


def _observe(learner: PatternLearner, clock: FakeClock, goal: str, i: int, times: int = 1) -> str:
    sig = ""
    for _ in range(times):
        sig = learner.observe(_words(i), "code", clock.now(), goal_id=goal)
    return sig


def _patterns(learner: PatternLearner, goal: str) -> set[str]:
    return {row[0] for row in learner.dump() if row[-1] == goal}


def _failing(state: ImprovementState, run: str, goal: str, message: str) -> None:
    at = state.learner.clock.now()
    user = f"user-of-{goal}"
    for event in (
        RequestReceived(
            source="t", run_id=run, goal_id=goal, user_id=user, message=message, occurred_at=at
        ),
        RouteDecided(
            source="t", run_id=run, goal_id=goal, user_id=user, specialty="code", action="spawn"
        ),
        WorkflowFailed(
            source="t",
            run_id=run,
            goal_id=goal,
            user_id=user,
            reason="budget_exceeded",
            detail="x",
            specialty="code",
            occurred_at=at,
        ),
    ):
        state.apply(event)


# -- patterns ----------------------------------------------------------------------------


def test_a_pattern_keeps_only_the_example_it_sends():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(), clock)
    message = _words(1) + " " + "y" * 32_000
    for _ in range(3):
        sig = learner.observe(message, "code", clock.now(), goal_id="g1")
    [row] = learner.dump()
    assert len(row[2]) == EXAMPLE_CHARS
    [found] = [e for e in learner.evaluate(sig) if isinstance(e, PatternDiscovered)]
    assert found.example_message == message[:EXAMPLE_CHARS]
    # What the log reads back is cut the same way.
    other = PatternLearner(PatternSettings(), clock)
    other.learn(found.model_copy(update={"example_message": message}))
    assert len(other.dump()[0][2]) == EXAMPLE_CHARS


def test_a_failed_run_drops_its_message_once_its_signature_is_known():
    """Only completed runs are assessed, so a failed one's message is read by nothing once
    the learner has its signature (it kept it until evicted before)."""
    state = ImprovementState(PatternSettings(), FakeClock())
    _failing(state, "r1", "g1", _words(1) + " " + "z" * 30_000)
    run = state.run("r1")
    assert run is not None and run.signature is not None and run.message is None
    # Not before the signature: a request whose route has not come keeps its message.
    state.apply(RequestReceived(source="t", run_id="r2", goal_id="g1", user_id="u", message="hi"))
    assert state.run("r2").message == "hi"  # type: ignore[union-attr]


def test_a_goal_keeps_at_most_its_quota_of_patterns_undecided_ones_going_first():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(max_per_goal=5), clock)
    decided = _observe(learner, clock, "g1", 0, times=3)
    assert [e.event_type for e in learner.evaluate(decided)][0] == "pattern_discovered"
    for i in range(1, 20):
        clock.advance(1)
        _observe(learner, clock, "g1", i)
    kept = _patterns(learner, "g1")
    # The decided pattern outlives undecided ones seen after it; the latest ones are kept.
    assert len(kept) == 5 and decided in kept
    assert kept - {decided} == {signature_of(_words(i), "code") for i in range(16, 20)}
    # Once only decided ones are left, the least recently seen of them goes.
    tiny = PatternLearner(PatternSettings(max_per_goal=2), clock)
    first, second = (_observe(tiny, clock, "g1", i, times=3) for i in (0, 1))
    tiny.evaluate(first), tiny.evaluate(second)
    _observe(tiny, clock, "g1", 0)  # seen again: now the most recent
    third = _observe(tiny, clock, "g1", 2, times=3)
    assert _patterns(tiny, "g1") == {first, third}


def test_one_goal_cannot_push_another_goals_patterns_out():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(max_per_goal=1000, max_patterns=100), clock)
    victim = {_observe(learner, clock, "victim", i) for i in range(10)}
    for i in range(10, 5000):
        _observe(learner, clock, "attacker", i)
    assert _patterns(learner, "victim") == victim
    assert len(learner) == len(learner.dump()) == 100
    assert len(_patterns(learner, "attacker")) == 90


def test_a_decided_pattern_is_forgotten_once_its_window_and_its_automations_lapsed():
    clock = FakeClock()
    settings = PatternSettings(window_s=3600, ttl_seconds=7200)
    learner = PatternLearner(settings, clock)
    sig = _observe(learner, clock, "g1", 0, times=3)
    for _ in range(3):
        learner.outcome(sig, agent_id="a1", goal_id="g1", quality=0.9, at=clock.now())
    first = learner.evaluate(sig)
    assert sorted(e.event_type for e in first) == [
        "automation_created",
        "automation_created",
        "pattern_discovered",
    ]
    clock.advance(3601)  # the window is empty, the automations are still in force
    assert learner.sweep() == 0 and _patterns(learner, "g1") == {sig}
    clock.advance(3600)  # and now they have lapsed too
    assert learner.sweep() == 1 and len(learner) == 0
    # Should the pattern come back, it is decided again under the same event ids: the sink
    # keeps one row per id, the router renews the automation it knows.
    _observe(learner, clock, "g1", 0, times=3)
    for _ in range(3):
        learner.outcome(sig, agent_id="a1", goal_id="g1", quality=0.9, at=clock.now())
    again = learner.evaluate(sig)
    assert sorted(e.event_id for e in again) == sorted(e.event_id for e in first)
    automation = next(e for e in again if isinstance(e, AutomationCreated))
    assert automation.occurred_at == clock.now()


def test_a_decision_read_back_from_the_log_counts_from_its_time():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(ttl_seconds=3600), clock)
    old = PatternDiscovered(
        source="improvement",
        goal_id="g1",
        signature="sig_old",
        specialty="code",
        occurrences=3,
        example_message="hi",
        occurred_at=clock.now() - timedelta(days=30),
    )
    learner.learn(old)
    assert learner.sweep() == 1 and len(learner) == 0


def test_a_snapshot_written_before_the_caps_restores_within_them():
    clock = FakeClock()
    big = PatternLearner(PatternSettings(), clock)
    decided = _observe(big, clock, "g1", 0, times=3)
    big.evaluate(decided)
    for i in range(1, 50):
        clock.advance(1)
        _observe(big, clock, "g1", i)
    for i in range(50, 60):
        _observe(big, clock, "g2", i)
    rows = [(*row[:7], row[-1]) for row in big.dump()]  # as snapshot version 2 wrote them
    rows[0] = (*rows[0][:2], "e" * 32_000, *rows[0][3:])
    small = PatternLearner(PatternSettings(max_per_goal=10, max_patterns=15), clock)
    small.restore(rows)
    # g1's rows come first and fill its quota; g2's then take from the goal holding the most.
    kept = _patterns(small, "g1")
    assert len(small) == 15 and len(kept) == 7 and len(_patterns(small, "g2")) == 8
    latest = {signature_of(_words(i), "code") for i in range(44, 50)}
    assert kept == {decided, *latest}  # undecided ones go first, the least recently seen
    assert all(len(row[2]) <= EXAMPLE_CHARS for row in small.dump())
    # A decision of a version 2 row counts as made at the restore: kept one TTL.
    [row] = [r for r in small.dump() if r[0] == decided]
    assert row[7] == clock.now()


# -- runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cap", "per_goal"), [(2000, 500), (2000, 2000)])
def test_one_goals_flood_of_runs_does_not_evict_another_goals_run(cap: int, per_goal: int):
    """The victim's run is still known (its feedback finds it) after the attacker's flood
    of ten times the table, whether the goal's quota or the overall cap bites first."""
    state = ImprovementState(
        PatternSettings(), FakeClock(), max_runs=cap, max_runs_per_goal=per_goal
    )
    state.apply(
        RequestReceived(source="t", run_id="victim-run", goal_id="v", user_id="alice", message="a")
    )
    for i in range(10 * cap):
        state.apply(
            RequestReceived(source="t", run_id=f"f{i}", goal_id="x", user_id="m", message="hi")
        )
    victim = state.run("victim-run")
    assert victim is not None and victim.user_id == "alice"
    assert len(state.runs) == min(cap, per_goal + 1)
    assert state.run(f"f{10 * cap - 1}") is not None and state.run("f0") is None
    # A goal holding the most loses its oldest first, whichever goal sends the next run.
    many = ImprovementState(PatternSettings(), FakeClock(), max_runs=4, max_runs_per_goal=4)
    for run, goal in (("a1", "a"), ("b1", "b"), ("a2", "a"), ("a3", "a"), ("b2", "b")):
        many.apply(RequestReceived(source="t", run_id=run, goal_id=goal, user_id="u", message="m"))
    assert list(many.runs) == ["b1", "a2", "a3", "b2"]


def test_a_run_that_learns_its_goal_late_counts_towards_that_goal():
    state = ImprovementState(PatternSettings(), FakeClock(), max_runs=10, max_runs_per_goal=2)
    state.apply(RouteDecided(source="t", run_id="late", specialty="code", action="spawn"))
    state.apply(RequestReceived(source="t", run_id="late", goal_id="g", user_id="u", message="m"))
    for i in range(2):
        state.apply(
            RequestReceived(source="t", run_id=f"g{i}", goal_id="g", user_id="u", message="m")
        )
    assert state.run("late") is None and len(state.runs) == 2


def test_a_snapshot_of_runs_restores_within_the_caps_and_without_failed_runs_messages():
    clock = FakeClock()
    full = ImprovementState(PatternSettings(), clock)
    _failing(full, "victim", "v", _words(1))
    for i in range(100):
        _failing(full, f"f{i}", "x", _words(i + 2))
    dumped = full.dump()
    # As a snapshot of before wrote it: every failed run kept its message.
    message = [f.name for f in fields(RunInfo)].index("message")
    dumped["runs"] = [
        (*row[:message], "old message", *row[message + 1 :]) for row in dumped["runs"]
    ]
    small = ImprovementState(PatternSettings(), clock, max_runs=20, max_runs_per_goal=10)
    small.restore(dumped)
    assert len(small.runs) == 11 and small.run("victim") is not None
    assert small.run("f99") is not None and small.run("f89") is None
    assert all(row[message] is None for row in small.dump()["runs"])


# -- spend and feedback ------------------------------------------------------------------


def test_goal_spend_keeps_the_last_two_days_and_still_counts_today():
    clock = FakeClock()
    start = clock.now()
    spend = GoalSpend(1.0, clock=clock)
    for day in range(365):
        clock.set(at := start + timedelta(days=day))
        for goal in ("g1", "g2"):
            spend.apply(
                LlmCallCompleted(source="t", goal_id=goal, model="m", cost_usd=0.4, occurred_at=at)
            )
            spend.apply(
                BudgetExceeded(
                    source="t",
                    goal_id=goal,
                    limit="max_daily_cost",
                    current=1,
                    maximum=1,
                    occurred_at=at,
                )
            )
    dumped = spend.dump()
    assert len(dumped["spent"]) == 4 and len(dumped["exceeded"]) == 4
    last = clock.now()
    assert spend.spent("g1", last.date()) == pytest.approx(0.4)
    assert not spend.allows("g1", last, 0.0)  # today's refusal is still read
    late = LlmCallCompleted(source="t", goal_id="g1", model="m", cost_usd=9, occurred_at=start)
    spend.apply(late)  # a day long gone: not kept
    assert len(spend.dump()["spent"]) == 4
    # A snapshot of before, with every day, restores with the last two.
    old = GoalSpend(1.0, clock=clock)
    old.restore(
        {
            **dumped,
            "exceeded": [],
            "spent": [(("g1", (start + timedelta(days=d)).date()), 1.0) for d in range(30)],
        }
    )
    assert len(old.dump()["spent"]) == 2


def test_feedback_times_outside_the_rate_window_and_idle_users_are_dropped():
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock, feedback_window_s=3600)
    for u in range(1000):
        state.note_feedback("g1", f"user{u}", f"fb{u}", clock.now())
    clock.advance(3 * 3600)
    state.note_feedback("g1", "user0", "late", clock.now())
    state.note_feedback("g1", "newcomer", "n1", clock.now())
    assert set(state.feedback) == {rater("g1", "user0"), rater("g1", "newcomer")}
    assert list(state.feedback[rater("g1", "user0")]) == ["late"]
    # Within the window nothing a rate check reads is dropped.
    for k in range(5):
        clock.advance(60)
        state.note_feedback("g1", "newcomer", f"n{k + 2}", clock.now())
    hour_ago = clock.now() - timedelta(hours=1)
    assert state.feedback_count("g1", "newcomer", hour_ago, excluding="") == 6
    # A user of the same name in another goal is another person: none of it counts there.
    assert state.feedback_count("g2", "newcomer", hour_ago, excluding="") == 0


# -- the service -----------------------------------------------------------------------------


async def test_a_refused_command_is_dead_lettered_as_an_excerpt():
    service, producer, _ = _service()
    command = ImprovementAvailable(
        source="improvement",
        goal_id="g1",
        improvement_id="imp_big",
        workflow_id="code",
        kind="rewrite",
        proposal="p" * 900_000,
    )
    await service.handle_command(command, Delivery(command, command.topic, 3, 41))
    [letter] = producer.of(DeadLetter)
    assert len(letter.payload) == DEAD_LETTER_EXCERPT
    assert (letter.original_topic, letter.partition, letter.offset) == (command.topic, 3, 41)
    assert letter.error_type == "ImprovementRefused" and "cut" in letter.reason
    assert letter.occurred_at == service.ctx.clock.now()


def test_a_version_holds_at_most_the_instructions_the_loader_serves(
    monkeypatch: pytest.MonkeyPatch,
):
    service, _, _ = _service()
    current = [f"Rule number {i} applies." for i in range(MAX_ADJUSTMENTS)]
    monkeypatch.setattr(service.state, "current_instructions", lambda workflow: current)
    proposal = ImprovementAvailable(
        source="improvement",
        goal_id="g1",
        improvement_id="imp_9",
        workflow_id="g1/code",
        kind="instructions",
        proposal="Keep answers short.",
    )
    changes = service._changes(proposal)  # noqa: SLF001
    assert isinstance(changes, dict)
    kept = split_instructions(changes["instructions"])
    assert (
        kept == [*current[1:], "Keep answers short."] and changes["added"] == "Keep answers short."
    )


def test_the_service_state_takes_its_caps_from_the_config():
    ctx = SimpleNamespace(producer=None, clock=FakeClock())
    config = ImprovementConfig(http_port=None, max_runs=7, max_runs_per_goal=3)
    service = ImprovementService(ctx, config, None)  # type: ignore[arg-type]
    events: list[Event] = [
        RequestReceived(source="t", run_id=f"r{i}", goal_id="g", user_id="u", message="m")
        for i in range(5)
    ]
    for event in events:
        service._view_event(event)  # noqa: SLF001
    assert list(service.state.runs) == ["r2", "r3", "r4"]
