"""The pattern learner: sliding window, one discovery, one automation per kind, what they save;
all of it per goal."""

from __future__ import annotations

import hashlib
import random
from datetime import datetime, timedelta

import pytest

from services.improvement.patterns import PatternLearner, PatternSettings, automation_id
from services.improvement.state import ImprovementState
from streams.clock import FakeClock
from streams.events import (
    AutomationCreated,
    Event,
    PatternDiscovered,
    RequestReceived,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
)
from streams.signatures import exact_key, signature_of

MSG = "Explain python decorators with an example"


def _run(
    learner: PatternLearner,
    clock: FakeClock,
    i: int,
    *,
    message: str = MSG,
    agent: str = "a1",
    quality: float | None = 0.9,
    specialty: str = "code",
    goal: str = "g1",
) -> str:
    sig = learner.observe(message, specialty, clock.now(), goal_id=goal)
    learner.outcome(sig, agent_id=agent, goal_id=goal, quality=quality, at=clock.now())
    return sig


def test_three_runs_make_one_pattern_and_one_automation_per_kind():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(), clock)
    sig = ""
    emitted = []
    for i in range(6):
        sig = _run(learner, clock, i, agent="a1" if i % 2 else "a2", quality=0.9 if i % 2 else 0.7)
        emitted += learner.evaluate(sig)
        clock.advance(60)
        if i == 1:
            assert emitted == []  # two runs are not a pattern yet
    found = [e for e in emitted if isinstance(e, PatternDiscovered)]
    autos = [e for e in emitted if isinstance(e, AutomationCreated)]
    assert len(found) == 1 and found[0].signature == sig == signature_of(MSG, "code")
    assert found[0].occurrences == 3 and found[0].specialty == "code"
    assert sorted(a.kind for a in autos) == ["direct_route", "response_cache"]
    assert {a.agent_id for a in autos} == {"a1"}  # the better agent of the two
    assert {a.automation_id for a in autos} == {
        automation_id(sig, "direct_route", "g1"),
        automation_id(sig, "response_cache", "g1"),
    }
    assert learner.evaluate(sig) == []


def test_window_forgets_old_runs():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(window_s=3600), clock)
    sig = _run(learner, clock, 1)
    clock.advance(3000)
    _run(learner, clock, 2)
    clock.advance(1000)  # the first run is now outside the hour
    _run(learner, clock, 3)
    assert learner.occurrences(sig) == 2
    assert learner.evaluate(sig) == []
    _run(learner, clock, 4)
    assert [e.event_type for e in learner.evaluate(sig)][0] == "pattern_discovered"


def test_the_window_is_counted_from_the_latest_run_times_alone():
    """A signature keeps only its latest ``threshold`` run times, not one per run: with runs
    arriving late and out of order and the window moving on, it counts what a learner
    keeping every run would count, up to the threshold, so it finds the pattern when that
    one would."""
    rng = random.Random(2)
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(window_s=600, threshold=4), clock)
    every: list[datetime] = []
    found = 0
    for _ in range(400):
        at = clock.now() - timedelta(seconds=rng.uniform(0, 900))
        sig = learner.observe(MSG, "code", at, goal_id="g1")
        every.append(at)
        clock.advance(rng.choice([0.0, 1.0, 20.0, 300.0]))
        in_window = sum(1 for t in every if t >= clock.now() - timedelta(seconds=600))
        assert learner.occurrences(sig) == min(in_window, 4)
        assert len(learner.dump()[0][3]) <= 4
        if not found:
            emitted = [e for e in learner.evaluate(sig) if isinstance(e, PatternDiscovered)]
            assert bool(emitted) == (in_window >= 4)
            found = len(emitted)
    assert found == 1


