"""What one goal teaches the router changes only that goal's routing (invariant 6).

Before the policy was per goal, one learned policy took every goal's outcomes: a tenant
scoring its answers could steer every other tenant's requests. These tests attack that
through the router's own log folding, and hold the per-goal policies to their bounds.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from services.router.policy import (
    MAX_FEATURE_WORDS,
    Features,
    GoalPolicies,
    LearnedPolicy,
    features_of,
)
from services.router.service import Router
from streams.clock import FakeClock
from streams.events import FeedbackReceived, RequestReceived, RouteDecided, WorkflowAssessed
from streams.snapshots import decode_state, encode_state

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
MESSAGE = "refund my invoice for the damaged order"
ARMS = ["customer_support", "research", "writing"]


def _router() -> Router:
    policy = LearnedPolicy(rng=random.Random(1), epsilon0=0.0, epsilon_min=0.0)
    ctx = SimpleNamespace(producer=None, clock=FakeClock(T0))
    return Router(ctx, policy=policy)  # type: ignore[arg-type]


def _taught(router: Router, goal: str, arm: str, score: int, runs: int) -> None:
    """``runs`` answers of ``goal`` by ``arm`` on MESSAGE, each left unjudged and scored
    ``score`` (1-5) by the user who asked: the feedback path a tenant controls."""
    for i in range(runs):
        run = f"{goal}-{arm}-{i}"
        router.learn(
            RouteDecided(
                source="router",
                run_id=run,
                goal_id=goal,
                user_id="u",
                specialty=arm,
                action="reuse",
                policy="learned",
                probability=1.0,
                features=features_of(MESSAGE).as_list(),
            )
        )
        router.learn(
            WorkflowAssessed(
                source="improvement",
                run_id=run,
                goal_id=goal,
                agent_id=f"{arm}-agent",
                specialty=arm,
                quality=0.5,
                method="unjudged",
                cost_usd=0.001,
            )
        )
        router.learn(
            FeedbackReceived(source="gateway", run_id=run, goal_id=goal, user_id="u", score=score)
        )


def _scores(router: Router, goal: str) -> dict[str, float]:
    request = RequestReceived(
        source="client", run_id=f"ask-{goal}", goal_id=goal, user_id="u", message=MESSAGE
    )
    return router.policy.choose(goal, features_of(request.message), ARMS).scores


def test_one_goals_feedback_does_not_move_another_goals_routing() -> None:
    router, untouched = _router(), _router()
    _taught(router, "victim", "customer_support", 5, 20)
    _taught(untouched, "victim", "customer_support", 5, 20)
    before = _scores(router, "victim")
    assert max(before, key=before.__getitem__) == "customer_support"
    # The attacker's goal says, 200 times, that writing is perfect and support useless
    # on the victim's very words.
    _taught(router, "attacker", "writing", 5, 200)
    _taught(router, "attacker", "customer_support", 1, 200)
    assert _scores(router, "victim") == before == _scores(untouched, "victim")
    # ... and the attacker's own routing did move: the check can fail.
    mine = _scores(router, "attacker")
    assert max(mine, key=mine.__getitem__) == "writing"
    # A goal nothing was taught for chooses as a new policy does, whatever others taught.
    assert _scores(router, "newcomer") == _scores(_router(), "newcomer")
    assert router.policy.version("victim") == 21 and router.policy.version("newcomer") == 1


def test_the_goals_policies_survive_a_snapshot_apart() -> None:
    router = _router()
    _taught(router, "a", "writing", 5, 30)
    _taught(router, "b", "research", 5, 30)
    again = _router()
    again.restore(decode_state(encode_state(router.dump())))
    assert again.dump() == router.dump()
    for goal in ("a", "b"):
        assert _scores(again, goal) == _scores(router, goal)


def _made_up(rng: random.Random) -> Features:
    return Features(
        frozenset(f"w{rng.getrandbits(48):x}" for _ in range(MAX_FEATURE_WORDS)), "general"
    )


def test_one_goals_made_up_words_push_out_only_its_own_statistics() -> None:
    goals = GoalPolicies(LearnedPolicy(rng=random.Random(1)), max_goals=100, max_word_stats=5_000)
    invoice = features_of("invoice billing refund")
    for _ in range(3):
        goals.update("quiet", invoice, "research", 0.9)
    quiet = goals.of("quiet")
    assert isinstance(quiet, LearnedPolicy)
    learned = quiet.dump()
    rng = random.Random(2)
    for _ in range(1_000):  # 64,000 statistics of words never seen again
        goals.update("flood", _made_up(rng), "general", 0.5)
    assert goals.word_stats == 5_000
    assert quiet.dump() == learned  # every statistic of the quiet goal kept
    flood = goals.of("flood")
    assert isinstance(flood, LearnedPolicy)
    assert flood.word_stats == 5_000 - quiet.word_stats


def test_goals_past_the_cap_leave_least_recently_taught_first() -> None:
    goals = GoalPolicies(LearnedPolicy(rng=random.Random(1)), max_goals=3, max_word_stats=1_000)
    words = features_of("invoice billing refund")
    for goal in ("a", "b", "c"):
        goals.update(goal, words, "research", 0.9)
    goals.update("a", words, "research", 0.9)  # a taught again: b is now the oldest
    goals.update("d", words, "research", 0.9)
    assert "b" not in goals and all(g in goals for g in ("a", "c", "d"))
    # Three words and the request's form a goal: b's went with it.
    assert len(goals) == 3 and goals.word_stats == 12
    assert goals.version("b") == 1  # starts again from blank
    # A restore holds a smaller cap too, keeping the most recently taught.
    small = GoalPolicies(LearnedPolicy(rng=random.Random(1)), max_goals=2, max_word_stats=1_000)
    small.restore(goals.dump())
    assert len(small) == 2 and "d" in small and "a" in small and small.word_stats == 8


def _promoting(promote: int = 3) -> GoalPolicies:
    template = LearnedPolicy(rng=random.Random(1), epsilon0=0.0, epsilon_min=0.0, bonus=0.0)
    return GoalPolicies(template, max_goals=100, max_word_stats=10_000, promote_goals=promote)


INVOICE = features_of("invoice billing refund")  # the keyword guess: customer_support


def _learns(goals: GoalPolicies, goal: str, good: str, bad: str, runs: int = 5) -> None:
    for _ in range(runs):
        goals.update(goal, INVOICE, good, 0.9)
        goals.update(goal, INVOICE, bad, 0.2)


def test_what_three_goals_agree_on_is_where_a_new_goal_starts() -> None:
    arms = ["customer_support", "research"]
    assert INVOICE.keyword_guess == "customer_support"
    promoted, alone = _promoting(3), _promoting(0)
    for goals in (promoted, alone):
        for goal in ("a", "b", "c"):
            _learns(goals, goal, "research", "customer_support")
    assert promoted.choose("new", INVOICE, arms).specialty == "research"
    assert alone.choose("new", INVOICE, arms).specialty == "customer_support"
    assert promoted.agreed("new", "invoice", "research") == pytest.approx(0.9)
    # The prior gives way to the goal's own outcomes: this goal's research answers are bad.
    for _ in range(10):
        promoted.update("new", INVOICE, "research", 0.1)
        promoted.update("new", INVOICE, "customer_support", 0.8)
    assert promoted.choose("new", INVOICE, arms).specialty == "customer_support"
    # ... and what it learned moves nobody else: a, b and c still choose research.
    assert {promoted.choose(g, INVOICE, arms).specialty for g in "abc"} == {"research"}


def test_fewer_goals_than_the_rule_promote_nothing_and_one_liar_moves_little() -> None:
    arms = ["customer_support", "research"]
    goals = _promoting(3)
    _learns(goals, "honest", "research", "customer_support")
    _learns(goals, "liar", "customer_support", "research", runs=200)
    blank = _promoting(0).choose("new", INVOICE, arms).scores
    assert goals.choose("new", INVOICE, arms).scores == blank  # two goals: nothing shared
    for goal in ("honest2", "honest3"):
        _learns(goals, goal, "research", "customer_support")
    # Four goals know the words now, one lying with forty times the outcomes: the median of
    # their means is an honest goal's.
    assert goals.agreed("new", "invoice", "research") == pytest.approx(0.9)
    assert goals.agreed("new", "invoice", "customer_support") == pytest.approx(0.2)
    assert goals.choose("new", INVOICE, arms).specialty == "research"


def test_what_goals_agree_on_survives_a_snapshot() -> None:
    goals = _promoting(3)
    for goal in ("a", "b", "c"):
        _learns(goals, goal, "research", "customer_support")
    again = _promoting(3)
    again.restore(decode_state(encode_state(goals.dump())))
    assert again.dump() == goals.dump()
    arms = ["customer_support", "research"]
    assert again.choose("new", INVOICE, arms).scores == goals.choose("new", INVOICE, arms).scores
    assert again.choose("a", INVOICE, arms).scores == goals.choose("a", INVOICE, arms).scores


def test_what_goals_agree_on_does_not_depend_on_whose_requests_were_read() -> None:
    """With a half-life, a statistic decays lazily (when its own goal reads or learns it):
    whether another goal's outcome count passes the promotion's two must be the decayed
    count, not whatever reading the owner's requests last left behind. Otherwise two
    router instances with the same log (or one restored from a snapshot, which decays
    every statistic) promote different things for the same request."""
    arms = ["customer_support", "research"]
    other = features_of("poem stanza rhyme")

    def folded() -> GoalPolicies:
        template = LearnedPolicy(
            rng=random.Random(1), epsilon0=0.0, epsilon_min=0.0, bonus=0.0, half_life=10.0
        )
        goals = GoalPolicies(template, max_goals=100, max_word_stats=10_000, promote_goals=3)
        for goal in ("a", "b", "c"):
            _learns(goals, goal, "research", "customer_support", runs=5)
            for _ in range(20):  # twenty more outcomes each: the invoice words weigh ~1 now
                goals.update(goal, other, "research", 0.5)
        return goals

    quiet, read, restored = folded(), folded(), folded()
    want = quiet.choose("new", INVOICE, arms).scores
    for goal in ("a", "b", "c"):  # this instance served a request of each goal: a read
        read.choose(goal, INVOICE, arms)
    restored.restore(decode_state(encode_state(folded().dump())))
    # The decayed counts are below two: nothing is promoted, whoever read what.
    assert quiet.agreed("new", "invoice", "research") is None
    assert read.agreed("new", "invoice", "research") is None
    assert restored.agreed("new", "invoice", "research") is None
    assert read.choose("new", INVOICE, arms).scores == pytest.approx(want)
    assert restored.choose("new", INVOICE, arms).scores == pytest.approx(want)


def test_a_goal_past_its_first_500_outcomes_asks_nobody() -> None:
    arms = ["customer_support", "research"]
    other = features_of("poem stanza rhyme")
    promoted, alone = _promoting(3), _promoting(0)
    for goals in (promoted, alone):
        for goal in ("a", "b", "c"):
            _learns(goals, goal, "research", "customer_support")
        for _ in range(499):
            goals.update("old", other, "writing", 0.7)
    # Young still (499 outcomes): it starts invoices where the three others agree.
    assert promoted.choose("old", INVOICE, arms).specialty == "research"
    promoted.update("old", other, "writing", 0.7)
    alone.update("old", other, "writing", 0.7)
    # 500: what it does not know it takes from its own arm means, as a goal alone does.
    assert promoted.choose("old", INVOICE, arms).scores == alone.choose("old", INVOICE, arms).scores


def test_one_partys_goals_voting_alone_on_a_poor_arm_do_not_set_its_prior() -> None:
    # Honest goals seldom learn a poor arm twice, so on that arm three goals of one party
    # were the only voters, and their score of it became every young goal's prior.
    goals = _promoting(3)
    for goal in ("h1", "h2", "h3", "h4", "h5"):
        for _ in range(5):
            goals.update(goal, INVOICE, "customer_support", 0.9)
    for goal in ("m1", "m2", "m3"):
        for _ in range(2):
            goals.update(goal, INVOICE, "research", 1.0)
    assert goals.agreed("new", "invoice", "customer_support") == pytest.approx(0.9)
    # Three of the eight goals that know the word: not half of them.
    assert goals.agreed("new", "invoice", "research") is None
    # Where nobody else knows the word, three goals still agree as before.
    alone = _promoting(3)
    for goal in ("m1", "m2", "m3"):
        for _ in range(2):
            alone.update(goal, INVOICE, "research", 1.0)
    assert alone.agreed("new", "invoice", "research") == pytest.approx(1.0)
    # The rule survives a snapshot, and one written before it kept who knows a word.
    again = _promoting(3)
    again.restore(goals.dump())
    assert again.agreed("new", "invoice", "research") is None
    older = _promoting(3)
    older.restore({k: v for k, v in goals.dump().items() if k != "knowers"})
    assert older.agreed("new", "invoice", "research") is None


def test_a_word_many_goals_agree_on_is_still_shared() -> None:
    # Voters are kept up to nine while the goals that know a word are kept up to 36: with
    # more than 18 of them a prior could never have half, and the more goals agreed, the
    # less it was shared.
    goals = _promoting(3)
    for i in range(30):
        for _ in range(2):
            goals.update(f"g{i}", INVOICE, "customer_support", 0.9)
    assert goals.agreed("new", "invoice", "customer_support") == pytest.approx(0.9)
