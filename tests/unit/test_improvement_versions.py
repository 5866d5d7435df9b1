"""Workflow versions: canary statistics, automatic rollback and promotion, manual rollback."""

from __future__ import annotations

import random

import pytest

from services.improvement.patterns import PatternSettings
from services.improvement.service import _from_v3
from services.improvement.state import ImprovementState
from services.improvement.versions import CanaryPolicy, WorkflowLedger, judge_canary
from streams.clock import FakeClock
from streams.events import (
    ImprovementApplied,
    ImprovementAvailable,
    ImprovementRolledBack,
    RequestReceived,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowVersionSaved,
)

POLICY = CanaryPolicy(share=0.5, min_runs=10, promote_runs=20, max_runs=200)


def _improvement(n: int = 1) -> ImprovementAvailable:
    return ImprovementAvailable(
        source="test",
        user_id="u1",
        run_id=f"r{n}",
        improvement_id=f"imp{n}",
        workflow_id="code",
        kind="system_prompt",
        proposal=f"You are a careful coder (v{n}).",
        reason="feedback",
    )


def _with_canary(clock: FakeClock) -> WorkflowLedger:
    ledger = WorkflowLedger("code")
    for e in ledger.propose(_improvement(), now=clock.now(), share=0.5, source="user"):
        ledger.apply(e)
    clock.advance(1)
    return ledger


def _serve(ledger: WorkflowLedger, clock: FakeClock, label: str, qualities: list[float]) -> None:
    for q in qualities:
        ledger.observe(f"run{random.random()}", label, q, clock.now())
        clock.advance(1)


def test_improvement_becomes_version_two_on_half_the_traffic():
    clock = FakeClock()
    ledger = WorkflowLedger("code")
    saved, applied = ledger.propose(_improvement(), now=clock.now(), share=0.5, source="user")
    assert isinstance(saved, WorkflowVersionSaved) and isinstance(applied, ImprovementApplied)
    assert (saved.version, saved.parent_version, saved.change_source) == (2, 1, "user")
    assert saved.changes["system_prompt"] == "You are a careful coder (v1)."
    assert (applied.version, applied.traffic_share, applied.improvement_id) == (2, 0.5, "imp1")
    ledger.apply(saved)
    ledger.apply(applied)
    assert (ledger.state.base, ledger.state.canary) == (1, 2)
    # One canary at a time; a replayed improvement is not applied twice.
    assert ledger.propose(_improvement(2), now=clock.now(), share=0.5, source="user") == []
    assert ledger.has_improvement("imp1")


def test_a_regressing_version_is_rolled_back():
    random.seed(7)
    clock = FakeClock()
    ledger = _with_canary(clock)
    _serve(ledger, clock, "2", [0.45 + random.uniform(-0.1, 0.1) for _ in range(9)])
    _serve(ledger, clock, "1", [0.80 + random.uniform(-0.1, 0.1) for _ in range(12)])
    verdict, events = ledger.evaluate(clock.now(), POLICY)
    assert verdict is not None and verdict.action == "wait"  # 9 canary runs are too few
    _serve(ledger, clock, "2", [0.45])
    verdict, events = ledger.evaluate(clock.now(), POLICY)
    assert verdict is not None and verdict.action == "rollback"
    assert verdict.p_value is not None and verdict.p_value < 0.05
    rolled, record, restore = events
    assert isinstance(rolled, ImprovementRolledBack)
    assert (rolled.from_version, rolled.to_version) == (2, 1)
    assert "p=" in rolled.reason
    assert isinstance(record, WorkflowVersionSaved)
    assert (record.version, record.parent_version, record.change_source) == (3, 2, "automated")
    assert record.changes["rollback_to"] == "1" and "system_prompt" not in record.changes
    assert isinstance(restore, ImprovementApplied)
    assert (restore.version, restore.traffic_share) == (1, 1.0)
    for e in events:
        ledger.apply(e)
    st = ledger.state
    assert (st.base, st.canary) == (1, None) and 2 in st.rolled_back
    assert ledger.evaluate(clock.now(), POLICY) == (None, [])
    statuses = {r["version"]: r["status"] for r in ledger.listing()}
    assert statuses == {1: "base", 2: "rolled_back", 3: "rollback_record"}


