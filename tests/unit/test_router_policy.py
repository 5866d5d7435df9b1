"""Routing policies: the static baseline, and a learned policy that finds the better specialty."""

from __future__ import annotations

import random

from services.router.policy import (
    MAX_FEATURE_WORDS,
    Features,
    LearnedPolicy,
    StaticPolicy,
    features_of,
)


def test_features_drop_stop_words_and_keep_the_keyword_guess():
    f = features_of("Why does my Python function raise an error?")
    assert "python" in f.words and "why" not in f.words
    assert f.keyword_guess == "code"
    assert Features.from_list(f.as_list()) == f


def test_static_policy_follows_keywords_with_certainty():
    choice = StaticPolicy().choose(features_of("fix this python bug"), ["code", "writing"])
    assert choice.specialty == "code" and choice.probability == 1.0


def test_learned_policy_finds_the_specialty_that_serves_a_request_type_best():
    # Hidden truth: "invoice" requests are served best by research, whatever keywords say.
    rng = random.Random(7)
    policy = LearnedPolicy(rng=random.Random(1))
    arms = ["customer_support", "research", "writing"]
    quality = {"customer_support": 0.4, "research": 0.9, "writing": 0.2}
    for _ in range(600):
        f = features_of(f"question about invoice {rng.randint(0, 9)} billing")
        choice = policy.choose(f, arms)
        assert 0 < choice.probability <= 1
        policy.update(f, choice.specialty, quality[choice.specialty] + rng.uniform(-0.1, 0.1))
    picks = [
        policy.choose(features_of("invoice billing question"), arms).specialty for _ in range(200)
    ]
    assert picks.count("research") / len(picks) > 0.9
    assert policy.epsilon() < 0.1
    assert policy.version == 601


def test_propensity_is_exact_for_epsilon_greedy():
    policy = LearnedPolicy(rng=random.Random(3), epsilon0=0.3)
    arms = ["a", "b", "c"]
    f = Features(frozenset({"x"}), "a")
    choice = policy.choose(f, arms)
    eps = policy.epsilon()
    greedy_p = 1 - eps + eps / 3
    assert choice.probability in (greedy_p, eps / 3)


def test_optimism_tries_a_specialty_the_words_were_never_seen_with():
    # No random exploration at all: only the confidence bonus can pick "b" here.
    policy = LearnedPolicy(rng=random.Random(0), epsilon0=0.0, epsilon_min=0.0, keyword_prior=0.0)
    f = Features(frozenset({"ledger", "audit"}), "a")
    for _ in range(5):
        policy.update(f, "a", 0.55)
    choice = policy.choose(f, ["a", "b"])
    assert choice.specialty == "b" and choice.probability == 1.0
    # Once "b" has been tried and did worse, the words' record decides again.
    for _ in range(5):
        policy.update(f, "b", 0.2)
    assert policy.choose(f, ["a", "b"]).specialty == "a"
    # Without the bonus, the untried specialty would never be picked.
    plain = LearnedPolicy(
        rng=random.Random(0), epsilon0=0.0, epsilon_min=0.0, keyword_prior=0.0, bonus=0.0
    )
    for _ in range(5):
        plain.update(f, "a", 0.55)
    assert plain.choose(f, ["a", "b"]).specialty == "a"


def test_a_message_of_thousands_of_distinct_words_brings_the_policy_only_its_first_ones():
    # Each word is a statistic per arm, kept until the run's outcome teaches the policy:
    # a 32 KB message of distinct words made 5,458 and 800 KiB per waiting run.
    words = [f"w{i}x" for i in range(5000)]
    hostile = features_of(" ".join(["please", "42", *words]))
    assert hostile.words == frozenset(words[:MAX_FEATURE_WORDS])
    # A real question keeps every content word, as before.
    normal = features_of("Why does my python function raise KeyError on 3 dict lookups?")
    assert normal.words == {"python", "function", "raise", "keyerror", "dict", "lookups"}


def _made_up(rng: random.Random, n: int = MAX_FEATURE_WORDS) -> Features:
    return Features(frozenset(f"w{rng.getrandbits(48):x}" for _ in range(n)), "general")


def test_made_up_words_do_not_grow_the_policy_past_its_limit():
    # Before the limit, 1,000 requests of 64 made-up words kept 64,000 statistics.
    policy = LearnedPolicy(rng=random.Random(1), max_word_stats=5_000)
    rng = random.Random(2)
    for _ in range(1_000):
        policy.update(_made_up(rng), "general", 0.5)
    assert len(policy._word) == 5_000
    assert len(policy.dump()["words"]) == 5_000


