"""The router learns an unjudged run from its user's feedback, once, in any reading order."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from services.router.policy import Features, GoalPolicies, LearnedPolicy, features_of
from services.router.service import Router
from streams import events as ev
from streams.clock import FakeClock
from streams.signatures import exact_key, signature_of
from streams.snapshots import decode_state, encode_state

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
MESSAGE = "refund my invoice please"


class _Recording(GoalPolicies):
    """The router's policies, remembering each update they were given."""

    def __init__(self) -> None:
        template = LearnedPolicy(rng=random.Random(0))
        super().__init__(template, max_goals=100, max_word_stats=10_000)
        self.taught: list[tuple[str, float, float]] = []
        self.detected: list[bool] = []  # whether each update may raise a change

    def update(
        self,
        goal: str,
        features: Features,
        arm: str,
        reward: float,
        cost: float = 0.0,
        *,
        detect: bool = True,
    ) -> None:
        self.taught.append((arm, round(reward, 6), round(cost, 6)))
        self.detected.append(detect)
        super().update(goal, features, arm, reward, cost, detect=detect)

    @property
    def updates(self) -> int:
        """What goal g's policy was taught (every run here is g's)."""
        return self.version("g") - 1


def _router() -> tuple[Router, _Recording]:
    policy = _Recording()
    ctx = SimpleNamespace(producer=None, clock=FakeClock(T0))
    return Router(ctx, policy=policy), policy  # type: ignore[arg-type]


def _decided(run: str, specialty: str = "code", *, policy: str = "learned", user: str = "u1"):
    return ev.RouteDecided(
        source="router",
        run_id=run,
        goal_id="g",
        user_id=user,
        specialty=specialty,
        agent_id=f"{specialty}-agent",
        action="reuse",
        policy=policy,
        probability=0.9,
        features=features_of(MESSAGE).as_list(),
        request_key=exact_key(MESSAGE, specialty),
        signature=signature_of(MESSAGE, specialty),
        occurred_at=T0,
    )


def _completed(run: str, specialty: str = "code", cost: float = 0.002):
    return ev.WorkflowCompleted(
        source="loader",
        run_id=run,
        goal_id="g",
        user_id="u1",
        agent_id=f"{specialty}-agent",
        specialty=specialty,
        text=f"answer of {run}",
        cost_usd=cost,
        degradation_tier="llm",
        occurred_at=T0,
    )


def _assessed(run: str, method: str, quality: float = 0.9, cost: float = 0.002):
    return ev.WorkflowAssessed(
        source="improvement",
        run_id=run,
        goal_id="g",
        user_id="u1",
        agent_id="code-agent",
        specialty="code",
        quality=quality,
        method=method,  # type: ignore[arg-type]
        cost_usd=cost,
        occurred_at=T0,
    )


def _feedback(run: str, score: int | None, user: str = "u1", n: int = 0):
    return ev.FeedbackReceived(
        source="client",
        event_id=f"{run}-fb-{user}-{n}",
        run_id=run,
        user_id=user,
        score=score,
        occurred_at=T0 + timedelta(seconds=n),
    )


def test_an_unjudged_assessment_teaches_nothing_and_a_judged_one_does():
    router, policy = _router()
    for e in (_decided("r1"), _completed("r1"), _assessed("r1", "unjudged", 0.95)):
        router.learn(e)
    assert policy.taught == [] and policy.updates == 0
    # Nor does the guess count as the agent's quality, or make its answer a cached one.
    assert router.stats.agents["code-agent"].quality_n == 0
    for e in (_decided("r2"), _completed("r2"), _assessed("r2", "judge", 0.7, 0.003)):
        router.learn(e)
    assert policy.taught == [("code", 0.7, 0.003)]
    assert router.stats.agents["code-agent"].quality_n == 1


def test_an_unjudged_answer_is_never_served_from_the_cache():
    router, _ = _router()
    router.learn(
        ev.AutomationCreated(
            source="improvement",
            automation_id="a1",
            kind="response_cache",
            signature=signature_of(MESSAGE, "code"),
            specialty="code",
            goal_id="g",
            ttl_seconds=3600,
            occurred_at=T0,
        )
    )
    for e in (_decided("r1"), _completed("r1"), _assessed("r1", "unjudged", 0.95)):
        router.learn(e)
    hit = router.automations.lookup(MESSAGE, "code", T0, "g")
    assert hit is None or hit.cached is None
    for e in (_decided("r2"), _completed("r2"), _assessed("r2", "judge", 0.95)):
        router.learn(e)
    hit = router.automations.lookup(MESSAGE, "code", T0, "g")
    assert hit is not None and hit.cached is not None and hit.cached.run_id == "r2"


