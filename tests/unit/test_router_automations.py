"""The router's automations: identical requests answered from cache, direct routes, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from services.gateway.chat import parse_chat
from services.router.automations import Automations, CachedAnswer
from services.router.policy import features_of, make_policy
from services.router.service import Router
from streams.clock import FakeClock
from streams.events import (
    AgentSpawned,
    AutomationCreated,
    Event,
    RequestReceived,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
)
from streams.registry import RegistryView
from streams.signatures import exact_key, signature_of

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
MSG = "Reset my account password please"
CS = "customer_support"


def _decided(run: str, message: str, specialty: str, goal: str = "g") -> RouteDecided:
    return RouteDecided(
        source="router",
        run_id=run,
        goal_id=goal,
        specialty=specialty,
        action="reuse",
        request_key=exact_key(message, specialty),
        signature=signature_of(message, specialty),
    )


def _answer(
    run: str, tier: str = "llm", goal: str = "g", text: str = "Use the reset link."
) -> WorkflowCompleted:
    return WorkflowCompleted(
        source="loader",
        run_id=run,
        goal_id=goal,
        agent_id=f"cs_{goal}",
        specialty="customer_support",
        text=text,
        cost_usd=0.02,
        degradation_tier=tier,
        meta={"quality": "0.9"},
    )


def _assessed(run: str, quality: float = 0.9) -> WorkflowAssessed:
    return WorkflowAssessed(
        source="improvement", run_id=run, specialty="customer_support", quality=quality
    )


def _automation(
    kind: str, ttl: int = 600, goal: str | None = "g", agent: str = "cs_1"
) -> AutomationCreated:
    return AutomationCreated(
        source="improvement",
        automation_id=f"auto-{kind}",
        kind=kind,
        signature=signature_of(MSG, "customer_support"),
        specialty="customer_support",
        agent_id=agent,
        goal_id=goal,
        ttl_seconds=ttl,
        occurred_at=T0,
    )


def test_identical_request_is_served_from_cache_only_with_an_automation():
    auto = Automations()
    auto.learn(_decided("r1", MSG, "customer_support"))
    auto.learn(_answer("r1"))
    auto.learn(_assessed("r1"))
    assert auto.lookup(MSG, CS, T0, "g") is None  # an answer alone is not an automation
    auto.learn(_automation("response_cache"))
    hit = auto.lookup(f"\n{MSG}  \n", CS, T0 + timedelta(seconds=5), "g")
    assert hit is not None and hit.cached is not None
    assert hit.cached.text == "Use the reset link." and hit.specialty == "customer_support"
    # Same intent, different words order: not identical, so no cached answer.
    assert auto.lookup("password account reset my please", CS, T0, "g") is None
    # Nor another case or inner spacing: `x = true` is not `x = True`, and indented code is
    # not the same code flat (both once served one user's answer to the other's request).
    assert auto.lookup(MSG.upper(), CS, T0, "g") is None
    assert auto.lookup(MSG.replace(" ", "  ", 1), CS, T0, "g") is None
    assert auto.lookup(f"    {MSG}", CS, T0, "g") is None  # a first line's indentation counts
    # A message cannot pose as another message sent with a context.
    assert exact_key('X|[["system", "y"]]', CS) != exact_key("X", CS, {"system": "y"})


def test_cache_expires_and_degraded_answers_are_never_cached():
    auto = Automations()
    auto.learn(_automation("response_cache", ttl=60))
    auto.learn(_decided("r1", MSG, "customer_support"))
    auto.learn(_answer("r1", tier="keyword"))
    assert auto.lookup(MSG, CS, T0, "g") is None
    auto.learn(_assessed("r1"))
    auto.learn(_decided("r2", MSG, "customer_support"))
    auto.learn(_answer("r2"))
    assert auto.lookup(MSG, CS, T0, "g") is None  # not assessed yet
    auto.learn(_assessed("r2", quality=0.4))
    assert auto.lookup(MSG, CS, T0, "g") is None  # too poor to repeat
    auto.learn(_decided("r3", MSG, "customer_support"))
    auto.learn(_answer("r3"))
    auto.learn(_assessed("r3", quality=0.8))
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=30), "g") is not None
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=61), "g") is None


def test_direct_route_pins_the_agent():
    auto = Automations()
    auto.learn(_automation("direct_route"))
    hit = auto.lookup("reset my account password", CS, T0, goal_id="g")
    assert hit is not None and hit.cached is None
    assert hit.automation.agent_id == "cs_1"
    assert auto.lookup("reset my account password", CS, T0, goal_id="other") is None


def test_an_automation_serves_only_the_specialty_the_policy_chose():
    auto = Automations()
    auto.learn(_automation("response_cache"))
    auto.learn(_decided("r1", MSG, CS))
    auto.learn(_answer("r1"))
    auto.learn(_assessed("r1"))
    assert auto.lookup(MSG, CS, T0, "g") is not None
    # The policy now prefers another specialty: the cached answer must not override it.
    assert auto.lookup(MSG, "research", T0, "g") is None


# -- answers never cross goals --------------------------------------------------------


def _served(auto: Automations, goal: str) -> CachedAnswer | None:
    hit = auto.lookup(MSG, CS, T0, goal)
    return hit.cached if hit is not None else None


def _learn_run(auto: Automations, run: str, goal: str, text: str, quality: float = 0.9) -> None:
    auto.learn(_decided(run, MSG, CS, goal=goal))
    auto.learn(_answer(run, goal=goal, text=text))
    auto.learn(_assessed(run, quality))


def test_one_goal_is_never_served_another_goals_answer():
    auto = Automations()
    for goal in ("goal-a", "goal-b", "goal-c"):  # each goal's own automation
        auto.learn(_automation("response_cache", goal=goal))
    _learn_run(auto, "a1", "goal-a", "A's answer")
    served = _served(auto, "goal-a")
    assert served is not None and served.run_id == "a1"  # a goal hits its own cache
    assert _served(auto, "goal-b") is None  # the same message from another goal does not

    # A better answer of B's own fills B's entry and leaves A's as it was.
    _learn_run(auto, "b1", "goal-b", "B's answer", quality=0.95)
    a, b = _served(auto, "goal-a"), _served(auto, "goal-b")
    assert a is not None and a.run_id == "a1" and a.text == "A's answer"
    assert b is not None and b.run_id == "b1" and b.text == "B's answer"
    assert _served(auto, "goal-c") is None


def test_an_answer_whose_goal_is_unclear_is_never_cached():
    auto = Automations()
    for goal in ("goal-a", "goal-b"):  # each goal's own automation
        auto.learn(_automation("response_cache", goal=goal))
    # Decided for A, answered as B's: a mismatch, so nobody gets it.
    auto.learn(_decided("r1", MSG, CS, goal="goal-a"))
    auto.learn(_answer("r1", goal="goal-b"))
    auto.learn(_assessed("r1"))
    # Decided without a goal at all.
    auto.learn(_decided("r2", MSG, CS).model_copy(update={"goal_id": None}))
    auto.learn(_answer("r2", goal="goal-a"))
    auto.learn(_assessed("r2"))
    assert _served(auto, "goal-a") is None and _served(auto, "goal-b") is None


def test_events_in_any_order_keep_answers_apart():
    runs: list[Event] = []
    for run, goal in (("a1", "goal-a"), ("b1", "goal-b")):
        runs += [_decided(run, MSG, CS, goal=goal), _answer(run, goal=goal, text=goal)]
        runs += [_assessed(run)]
    for order in (runs, runs[::-1], sorted(runs, key=lambda e: type(e).__name__)):
        auto = Automations()
        for goal in ("goal-a", "goal-b"):  # each goal's own automation
            auto.learn(_automation("response_cache", goal=goal))
        for event in order:
            auto.learn(event)
        for goal in ("goal-a", "goal-b"):
            served = _served(auto, goal)
            assert served is not None and served.goal_id == goal and served.text == goal


def _registry(agent: str, goal: str) -> RegistryView:
    view = RegistryView()
    view.apply(
        AgentSpawned(
            source="spawner",
            agent_id=agent,
            goal_id=goal,
            specialty=CS,
            system_prompt="p",
            temperature=0.2,
            model="gpt-4o-mini",
            prompt_source="template",
            version=1,
        )
    )
    return view


def test_a_direct_route_without_a_goal_serves_only_its_agents_goal():
    auto = Automations()
    auto.learn(_automation("direct_route", goal=None, agent="cs_a"))
    registry = _registry("cs_a", "goal-a")
    hit = auto.lookup(MSG, CS, T0, "goal-a", registry)
    assert hit is not None and hit.automation.agent_id == "cs_a"
    assert auto.lookup(MSG, CS, T0, "goal-b", registry) is None
    # Whose agent it is unknown: no goal is served.
    assert auto.lookup(MSG, CS, T0, "goal-a") is None
    assert auto.lookup(MSG, CS, T0, "goal-a", RegistryView()) is None


def test_a_direct_route_naming_a_goal_its_agent_does_not_belong_to_serves_nobody():
    auto = Automations()
    auto.learn(_automation("direct_route", goal="goal-b", agent="cs_a"))
    registry = _registry("cs_a", "goal-a")
    assert auto.lookup(MSG, CS, T0, "goal-a", registry) is None
    assert auto.lookup(MSG, CS, T0, "goal-b", registry) is None


def test_the_router_asks_for_the_requests_own_goal():
    ctx = SimpleNamespace(producer=None, clock=FakeClock(T0))
    router = Router(ctx, policy=make_policy("static"))  # type: ignore[arg-type]
    for goal in ("goal-a", "goal-b"):  # each goal's own automation
        router.learn(_automation("response_cache", goal=goal))
    for event in (_decided("a1", MSG, CS, goal="goal-a"), _answer("a1", goal="goal-a")):
        router.learn(event)
    router.learn(_assessed("a1"))

    def ask(goal: str) -> CachedAnswer | None:
        request = RequestReceived(
            source="sdk", run_id=f"{goal}-run", goal_id=goal, user_id="u", message=MSG
        )
        specialty, _, decision, hit = router.choose(request)
        assert specialty == CS
        assert (decision.action == "automation") == (hit is not None)
        return hit.cached if hit is not None else None

    served = ask("goal-a")
    assert served is not None and served.run_id == "a1"
    assert ask("goal-b") is None


def test_a_cached_answer_made_from_a_callers_conversation_serves_only_that_conversation():
    # Through the gateway the caller's system message and earlier turns travel as the
    # request's context; the answer they shaped may hold what only that caller said.
    alice = parse_chat(
        {
            "model": "auto",
            "messages": [
                {"role": "system", "content": "You are Alice's banking assistant."},
                {"role": "user", "content": "My account number is 4417-2291."},
                {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": "Summarize what I told you"},
            ],
        }
    )
    bob = parse_chat({"model": "auto", "messages": [{"role": "user", "content": alice.message}]})
    assert alice.message == bob.message and alice.context != bob.context
    auto = Automations()
    auto.learn(
        _automation("response_cache").model_copy(
            update={"signature": signature_of(alice.message, CS)}
        )
    )
    decided = _decided("r1", alice.message, CS).model_copy(
        update={"request_key": exact_key(alice.message, CS, alice.context)}
    )
    auto.learn(decided)
    auto.learn(_answer("r1", text="You told me your account number is 4417-2291."))
    auto.learn(_assessed("r1"))
    assert auto.lookup(bob.message, CS, T0, "g", context=bob.context) is None
    assert auto.lookup(bob.message, CS, T0, "g") is None
    other = {**alice.context, "history": "user: My account number is 0000."}
    assert auto.lookup(alice.message, CS, T0, "g", context=other) is None
    hit = auto.lookup(alice.message, CS, T0, "g", context=alice.context)
    assert hit is not None and hit.cached is not None and hit.cached.run_id == "r1"
    # Without context the key is what it always was: caches kept across the change still hit.
    assert exact_key(MSG, CS, {}) == exact_key(MSG, CS)


async def test_the_router_keys_a_request_with_its_context(monkeypatch):
    from tests.unit.test_router_resend import _agent, _request, _router

    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    request = _request(clock)
    await router.handle(request, None)  # type: ignore[arg-type]
    [decision] = producer.of(RouteDecided)
    assert decision.request_key == exact_key(request.message, "code", request.context)
    assert decision.request_key != exact_key(request.message, "code")


# -- automations are per goal: one goal's runs turn nothing on for another ----------------


def test_one_goals_response_cache_does_not_serve_another_goal_its_own_answer():
    """F10: goal A's runs earned a response cache; goal B, which never reached the
    threshold itself, is not served even its own cached answer, until it earns its own."""
    auto = Automations()
    auto.learn(_automation("response_cache", goal="goal-a"))
    _learn_run(auto, "a1", "goal-a", "A's answer")
    _learn_run(auto, "b1", "goal-b", "B's answer")
    a = _served(auto, "goal-a")
    assert a is not None and a.run_id == "a1"
    assert auto.lookup(MSG, CS, T0, "goal-b") is None
    auto.learn(_automation("response_cache", goal="goal-b"))  # B's own, once B earns it
    b = _served(auto, "goal-b")
    assert b is not None and b.run_id == "b1"
    a = _served(auto, "goal-a")  # A's kept: B's did not replace it
    assert a is not None and a.run_id == "a1" and len(auto) == 2


def test_each_goal_is_routed_by_its_own_direct_route_only():
    registry = _registry("cs_a", "goal-a")
    registry.apply(
        AgentSpawned(
            source="spawner",
            agent_id="cs_b",
            goal_id="goal-b",
            specialty=CS,
            system_prompt="p",
            temperature=0.2,
        )
    )
    auto = Automations()
    auto.learn(_automation("direct_route", goal="goal-a", agent="cs_a"))
    assert auto.lookup(MSG, CS, T0, "goal-b", registry) is None
    auto.learn(_automation("direct_route", goal="goal-b", agent="cs_b"))
    for goal, agent in (("goal-a", "cs_a"), ("goal-b", "cs_b")):
        hit = auto.lookup(MSG, CS, T0, goal, registry)
        assert hit is not None and hit.automation.agent_id == agent
        assert hit.automation.goal_id == goal
    assert auto.lookup(MSG, CS, T0, "goal-c", registry) is None


def test_an_older_response_cache_without_a_goal_serves_no_goal_even_restored():
    """An automation_created written before automations were per goal (no goal_id)
    folds, and restores from a snapshot, without error, and serves no goal (it used to
    serve every goal with an answer cached)."""
    older = _automation("response_cache", goal=None)
    auto = Automations()
    auto.learn(older)
    _learn_run(auto, "a1", "goal-a", "A's answer")
    assert auto.lookup(MSG, CS, T0, "goal-a") is None
    dumped = auto.dump()
    dumped["automations"].append(older.model_dump(mode="json"))  # as an older dump held it
    restored = Automations()
    restored.restore(dumped)
    assert restored.lookup(MSG, CS, T0, "goal-a") is None
    assert restored.lookup(MSG, CS, T0, "goal-b") is None
    restored.learn(_automation("response_cache", goal="goal-a"))
    served = _served(restored, "goal-a")
    assert served is not None and served.run_id == "a1"
    assert _served(restored, "goal-b") is None


def test_an_older_automation_naming_its_goal_serves_only_that_goal():
    """One with a goal but the id of a signature for every goal (the older learner's):
    it is that goal's, and never serves another, folded or restored."""
    auto = Automations()
    for kind in ("response_cache", "direct_route"):
        auto.learn(
            _automation(kind, goal="goal-a", agent="cs_a").model_copy(
                update={"automation_id": f"auto_{kind}_of_every_goal"}
            )
        )
    _learn_run(auto, "a1", "goal-a", "A's answer")
    _learn_run(auto, "b1", "goal-b", "B's answer")
    restored = Automations()
    restored.restore(auto.dump())
    assert restored.dump() == auto.dump()
    registry = _registry("cs_a", "goal-a")
    for router in (auto, restored):
        hit = router.lookup(MSG, CS, T0, "goal-a", registry)
        assert hit is not None and hit.cached is not None and hit.cached.run_id == "a1"
        assert router.lookup(MSG, CS, T0, "goal-b", registry) is None
        assert router.lookup("reset my account password", CS, T0, "goal-b", registry) is None


# -- bounded: one goal's traffic never evicts another's cache; nothing grows with history ----


def _answered(auto: Automations, run: str, goal: str, message: str, text: str = "ok") -> None:
    auto.learn(_decided(run, message, CS, goal=goal))
    auto.learn(_answer(run, goal=goal, text=text))
    auto.learn(_assessed(run))


def _flood(auto: Automations, goal: str, n: int) -> None:
    """n distinct good answers of ``goal``, each of a signature with its cache in force."""
    for i in range(n):
        message = f"reset my account password please {i}"
        auto.learn(
            _automation("response_cache", goal=goal).model_copy(
                update={"signature": signature_of(message, CS)}
            )
        )
        _answered(auto, f"{goal}-{i}", goal, message)


def test_one_goals_flood_of_answers_never_evicts_another_goals_cached_answer():
    for make in (lambda: Automations(100), lambda: Automations(100, per_goal=20)):
        auto = make()
        auto.learn(_automation("response_cache", goal="victim"))
        _learn_run(auto, "v1", "victim", "9 to 5")
        _flood(auto, "attacker", 500)
        served = _served(auto, "victim")
        assert served is not None and served.text == "9 to 5"
        # past the total the goal holding the most loses its oldest; then its own quota
        assert auto._answers.count_of("attacker") == min(99, auto._per_goal)


def test_an_answer_is_kept_only_where_a_response_cache_serves_it():
    auto = Automations(max_answers=1_000, per_goal=100)
    for i in range(500):  # no automation: at most a tenth of the goal's share waits
        _answered(auto, f"r{i}", "g", f"question number {i}")
    assert len(auto._answers) == 0 and len(auto._candidates) == 10
    # The answer that earned the automation waits for it, and is served once it comes.
    _learn_run(auto, "r-msg", "g", "Use the reset link.")
    auto.learn(_automation("response_cache", ttl=60))
    served = _served(auto, "g")
    assert served is not None and served.run_id == "r-msg"
    assert len(auto._answers) == 1 and len(auto._candidates) == 9


def test_an_answer_too_large_is_never_cached_and_the_cache_is_bounded_in_bytes():
    auto = Automations(max_bytes=100 * 1024, answer_bytes=16 * 1024)
    auto.learn(_automation("response_cache"))
    _learn_run(auto, "big", "g", "y" * (256 * 1024))  # an endpoint that ignored max_tokens
    assert _served(auto, "g") is None
    assert all(run.answer is None for run in auto._runs.values())  # nor kept while it waits
    for goal in ("g", *(f"goal-{i}" for i in range(20))):
        auto.learn(_automation("response_cache", goal=goal))
        for i in range(3):  # 15 KiB each, three requests of the goal's
            message = f"{MSG} {i}"
            auto.learn(
                _automation("response_cache", goal=goal).model_copy(
                    update={"signature": signature_of(message, CS)}
                )
            )
            _answered(auto, f"{goal}-{i}", goal, message, text="z" * (15 * 1024))
    assert auto._answers.weight <= 100 * 1024
    assert 0 < len(auto._answers) <= 100 * 1024 // (15 * 1024)


def test_expired_automations_are_dropped_and_their_answers_wait_again():
    clock = FakeClock(T0)
    auto = Automations(clock=clock)
    auto.learn(_automation("response_cache", ttl=60))
    auto.learn(_automation("direct_route", ttl=600))
    _learn_run(auto, "r1", "g", "Use the reset link.")
    assert len(auto) == 2 and len(auto._answers) == 1
    clock.advance(61)
    auto.learn(_assessed("unrelated"))  # any event: the fold drops what expired
    assert len(auto) == 1 and len(auto._answers) == 0 and len(auto._candidates) == 1
    assert [a["kind"] for a in auto.dump()["automations"]] == ["direct_route"]
    # lookup drops by the time it is asked at, and so does dump
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=601), "g") is None and len(auto) == 0
    for i in range(1_000):  # every automation ever earned, all long expired
        auto.learn(_automation("direct_route", ttl=60).model_copy(update={"signature": f"s{i}"}))
    assert len(auto) == 0 and auto.dump()["automations"] == []