def test_a_flood_of_words_seen_once_keeps_what_repeated_outcomes_taught():
    policy = LearnedPolicy(rng=random.Random(1), max_word_stats=5_000, bonus=0.0)
    arms = ["research", "writing"]
    invoice = features_of("invoice billing refund")
    for _ in range(30):
        policy.update(invoice, "research", 0.9)
        policy.update(invoice, "writing", 0.2)
    rng = random.Random(3)
    for _ in range(2_000):  # 128,000 statistics of words never seen again
        policy.update(_made_up(rng), "writing", 1.0)
    assert len(policy._word) == 5_000
    assert all((w, a) in policy._word for w in invoice.words for a in arms)
    scores = policy.choose(invoice, arms).scores
    assert scores["research"] > scores["writing"] + 0.5


def test_when_the_table_is_full_of_repeated_words_the_least_recently_taught_leave():
    policy = LearnedPolicy(rng=random.Random(1), max_word_stats=1_000)
    words = [f"word{i}" for i in range(600)]
    for _ in range(2):  # each learned twice: all kept, none on probation
        for w in words:
            policy.update(Features(frozenset([w]), "general"), "general", 0.5)
    policy.update(Features(frozenset(["word0"]), "general"), "general", 0.5)  # taught again
    for w in (f"new{i}" for i in range(500)):
        for _ in range(2):
            policy.update(Features(frozenset([w]), "general"), "general", 0.5)
    assert len(policy._word) == 1_000
    assert ("word0", "general") in policy._word  # recently taught
    assert ("word1", "general") not in policy._word  # the oldest teaching left first
    assert ("new499", "general") in policy._word


def test_a_snapshot_keeps_the_limit_and_which_words_are_on_probation():
    policy = LearnedPolicy(rng=random.Random(1), max_word_stats=2_000)
    rng = random.Random(4)
    kept = features_of("invoice billing refund")
    for _ in range(3):
        policy.update(kept, "research", 0.8)
    for _ in range(100):
        policy.update(_made_up(rng), "general", 0.5)
    dump = policy.dump()
    again = LearnedPolicy(rng=random.Random(1), max_word_stats=2_000)
    again.restore(dump)
    assert again.dump() == dump
    assert all(row[-1] == 0 for row in dump["words"] if row[0] in kept.words)
    # A smaller limit on restore (or a snapshot written with none) is held to at once,
    # and the words seen once leave before the kept ones.
    small = LearnedPolicy(rng=random.Random(1), max_word_stats=1_000)
    small.restore(dump)
    assert len(small._word) == 1_000
    assert all((w, "research") in small._word for w in kept.words)


def test_a_snapshot_from_before_the_limit_puts_words_seen_once_on_probation():
    rows = [["often", "research", 5.0, 4.0], ["once", "research", 1.0, 0.5]]
    rows += [[f"x{i}", "general", 1.0, 0.5, 0.0, 0.25, 0.0, 0.0, 0] for i in range(1_500)]
    policy = LearnedPolicy(rng=random.Random(1), max_word_stats=1_000)
    policy.restore({"updates": 10, "arms": [["research", 6.0, 4.5]], "words": rows})
    assert len(policy._word) == 1_000
    assert ("often", "research") in policy._word
    assert ("once", "research") not in policy._word  # the oldest on probation left


def test_expected_is_the_estimate_without_its_bonus_for_the_unknown() -> None:
    """``expected`` is what an arm's answer is worth as far as is known (what the router
    weighs a cached answer against); ``estimate`` adds the optimism that makes the policy
    try what it has seen little of, which fades as the arm is tried."""
    policy = LearnedPolicy(rng=random.Random(1))
    features = features_of("refund my order 12")
    fresh_gap = policy.estimate(features, "billing") - policy.expected(features, "billing")
    assert fresh_gap > 0.05
    for _ in range(200):
        policy.update(features, "billing", 0.8, 0.001)
    assert abs(policy.expected(features, "billing") - 0.8) < 0.02
    assert abs(policy.expected(features, "billing", cost_weight=100.0) - 0.7) < 0.02
    tried_gap = policy.estimate(features, "billing") - policy.expected(features, "billing")
    assert 0 < tried_gap < fresh_gap / 3
