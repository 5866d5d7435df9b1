"""Which answers the platform's judge grades: a share of them, aimed where it teaches most.

The judge costs money, so it grades only a share of the answers (``ORCH_JUDGE_SAMPLE``);
the rest teach the router only through their users' feedback. ``uniform`` draws every
answer at the share. ``uncertain`` spends the same share where the policy knows least:
an answer's weight is ``(1 + n) ** -power``, ``n`` the outcomes the policy learned with
the chosen arm on the request's words, times ``explore_weight`` when the pick was an
exploration (an exploration nobody grades is paid for and teaches nothing). Measured
offline in ``bench.priced`` (docs/performance.md, "Judging where the policy is unsure").

The router decides the probability with its decision and logs it on ``route_decided``;
the improvement service judges the run when the run id's own draw (:func:`judge_draw`)
falls under it, so a redelivery, a restart or another instance decides the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["DEFAULT_JUDGE_RULE", "JUDGE_RULES", "JudgeRule", "judge_draw", "judged"]

JUDGE_RULES = ("uncertain", "uniform")
DEFAULT_JUDGE_RULE = JUDGE_RULES[0]


def judge_draw(run_id: str) -> float:
    """A number in [0, 1) drawn from the run id alone: a redelivered answer, or another or
    a restarted instance, draws the same one, so a run is in the judge's sample or not for
    good."""
    digest = hashlib.sha256(f"judge-sample:{run_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def judged(run_id: str, share: float) -> bool:
    """Whether the run is in a judge's sample of ``share`` (0: none, 1: every run)."""
    if share >= 1.0:
        return True
    return share > 0.0 and judge_draw(run_id) < share


@dataclass
class JudgeRule:
    """The chance of judging each answer, about ``share`` of them over a run.

    ``uncertain``: ``share`` times the answer's weight over the running mean weight (the
    last ``horizon`` answers; plus what the share has not spent beyond ``reserve`` calls,
    over ``catch_up`` answers), at least ``floor x share`` (no arm goes ungraded for good:
    the world may drift) and at most 1; and an answer is judged only while the judged
    count stays within ``share`` of the answers so far (:meth:`decide`), so the realised
    share never passes ``share``.
    """

    share: float
    rule: str = DEFAULT_JUDGE_RULE
    floor: float = 0.25
    explore_weight: float = 3.0
    horizon: float = 200.0
    catch_up: float = 100.0
    reserve: float = 2.0
    power: float = 0.5
    seen: int = 0
    judged: int = 0
    _mean: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in JUDGE_RULES:
            raise ValueError(f"judge rule must be one of {', '.join(JUDGE_RULES)}: {self.rule!r}")
        if not 0.0 <= self.share <= 1.0:  # NaN fails this too
            raise ValueError(f"judge share must be between 0 and 1: {self.share!r}")

    @property
    def realised(self) -> float:
        return self.judged / self.seen if self.seen else 0.0

    def weight(self, n: float, explored: bool = False) -> float:
        """An answer's weight: ``n`` outcomes known of its arm on its words."""
        value = float((1.0 + max(0.0, n)) ** -self.power)
        return value * (self.explore_weight if explored else 1.0)

    def probability(self, n: float, explored: bool = False) -> float:
        """The chance of judging this answer, before the share's cap (moves the mean)."""
        if self.rule == "uniform" or self.share >= 1.0 or self.share <= 0.0:
            return self.share
        weight = self.weight(n, explored)
        self._mean += (weight - self._mean) / min(self.seen + 1.0, self.horizon)
        spare = (self.share * self.seen - self.judged - self.reserve) / self.catch_up
        scale = max(0.0, self.share + spare) / self._mean
        return min(1.0, max(self.floor * self.share, scale * weight))

    def decide(self, n: float, draw: float, explored: bool = False) -> tuple[bool, float]:
        """Whether the judge grades this answer (``draw`` uniform in [0, 1)) and the
        probability it was drawn at: 0 when the share is spent, so the probability alone
        says the decision for any draw at or above it."""
        p = self.probability(n, explored)
        self.seen += 1
        if self.rule == "uncertain" and self.judged + 1 > self.share * self.seen + 1e-9:
            p = 0.0
        judge = draw < p
        self.judged += judge
        return judge, p