def test_automations_in_force_are_capped(monkeypatch):
    from services.router import automations

    monkeypatch.setattr(automations, "MAX_AUTOMATIONS", 10)
    auto = Automations()
    for i in range(30):
        auto.learn(
            _automation("direct_route", ttl=1_000 + i).model_copy(update={"signature": f"s{i}"})
        )
    assert len(auto) == 10  # the soonest to expire went first
    assert sorted(a["signature"] for a in auto.dump()["automations"]) == sorted(
        f"s{i}" for i in range(20, 30)
    )


def test_restore_holds_the_caps_and_reads_an_older_dump():
    older = {  # what a router wrote before answers were per goal and bounded
        "automations": [_automation("response_cache").model_dump(mode="json")],
        "answers": [
            (("g", exact_key(MSG, CS)), ("r1", "g", "cs_g", "Use the reset link.", {}), 0.9),
            (("g", "k-huge"), ("r2", "g", "cs_g", "y" * (256 * 1024), {}), 0.9),
            (("other", "k-other"), ("r3", "other", "cs_o", "no cache of its own", {}), 0.9),
            *((("g", f"k{i}"), (f"x{i}", "g", "cs_g", "answer", {}), 0.9) for i in range(50)),
        ],
        "runs": [("r9", "k9", "g", None, None)],
    }
    auto = Automations(per_goal=20)
    auto.restore(older)
    assert len(auto._answers) == 20 and auto._answers.count_of("other") == 0
    assert auto._answers.get("g", "k-huge") is None and auto._kept("g", "k-huge") is None
    assert list(auto._runs) == ["r9"]
    again = Automations(per_goal=20)
    again.restore(auto.dump())
    assert again.dump() == auto.dump()