def test_a_non_regressing_version_is_not_rolled_back_and_is_promoted():
    random.seed(11)
    clock = FakeClock()
    ledger = _with_canary(clock)
    for _ in range(19):
        _serve(ledger, clock, "2", [0.8 + random.uniform(-0.05, 0.05)])
        _serve(ledger, clock, "1", [0.78 + random.uniform(-0.05, 0.05)])
        verdict, events = ledger.evaluate(clock.now(), POLICY)
        assert events == [] and verdict is not None and verdict.action == "wait"
    _serve(ledger, clock, "2", [0.8])
    verdict, events = ledger.evaluate(clock.now(), POLICY)
    assert verdict is not None and verdict.action == "promote"
    (promote,) = events
    assert isinstance(promote, ImprovementApplied)
    assert (promote.version, promote.traffic_share, promote.improvement_id) == (2, 1.0, "imp1")
    ledger.apply(promote)
    assert (ledger.state.base, ledger.state.canary) == (2, None)
    # The next improvement builds on the promoted version.
    saved = ledger.propose(_improvement(2), now=clock.now(), share=0.5, source="system")[0]
    assert isinstance(saved, WorkflowVersionSaved) and (saved.version, saved.parent_version) == (
        3,
        2,
    )


def test_runs_before_the_canary_and_unlabelled_runs_do_not_count():
    clock = FakeClock()
    ledger = WorkflowLedger("code")
    _serve(ledger, clock, "1", [0.9] * 20)  # before the canary started
    for e in ledger.propose(_improvement(), now=clock.now(), share=0.5, source="user"):
        ledger.apply(e)
    clock.advance(1)
    _serve(ledger, clock, "2", [0.1] * 20)
    _serve(ledger, clock, "7", [0.9] * 20)  # neither base nor canary
    canary, control = ledger.samples()
    assert (len(canary), len(control)) == (20, 0)
    verdict, _ = ledger.evaluate(clock.now(), POLICY)
    assert verdict is not None and verdict.action == "wait"


def test_manual_rollback_to_any_version():
    clock = FakeClock()
    ledger = _with_canary(clock)
    promote = ImprovementApplied(
        source="test",
        improvement_id="imp1",
        workflow_id="code",
        version=2,
        traffic_share=1.0,
        occurred_at=clock.now(),
    )
    ledger.apply(promote)
    clock.advance(1)
    events = ledger.rollback(1, now=clock.now(), source="user", reason="by ops", user_id="ops")
    assert [e.event_type for e in events] == [
        "improvement_rolled_back",
        "workflow_version_saved",
        "improvement_applied",
    ]
    assert events[1].change_source == "user"  # type: ignore[union-attr]
    for e in events:
        ledger.apply(e)
    assert (ledger.state.base, ledger.state.canary) == (1, None)
    assert ledger.rollback(1, now=clock.now(), source="user", reason="again") == []
    with pytest.raises(ValueError):
        ledger.rollback(9, now=clock.now(), source="user", reason="no such version")


def test_fold_does_not_depend_on_topic_order():
    random.seed(3)
    clock = FakeClock()
    ledger = _with_canary(clock)
    events = list(ledger._events.values())  # noqa: SLF001
    clock.advance(1)
    events += ledger.rollback(1, now=clock.now(), source="automated", reason="worse")
    for _ in range(5):
        random.shuffle(events)
        replayed = WorkflowLedger("code")
        for e in events:
            replayed.apply(e)
        assert (replayed.state.base, replayed.state.canary) == (1, None)
        assert replayed.next_version() == 4


def test_judge_canary_undecided_at_max_keeps_the_higher_mean():
    policy = CanaryPolicy(min_runs=2, promote_runs=1000, max_runs=4, margin=0.0)
    assert judge_canary([0.5, 0.6, 0.5, 0.6], [0.55, 0.5, 0.6, 0.55], policy).action == "promote"
    assert judge_canary([0.5, 0.6], [0.9, 0.1], policy).action == "wait"


def test_a_goals_run_counts_in_its_goals_trial_and_in_the_platforms_under_it():
    # A run of a goal with its own versions was labelled with the goal's version only, so
    # the platform's trial of a change never saw that goal's runs.
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock)
    meta = {"workflow_version": "2", "workflow_id": "g1/code", "platform_version": "3"}
    for event in (
        RequestReceived(source="t", run_id="r1", goal_id="g1", user_id="u1", message="fix it"),
        RouteDecided(source="t", run_id="r1", specialty="code", action="spawn"),
        WorkflowCompleted(
            source="loader", run_id="r1", goal_id="g1", specialty="code", text="ok", meta=meta
        ),
        WorkflowAssessed(source="t", run_id="r1", specialty="code", quality=0.8, method="world"),
    ):
        state.apply(event)
    seen = {
        flow: [(o.label, o.quality) for o in ledger._observations.values()]  # noqa: SLF001
        for flow, ledger in state.flows.items()
    }
    assert seen == {"g1/code": [("2", 0.8)], "code": [("3", 0.8)]}
    # A snapshot written before runs kept the platform's version reads back, that unknown.
    dump = state.dump()
    older = {"state": {**dump, "runs": [row[:-1] for row in dump["runs"]]}}
    again = ImprovementState(PatternSettings(), clock)
    again.restore(_from_v3(older)["state"])
    assert again.dump()["runs"] == [(*dump["runs"][0][:-1], None)]