def test_feedback_on_an_unjudged_run_teaches_once_at_the_runs_cost():
    router, policy = _router()
    for e in (
        _decided("r1"),
        _completed("r1", cost=0.004),
        _assessed("r1", "unjudged", cost=0.004),
    ):
        router.learn(e)
    router.learn(_feedback("r1", None))  # no score: nothing to learn
    router.learn(_feedback("r1", 4, user="intruder"))  # not the run's user
    assert policy.taught == []
    router.learn(_feedback("r1", 4))
    assert policy.taught == [("code", 0.75, 0.004)]
    # A user's own score teaches, but may not raise a change (see test_router_policy).
    assert policy.detected == [False]
    router.learn(_feedback("r1", 1, n=1))  # a second word on the same run
    router.learn(_decided("r1", "math"))  # a late decision of the run
    router.learn(_feedback("r1", 2, n=2))
    assert policy.taught == [("code", 0.75, 0.004)] and policy.updates == 1


def test_feedback_on_a_judged_or_forced_run_does_not_teach_again():
    router, policy = _router()
    for e in (_decided("r1"), _assessed("r1", "judge", 0.5), _feedback("r1", 5)):
        router.learn(e)
    for e in (_decided("r2", policy="forced"), _assessed("r2", "unjudged"), _feedback("r2", 5)):
        router.learn(e)
    assert policy.taught == [("code", 0.5, 0.002)]


def _run_events(run: str, method: str, scores: list[tuple[str, int | None]]) -> list[ev.Event]:
    out: list[ev.Event] = [_decided(run), _completed(run), _assessed(run, method, 0.8)]
    out += [_feedback(run, s, user=u, n=i) for i, (u, s) in enumerate(scores)]
    return out


@pytest.mark.parametrize(
    ("method", "scores", "taught"),
    [
        ("unjudged", [("u1", 3), ("u1", 5)], [("code", 0.5, 0.002)]),
        ("unjudged", [("intruder", 1), ("u1", 5)], [("code", 1.0, 0.002)]),
        ("unjudged", [], []),
        ("judge", [("u1", 1)], [("code", 0.8, 0.002)]),
        ("world", [("u1", 1), ("u1", 2)], [("code", 0.8, 0.002)]),
    ],
)
def test_what_a_run_teaches_does_not_depend_on_the_reading_order(
    method: str, scores: list[tuple[str, int | None]], taught: list[tuple[str, float, float]]
):
    # Topics are read side by side after a restart: a run's decision, assessment and
    # feedback come in any order, while one topic's events keep theirs.
    events = _run_events("r1", method, scores)
    topics = {
        "route": [e for e in events if isinstance(e, ev.RouteDecided)],
        "done": [e for e in events if isinstance(e, ev.WorkflowCompleted)],
        "assessed": [e for e in events if isinstance(e, ev.WorkflowAssessed)],
        "feedback": [e for e in events if isinstance(e, ev.FeedbackReceived)],
    }
    for order in itertools.permutations(topics):
        router, policy = _router()
        for name in order:
            for e in topics[name]:
                router.learn(e)
        assert policy.taught == taught, order
    # Feedback interleaved with the other topics keeps its own order too.
    for cut in range(len(events) + 1):
        fb = [e for e in events if isinstance(e, ev.FeedbackReceived)]
        rest = [e for e in events if not isinstance(e, ev.FeedbackReceived)]
        router, policy = _router()
        for e in [*fb[:cut], *rest, *fb[cut:]]:
            router.learn(e)
        assert policy.taught == taught