# -- runs waiting for their last piece: per goal, and bounded in bytes -----------------------


def _pending(auto: Automations, run: str, goal: str, text: str) -> None:
    """A run decided and answered, its assessment still to come."""
    auto.learn(_decided(run, f"{MSG} {run}", CS, goal=goal))
    auto.learn(_answer(run, goal=goal, text=text))


def _pending_bytes(auto: Automations) -> int:
    return sum(r.answer.size() for r in auto._runs.values() if r.answer is not None)


def test_one_goals_flood_of_waiting_runs_never_pushes_out_another_goals_run():
    """Goal A's runs waiting for their assessment do not make goal B's good answer miss
    the cache: B's run, decided and answered, is still there when its assessment comes."""
    auto = Automations(max_answers=100, per_goal=20)
    auto.learn(_automation("response_cache", goal="goal-b"))
    auto.learn(_decided("b1", MSG, CS, goal="goal-b"))
    auto.learn(_answer("b1", goal="goal-b", text="B's answer"))
    for i in range(500):  # A's flood: decided and answered, none assessed yet
        _pending(auto, f"a{i}", "goal-a", "A's answer")
    auto.learn(_assessed("b1"))
    served = _served(auto, "goal-b")
    assert served is not None and served.run_id == "b1" and served.text == "B's answer"


