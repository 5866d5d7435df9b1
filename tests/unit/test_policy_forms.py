"""Request forms in the learned policy: requests of the same words in the same order
(numbers aside) learn from each other's outcomes, so words several kinds of request share
no longer pull one kind toward what serves another; a change detected on a form's words
makes its outcomes old."""

from __future__ import annotations

import random

from services.router.policy import Features, LearnedPolicy, features_of

ARMS = ["fast", "careful"]
# Two kinds of request sharing most of their words: "beta" requests are four in five, and
# "fast" serves them; "alpha" requests are served better by "careful".
TRUTH = {
    "alpha": {"fast": 0.55, "careful": 0.85},
    "beta": {"fast": 0.9, "careful": 0.3},
}


def _message(kind: str, n: int) -> str:
    return f"Tell me about the {kind} issue, ticket {n}"


def test_a_form_is_the_words_in_order_with_numbers_left_out() -> None:
    one, other = features_of(_message("alpha", 12)), features_of(_message("alpha", 9071))
    assert one.form is not None and one.form == other.form
    assert features_of("ticket 12: tell me about the alpha issue").form != one.form
    assert features_of(_message("beta", 12)).form != one.form
    assert features_of("12 345").form is None
    assert Features.from_list(one.as_list()) == one


def test_forms_read_from_a_topic_are_bounded_and_older_features_have_none() -> None:
    logged = ["kw:general", "alpha", "issue"]  # what route_decided carried before forms
    assert Features.from_list(logged).form is None
    assert Features.from_list(logged).words == {"alpha", "issue"}
    hostile = Features.from_list(["kw:general", "~" + "f" * 100_000, "alpha"])
    assert hostile.form == "f" * 16 and hostile.words == {"alpha"}


def _serve(policy: LearnedPolicy, n: int, seed: int) -> float:
    """``n`` requests, four in five of kind beta; the share of the last 200 alpha requests
    the policy sent to their best arm."""
    rng = random.Random(seed)
    alpha_hits: list[bool] = []
    for _ in range(n):
        kind = "beta" if rng.random() < 0.8 else "alpha"
        features = features_of(_message(kind, rng.randrange(10_000)))
        arm = policy.choose(features, ARMS).specialty
        policy.update(features, arm, TRUTH[kind][arm] + rng.gauss(0.0, 0.05))
        if kind == "alpha":
            alpha_hits.append(arm == "careful")
    last = alpha_hits[-200:]
    return sum(last) / len(last)


def test_a_form_learns_what_its_shared_words_hide() -> None:
    # By its words, an alpha request is three parts beta ("tell", "issue", "ticket") and one
    # part alpha: their mean sends it to "fast", which beta requests taught them.
    words_only = _serve(LearnedPolicy(rng=random.Random(3), form_weight=0.0), 3_000, seed=1)
    with_forms = _serve(LearnedPolicy(rng=random.Random(3), form_weight=2.0), 3_000, seed=1)
    assert words_only < 0.3
    assert with_forms > 0.9


def test_a_change_on_its_words_makes_a_forms_outcomes_old() -> None:
    policy = LearnedPolicy(rng=random.Random(1), change_threshold=12.0)
    first = features_of("alpha beta gamma delta 1")
    second = features_of("delta gamma beta alpha 2")  # the same words, another form
    assert first.words == second.words and first.form != second.form
    rng = random.Random(2)
    for _ in range(40):
        for features in (first, second):
            policy.update(features, "fast", 0.9 + rng.gauss(0.0, 0.02))
            policy.update(features, "careful", 0.2 + rng.gauss(0.0, 0.02))

    def words_only(features: Features, arm: str) -> float:
        policy.form_weight = 0.0
        try:
            return policy.estimate(features, arm)
        finally:
            policy.form_weight = 2.0

    # Before any change the form's own outcomes weigh in (a difference, however small).
    assert policy.estimate(first, "fast") != words_only(first, "fast")
    while policy.changes == 0:  # "fast" drops on the second form only
        policy.update(second, "fast", 0.1 + rng.gauss(0.0, 0.02))
    # The first form's outcomes predate the change on its words: not believed.
    assert policy.estimate(first, "fast") == words_only(first, "fast")
    policy.update(first, "fast", 0.15)
    # ...and its next outcome starts them over.
    form = policy._word.get(("~" + str(first.form), "fast"))
    assert form is not None and form.n == 1.0 and form.total == 0.15
    assert policy.estimate(first, "fast") != words_only(first, "fast")


def test_a_snapshot_keeps_when_each_form_started() -> None:
    policy = LearnedPolicy(rng=random.Random(1), change_threshold=12.0)
    features = features_of("alpha beta gamma 1")
    rng = random.Random(4)
    for _ in range(40):
        policy.update(features, "fast", 0.9 + rng.gauss(0.0, 0.02))
    while policy.changes == 0:
        policy.update(features, "fast", 0.1 + rng.gauss(0.0, 0.02))
    policy.update(features, "fast", 0.1)
    dumped = policy.dump()
    again = LearnedPolicy(rng=random.Random(1), change_threshold=12.0)
    again.restore(dumped)
    assert again.dump() == dumped
    assert again.estimate(features, "fast") == policy.estimate(features, "fast")
    # A snapshot written before forms had epochs (ten columns a row) still restores.
    older = {**dumped, "words": [row[:10] for row in dumped["words"]]}
    again.restore(older)
    assert all(st.epoch == 0 for st in again._word.values())
