"""A snapshot plus the tail folds to the same state as the whole log (router, improvement)."""

from __future__ import annotations

import pickle
import random
import zlib
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import TypeVar

import pytest

from services.improvement import state as improvement_state
from services.improvement.patterns import PatternSettings
from services.improvement.service import ImprovementConfig, ImprovementService, _from_v1
from services.improvement.state import ImprovementState
from services.router.policy import LearnedPolicy, features_of
from services.router.service import Router
from streams import events as ev
from streams import snapshots
from streams.clock import FakeClock
from streams.signatures import exact_key, signature_of
from streams.snapshots import (
    Snapshot,
    Snapshotter,
    SnapshotUnusable,
    _stale_keys,
    decode_state,
    encode_state,
)

SPECIALTIES = ["code", "math", "writing"]
WORDS = "invoice refund login python error proof essay travel budget".split()
GREEK = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
T = TypeVar("T")


def history(seed: int, runs: int = 300, *, unique: bool = False) -> list[ev.Event]:
    """A mixed log: every event type the two views fold, runs that repeat their requests
    (patterns, cached answers; none with ``unique``), out-of-order assessments, failures,
    keys, budgets, versions."""
    rng = random.Random(seed)
    out: list[ev.Event] = []
    agents = {}
    for i, s in enumerate(SPECIALTIES):
        agents[s] = f"{s}-agent"
        out.append(
            ev.AgentSpawned(
                source="spawner",
                goal_id=f"g{i % 2}",
                agent_id=agents[s],
                specialty=s,
                system_prompt=f"You do {s}.",
                temperature=0.2,
                occurred_at=T0,
            )
        )
    out.append(ev.AgentRetired(source="loader", agent_id=agents["math"], specialty="math"))
    out.append(
        ev.SpawnDenied(
            source="budget", goal_id="g1", specialty="code", limit="max_agents", detail="full"
        )
    )
    key = ev.ApiKeyIssued(
        source="cli", goal_id="g0", user_id="op", key_id="k1", key_hash="h" * 64, role="operator"
    )
    out += [key, ev.ApiKeyRevoked(source="cli", key_id="k2", occurred_at=T0)]
    out.append(ev.BudgetUpdateRequested(source="cli", goal_id="g0", max_daily_cost=2.5))
    out.append(
        ev.BudgetExceeded(
            source="budget",
            goal_id="g1",
            limit="max_daily_cost",
            current=1.0,
            maximum=1.0,
            occurred_at=T0,
        )
    )
    out += [
        ev.WorkflowVersionSaved(
            source="improvement",
            workflow_id="g0/code",
            version=2,
            parent_version=1,
            changes={"instructions": "Be brief.", "added": "Be brief.", "improvement_id": "i1"},
            occurred_at=T0,
        ),
        ev.ImprovementApplied(
            source="improvement",
            improvement_id="i1",
            workflow_id="g0/code",
            version=2,
            traffic_share=0.5,
            occurred_at=T0,
        ),
        ev.ImprovementAvailable(
            source="improvement",
            goal_id="g0",
            improvement_id="w1",
            workflow_id="code",
            kind="goal_win",
            proposal="Be brief.",
        ),
    ]
    for i in range(runs):
        run_id = f"run-{i}"
        goal = f"g{i % 2}"
        specialty = rng.choice(SPECIALTIES)
        message = " ".join(rng.sample(WORDS, 3)) + f" case {i if unique else rng.randint(0, 20)}"
        at = T0 + timedelta(seconds=i)
        quality = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])
        decided = ev.RouteDecided(
            source="router",
            run_id=run_id,
            goal_id=goal,
            user_id="u1",
            specialty=specialty,
            agent_id=agents[specialty],
            action="reuse",
            policy="learned",
            probability=0.9,
            features=features_of(message).as_list(),
            request_key=exact_key(message, specialty),
            signature=signature_of(message, specialty),
            occurred_at=at,
        )
        assessed = ev.WorkflowAssessed(
            source="improvement",
            run_id=run_id,
            goal_id=goal,
            agent_id=agents[specialty],
            specialty=specialty,
            quality=quality,
            occurred_at=at,
        )
        request = ev.RequestReceived(
            source="client", run_id=run_id, goal_id=goal, user_id="u1", message=message
        )
        if rng.random() < 0.1:
            end: ev.Event = ev.WorkflowFailed(
                source="loader",
                run_id=run_id,
                goal_id=goal,
                reason="llm_failure",
                detail="down",
                specialty=specialty,
                occurred_at=at,
            )
        else:
            end = ev.WorkflowCompleted(
                source="loader",
                run_id=run_id,
                goal_id=goal,
                user_id="u1",
                agent_id=agents[specialty],
                specialty=specialty,
                text=f"answer {i}",
                cost_usd=0.25,
                latency_ms=40.0,
                degradation_tier="llm",
                meta={"workflow_version": rng.choice(["1", "2"]), "workflow_id": "g0/code"},
                occurred_at=at,
            )
        # Topics are read side by side: an assessment may come before its decision.
        pieces = [request, decided, end, assessed]
        if rng.random() < 0.3:
            pieces = [assessed, end, request, decided]
        out += pieces
        out.append(ev.LlmCallCompleted(source="loader", goal_id=goal, model="m", cost_usd=0.25))
        if i % 7 == 0:
            out.append(ev.FeedbackReceived(source="client", run_id=run_id, user_id="u1", score=4))
            out.append(
                ev.FeedbackDecided(
                    source="improvement",
                    run_id=run_id,
                    user_id="u1",
                    feedback_id=f"f{i}",
                    accepted=True,
                    occurred_at=at,
                )
            )
        if i == runs // 2:
            sig = signature_of(message, specialty)
            out.append(
                ev.PatternDiscovered(
                    source="improvement", signature=sig, specialty=specialty, occurrences=3
                )
            )
            out.append(
                ev.AutomationCreated(
                    source="improvement",
                    automation_id="a1",
                    signature=sig,
                    kind="response_cache",
                    specialty=specialty,
                    goal_id=goal,
                )
            )
    return out