def test_waiting_runs_are_bounded_in_bytes_as_well_as_in_count():
    """Answers waiting for their assessment take at most a quarter of ``max_bytes`` (they
    were bounded by count alone: 20,000 answers of up to 16 KiB, over 300 MiB), and a goal
    holding less than the largest keeps its waiting answer."""
    auto = Automations(max_answers=20_000, max_bytes=1024 * 1024, answer_bytes=16 * 1024)
    auto.learn(_automation("response_cache", goal="goal-b"))
    auto.learn(_decided("b1", MSG, CS, goal="goal-b"))
    auto.learn(_answer("b1", goal="goal-b", text="B's answer"))
    for i in range(300):  # 15 KiB each: 4.4 MiB if all were kept
        _pending(auto, f"a{i}", "goal-a", "z" * (15 * 1024))
        assert _pending_bytes(auto) <= 1024 * 1024 // 4
    assert len(list(auto._runs)) < 300
    auto.learn(_assessed("b1"))
    served = _served(auto, "goal-b")
    assert served is not None and served.run_id == "b1"


def test_waiting_runs_restore_per_goal_and_from_an_older_dump():
    """A snapshot keeps the waiting runs of each goal; an older one (one list for all
    goals, as long as ``max_answers``) restores under the caps, other goals' runs kept."""
    older = {
        "automations": [_automation("response_cache", goal="goal-b").model_dump(mode="json")],
        "answers": [],
        "runs": [
            ("b1", exact_key(MSG, CS), "goal-b", ("b1", "goal-b", "cs_b", "B's answer", {}), None),
            *(
                (f"a{i}", f"k{i}", "goal-a", (f"a{i}", "goal-a", "cs_a", "z" * 15_000, {}), None)
                for i in range(300)
            ),
        ],
    }
    auto = Automations(max_answers=100, per_goal=20, max_bytes=1024 * 1024)
    auto.restore(older)
    assert _pending_bytes(auto) <= 1024 * 1024 // 4 and len(list(auto._runs)) <= 100
    again = Automations(max_answers=100, per_goal=20, max_bytes=1024 * 1024)
    again.restore(auto.dump())
    assert again.dump() == auto.dump()
    again.learn(_assessed("b1"))
    served = _served(again, "goal-b")
    assert served is not None and served.run_id == "b1"


