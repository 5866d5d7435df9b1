"""The learned policy's change detector: a workload whose best arm changes is followed, one
that does not change keeps what was learned, and the choice's probability stays exact."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.router.policy import Features, LearnedPolicy, make_policy
from services.router.settings import RouterSettings

WORDS = Features(frozenset({"quarterly", "survey", "variance"}), "research")
OTHER = Features(frozenset({"invoice", "refund"}), "customer_support")
ARMS = ["research", "data_analysis", "math"]


def _policy(change: float) -> LearnedPolicy:
    return LearnedPolicy(rng=random.Random(5), change_threshold=change)


def _serve(policy: LearnedPolicy, truth: dict[str, float], n: int, rng: random.Random) -> int:
    """``n`` requests on WORDS answered by the policy's choice; how many went to the best."""
    best = max(truth, key=lambda a: truth[a])
    hits = 0
    for _ in range(n):
        arm = policy.choose(WORDS, ARMS).specialty
        policy.update(WORDS, arm, min(1.0, max(0.0, truth[arm] + rng.gauss(0.0, 0.05))))
        hits += arm == best
    return hits


@pytest.mark.parametrize("change", [0.0, 12.0])
def test_a_new_best_arm_is_found_after_the_old_one_drops(change: float) -> None:
    # research was best for long; then it drops and data_analysis, little tried and poor
    # until then, becomes the best. math, second all along, stays as it was.
    policy, rng = _policy(change), random.Random(1)
    _serve(policy, {"research": 0.9, "data_analysis": 0.3, "math": 0.6}, 600, rng)
    _serve(policy, {"research": 0.4, "data_analysis": 0.95, "math": 0.6}, 150, rng)
    hits = _serve(policy, {"research": 0.4, "data_analysis": 0.95, "math": 0.6}, 100, rng)
    if change:
        assert policy.changes >= 1
        assert hits >= 80  # the new best serves most requests
    else:
        assert policy.changes == 0
        assert hits <= 20  # without the detector the old estimates keep it away


def test_an_unchanging_noisy_workload_raises_few_changes_and_keeps_its_choice() -> None:
    policy, rng = _policy(12.0), random.Random(2)
    truth = {"research": 0.8, "data_analysis": 0.6, "math": 0.5}
    for _ in range(3000):
        for features in (WORDS, OTHER):
            arm = policy.choose(features, ARMS).specialty
            policy.update(features, arm, min(1.0, max(0.0, truth[arm] + rng.gauss(0.0, 0.15))))
    assert policy.changes <= 3
    assert _serve(policy, truth, 200, rng) >= 180


def test_probabilities_stay_exact_while_stale_arms_are_tried_again() -> None:
    policy, rng = _policy(12.0), random.Random(3)
    _serve(policy, {"research": 0.9, "data_analysis": 0.3, "math": 0.6}, 400, rng)
    while policy.changes == 0:  # the drop, until it is detected
        policy.update(WORDS, "research", 0.3)
    assert policy._stale_arms(WORDS, ARMS)  # noqa: SLF001  the state under test
    seen: Counter[str] = Counter()
    stated: dict[str, float] = {}
    draws = 20_000
    for _ in range(draws):
        choice = policy.choose(WORDS, ARMS)  # choosing changes nothing but the draw
        seen[choice.specialty] += 1
        stated[choice.specialty] = choice.probability
    assert sum(stated.values()) == pytest.approx(1.0, abs=1e-9)
    for arm, p in stated.items():
        assert seen[arm] / draws == pytest.approx(p, abs=0.015)


def test_a_snapshot_keeps_what_the_detector_knows() -> None:
    policy, rng = _policy(12.0), random.Random(4)
    _serve(policy, {"research": 0.9, "data_analysis": 0.3, "math": 0.6}, 400, rng)
    while policy.changes == 0:
        policy.update(WORDS, "research", 0.3)
    again = _policy(12.0)
    again.restore(policy.dump())
    assert again.changes == policy.changes
    assert again._stale_arms(WORDS, ARMS) == policy._stale_arms(WORDS, ARMS)  # noqa: SLF001
    assert again.dump() == policy.dump()
    # Snapshots written before the detector existed still restore, with nothing stale.
    old = policy.dump()
    old["words"] = [row[:5] for row in old["words"]]
    old.pop("changes")
    again.restore(old)
    assert again._stale_arms(WORDS, ARMS) == []  # noqa: SLF001


def test_the_threshold_comes_from_the_environment_and_refuses_negatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORCH_ROUTER_CHANGE_THRESHOLD", "0")
    policy = make_policy("learned", seed=1)
    assert isinstance(policy, LearnedPolicy) and policy.change_threshold == 0.0
    assert LearnedPolicy().change_threshold == RouterSettings().change_threshold == 12.0
    for bad in ("-1", "nan", "lots", "inf"):
        monkeypatch.setenv("ORCH_ROUTER_CHANGE_THRESHOLD", bad)
        with pytest.raises(ValueError, match="ORCH_ROUTER_CHANGE_THRESHOLD"):
            RouterSettings.from_env()


def test_a_users_scores_raise_no_change_and_the_platforms_assessments_still_do() -> None:
    # Two scores of 1 from one user on a goal's well-learned words once made the detector
    # mark every statistic of those words stale (what 1,500 outcomes taught, forgotten).
    policy, rng = _policy(12.0), random.Random(3)
    _serve(policy, {"research": 0.9, "data_analysis": 0.3, "math": 0.6}, 400, rng)
    learned = policy.changes
    for _ in range(5):  # a user scoring every answer 1
        policy.update(WORDS, "research", 0.0, detect=False)
    assert policy.changes == learned and not policy._stale_arms(WORDS, ARMS)  # noqa: SLF001
    # The platform's own assessments (a judge's grade, the world's) still raise it.
    for _ in range(3):
        policy.update(WORDS, "research", 0.0)
    assert policy.changes > learned