def _router() -> Router:
    return Router(SimpleNamespace(producer=None, clock=FakeClock(T0)))  # type: ignore[arg-type]


def _both_ways(
    make: Callable[[], T], fold: Callable[[T, ev.Event], None], events: list[ev.Event], cut: int
) -> tuple[T, T]:
    """The whole log folded, and the log up to ``cut`` folded, snapshotted (through the
    bytes a snapshot holds), restored in a fresh instance and the rest folded on top."""
    full, before, resumed = make(), make(), make()
    for e in events:
        fold(full, e)
    for e in events[:cut]:
        fold(before, e)
    resumed.restore(decode_state(encode_state(before.dump())))  # type: ignore[attr-defined]
    for e in events[cut:]:
        fold(resumed, e)
    return full, resumed


@pytest.mark.parametrize("cut", [0, 1, 400, 900, -1])
def test_router_snapshot_plus_tail_equals_the_full_fold(cut: int) -> None:
    events = history(seed=3)
    cut = len(events) if cut == -1 else cut
    full, resumed = _both_ways(_router, Router.learn, events, cut)
    assert resumed.dump() == full.dump()
    # ... and it routes the same way (exploration drawing the same numbers).
    for router in (full, resumed):
        assert isinstance(router.policy.template, LearnedPolicy)
        router.policy.template.rng.seed(1)  # every goal's policy draws from it
    for message in ("python error login", "proof of budget", "travel essay case 3"):
        request = ev.RequestReceived(
            source="client", run_id="new", goal_id="g0", user_id="u1", message=message
        )
        a, b = full.choose(request), resumed.choose(request)
        assert (a[0], a[2].scores, a[2].probability) == (b[0], b[2].scores, b[2].probability)