def _history(seed: int, runs: int = 200) -> list[ev.Event]:
    """Runs judged, unjudged, forced and failed, with feedback from owners and others,
    their topics interleaved at random (each topic in its own order)."""
    rng = random.Random(seed)
    streams: list[list[ev.Event]] = [[], [], [], []]
    words = "invoice refund login python error proof essay travel budget".split()
    for i in range(runs):
        run = f"run-{i}"
        specialty = rng.choice(["code", "math", "writing"])
        message = " ".join(rng.sample(words, 3))
        decided = _decided(run, specialty, policy="forced" if rng.random() < 0.1 else "learned")
        streams[0].append(decided.model_copy(update={"features": features_of(message).as_list()}))
        streams[1].append(_completed(run, specialty, cost=0.001 * (i % 5)))
        method = rng.choice(["unjudged", "unjudged", "unjudged", "judge", "world"])
        streams[2].append(_assessed(run, method, rng.random(), 0.001 * (i % 5)))
        for n in range(rng.choice([0, 0, 1, 2])):
            user = "u1" if rng.random() < 0.8 else "u2"
            streams[3].append(_feedback(run, rng.choice([None, 1, 2, 3, 4, 5]), user, n))
    out: list[ev.Event] = []
    while any(streams):
        source = rng.choice([s for s in streams if s])
        out.append(source.pop(0))
    return out


def _both_ways(
    events: list[ev.Event], cut: int
) -> tuple[tuple[Router, _Recording], tuple[Router, _Recording]]:
    """Routers that folded ``events`` whole, and from a snapshot taken after ``cut`` of them
    plus the rest."""
    full = _router()
    for e in events:
        full[0].learn(e)
    before, _ = _router()
    for e in events[:cut]:
        before.learn(e)
    resumed = _router()
    resumed[0].restore(decode_state(encode_state(before.dump())))
    for e in events[cut:]:
        resumed[0].learn(e)
    return full, resumed


@pytest.mark.parametrize("cut", [0, 1, 150, 400, -1])
def test_a_snapshot_plus_the_tail_learns_what_the_whole_log_does(cut: int):
    events = _history(seed=11)
    cut = len(events) if cut == -1 else cut
    (full, full_policy), (resumed, resumed_policy) = _both_ways(events, cut)
    assert resumed.dump() == full.dump()
    assert resumed_policy.updates == full_policy.updates == _expected_updates(events)
    assert resumed.policy.version("g") == full.policy.version("g")


def _expected_updates(events: list[ev.Event]) -> int:
    """Policy-routed runs judged, plus policy-routed unjudged runs their user scored."""
    learned = {e.run_id for e in events if isinstance(e, ev.RouteDecided) and e.policy == "learned"}
    method = {e.run_id: e.method for e in events if isinstance(e, ev.WorkflowAssessed)}
    scored = {
        e.run_id
        for e in events
        if isinstance(e, ev.FeedbackReceived) and e.score is not None and e.user_id == "u1"
    }
    judged = sum(1 for r in learned if method.get(r) != "unjudged")
    fed_back = sum(1 for r in learned if method.get(r) == "unjudged" and r in scored)
    assert judged and fed_back
    return judged + fed_back


# -- bounded: feedback on runs the router never sees, user preferences --------------------


def test_feedback_on_runs_the_router_never_saw_does_not_push_real_runs_out(monkeypatch):
    from services.router import service

    monkeypatch.setattr(service, "_MAX_RUNS", 50)
    monkeypatch.setattr(service, "_MAX_EARLY_FEEDBACK", 20, raising=False)
    router, policy = _router()
    router.learn(_decided("real"))  # routed; its assessment is still to come
    for i in range(1_000):  # SDK feedback on made-up run ids
        router.learn(_feedback(f"made-up-{i}", 1, user="mallory"))
    router.learn(_assessed("real", "judge", 0.7))
    assert policy.taught == [("code", 0.7, 0.002)]
    assert len(router._runs) == 1 and len(router._early_feedback) == 20


def test_feedback_read_before_its_run_teaches_across_a_snapshot_and_older_ones_restore():
    router, policy = _router()
    router.learn(_feedback("r1", 5))  # read before anything else of the run
    assert "r1" not in router._runs and "r1" in router._early_feedback
    state = decode_state(encode_state(router.dump()))
    resumed, resumed_policy = _router()
    resumed.restore(state)
    for e in (_decided("r1"), _completed("r1"), _assessed("r1", "unjudged")):
        resumed.learn(e)
    assert resumed_policy.taught == [("code", 1.0, 0.002)]
    older = dict(state)  # a snapshot written before the early feedback was kept aside
    del older["early_feedback"]
    older["runs"] = [["r1", False, None, None, None, None, None, [["u1", 1.0]], False]]
    again, again_policy = _router()
    again.restore(older)
    for e in (_decided("r1"), _assessed("r1", "unjudged")):
        again.learn(e)
    assert again_policy.taught == [("code", 1.0, 0.002)]


