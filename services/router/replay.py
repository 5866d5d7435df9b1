"""Offline replay: score a candidate routing policy on the recorded log, without any LLM call.

Each logged decision carries the features the live policy saw, the specialty it chose
and the probability it had of choosing it; the run's assessed quality is the reward.
Inverse propensity scoring weighs the rewards of the decisions the candidate would
also have made by 1/probability, which gives an unbiased estimate of the candidate's
mean reward; the self-normalised variant (SNIPS) trades a little bias for much less
variance. A candidate that learns is trained on the log in time order, and scored on
each decision before it sees that decision's reward.

``python -m services.router.replay [--policy NAME]... [--arms A,B] [--since ISO]`` scores
policies on the log of ``KAFKA_BOOTSTRAP_SERVERS`` and prints the results as JSON: the
router's own command, which ``orchestrator replay`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
from dataclasses import dataclass
from datetime import datetime

from aiokafka.errors import KafkaError

from services.router.policy import (
    Features,
    GoalPolicies,
    LearnedPolicy,
    Policy,
    StaticPolicy,
    arm_name,
)
from services.router.settings import RouterSettings
from streams.events import Event, RouteDecided, WorkflowAssessed
from streams.kafka import KafkaSettings
from streams.registry import read_topics_to_end

__all__ = ["Logged", "ReplayResult", "evaluate", "join_log", "replay_from_log"]


@dataclass(frozen=True)
class Logged:
    features: Features
    specialty: str
    probability: float
    reward: float
    policy: str
    at: datetime
    goal: str = ""


@dataclass(frozen=True)
class ReplayResult:
    candidate: str
    decisions: int
    matched: int
    ips: float
    snips: float
    stderr: float
    live_mean: float
    live_policy: str

    @property
    def beats_live(self) -> bool:
        """Better than the live policy by more than two standard errors."""
        return self.snips - 2 * self.stderr > self.live_mean

    def as_dict(self) -> dict[str, object]:
        return {
            "candidate": self.candidate,
            "decisions": self.decisions,
            "matched": self.matched,
            "ips": round(self.ips, 4),
            "snips": round(self.snips, 4),
            "stderr": round(self.stderr, 4),
            "live_policy": self.live_policy,
            "live_mean": round(self.live_mean, 4),
            "beats_live": self.beats_live,
        }


def join_log(events: list[Event], since: datetime | None = None) -> list[Logged]:
    """Decisions the policy made (not forced) joined to their quality.

    Older routers logged automation-served runs as policy ``automation`` with no
    real propensity; those are left out. Now an automation only serves the
    specialty the policy chose, and the decision carries the policy's probability.
    Runs outside the judge's sample (method ``unjudged``) have no quality to join: the
    sample is drawn from the run id, so the judged ones are an unbiased share.
    """
    quality = {
        e.run_id: e.quality
        for e in events
        if isinstance(e, WorkflowAssessed) and e.method != "unjudged"
    }
    out = []
    for e in events:
        if not isinstance(e, RouteDecided) or e.policy in ("forced", "automation"):
            continue
        if not e.features or e.run_id not in quality or e.probability <= 0:
            continue
        if since is not None and e.occurred_at < since:
            continue
        out.append(
            Logged(
                Features.from_list(e.features),
                arm_name(e.specialty, e.model),
                e.probability,
                quality[e.run_id],
                e.policy,
                e.occurred_at,
                e.goal_id or "",
            )
        )
    out.sort(key=lambda r: r.at)
    return out


def _candidate(name: str, seed: int) -> Policy:
    if name == "static":
        return StaticPolicy()
    if name == "learned":
        # Scored greedily: exploration is the live policy's business, not the estimate's.
        return LearnedPolicy(rng=random.Random(seed), epsilon0=0.0, epsilon_min=0.0)
    raise ValueError(f"unknown policy {name!r}; replay knows static and learned")


def evaluate(log: list[Logged], candidate: str, arms: list[str], seed: int = 0) -> ReplayResult:
    # Each goal learns on its own, as the live router's do (one policy per goal).
    policy = GoalPolicies(
        _candidate(candidate, seed),
        max_goals=1 << 30,
        max_word_stats=1 << 30,
        promote_goals=RouterSettings.from_env().promote_goals,  # as the live router does
    )
    arms = arms or sorted({r.specialty for r in log})
    weighted: list[float] = []
    weights: list[float] = []
    matched = 0
    for rec in log:
        choice = policy.choose(rec.goal, rec.features, arms)
        hit = choice.specialty == rec.specialty
        w = (1.0 / rec.probability) if hit else 0.0
        matched += int(hit)
        weighted.append(w * rec.reward)
        weights.append(w)
        policy.update(rec.goal, rec.features, rec.specialty, rec.reward)
    n = len(log)
    ips = sum(weighted) / n if n else 0.0
    total_w = sum(weights)
    snips = sum(weighted) / total_w if total_w else 0.0
    var = sum((x - ips) ** 2 for x in weighted) / (n - 1) if n > 1 else 0.0
    live = sum(r.reward for r in log) / n if n else 0.0
    policies = sorted({r.policy for r in log})
    return ReplayResult(
        candidate=candidate,
        decisions=n,
        matched=matched,
        ips=ips,
        snips=snips,
        stderr=math.sqrt(var / n) if n else 0.0,
        live_mean=live,
        live_policy="+".join(policies) or "none",
    )


async def replay_from_log(
    settings: KafkaSettings,
    candidates: list[str],
    arms: list[str],
    since: datetime | None = None,
) -> list[ReplayResult]:
    """Each candidate scored on the log now on the broker (read once)."""
    events = await read_topics_to_end(settings, [RouteDecided.topic, WorkflowAssessed.topic])
    log = join_log(events, since)
    return [evaluate(log, candidate, arms) for candidate in candidates]


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.router.replay")
    parser.add_argument("--policy", action="append", choices=("static", "learned"))
    parser.add_argument("--arms", default="", help="comma-separated specialties")
    parser.add_argument("--since", type=datetime.fromisoformat, default=None)
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    settings = KafkaSettings.from_env()
    try:
        results = asyncio.run(
            replay_from_log(settings, args.policy or ["static", "learned"], arms, args.since)
        )
    except (KafkaError, OSError) as exc:
        print(f"cannot reach Kafka at {settings.bootstrap} ({exc})", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