def test_failures_or_low_quality_earn_no_automation():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(), clock)
    for i in range(3):
        sig = _run(learner, clock, i, quality=None if i == 2 else 0.9)
        clock.advance(1)
    assert [e.event_type for e in learner.evaluate(sig)] == ["pattern_discovered"]
    for i in range(3, 7):  # good runs again, but the failure is among the last five
        _run(learner, clock, i)
        clock.advance(1)
        assert learner.evaluate(sig) == []
    _run(learner, clock, 7)  # now the last five runs all succeeded
    assert {e.event_type for e in learner.evaluate(sig)} == {"automation_created"}

    poor = PatternLearner(PatternSettings(), clock)
    for i in range(5):
        sig2 = _run(poor, clock, 100 + i, message="sort a csv file by date", quality=0.4)
    assert [e.event_type for e in poor.evaluate(sig2)] == ["pattern_discovered"]


def test_sweep_forgets_idle_signatures_but_not_patterns():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(window_s=60), clock)
    for i in range(3):
        pattern = _run(learner, clock, i)
    learner.evaluate(pattern)
    once = _run(learner, clock, 9, message="a one-off question about rust lifetimes")
    clock.advance(120)
    assert learner.sweep() == 1
    assert set(learner) == {pattern} and once not in set(learner)


def test_history_read_back_prevents_a_second_emission():
    clock = FakeClock()
    first = PatternLearner(PatternSettings(), clock)
    for i in range(3):
        sig = _run(first, clock, i)
    emitted = first.evaluate(sig)
    restarted = PatternLearner(PatternSettings(), clock)
    for e in emitted:
        restarted.learn(e)
    for i in range(3):
        _run(restarted, clock, i)
    assert restarted.evaluate(sig) == []


def test_only_kinds_the_router_serves_can_be_configured(monkeypatch):
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(kinds=("response_cache",)), clock)
    for i in range(3):
        sig = _run(learner, clock, i)
    kinds = [e.kind for e in learner.evaluate(sig) if isinstance(e, AutomationCreated)]
    assert kinds == ["response_cache"]
    monkeypatch.setenv("ORCH_AUTOMATION_KINDS", "response_cache,predictive_spawn")
    with pytest.raises(ValueError, match="unknown kind.*predictive_spawn"):
        PatternSettings.from_env()


def _replay(kinds: tuple[str, ...]) -> dict[str, float]:
    """A repetitive workload replayed the way the router applies automations.

    Five questions asked 20 times each, interleaved; every LLM answer costs 0.002 USD.
    Agent a1 answers at quality 0.9, a2 at 0.6, and without automations the router
    still explores a2 on a third of the requests. response_cache: an identical
    request within the TTL gets the best assessed answer for it, at zero cost.
    direct_route: the pattern's requests go to the best agent.
    """
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(kinds=kinds), clock)
    questions = [f"{w} python decorators" for w in ("alpha", "beta", "gamma", "delta", "omega")]
    cost, quality = 0.002, {"a1": 0.9, "a2": 0.6}
    automated: dict[str, dict[str, AutomationCreated]] = {}
    best_answer: dict[str, float] = {}  # exact_key -> quality of the best answer seen
    m = dict.fromkeys(("base_cost", "cost", "base_q", "q", "cached", "routed"), 0.0)
    for i in range(100):
        message = questions[i % 5]
        sig, key = signature_of(message, "code"), exact_key(message, "code")
        explore = "a2" if i % 3 == 0 else "a1"
        m["base_cost"] += cost
        m["base_q"] += quality[explore] / 100
        done = automated.get(sig, {})
        if "response_cache" in done and key in best_answer:
            m["cached"] += 1
            m["q"] += best_answer[key] / 100
        else:
            agent = explore
            if "direct_route" in done:
                agent = done["direct_route"].agent_id or explore
                m["routed"] += agent != explore
            m["cost"] += cost
            m["q"] += quality[agent] / 100
            best_answer[key] = max(best_answer.get(key, 0.0), quality[agent])
            _run(learner, clock, i, message=message, agent=agent, quality=quality[agent])
            for e in learner.evaluate(sig):
                if isinstance(e, AutomationCreated):
                    automated.setdefault(sig, {})[e.kind] = e
        clock.advance(30)
    return m