def test_a_run_that_can_no_longer_be_cached_holds_no_answer_and_leaves_in_any_order():
    """A degraded or too large answer, or a failure, is not held while the run waits, and
    the run leaves once its decision and assessment are known, whatever order they are read
    in (a degraded answer's assessment used to start a new wait that only other runs'
    traffic ended)."""
    from streams.events import WorkflowFailed

    def ends(run: str) -> list[Event]:
        failed = WorkflowFailed(
            source="budget", run_id=run, goal_id="g", reason="timeout", detail="late"
        )
        return {
            "degraded": [_answer(run, tier="keyword")],
            "too-large": [_answer(run, text="y" * 4096)],
            "failed": [failed],
        }[run]

    for order in (lambda e: e, lambda e: e[::-1]):
        auto = Automations(answer_bytes=1024)
        for run in ("degraded", "too-large", "failed"):
            for event in order([_decided(run, MSG, CS), *ends(run), _assessed(run)]):
                auto.learn(event)
        assert list(auto._runs) == [] and auto._runs.weight == 0
    auto = Automations(answer_bytes=1024)
    for event in (_decided("r1", MSG, CS), _answer("r1", text="y" * 4096)):
        auto.learn(event)
    assert [run.answer for run in auto._runs.values()] == [None]  # waits, holding nothing