def test_user_preferences_are_capped_least_recently_scored_first(monkeypatch):
    from services.router import scoring

    monkeypatch.setattr(scoring, "MAX_PREFERENCES", 5, raising=False)
    router, _ = _router()
    for i in range(20):
        run, user = f"r{i}", f"user-{i}"
        router.learn(_completed(run).model_copy(update={"user_id": user}))
        router.learn(_feedback(run, 5, user=user))
        if i >= 1:  # user-0 scores again each time: the most recent, never dropped
            router.learn(_completed(f"again-{i}").model_copy(update={"user_id": "user-0"}))
            router.learn(_feedback(f"again-{i}", 4, user="user-0"))
    kept = router.stats.preferences()
    assert len(kept) == 5 and ("user-0", "code-agent") in kept
    assert kept[-1] == ("user-0", "code-agent")
    restored, _ = _router()
    dumped = router.dump()
    dumped["stats"]["preference"] = [[f"old-{i}", "a", 1.0, 1.0] for i in range(10)]
    restored.restore(dumped)
    assert restored.stats.preferences() == [(f"old-{i}", "a") for i in range(5, 10)]


def test_a_goals_users_do_not_push_out_another_goals_user_preferences(monkeypatch):
    from services.router import scoring

    monkeypatch.setattr(scoring, "MAX_PREFERENCES", 20, raising=False)
    monkeypatch.setattr(scoring, "MAX_RUN_AGENTS", 20, raising=False)
    router, _ = _router()
    b_run = _completed("b-run").model_copy(update={"goal_id": "b", "agent_id": "b-agent"})
    b_scored = _completed("b-scored").model_copy(update={"goal_id": "b", "agent_id": "b-agent"})
    for goal, agent in (("b", "b-agent"), ("a", "code-agent")):
        router.learn(
            ev.AgentSpawned(
                source="spawner",
                goal_id=goal,
                agent_id=agent,
                specialty="code",
                system_prompt="You write code.",
                temperature=0.2,
            )
        )
    for e in (b_scored, _feedback("b-scored", 5), b_run):  # b's user likes b's agent
        router.learn(e)
    for i in range(500):  # goal a's users, each scoring a run of a's agent
        run, user = f"a-{i}", f"a-user-{i}"
        router.learn(_completed(run).model_copy(update={"goal_id": "a", "user_id": user}))
        router.learn(_feedback(run, 1, user=user))
    assert router.stats.user_preference("u1", "b-agent") == 1.0
    router.learn(_feedback("b-run", 1))  # b's run is still known: its feedback counts
    assert router.stats.user_preference("u1", "b-agent") == 0.5
    # A snapshot keeps them per goal; an older one's rows are filed under their agent's goal.
    state = decode_state(encode_state(router.dump()))
    resumed, _ = _router()
    resumed.restore(state)
    assert resumed.dump() == router.dump()
    assert resumed.stats.user_preference("u1", "b-agent") == 0.5
    stats = state["stats"]
    older = {
        **state,
        "stats": {
            **stats,
            "preference": [row[:4] for row in stats["preference"]],
            "run_agent": [row[:2] for row in stats["run_agent"]],
        },
    }
    again, _ = _router()
    again.restore(older)
    assert again.stats.user_preference("u1", "b-agent") == 0.5
    assert again.dump()["stats"] == resumed.dump()["stats"]  # each row under its agent's goal


# -- per goal: one goal's runs never push out another goal's run still to teach -------------


def _of(goal: str, e: ev.Event) -> ev.Event:
    return e.model_copy(update={"goal_id": goal})


def _recording_router() -> tuple[Router, list[tuple[str, float]]]:
    taught: list[tuple[str, float]] = []
    router, policy = _router()
    update = policy.update

    def record(goal, features, arm, reward, cost=0.0, *, detect=True):  # type: ignore[no-untyped-def]
        taught.append((goal, round(reward, 6)))
        update(goal, features, arm, reward, cost, detect=detect)

    policy.update = record  # type: ignore[method-assign]
    return router, taught