def test_what_automations_save_on_a_repetitive_workload():
    """Each kind alone, then both: cost avoided per automated request, and quality kept."""
    cache = _replay(("response_cache",))
    route = _replay(("direct_route",))
    both = _replay(("response_cache", "direct_route"))
    saved = cache["base_cost"] - cache["cost"]
    print(
        f"\nresponse_cache: {cache['cached']:.0f}/100 requests cached,"
        f" {saved / cache['cached']:.4f} USD avoided per cached request,"
        f" LLM cost -{saved / cache['base_cost']:.0%}, quality {cache['q']:.3f} vs"
        f" {cache['base_q']:.3f}\ndirect_route: {route['routed']:.0f}/100 requests moved to the"
        f" best agent, +{(route['q'] - route['base_q']) * 100 / route['routed']:.2f} quality per"
        f" routed request, cost unchanged\nboth: LLM cost"
        f" -{1 - both['cost'] / both['base_cost']:.0%},"
        f" quality {both['q']:.3f} vs {both['base_q']:.3f}"
    )
    assert saved / cache["cached"] == pytest.approx(0.002)  # a cache hit avoids one LLM call
    assert saved / cache["base_cost"] >= 0.30 and cache["q"] >= cache["base_q"]
    assert route["routed"] > 0 and route["cost"] == pytest.approx(route["base_cost"])
    assert route["q"] > route["base_q"]
    assert both["cost"] <= 0.7 * both["base_cost"] and both["q"] >= both["base_q"]


# -- one goal's runs teach that goal only (DESIGN.md, "Trust boundary") ----------------

CS = "customer_support"
ASKED = "Reset my account password please"


def _goal_run(
    state: ImprovementState,
    clock: FakeClock,
    i: int,
    goal: str,
    quality: float | None = 0.9,
    reason: str = "budget_exceeded",
) -> None:
    """One run of ``goal`` asking ``ASKED`` (its own agent ``cs_<goal>``), folded as the
    service folds the log; ``quality`` None: it failed (over budget, or ``reason``)."""
    run, agent = f"{goal}-r{i}", f"cs_{goal}"
    events: list[Event] = [
        RequestReceived(source="sdk", run_id=run, goal_id=goal, user_id="u", message=ASKED),
        RouteDecided(source="router", run_id=run, goal_id=goal, specialty=CS, action="reuse"),
    ]
    if quality is None:
        events.append(
            WorkflowFailed(
                source="budget",
                run_id=run,
                goal_id=goal,
                reason=reason,
                detail="failed",
                specialty=CS,
                occurred_at=clock.now(),
            )
        )
    else:
        events += [
            WorkflowCompleted(
                source="loader",
                run_id=run,
                goal_id=goal,
                agent_id=agent,
                specialty=CS,
                text=f"{goal}'s answer",
                cost_usd=0.01,
                degradation_tier="llm",
                occurred_at=clock.now(),
            ),
            WorkflowAssessed(
                source="improvement",
                run_id=run,
                goal_id=goal,
                specialty=CS,
                quality=quality,
                method="judge",
            ),
        ]
    for e in events:
        state.apply(e)
    clock.advance(30)


def _earned(events: list[Event]) -> list[tuple[str, str | None, str | None]]:
    return sorted(
        (e.kind, e.goal_id, e.agent_id) for e in events if isinstance(e, AutomationCreated)
    )


BOTH = ["direct_route", "response_cache"]