def test_router_restore_that_fails_changes_nothing() -> None:
    router = _router()
    for e in history(seed=4, runs=30):
        router.learn(e)
    before = router.dump()
    # The last value the policy reads is bad: what it read before that must not stay.
    *kept, (goal, last) = before["learned"]["goals"]
    bad = {**last, "arms": [], "words": [], "changes": "many"}
    learned = {"goals": [*kept, [goal, bad]]}
    for broken in ({**before, "stats": {"agents": [["x", 1]]}}, {**before, "learned": learned}):
        with pytest.raises(ValueError):
            router.restore(broken)
        assert router.dump() == before


def _improvement() -> ImprovementService:
    ctx = SimpleNamespace(producer=None, clock=FakeClock(T0 + timedelta(hours=1)))
    return ImprovementService(ctx, ImprovementConfig(http_port=None), None)  # type: ignore[arg-type]


def test_improvement_restore_that_fails_changes_nothing() -> None:
    service = _improvement()
    for e in history(seed=4, runs=30):
        service._view_event(e)
    before = service.dump()
    state = before["state"]
    for broken in (
        {**before, "reported": None},
        {**before, "state": {**state, "wins": [("w", "text")]}},
        {**before, "state": {**state, "spend": {**state["spend"], "exceeded": [1]}}},
        {**before, "state": {**state, "runs": [("run-x",)]}},
    ):
        with pytest.raises((ValueError, TypeError)):
            service.restore(broken)
        assert service.dump() == before


@pytest.mark.parametrize("cut", [0, 1, 700, -1])
def test_improvement_snapshot_plus_tail_equals_the_full_fold(cut: int) -> None:
    events = history(seed=5)
    cut = len(events) if cut == -1 else cut
    full, resumed = _both_ways(_improvement, ImprovementService._view_event, events, cut)
    assert resumed.dump() == full.dump()
    state, want = resumed.state, full.state
    assert state.spend.allows("g0", T0, 0.1) == want.spend.allows("g0", T0, 0.1)
    assert state.keys.is_operator("op") and want.keys.is_operator("op")
    assert state.flow("g0/code").samples() == want.flow("g0/code").samples()
    assert set(state.learner) == set(want.learner) == state.dirty_signatures


def _repeating(first: int, runs: int, distinct: int = 10) -> list[ev.Event]:
    """Runs ``first`` to ``first + runs`` of ``distinct`` requests asked over and over, a
    second apart (all inside the pattern window), each answered and assessed."""
    out: list[ev.Event] = []
    for i in range(first, first + runs):
        run_id, goal, specialty = f"run-{i:06d}", f"g{i % 2}", SPECIALTIES[i % distinct % 3]
        message, at = f"tell me about {GREEK[i % distinct]}", T0 + timedelta(seconds=i)
        common = {"source": "test", "run_id": run_id, "goal_id": goal, "occurred_at": at}
        out += [
            ev.RequestReceived(**common, user_id="u1", message=message),
            ev.WorkflowCompleted(
                **common,
                user_id="u1",
                agent_id=f"{specialty}-agent",
                specialty=specialty,
                text="an answer",
                cost_usd=0.001,
                latency_ms=40.0,
                degradation_tier="llm",
            ),
            ev.WorkflowAssessed(
                **common, agent_id=f"{specialty}-agent", specialty=specialty, quality=0.25 * (i % 5)
            ),
        ]
    return out