def test_a_goals_burst_of_runs_does_not_push_out_another_goals_run_waiting_for_feedback(
    monkeypatch,
):
    from services.router import service

    monkeypatch.setattr(service, "_MAX_RUNS", 200)
    monkeypatch.setattr(service, "_MAX_RUNS_PER_GOAL", 100, raising=False)
    router, taught = _recording_router()
    # Goal b's run, assessed unjudged: it waits for its user's feedback.
    for e in (_decided("b-run"), _completed("b-run"), _assessed("b-run", "unjudged")):
        router.learn(_of("b", e))
    # Goal a's burst: runs judged at once (they teach) and runs waiting for feedback.
    for i in range(1_000):
        method = "judge" if i % 2 else "unjudged"
        for e in (_decided(f"a-{i}"), _assessed(f"a-{i}", method, 0.5)):
            router.learn(_of("a", e))
    router.learn(_feedback("b-run", 5))
    assert ("b", 1.0) in taught
    # a's runs still to teach are a's newest, within its share; its runs that taught are
    # markers: a's run a-999 judged, its feedback teaches nothing more.
    router.learn(_feedback("a-999", 5))
    router.learn(_feedback("a-998", 1))
    assert taught[-2:] == [("b", 1.0), ("a", 0.0)]
    assert len(router._runs) <= 2 * 200
    # A snapshot keeps it all, per goal: the same state as the fold.
    resumed, _ = _recording_router()
    resumed.restore(decode_state(encode_state(router.dump())))
    assert resumed.dump() == router.dump()


def test_a_marker_of_a_run_that_taught_gives_way_before_a_run_still_to_teach(monkeypatch):
    from services.router import service

    monkeypatch.setattr(service, "_MAX_RUNS", 20)
    monkeypatch.setattr(service, "_MAX_RUNS_PER_GOAL", 20, raising=False)
    router, taught = _recording_router()
    for e in (_decided("waits"), _assessed("waits", "unjudged")):
        router.learn(e)
    for i in range(100):  # runs of the same goal that teach at once: markers after
        for e in (_decided(f"r{i}"), _assessed(f"r{i}", "judge", 0.5)):
            router.learn(e)
    router.learn(_feedback("waits", 5))
    assert ("g", 1.0) in taught
    assert "r99" in router._runs and "r0" not in router._runs


def test_an_older_snapshots_runs_restore_under_their_goals():
    router, taught = _recording_router()
    state = router.dump()
    # Rows of a snapshot written before runs were kept per goal: one list, "b-run" waiting
    # for feedback (goal named), "old" with no goal, "done" a marker.
    words = features_of(MESSAGE).as_list()
    state["runs"] = [
        ["b-run", True, words, "code", "u1", None, 0.002, None, False, "b"],
        ["old", True, words, "code", "u1", None, 0.002, None, False],
        ["done", True, None, None, "u1", None, None, None, True],
    ]
    router.restore(state)
    for run in ("b-run", "old", "done"):
        router.learn(_feedback(run, 5))
    assert taught == [("b", 1.0), ("", 1.0)]


@pytest.mark.parametrize("cut", [0, 150, 333, 700, -1])
def test_a_snapshot_plus_the_tail_is_the_full_fold_with_goals_over_their_caps(monkeypatch, cut):
    from services.router import scoring, service

    monkeypatch.setattr(service, "_MAX_RUNS", 30)
    monkeypatch.setattr(service, "_MAX_RUNS_PER_GOAL", 15)
    monkeypatch.setattr(scoring, "MAX_PREFERENCES", 12)
    monkeypatch.setattr(scoring, "MAX_RUN_AGENTS", 12)
    rng = random.Random(5)
    events: list[ev.Event] = []
    for i in range(250):
        goal, run, user = rng.choice("aabc"), f"r{i}", f"u{rng.randrange(6)}"
        method = rng.choice(["judge", "unjudged", "unjudged"])
        for e in (
            _decided(run, user=user),
            _completed(run).model_copy(update={"user_id": user}),
            _assessed(run, method),
            _feedback(run, rng.randrange(1, 6), user=user),
        ):
            events.append(_of(goal, e) if not isinstance(e, ev.FeedbackReceived) else e)
    rng.shuffle(events)  # the topics are read side by side
    cut = len(events) if cut == -1 else cut
    (full, _), (resumed, _) = _both_ways(events, cut)
    assert decode_state(encode_state(resumed.dump())) == decode_state(encode_state(full.dump()))
    assert len(full._runs) <= 30 + 15