def test_a_goal_that_automated_a_signature_first_does_not_claim_it_for_every_goal():
    """F8: goal A's three good runs earn A's automations; goal B's later runs of the same
    signature earn B's own, with B's agent, B's goal and ids of B's."""
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock)
    sig = signature_of(ASKED, CS)
    first: list[Event] = []
    for i in range(3):
        _goal_run(state, clock, i, "goal-a")
        first += state.learner.evaluate(sig)
    assert _earned(first) == [(k, "goal-a", "cs_goal-a") for k in BOTH]
    later: list[Event] = []
    for i in range(9):
        _goal_run(state, clock, i, "goal-b", quality=1.0)
        later += state.learner.evaluate(sig)
    assert _earned(later) == [(k, "goal-b", "cs_goal-b") for k in BOTH]
    found = [e for e in first + later if isinstance(e, PatternDiscovered)]
    assert [(e.goal_id, e.signature) for e in found] == [("goal-a", sig), ("goal-b", sig)]
    ids = {e.automation_id for e in first + later if isinstance(e, AutomationCreated)}
    assert ids == {automation_id(sig, k, g) for k in BOTH for g in ("goal-a", "goal-b")}
    assert len({e.event_id for e in first + later}) == 6  # one event per goal and decision
    assert state.learner.evaluate(sig) == []  # each goal's, once


def test_another_goals_failures_or_poor_runs_do_not_veto_a_goals_automations():
    """F9: goal B's six runs at 0.95 earn both automations, whatever goal A's runs of the
    same signature did: one failed over budget, or six at 0.3."""
    sig = signature_of(ASKED, CS)
    for label, a_runs in (("none", []), ("one failure", [None]), ("six poor", [0.3] * 6)):
        clock = FakeClock()
        state = ImprovementState(PatternSettings(), clock)
        for i in range(6):
            _goal_run(state, clock, i, "goal-b", quality=0.95)
        for i, quality in enumerate(a_runs):
            _goal_run(state, clock, 100 + i, "goal-a", quality=quality)
        earned = _earned(state.learner.evaluate(sig))
        assert [(k, g) for k, g, _ in earned] == [(k, "goal-b") for k in BOTH], label


def test_another_goals_runs_do_not_count_towards_a_goals_pattern():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(), clock)
    for i in range(2):
        sig = _run(learner, clock, i, goal="goal-a")
    _run(learner, clock, 2, goal="goal-b")  # three runs of the signature, of two goals
    assert learner.occurrences(sig, "goal-a") == 2 and learner.occurrences(sig, "goal-b") == 1
    assert learner.evaluate(sig) == []
    _run(learner, clock, 3, goal="goal-b")
    _run(learner, clock, 4, goal="goal-b")
    assert {(e.event_type, e.goal_id) for e in learner.evaluate(sig)} == {
        ("pattern_discovered", "goal-b"),
        ("automation_created", "goal-b"),
    }


def test_decisions_read_back_are_a_goals_own_and_older_ones_mark_nothing():
    """A goal's own decisions read back are never made twice; one written before patterns
    were per goal (no goal, or the id of a signature for every goal) marks nothing, so the
    goal earns its own on its own runs; none of them breaks the fold."""
    clock = FakeClock()
    sig = signature_of(MSG, "code")
    older: list[Event] = [
        PatternDiscovered(source="improvement", signature=sig, specialty="code", occurrences=3),
        AutomationCreated(
            source="improvement",
            automation_id="auto_" + hashlib.sha256(f"{sig}|direct_route".encode()).hexdigest()[:16],
            signature=sig,
            kind="direct_route",
            specialty="code",
            agent_id="a1",
            goal_id="g1",
        ),
        AutomationCreated(
            source="improvement",
            automation_id="auto-1",
            signature=sig,
            kind="response_cache",
            specialty="code",
        ),
    ]
    learner = PatternLearner(PatternSettings(), clock)
    for e in older:
        learner.learn(e)
    for i in range(3):
        _run(learner, clock, i, goal="g1")
    emitted = learner.evaluate(sig)
    assert sorted((e.event_type, e.goal_id) for e in emitted) == [
        ("automation_created", "g1"),
        ("automation_created", "g1"),
        ("pattern_discovered", "g1"),
    ]
    restarted = PatternLearner(PatternSettings(), clock)
    for e in [*older, *emitted]:
        restarted.learn(e)
    for i in range(3):
        _run(restarted, clock, i, goal="g1")
    assert restarted.evaluate(sig) == []
    # Another goal's decisions, read back, mark nothing of this goal's.
    other = PatternLearner(PatternSettings(), clock)
    for e in emitted:
        other.learn(e)
    for i in range(3):
        _run(other, clock, i, goal="g2")
    assert {e.goal_id for e in other.evaluate(sig)} == {"g2"}