def test_improvement_state_stops_growing_with_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same requests asked again and again: once the runs kept and each signature's
    outcomes are at their caps, twice the history writes a snapshot of the same size (the
    window holds all of it; a signature keeps its latest run times, not every run)."""
    monkeypatch.setattr(improvement_state, "_MAX_RUNS", 500)
    service = _improvement()
    service.ctx.clock.set(T0 + timedelta(hours=2))  # past the history's 6000 runs a second apart
    sizes = []
    for first in (0, 2000, 4000):
        for e in _repeating(first, 2000):
            service._view_event(e)
        sizes.append(len(encode_state(service.dump())))
    state = service.dump()["state"]
    assert len(state["runs"]) == 500 and len(state["patterns"]) == 10
    assert all(
        len(seen) == 3 and len(outcomes) == 200 for _, _, _, seen, outcomes, *_ in state["patterns"]
    )
    assert all(row[1] is None for row in state["runs"])  # joined and assessed: no message
    assert abs(sizes[2] - sizes[1]) <= 0.02 * sizes[1], sizes


def test_a_version_1_snapshot_restores_as_the_full_fold() -> None:
    """What snapshot version 1 held (every run of a signature in the window with its id,
    outcomes with run ids, the messages of joined runs) is read as the current version."""
    events = history(seed=5)
    full = _improvement()
    for e in events:
        full._view_event(e)
    now = full.dump()
    state = now["state"]
    messages = {e.run_id: e.message for e in events if isinstance(e, ev.RequestReceived)}
    runs = [(row[0], messages.get(row[0]), *row[2:]) for row in state["runs"]]
    patterns = []
    for sig, specialty, example, seen, outcomes, *rest in state["patterns"]:
        earlier = [seen[0] - timedelta(seconds=1)] if len(seen) == 3 else []
        patterns.append(
            (
                sig,
                specialty,
                example,
                tuple((at, f"run of {at}") for at in [*earlier, *seen]),
                tuple((o[0], "a run", *o[1:]) for o in outcomes),
                *rest,
            )
        )
    version_1 = {**now, "state": {**state, "runs": runs, "patterns": patterns}}
    assert any(row[1] is not None for row in runs)
    resumed = _improvement()
    resumed.restore(_from_v1(decode_state(encode_state(version_1))))
    assert resumed.dump() == now


async def test_a_snapshotter_reads_an_older_version_it_is_given_the_way_from() -> None:
    class Store:
        service = "test"

        async def snapshots(
            self, version: int, older: tuple[int, ...] = ()
        ) -> AsyncGenerator[Snapshot, None]:
            saved = Snapshot("s1", 1, {}, {"n": 1}, 10)
            if saved.version in (version, *older):
                yield saved

    restored: list[object] = []
    plain = Snapshotter(Store(), 2, dict, restored.append)  # type: ignore[arg-type]
    assert await plain.resume({}) == {} and plain.restored is None and restored == []
    upgrading = Snapshotter(
        Store(),  # type: ignore[arg-type]
        2,
        dict,
        restored.append,
        upgrades={1: lambda state: {"n": state["n"] + 1}},
    )
    assert await upgrading.resume({}) == {}
    assert restored == [{"n": 2}] and upgrading.restored is not None


def test_dumps_are_plain_values_and_nothing_else_is_read() -> None:
    state = ImprovementState(PatternSettings(), FakeClock(T0))
    router = _router()
    for e in history(seed=6, runs=40):
        state.apply(e)
        router.learn(e)
    for dumped in (state.dump(), router.dump()):
        assert decode_state(encode_state(dumped)) == dumped
    # A snapshot builds values, never objects of other classes (no code runs on reading).
    with pytest.raises(pickle.UnpicklingError, match="may not hold"):
        decode_state(zlib.compress(pickle.dumps(state.learner)))
    with pytest.raises(pickle.UnpicklingError, match="may not hold"):
        decode_state(zlib.compress(pickle.dumps(SimpleNamespace(a=1))))


async def test_a_snapshot_that_does_not_restore_is_skipped_for_the_one_before() -> None:
    class Store:
        service = "test"

        async def snapshots(
            self, version: int, older: tuple[int, ...] = ()
        ) -> AsyncGenerator[Snapshot, None]:
            yield Snapshot("new", 1, {}, {"n": "not a number"}, 10)
            yield Snapshot("old", 1, {}, {"n": 1}, 10)

    restored: list[int] = []

    def restore(state: dict[str, object]) -> None:
        n = state["n"]
        if not isinstance(n, int):
            raise RecursionError("deep")  # not a ValueError: any exception will do
        restored.append(n)

    snapshotter = Snapshotter(Store(), 1, dict, restore)  # type: ignore[arg-type]
    await snapshotter.resume({})
    assert restored == [1] and snapshotter.restored is not None
    assert snapshotter.restored.snapshot_id == "old"


def test_a_state_that_inflates_past_the_limit_is_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = encode_state({"pad": "0" * (4 << 20)})
    assert len(bomb) < 64 << 10
    monkeypatch.setattr(snapshots, "MAX_STATE_BYTES", 1 << 20)
    with pytest.raises(SnapshotUnusable, match="inflates past"):
        decode_state(bomb)
    assert decode_state(encode_state({"n": 1})) == {"n": 1}
    with pytest.raises(SnapshotUnusable, match="truncated"):
        decode_state(encode_state({"n": 1})[:-4])


NOW_MS = 10_000_000


def _below(
    log: list[str], manifest: str, fresh_from: int | None = None
) -> dict[str, tuple[int, bool, int]]:
    """Each key's latest record (offset, holds a value, timestamp) in ``log`` (keys in
    offset order, ``-key`` a tombstone) below ``manifest``: records from ``fresh_from`` on
    written a moment ago, those before it an hour ago."""
    at = log.index(manifest)
    fresh = at if fresh_from is None else fresh_from
    return {
        key.lstrip("-"): (i, not key.startswith("-"), NOW_MS - (0 if i >= fresh else 3_600_000))
        for i, key in enumerate(log[:at])
    }


def test_a_sweep_drops_what_a_killed_writer_left_and_nothing_being_written() -> None:
    """Snapshot s0, tombstoned for s1 by its writer, which was killed before dropping s1
    for s2; chunks of a writer killed mid-way; then two instances save at once, their
    chunks interleaved (a's first chunk, then b's)."""
    earlier = ["s0:0", "manifest:s0", "s1:0", "s1:1", "manifest:s1", "-s0:0", "-manifest:s0"]
    earlier += ["s2:0", "manifest:s2", "dead:0", "dead:1"]
    log = [*earlier, "a:0", "b:0", "a:1", "b:1", "manifest:a", "manifest:b"]
    now = len(earlier)
    a_keys, b_keys = {"a:0", "a:1", "manifest:a"}, {"b:0", "b:1", "manifest:b"}
    stale_a = _stale_keys(_below(log, "manifest:a", now), log.index("a:0"), a_keys, NOW_MS)
    assert sorted(stale_a) == sorted(
        ["s1:0", "s1:1", "manifest:s1", "s2:0", "manifest:s2", "dead:0", "dead:1"]
    )
    # b's records since a's first may be a snapshot being written: a leaves them.
    stale_b = _stale_keys(_below(log, "manifest:b", now), log.index("b:0"), b_keys, NOW_MS)
    assert not set(stale_b) & a_keys and not set(stale_a) & b_keys
    # b wrote its chunks before a began and its manifest after a's: a leaves them too (b
    # is still writing: they are fresh and have no manifest), and b leaves a's.
    log = [*earlier, "b:0", "b:1", "a:0", "a:1", "manifest:a", "manifest:b"]
    stale_a = _stale_keys(_below(log, "manifest:a", now), log.index("a:0"), a_keys, NOW_MS)
    stale_b = _stale_keys(_below(log, "manifest:b", now), log.index("b:0"), b_keys, NOW_MS)
    assert not set(stale_a) & b_keys and not set(stale_b) & a_keys
    # Chunks with no manifest, written long ago, are what a killed writer left.
    assert {"dead:0", "dead:1"} <= set(stale_a)