# -- a stamp ahead of the router's clock: a skew counts, years ahead do not -----------------


def _cached_for(auto: Automations, stamp: datetime, ttl: int) -> None:
    auto.learn(_automation("response_cache", ttl=ttl).model_copy(update={"occurred_at": stamp}))
    _learn_run(auto, "r1", "g", "Use the reset link.")


def test_an_automation_stamped_years_ahead_still_expires_a_ttl_after_it_was_read():
    # A valid automation_created stamped in year 8999 (a producer inside the boundary, a
    # clock gone wrong) served its cached answer for good: its TTL ran from its stamp.
    clock = FakeClock(T0)
    auto = Automations(clock=clock)
    _cached_for(auto, datetime(8999, 1, 1, tzinfo=UTC), ttl=600)
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=5), "g") is not None
    # From no later than the router's clock plus the skew allowed (60 s, as the budget's).
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=659), "g") is not None
    clock.advance(661)
    assert auto.lookup(MSG, CS, clock.now(), "g") is None
    assert len(auto) == 0


def test_a_restore_gives_an_automation_stamped_ahead_no_new_life():
    clock = FakeClock(T0)
    auto = Automations(clock=clock)
    _cached_for(auto, datetime(8999, 1, 1, tzinfo=UTC), ttl=600)
    clock.advance(500)  # restarted from a snapshot 500 s later
    restored = Automations(clock=clock)
    restored.restore(auto.dump())
    assert restored.lookup(MSG, CS, clock.now(), "g") is not None
    clock.advance(161)  # 661 s after it was first read
    assert restored.lookup(MSG, CS, clock.now(), "g") is None


