"""Routing policies: which specialty serves a request. Static keywords, or learned from outcomes.

A policy sees the request's features (its words and the keyword guess) and the
specialties it may choose, and returns a choice with the probability it had of
making it. Logging that probability on ``route_decided`` is what lets
``replay`` score another policy on the recorded log without calling any LLM.

The learned policy is epsilon-greedy over a per-word estimate of each
specialty's reward plus an optimism bonus for what it has seen little of:
exploration is explicit and the bonus deterministic, so propensities are exact.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
import re
import statistics
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from services.router.settings import RouterSettings
from streams.quotas import Largest
from streams.specialties import all_tokens, classify, tokens_in_order

__all__ = [
    "Choice",
    "arm_name",
    "split_arm",
    "Features",
    "GoalPolicies",
    "LearnedPolicy",
    "Policy",
    "StaticPolicy",
    "features_of",
    "make_policy",
]

_STOP = frozenset(
    "a an the and or of to in on for with is are be it this that my me i you your we our"
    " please can could would should how what why when do does from at by as about".split()
)
_DIGITS = re.compile(r"^\d+$")
# A request's form among its features (``Features.as_list``), and as a key of the policy's
# statistics: no word has this character (words are [a-z0-9_]).
_FORM = "~"
_FORM_CHARS = 16
# Content words a request brings to the policy: far more than any real question has.
MAX_FEATURE_WORDS = 64
# Outcomes of its own on a word past which a goal's policy no longer asks what other goals
# agree on (see GoalPolicies): its own evidence outweighs the prior five to one.
_OWN_ENOUGH = 10.0
# Outcomes a goal's policy has learned in all past which it stops asking what other goals
# agree on (see GoalPolicies): by then its own words cover what it is asked.
_YOUNG = 500
# The words of a request for which a young goal asks what other goals agree on.
_SHARED_WORDS = 16
# Goals remembered per (word, arm) as having learned it: the median of at most this many
# other goals' means is what they agree on.
_MAX_VOTERS = 9
# Goals kept per word as having learned it with any arm (see GoalPolicies.agreed): it
# counts them up to twice _MAX_VOTERS, besides the goal asking.
_MAX_KNOWERS = 2 * _MAX_VOTERS + 1
# Outcomes a goal must have learned of a word before its mean counts towards agreement.
_VOTER_MIN = 2.0
# The change detector's least standard deviation of a word's rewards: outcomes that never
# varied yet (a repeated message's fixed draw) must not turn every small move into a change.
_MIN_SPREAD = 0.05


@dataclass(frozen=True)
class Features:
    words: frozenset[str]
    keyword_guess: str
    # The request's form: a digest of all its words in order, numbers left out, so that
    # "refund order 12" and "refund order 57" share it (see ``LearnedPolicy.estimate``).
    # None for features logged before forms were learned.
    form: str | None = None

    def as_list(self) -> list[str]:
        form = [f"{_FORM}{self.form}"] if self.form else []
        return [f"kw:{self.keyword_guess}", *form, *sorted(self.words)]

    @classmethod
    def from_list(cls, items: list[str]) -> Features:
        guess = next((i[3:] for i in items if i.startswith("kw:")), "general")
        form = next((i[len(_FORM) :] for i in items if i.startswith(_FORM)), None)
        words = frozenset(i for i in items if not i.startswith(("kw:", _FORM)))
        # Read from a topic: a form is a digest, never more than its length.
        return cls(words, guess, form[:_FORM_CHARS] if form else None)


def features_of(message: str) -> Features:
    """The message's content words (its first :data:`MAX_FEATURE_WORDS` distinct ones), its
    keyword guess and its form. A request's features are kept until its outcome teaches
    the policy, and each word is a statistic per arm: a 32 KB message of distinct words
    made 5,000; its form is one more statistic per arm, whatever its length."""
    content = (w for w in tokens_in_order(message) if w not in _STOP and not _DIGITS.match(w))
    words = frozenset(itertools.islice(content, MAX_FEATURE_WORDS))
    guess, _ = classify(message)
    form = " ".join(w for w in all_tokens(message) if not _DIGITS.match(w))
    digest = hashlib.blake2b(form.encode(), digest_size=_FORM_CHARS // 2).hexdigest()
    return Features(words, guess, digest if form else None)


def arm_name(specialty: str, model: str | None) -> str:
    """The policy's name for serving with ``specialty`` on ``model``: the specialty alone
    when the platform has one model (None), ``specialty@model`` when it routes between
    several."""
    return f"{specialty}@{model}" if model else specialty


def split_arm(arm: str) -> tuple[str, str | None]:
    """:func:`arm_name` read back: (specialty, model or None)."""
    specialty, at, model = arm.partition("@")
    return specialty, (model if at else None)


@dataclass(frozen=True)
class Choice:
    specialty: str
    """The arm chosen: a specialty, or ``specialty@model`` (see :func:`arm_name`)."""
    probability: float
    scores: dict[str, float]

    @property
    def explored(self) -> bool:
        """The pick scored below the best arm: an exploration, not the greedy pick."""
        return bool(self.scores) and self.scores.get(self.specialty, 0.0) < max(
            self.scores.values()
        )


class Policy(Protocol):
    name: str

    @property
    def version(self) -> int: ...

    def choose(self, features: Features, arms: list[str], cost_weight: float = 0.0) -> Choice:
        """The arm to serve with; ``cost_weight``: quality given up per USD of an answer."""
        ...

    def update(
        self,
        features: Features,
        arm: str,
        reward: float,
        cost: float = 0.0,
        *,
        detect: bool = True,
    ) -> None:
        """What serving with ``arm`` gave: its quality (``reward``) and its cost in USD;
        ``detect``: whether the outcome may raise a change (False for a user's feedback)."""
        ...


class StaticPolicy:
    """The keyword classifier, always: the baseline the learned policy has to beat."""

    name = "static"
    version = 1

    def choose(self, features: Features, arms: list[str], cost_weight: float = 0.0) -> Choice:
        guess = features.keyword_guess
        # The guessed specialty on the first model the arms list (the platform's own).
        pick = next((a for a in arms if split_arm(a)[0] == guess), None)
        if pick is None:
            pick = _fallback(arms) if arms else guess
        return Choice(pick, 1.0, {a: float(a == pick) for a in arms})

    def update(
        self,
        features: Features,
        arm: str,
        reward: float,
        cost: float = 0.0,
        *,
        detect: bool = True,
    ) -> None:
        return None


def _fallback(arms: list[str]) -> str:
    general = [a for a in arms if split_arm(a)[0] == "general"]
    return general[0] if general else sorted(arms)[0]


@dataclass(slots=True)
class _Stat:
    n: float = 0.0
    total: float = 0.0
    cost: float = 0.0  # summed USD of the answers counted in n
    at: int = 0  # the policy's update count when n, total and cost were last decayed
    squares: float = 0.0  # summed squared rewards, for the spread the change detector uses
    up: float = 0.0  # the change detector's one-sided sums of standardised surprises
    down: float = 0.0
    # Learned before a change was detected on its word: still the estimate, but the next
    # outcome replaces it, and the choice tries the arm again (see ``choose``).
    stale: bool = False
    # The policy's count of changes: for a word, when one was last detected on it; for a
    # request form, when its outcomes started (a form older than a change on one of its
    # words is not believed, and its next outcome starts it over).
    epoch: int = 0


class _WordStats:
    """The per-(word, arm) statistics, at most ``limit`` of them.

    Every distinct word of every request the policy learns from makes one per arm it
    was answered by, so a stream of made-up words would grow the table (and the router's
    snapshot) without end. A statistic learned once waits in a probation segment (the
    oldest leave first, once it holds more than a fifth of the table); a second outcome
    moves it to the kept segment, whose least recently updated leave only when the
    table is full. A flood of words never seen again pushes out other words seen once,
    not what the policy learned from repeated outcomes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(2, int(limit))
        self._new: OrderedDict[tuple[str, str], _Stat] = OrderedDict()
        self._kept: OrderedDict[tuple[str, str], _Stat] = OrderedDict()

    def __len__(self) -> int:
        return len(self._new) + len(self._kept)

    def __contains__(self, key: object) -> bool:
        return key in self._kept or key in self._new

    def get(self, key: tuple[str, str]) -> _Stat | None:
        st = self._kept.get(key)
        return st if st is not None else self._new.get(key)

    def values(self) -> Iterator[_Stat]:
        yield from self._kept.values()
        yield from self._new.values()

    def rows(self) -> Iterator[tuple[tuple[str, str], _Stat, bool]]:
        """Every statistic with whether it is still on probation, oldest first in each
        segment: what :meth:`put` rebuilds the same table from."""
        for key, st in self._kept.items():
            yield key, st, False
        for key, st in self._new.items():
            yield key, st, True

    def put(self, key: tuple[str, str], st: _Stat, probation: bool) -> None:
        """A restored statistic, as the newest of its segment."""
        self._new.pop(key, None)
        self._kept.pop(key, None)
        (self._new if probation else self._kept)[key] = st
        self._evict()

    def touch(self, key: tuple[str, str]) -> _Stat:
        """The statistic an outcome is about to update: made on probation if new, kept
        from its second outcome on, and the newest of its segment."""
        st = self._kept.get(key)
        if st is not None:
            self._kept.move_to_end(key)
            return st
        st = self._new.pop(key, None)
        if st is None:
            st = self._new[key] = _Stat()
        else:
            self._kept[key] = st
        self._evict()
        return st

    def shed(self) -> None:
        """Let one statistic go as a full table would (see :class:`GoalPolicies`): one on
        probation while they are more than a fifth of the table, else the least recently
        taught of the kept ones."""
        if self._new and (5 * len(self._new) > len(self) or not self._kept):
            self._new.popitem(last=False)
        elif self._kept:
            self._kept.popitem(last=False)

    def _evict(self) -> None:
        probation = max(1, self.limit // 5)
        while len(self) > self.limit:
            if len(self._new) > probation or not self._kept:
                self._new.popitem(last=False)
            else:
                self._kept.popitem(last=False)


@dataclass
class LearnedPolicy:
    """Epsilon-greedy over per-(word, arm) mean rewards, shrunk toward each arm's mean.

    An arm's value is its estimated quality minus the goal's cost weight times its
    estimated cost (both learned the same way). One such policy learns for one goal
    (:class:`GoalPolicies`): what it is taught comes from that goal's outcomes only.

    ``bonus`` scales an upper-confidence term, ``bonus * sqrt(ln(2 + updates) / (1 + n))``
    with ``n`` the mean number of times the request's words were seen with the
    specialty: a specialty rarely tried on these words gets tried again before the
    estimate settles, which random exploration alone does too slowly for rare words.
    """

    name: str = "learned"
    epsilon0: float = RouterSettings.model_fields["epsilon"].default
    epsilon_min: float = 0.03
    shrink: float = 2.0
    keyword_prior: float = 0.05
    bonus: float = 0.1
    # Updates after which an observation weighs half (0: never forgotten). What was
    # learned fades, so a world that changes is followed (see ``_fresh``).
    half_life: float = 0.0
    # The change detector (see ``_surprised``): a (word, arm) whose outcomes drift this far
    # from its estimate (one-sided CUSUM of surprises in standard deviations) makes what was
    # learned about the request's words stale, for every arm: each arm is tried again on
    # them (with probability ``probe`` a request), and its next outcome replaces the old
    # estimate. 0 turns it off.
    change_threshold: float = RouterSettings.model_fields["change_threshold"].default
    change_slack: float = 0.5
    change_min: float = 20.0
    probe: float = 0.3
    # How many outcomes the words' estimate weighs as, against those of the request's own
    # form (see ``estimate``); 0 leaves forms out.
    form_weight: float = RouterSettings.model_fields["form_weight"].default
    changes: int = 0
    rng: random.Random = field(default_factory=random.Random)
    updates: int = 0
    # At most this many (word, arm) statistics (``_WordStats``): memory and snapshots stay
    # bounded whatever words requests bring.
    max_word_stats: int = RouterSettings.model_fields["max_word_stats"].default
    _arm: dict[str, _Stat] = field(default_factory=lambda: defaultdict(_Stat))
    _word: _WordStats = field(init=False)
    # (word, arm) -> the mean reward other goals agree on, or None (set by GoalPolicies)
    commons: Callable[[str, str], float | None] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._word = _WordStats(self.max_word_stats)

    def blank(self) -> LearnedPolicy:
        """A policy with these settings that has learned nothing, drawing from the same
        random source (a goal's own policy, see :class:`GoalPolicies`)."""
        state = {"updates", "changes", "_arm", "commons"}
        return LearnedPolicy(
            **{
                f.name: getattr(self, f.name)
                for f in fields(self)
                if f.init and f.name not in state
            }
        )

    @property
    def word_stats(self) -> int:
        return len(self._word)

    def shed(self) -> None:
        """Forget one (word, arm) statistic: the one a full table would let go first."""
        self._word.shed()

    @property
    def version(self) -> int:
        """Grows with what was learned, so a decision names the state it came from."""
        return 1 + self.updates

    def epsilon(self) -> float:
        return max(self.epsilon_min, self.epsilon0 / math.sqrt(1.0 + self.updates / 50.0))

    def weight_now(self, st: _Stat) -> float:
        """``st.n`` as :meth:`_fresh` would decay it now, without touching ``st``: what
        another goal reads of this policy must not depend on whether this goal's own
        requests (or a snapshot) happened to decay it already."""
        if self.half_life > 0 and st.at < self.updates:
            return st.n * float(0.5 ** ((self.updates - st.at) / self.half_life))
        return st.n

    def _fresh(self, st: _Stat) -> _Stat:
        """``st`` decayed to now: each update since it was last touched weighs it down by
        ``0.5 ** (1 / half_life)``. Lazy, so an update costs what the request's words do."""
        if self.half_life > 0 and st.at < self.updates:
            factor = 0.5 ** ((self.updates - st.at) / self.half_life)
            st.n *= factor
            st.total *= factor
            st.cost *= factor
            st.squares *= factor
        st.at = self.updates
        return st

    def _prior(self, arm: str) -> tuple[float, float]:
        """What an arm little tried is expected to give, before its own answers: with
        several models, the mean quality of its specialty on the other models and the mean
        cost of its model with the other specialties; otherwise 0.5 and nothing."""
        specialty, model = split_arm(arm)
        if model is None:
            return 0.5, 0.0
        same_specialty = [
            self._fresh(st)
            for a, st in self._arm.items()
            if a != arm and split_arm(a)[0] == specialty
        ]
        same_model = [
            self._fresh(st) for a, st in self._arm.items() if a != arm and split_arm(a)[1] == model
        ]
        n = sum(st.n for st in same_specialty)
        quality = sum(st.total for st in same_specialty) / n if n else 0.5
        m = sum(st.n for st in same_model)
        # An arm whose model was never tried costs, as far as is known, nothing: optimism.
        cost = sum(st.cost for st in same_model) / m if m else 0.0
        return quality, cost

    def estimate(self, features: Features, arm: str, cost_weight: float = 0.0) -> float:
        """What the policy ranks ``arm`` by: :meth:`expected`, plus a small prior for the
        keyword guess's specialty (fading as the arm is tried) and the optimism bonus."""
        base = self._arm.get(arm)
        seen = self._fresh(base).n if base is not None else 0.0
        prior = self.keyword_prior / (1.0 + seen / 10.0)
        return (
            self.expected(features, arm, cost_weight)
            + (prior if split_arm(arm)[0] == features.keyword_guess else 0.0)
            + self._optimism(features, arm)
        )

    def expected(self, features: Features, arm: str, cost_weight: float = 0.0) -> float:
        """The reward ``arm`` is expected to give on this request (its estimated quality
        minus ``cost_weight`` times its estimated cost), with no bonus for what is unknown."""
        base = self._arm.get(arm)
        if base is not None:
            self._fresh(base)
        prior, prior_cost = self._prior(arm)
        arm_mean = (base.total + prior) / (base.n + 1.0) if base else prior
        arm_cost = (base.cost + prior_cost) / (base.n + 1.0) if base else prior_cost
        # Only a goal still young asks what others agree on: it is what the prior is for,
        # and asking costs the request path (docs/performance.md).
        agreed = self.commons if self.updates < _YOUNG else None
        parts, costs = [], []
        # The same specialty on the platform's other models: what they learned of a word is
        # where this arm's own few outcomes on it are shrunk to (a specialty that serves a
        # kind of request on one model is likely to serve it on another), and stands in for
        # a word this arm has not answered yet.
        specialty, model = split_arm(arm)
        kin = (
            [a for a in self._arm if a != arm and split_arm(a)[0] == specialty]
            if model is not None
            else []
        )
        changed = 0  # the latest change detected on one of the words, with this arm
        for i, w in enumerate(features.words):
            if i == _SHARED_WORDS:
                # Each ask reads up to nine other goals' statistics: a request's first words
                # ask, the rest do not (64 words, 9 voters each, once took 6-18 ms a choice).
                agreed = None
            st = self._word.get((w, arm))
            if st is not None:
                self._fresh(st)
                changed = max(changed, st.epoch)
            # What several other goals learned of the word (see GoalPolicies) stands in for
            # the arm's mean where this goal has learned little of it itself.
            shared = (
                agreed(w, arm)
                if agreed is not None and (st is None or st.n < _OWN_ENOUGH)
                else None
            )
            if shared is None and kin:
                # Else what the specialty learned of the word on the other models.
                shared = self._kin_mean(w, kin, arm_mean)
            if st is None:
                if shared is not None:
                    parts.append(shared)
                    costs.append(arm_cost)
                continue
            # Few observations lean on the arm's overall mean (or on what other goals agree
            # on, or what the specialty learned of the word on other models).
            mean = arm_mean if shared is None else shared
            parts.append((st.total + self.shrink * mean) / (st.n + self.shrink))
            costs.append((st.cost + self.shrink * arm_cost) / (st.n + self.shrink))
        if not parts:
            value, cost = arm_mean, arm_cost
        else:
            value, cost = sum(parts) / len(parts), sum(costs) / len(costs)
        form = self._word.get((_FORM + features.form, arm)) if features.form else None
        if form is not None and self.form_weight > 0 and form.epoch >= changed:
            # Requests of this very form: their own outcomes, shrunk toward what the words
            # say. Words shared by several kinds of request ("ticket", "describe") pull the
            # words' mean toward arms good at other kinds; a form's outcomes do not. A
            # change detected since on one of its words (by a request of any form that
            # shares it) leaves them out until they start over.
            self._fresh(form)
            value = (form.total + self.form_weight * value) / (form.n + self.form_weight)
            cost = (form.cost + self.form_weight * cost) / (form.n + self.form_weight)
        return value - cost_weight * cost

    def _kin_mean(self, word: str, kin: list[str], prior: float) -> float | None:
        """What ``kin`` (arms of one specialty on other models) learned of ``word``, shrunk
        toward ``prior`` like an arm's own; None if none of them learned it (or only before
        a change detected on it)."""
        n = total = 0.0
        for other in kin:
            st = self._word.get((word, other))
            if st is not None and not st.stale:
                self._fresh(st)
                n += st.n
                total += st.total
        return (total + self.shrink * prior) / (n + self.shrink) if n > 0 else None

    def known(self, features: Features, arm: str) -> float:
        """How much the policy knows of ``arm`` on these words: the mean over the words of
        the outcomes it learned with the arm (as decayed), the arm's own count for a
        request without words."""
        if features.words:
            counts = [
                self._fresh(st).n if (st := self._word.get((w, arm))) is not None else 0.0
                for w in features.words
            ]
            return sum(counts) / len(counts)
        base = self._arm.get(arm)
        return self._fresh(base).n if base else 0.0

    def _optimism(self, features: Features, arm: str) -> float:
        if self.bonus <= 0:
            return 0.0
        n = self.known(features, arm)
        return self.bonus * math.sqrt(math.log(2.0 + self.updates) / (1.0 + n))

    def choose(self, features: Features, arms: list[str], cost_weight: float = 0.0) -> Choice:
        if not arms:
            return Choice(features.keyword_guess, 1.0, {})
        scores = {a: self.estimate(features, a, cost_weight) for a in arms}
        best = max(arms, key=lambda a: (scores[a], a == features.keyword_guess))
        eps = self.epsilon()
        k = len(arms)
        stale = self._stale_arms(features, arms)
        probe = self.probe if stale else 0.0
        if self.rng.random() < eps:
            pick = self.rng.choice(arms)
        elif stale and self.rng.random() < probe:
            pick = self.rng.choice(stale)
        else:
            pick = best
        greedy = (1.0 - eps) * (1.0 - probe) if pick == best else 0.0
        probing = (1.0 - eps) * probe / len(stale) if pick in stale else 0.0
        probability = eps / k + greedy + probing
        return Choice(pick, probability, {a: round(v, 6) for a, v in scores.items()})

    def _stale_arms(self, features: Features, arms: list[str]) -> list[str]:
        """The arms whose estimate on most of the request's words predates a change
        detected on them: worth a try before the old estimates are believed again."""
        if self.change_threshold <= 0 or not features.words:
            return []
        half = len(features.words) / 2.0
        return [
            a
            for a in arms
            if sum(
                1 for w in features.words if (st := self._word.get((w, a))) is not None and st.stale
            )
            > half
        ]

    def dump(self) -> dict[str, Any]:
        """What was learned, as plain values (for a snapshot); settings are not state."""
        for st in (*self._arm.values(), *self._word.values()):
            self._fresh(st)  # every row as of now: a restore needs no update counts
        return {
            "updates": self.updates,
            "arms": [[a, s.n, s.total, s.cost] for a, s in self._arm.items()],
            "words": [
                [
                    *(w, a, s.n, s.total, s.cost, s.squares, s.up, s.down),
                    *(int(s.stale), int(new), s.epoch),
                ]
                for (w, a), s, new in self._word.rows()
            ],
            "changes": self.changes,
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace what was learned with a :meth:`dump`; nothing changes if it fails."""
        arms: dict[str, _Stat] = defaultdict(_Stat)
        words = _WordStats(self.max_word_stats)
        # Snapshots from before costs were learned have no cost column.
        for arm, n, total, *cost in data["arms"]:
            arms[arm] = _Stat(float(n), float(total), float(cost[0]) if cost else 0.0)
        for word, arm, n, total, *more in data["words"]:
            # Older snapshots stop after the cost, or before it, and do not say which
            # statistics are on probation: those learned from one outcome at most are.
            cost, squares, up, down, stale = (*map(float, more[:5]), 0.0, 0.0, 0.0, 0.0, 0.0)[:5]
            new = bool(more[5]) if len(more) > 5 else float(n) < 1.5
            # Older snapshots hold no epochs: as if no change had been detected.
            epoch = int(more[6]) if len(more) > 6 else 0
            st = _Stat(float(n), float(total), cost, 0, squares, up, down, bool(stale), epoch)
            words.put((str(word), str(arm)), st, new)
        updates, changes = int(data["updates"]), int(data.get("changes", 0))
        for st in (*arms.values(), *words.values()):
            st.at = updates
        # Only now, with every value read: a restore that fails changes nothing.
        self.updates, self.changes, self._arm, self._word = updates, changes, arms, words

    def update(
        self,
        features: Features,
        arm: str,
        reward: float,
        cost: float = 0.0,
        *,
        detect: bool = True,
    ) -> None:
        self.updates += 1
        st = self._fresh(self._arm[arm])
        st.n += 1
        st.total += reward
        st.cost += cost
        # The request's form is learned as its words are (and forgotten with them).
        keys = [*features.words, *([_FORM + features.form] if features.form else [])]
        stats = [self._fresh(self._word.touch((w, arm))) for w in keys]
        # Every word's detector sees the outcome (a list, not a generator that stops early),
        # unless it is a user's own score: two scores of 1 from one user on the goal's
        # common words once made the goal forget what 1,500 outcomes taught it.
        surprised = [self._surprised(ws, reward) for ws in stats] if detect else []
        if any(surprised):
            # Words of one request come together: the change is the request's kind's, so
            # what every arm learned on all of its words (and its form) is stale.
            self.changes += 1
            for w in keys:
                self._make_stale(w)
        if features.form:
            form = stats[-1]
            if form.n == 0 or any(ws.epoch > form.epoch for ws in stats[:-1]):
                # New, or a change was detected on one of its words since it started: its
                # outcomes start (over) now.
                form.stale, form.epoch = form.n > 0, self.changes
        for ws in stats:
            if ws.stale:
                ws.n = ws.total = ws.cost = ws.squares = ws.up = ws.down = 0.0
                ws.stale = False
            ws.n += 1
            ws.total += reward
            ws.cost += cost
            ws.squares += reward * reward

    def _surprised(self, st: _Stat, reward: float) -> bool:
        """Whether ``reward`` completes a change in ``st``'s outcomes: the one-sided sums of
        their surprises (the distance from the estimate in standard deviations, less
        ``change_slack``) pass ``change_threshold``. Words seen fewer than ``change_min``
        times are still being learned and raise nothing."""
        if self.change_threshold <= 0 or st.n < 1.0:
            return False
        mean = st.total / st.n
        spread = math.sqrt(max(0.0, st.squares / st.n - mean * mean))
        z = (reward - mean) / max(spread, _MIN_SPREAD)
        st.up = max(0.0, st.up + z - self.change_slack)
        st.down = max(0.0, st.down - z - self.change_slack)
        return st.n >= self.change_min and max(st.up, st.down) > self.change_threshold

    def _make_stale(self, word: str) -> None:
        for arm in self._arm:
            st = self._word.get((word, arm))
            if st is not None:
                st.stale = True
                st.up = st.down = 0.0
                st.epoch = self.changes


class GoalPolicies:
    """A policy per goal: what one goal's outcomes teach changes only that goal's routing.

    Tenants stay apart (the design's invariant 6): the assessments and feedback of one
    goal's answers must not move where another goal's requests go, as one policy learning
    from every goal's outcomes would (a tenant scoring every answer 1 would steer all the
    others away from what serves them). So each goal learns in a policy of its own, made
    the first time one of its outcomes is taught; a goal with nothing taught yet chooses
    with a blank one (its keyword guess first, explored like any policy that is new).

    Bounds: at most ``max_goals`` goals are kept (the least recently taught leaves first,
    and starts from blank should it come back), and the (word, arm) statistics of all of
    them together number at most ``max_word_stats``: past that, the goal holding the most
    lets one of its own go (see :meth:`LearnedPolicy.shed`), so a goal holding fewer than
    the largest never loses what it learned to another goal's words.

    Promotion by evidence from several goals (``promote_goals``, 0: never): what a word
    tells of an arm becomes a prior for other goals once at least that many goals each
    learned it from two outcomes or more. The prior is the median of those goals' mean
    rewards (of the first nine goals to learn the word with the arm), so one goal scoring
    against the others moves it no further than the honest goals' own spread, and a goal's
    own outcomes still replace it as they come (it weighs as two of them, and is not asked
    once the goal has ten of the word, nor at all once it learned 500 outcomes in all). A
    goal new to the platform then starts where the others agree, instead of from the
    keyword guess.
    """

    def __init__(
        self,
        template: Policy,
        *,
        max_goals: int,
        max_word_stats: int,
        promote_goals: int = 0,
    ) -> None:
        self.template = template
        self.max_goals = max(1, max_goals)
        self.max_word_stats = max(1, max_word_stats)
        self.promote_goals = max(0, promote_goals)
        self._goals: OrderedDict[str, Policy] = OrderedDict()  # least recently taught first
        self._sizes = Largest()  # goal -> its (word, arm) statistics
        self._words = 0
        # (word, arm) -> goals that learned it (at most _MAX_VOTERS, some may have let it go
        # since), least recently taught first, at most max_word_stats of them
        self._voters: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        # word -> goals that learned it with any arm (at most _MAX_KNOWERS), least recently
        # taught first: an arm's prior needs the votes of half of them (see agreed)
        self._knowers: OrderedDict[str, list[str]] = OrderedDict()

    @property
    def name(self) -> str:
        return self.template.name

    @property
    def learned(self) -> bool:
        return isinstance(self.template, LearnedPolicy)

    @property
    def word_stats(self) -> int:
        return self._words

    def __len__(self) -> int:
        return len(self._goals)

    def __contains__(self, goal: object) -> bool:
        return goal in self._goals

    def _new(self, goal: str) -> Policy:
        t = self.template
        if not isinstance(t, LearnedPolicy):
            return t
        policy = t.blank()
        if self.promote_goals:
            policy.commons = functools.partial(self.agreed, goal)
        return policy

    def agreed(self, goal: str, word: str, arm: str) -> float | None:
        """What goals other than ``goal`` agree ``word`` tells of ``arm``: the median of
        their mean rewards, when ``promote_goals`` of them, and half of the goals that
        learned the word with any arm, learned it from two outcomes or more; else None.
        (Without the half, three goals of one party that scored a poor arm on a word set
        every young goal's prior of it: honest goals seldom learn a poor arm twice, so on
        that arm the party's goals were the only voters.)"""
        voters = self._voters.get((word, arm))
        if voters is None or len(voters) < self.promote_goals:
            return None
        knowers = sum(1 for k in self._knowers.get(word, ()) if k != goal and k in self._goals)
        means = []
        for voter in voters:
            policy = self._goals.get(voter) if voter != goal else None
            if not isinstance(policy, LearnedPolicy):
                continue
            st = policy._word.get((word, arm))
            # The count as decayed now (read, not written: a read here must not change what
            # the voter's own requests, or a later read, see), so that every instance
            # folding the same log, restored from a snapshot or not, agrees.
            if st is not None and not st.stale and policy.weight_now(st) >= _VOTER_MIN:
                means.append(st.total / st.n)  # decay scales both alike: the mean is as is
        # Voters are kept up to _MAX_VOTERS: half of the knowers, counted up to twice that.
        if len(means) < max(self.promote_goals, min(knowers, 2 * _MAX_VOTERS) / 2.0):
            return None
        return statistics.median(means)

    def _stat(self, goal: str, word: str, arm: str) -> _Stat | None:
        policy = self._goals.get(goal)
        return policy._word.get((word, arm)) if isinstance(policy, LearnedPolicy) else None

    def _voted(self, goal: str, features: Features, arm: str) -> None:
        """Remember that ``goal`` learned the request's words with ``arm``."""
        for word in features.words:
            knowers = self._knowers.get(word)
            if knowers is None:
                knowers = self._knowers[word] = []
            else:
                self._knowers.move_to_end(word)
            if goal not in knowers:
                if len(knowers) >= _MAX_KNOWERS:  # make room: goals no longer kept
                    knowers[:] = [k for k in knowers if k in self._goals]
                if len(knowers) < _MAX_KNOWERS:
                    knowers.append(goal)
            key = (word, arm)
            voters = self._voters.get(key)
            if voters is None:
                voters = self._voters[key] = []
            else:
                self._voters.move_to_end(key)
            if goal not in voters:
                if len(voters) >= _MAX_VOTERS:  # make room: goals that let it go
                    voters[:] = [v for v in voters if self._stat(v, word, arm) is not None]
                if len(voters) < _MAX_VOTERS:
                    voters.append(goal)
        while len(self._voters) > self.max_word_stats:
            self._voters.popitem(last=False)
        while len(self._knowers) > self.max_word_stats:
            self._knowers.popitem(last=False)

    def of(self, goal: str) -> Policy:
        """The goal's policy, to choose with (a blank one for a goal taught nothing yet)."""
        found = self._goals.get(goal)
        return found if found is not None else self._new(goal)

    def version(self, goal: str) -> int:
        return self.of(goal).version

    def choose(
        self, goal: str, features: Features, arms: list[str], cost_weight: float = 0.0
    ) -> Choice:
        return self.of(goal).choose(features, arms, cost_weight)

    def estimate(self, goal: str, features: Features, arm: str, cost_weight: float = 0.0) -> float:
        policy = self.of(goal)
        return (
            policy.estimate(features, arm, cost_weight)
            if isinstance(policy, LearnedPolicy)
            else 0.0
        )

    def expected(
        self, goal: str, features: Features, arm: str, cost_weight: float = 0.0
    ) -> float | None:
        """The goal's learned policy's expected reward of ``arm`` on these features (see
        :meth:`LearnedPolicy.expected`); None when the policy does not learn."""
        policy = self.of(goal)
        if isinstance(policy, LearnedPolicy):
            return policy.expected(features, arm, cost_weight)
        return None

    def known(self, goal: str, features: Features, arm: str) -> float:
        policy = self.of(goal)
        return policy.known(features, arm) if isinstance(policy, LearnedPolicy) else 0.0

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
        policy = self._goals.get(goal)
        if policy is None:
            policy = self._keep(goal, self._new(goal))
        else:
            self._goals.move_to_end(goal)
        policy.update(features, arm, reward, cost, detect=detect)
        self._counted(goal, policy)
        if self.promote_goals:
            self._voted(goal, features, arm)

    def _keep(self, goal: str, policy: Policy) -> Policy:
        """``policy`` as the goal's, the most recently taught; the least recently taught
        goals leave past ``max_goals``."""
        self._goals[goal] = policy
        self._goals.move_to_end(goal)
        while len(self._goals) > self.max_goals:
            gone, _ = self._goals.popitem(last=False)
            self._words -= self._sizes.values.get(gone, 0)
            self._sizes.set(gone, 0)
        return policy

    def _counted(self, goal: str, policy: Policy) -> None:
        """Count the goal's statistics again, and shed past the cap from the largest."""
        if not isinstance(policy, LearnedPolicy):
            return
        self._words += policy.word_stats - self._sizes.values.get(goal, 0)
        self._sizes.set(goal, policy.word_stats)
        while self._words > self.max_word_stats:
            largest = self._sizes.top(avoid=goal)
            victim = self._goals.get(largest) if largest is not None else None
            if largest is None or not isinstance(victim, LearnedPolicy) or not victim.word_stats:
                break  # cannot happen while the counts are right; never loop on it
            victim.shed()
            self._words -= 1
            self._sizes.set(largest, victim.word_stats)

    def dump(self) -> dict[str, Any]:
        """Each goal's policy (least recently taught first), as plain values."""
        return {
            "goals": [
                [goal, policy.dump()]
                for goal, policy in self._goals.items()
                if isinstance(policy, LearnedPolicy)
            ],
            "voters": [[w, a, list(goals)] for (w, a), goals in self._voters.items()],
            "knowers": [[w, list(goals)] for w, goals in self._knowers.items()],
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace what was learned with a :meth:`dump`, under the same bounds; nothing
        changes if it fails."""
        fresh = GoalPolicies(
            self.template,
            max_goals=self.max_goals,
            max_word_stats=self.max_word_stats,
            promote_goals=self.promote_goals,
        )
        for goal, learned in data["goals"]:
            policy = fresh._new(str(goal))
            if not isinstance(policy, LearnedPolicy):
                continue
            policy.restore(learned)
            fresh._counted(str(goal), fresh._keep(str(goal), policy))
        for word, arm, goals in data.get("voters", []) if self.promote_goals else []:
            fresh._voters[(str(word), str(arm))] = [str(g) for g in goals][:_MAX_VOTERS]
        while len(fresh._voters) > fresh.max_word_stats:
            fresh._voters.popitem(last=False)
        knowers = data.get("knowers") if self.promote_goals else []
        if knowers is None:  # a snapshot from before they were kept: the voters of each word
            union: OrderedDict[str, list[str]] = OrderedDict()
            for (word, _), goals in fresh._voters.items():
                union.setdefault(word, []).extend(g for g in goals if g not in union[word])
            knowers = [[w, goals] for w, goals in union.items()]
        for word, goals in knowers:
            fresh._knowers[str(word)] = [str(g) for g in goals][:_MAX_KNOWERS]
        while len(fresh._knowers) > fresh.max_word_stats:
            fresh._knowers.popitem(last=False)
        # The goals' policies ask this object what others agree on: it keeps them now.
        self._goals, self._sizes, self._words = fresh._goals, fresh._sizes, fresh._words
        self._voters, self._knowers = fresh._voters, fresh._knowers
        for goal, policy in self._goals.items():
            if isinstance(policy, LearnedPolicy) and self.promote_goals:
                policy.commons = functools.partial(self.agreed, goal)


def make_policy(
    name: str | None = None, seed: int | None = None, settings: RouterSettings | None = None
) -> Policy:
    """``name``, else ``ORCH_ROUTER_POLICY``: ``learned`` (default) or ``static``."""
    if name is None:
        settings = settings or RouterSettings.from_env()
    chosen = (name or (settings.policy if settings else "")).strip().lower()
    if chosen == "static":
        return StaticPolicy()
    if chosen == "learned":
        settings = settings or RouterSettings.from_env()
        rng = random.Random(seed if seed is not None else settings.seed)
        return LearnedPolicy(
            rng=rng,
            epsilon0=settings.epsilon,
            half_life=settings.half_life,
            change_threshold=settings.change_threshold,
            form_weight=settings.form_weight,
            max_word_stats=settings.max_word_stats,
        )
    raise ValueError(f"ORCH_ROUTER_POLICY must be learned or static, got {chosen!r}")