def test_a_snapshot_of_two_goals_patterns_restores_each_goals_own():
    clock = FakeClock()
    learner = PatternLearner(PatternSettings(), clock)
    for i in range(3):
        sig = _run(learner, clock, i, goal="goal-a", agent="a")
        _run(learner, clock, i, goal="goal-b", agent="b", quality=None if i == 2 else 0.9)
    learner.evaluate(sig)
    restored = PatternLearner(PatternSettings(), clock)
    restored.restore(learner.dump())
    assert restored.dump() == learner.dump() and len(learner.dump()) == 2
    assert list(restored) == [sig]
    with pytest.raises(ValueError):
        restored.restore([row[:-1] + (None,) for row in learner.dump()])  # a row of no goal
    assert restored.dump() == learner.dump()  # a restore that fails changes nothing


def test_a_pattern_dumped_before_patterns_were_per_goal_restores_split_by_goal():
    """An older snapshot's row (no goal: every goal's runs of a signature together, with
    what was decided on them) restores without error: each goal gets its own outcomes,
    nothing decided on every goal's runs is carried over, and no goal's runs count for
    another; so each goal then earns its own on its own runs alone."""
    clock = FakeClock()
    sig = signature_of(MSG, "code")
    at = [clock.now() - timedelta(seconds=60 * k) for k in range(6)]
    legacy = (
        sig,
        "code",
        MSG,
        tuple(sorted(at)[-3:]),
        (
            (at[5], "a1", "goal-a", 0.9),
            (at[4], "a1", "goal-a", 0.9),
            (at[3], "a1", "goal-a", 0.9),
            (at[2], "b1", "goal-b", 0.9),
            (at[1], None, None, 0.9),  # a run of no goal: nobody's
            (at[0], "b1", "goal-b", None),  # goal B's failure: B's alone
        ),
        True,
        ("direct_route", "response_cache"),
    )
    state = ImprovementState(PatternSettings(), clock)
    state.restore({**state.dump(), "patterns": [legacy]})
    assert list(state.learner) == [sig] and state.dirty_signatures == {sig}
    rows = {row[-1]: row for row in state.learner.dump()}
    assert set(rows) == {"goal-a", "goal-b"}
    assert [o[1] for o in rows["goal-a"][4]] == ["a1"] * 3 and len(rows["goal-b"][4]) == 2
    assert len(rows["goal-a"][3]) == 3 and len(rows["goal-b"][3]) == 2
    assert all(row[5] is False and row[6] == () for row in rows.values())
    emitted = state.learner.evaluate(sig)
    assert sorted((e.event_type, e.goal_id) for e in emitted) == [
        ("automation_created", "goal-a"),
        ("automation_created", "goal-a"),
        ("pattern_discovered", "goal-a"),
    ]
    assert all(
        e.automation_id == automation_id(sig, e.kind, "goal-a")
        for e in emitted
        if isinstance(e, AutomationCreated)
    )


@pytest.mark.parametrize(
    ("reason", "earned"),
    [("timeout", BOTH), ("budget_exceeded", BOTH), ("invalid", BOTH), ("llm_failure", [])],
)
def test_only_failures_of_the_agent_or_platform_veto_a_goals_automations(reason, earned):
    """A user who sends the goal's common request with a deadline too short to meet (or
    over the goal's budget) once kept the goal from ever earning its automations; a failure
    of the answer's call still does."""
    sig = signature_of(ASKED, CS)
    clock = FakeClock()
    state = ImprovementState(PatternSettings(), clock)
    got: list[Event] = []
    for i in range(12):
        _goal_run(state, clock, i, "g1", quality=0.95)
        if i % 3 == 0:
            _goal_run(state, clock, 100 + i, "g1", quality=None, reason=reason)
        got += state.learner.evaluate(sig)
    assert [k for k, _, _ in _earned(got)] == earned