def test_an_automation_stamped_a_few_seconds_ahead_keeps_its_whole_ttl():
    clock = FakeClock(T0)
    auto = Automations(clock=clock)
    _cached_for(auto, T0 + timedelta(seconds=5), ttl=60)
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=64), "g") is not None
    assert auto.lookup(MSG, CS, T0 + timedelta(seconds=65), "g") is None


def test_a_cached_answer_teaches_the_policy_nothing() -> None:
    """A cached answer is an earlier one, kept for being good, at no cost, maybe another
    model's: learned from, it would make the chosen arm look better and cheaper than it is.
    Its decision says so (policy "automation") and the router learns nothing from it; an
    answer the LLM gave the same request teaches as before."""
    ctx = SimpleNamespace(producer=None, clock=FakeClock(T0))
    router = Router(ctx, policy=make_policy("learned", seed=1))  # type: ignore[arg-type]
    router.arms = [CS]
    router.learn(_automation("response_cache"))

    def serve(run: str) -> RouteDecided:
        request = RequestReceived(source="sdk", run_id=run, goal_id="g", user_id="u", message=MSG)
        _, _, decision, hit = router.choose(request)
        router.learn(decision)
        if hit is None or hit.cached is None:
            router.learn(_answer(run))
        router.learn(_assessed(run))
        return decision

    first = serve("a1")  # no answer kept yet: the LLM answers, and the policy learns it
    assert first.policy == "learned" and router.policy.version("g") == 2
    again = serve("a2")  # the same request: the cache answers it
    assert again.action == "automation" and again.policy == "automation"
    assert router.policy.version("g") == 2


def test_a_cached_answer_is_served_only_when_worth_what_a_fresh_one_is_expected_to_give():
    """A cached answer costs nothing, so its reward is its quality. It is served when that is
    at least what the chosen arm is expected to give fresh (quality less the goal's price
    of its cost): a mediocre old answer is not handed out where the policy expects a much
    better one, unless the goal would rather save the money."""
    ctx = SimpleNamespace(producer=None, clock=FakeClock(T0))
    router = Router(ctx, policy=make_policy("learned", seed=1))  # type: ignore[arg-type]
    router.arms = [CS]
    router.learn(_automation("response_cache"))

    def serve(run: str, quality: float) -> RouteDecided:
        request = RequestReceived(source="sdk", run_id=run, goal_id="g", user_id="u", message=MSG)
        _, _, decision, hit = router.choose(request)
        router.learn(decision)
        if hit is None or hit.cached is None:
            router.learn(_answer(run, text=f"answer {run}"))
            router.learn(_assessed(run, quality))
        return decision

    assert serve("a1", 0.7).policy == "learned"  # cached: good enough (>= 0.6)
    # The policy learns from other runs that this arm answers these words at 0.95, for 1 cent.
    features = features_of(MSG)
    for _ in range(20):
        router.policy.update("g", features, CS, 0.95, 0.01)
    expected = router.policy.expected("g", features, CS)
    assert expected is not None and expected > 0.9
    # Quality only: the 0.7 answer is worth less than a fresh one, so the LLM answers.
    assert serve("a2", 0.97).policy == "learned"
    # That fresh 0.97 is now the best kept, and worth more than a fresh one: served.
    assert serve("a3", 0.5).policy == "automation"

    # A goal paying 30 quality per USD: a fresh answer is expected at 0.95 - 0.3 = 0.65, so
    # even a 0.7 cached answer is the better deal.
    ctx2 = SimpleNamespace(producer=None, clock=FakeClock(T0))
    priced = Router(ctx2, policy=make_policy("learned", seed=1))  # type: ignore[arg-type]
    priced.arms = [CS]
    priced.cost_weights["g"] = 30.0
    priced.learn(_automation("response_cache"))
    for _ in range(20):
        priced.policy.update("g", features, CS, 0.95, 0.01)
    request = RequestReceived(source="sdk", run_id="b1", goal_id="g", user_id="u", message=MSG)
    _, _, decision, _ = priced.choose(request)
    priced.learn(decision)
    priced.learn(_answer("b1"))
    priced.learn(_assessed("b1", 0.7))
    again = RequestReceived(source="sdk", run_id="b2", goal_id="g", user_id="u", message=MSG)
    assert priced.choose(again)[2].policy == "automation"
