"""Agent selection: the six criteria, their weights, and the outcome statistics behind them.

Criteria (each in 0..1): specialty match, context relevance, past performance,
resource availability, cost efficiency and user preference. The weights come
from configuration; the statistics are folded in from outcome events, so a
learned policy can replace or extend them without changing the router.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from streams.registry import AgentRecord
from streams.specialties import profile_for, tokens

__all__ = ["CRITERIA", "MAX_PREFERENCES", "AgentStats", "OutcomeStats", "Weights", "score_agent"]

# (user, agent) preferences kept: every user who scores a run makes one per agent, so the
# least recently scored pair leaves past this (a user with none scores 0.5, neutral).
MAX_PREFERENCES = 100_000

CRITERIA = (
    "specialty_match",
    "context_relevance",
    "past_performance",
    "resource_availability",
    "cost_efficiency",
    "user_preference",
)


@dataclass(frozen=True)
class Weights:
    specialty_match: float = 0.35
    context_relevance: float = 0.15
    past_performance: float = 0.2
    resource_availability: float = 0.1
    cost_efficiency: float = 0.1
    user_preference: float = 0.1

    def as_dict(self) -> dict[str, float]:
        return {c: getattr(self, c) for c in CRITERIA}


@dataclass
class AgentStats:
    runs: int = 0
    successes: int = 0
    quality_sum: float = 0.0
    quality_n: int = 0
    cost_sum: float = 0.0
    in_flight: int = 0

    def performance(self) -> float:
        # Beta(1,1) prior on success, blended with mean quality once there is some.
        success = (self.successes + 1) / (self.runs + 2)
        if self.quality_n:
            return 0.5 * success + 0.5 * (self.quality_sum / self.quality_n)
        return success

    def mean_cost(self) -> float:
        return self.cost_sum / self.runs if self.runs else 0.0


@dataclass
class OutcomeStats:
    """What the router has seen of each agent and each user's experience with it."""

    agents: dict[str, AgentStats] = field(default_factory=lambda: defaultdict(AgentStats))
    # (user_id, agent_id) -> [score sum, count], least recently scored first
    preference: OrderedDict[tuple[str, str], list[float]] = field(default_factory=OrderedDict)
    # run_id -> (agent_id, user_id), the newest 100,000. An OrderedDict: dropping a plain
    # dict's oldest key scans the slots its earlier deletions left, and a long fold slowed down.
    run_agent: OrderedDict[str, tuple[str, str]] = field(default_factory=OrderedDict)

    def completed(
        self, run_id: str, agent_id: str | None, user_id: str | None, cost: float, ok: bool
    ) -> None:
        if not agent_id:
            return
        st = self.agents[agent_id]
        st.runs += 1
        st.successes += int(ok)
        st.cost_sum += cost
        self.run_agent[run_id] = (agent_id, user_id or "")
        if len(self.run_agent) > 100_000:
            self.run_agent.popitem(last=False)

    def assessed(self, agent_id: str | None, quality: float) -> None:
        if agent_id:
            st = self.agents[agent_id]
            st.quality_sum += quality
            st.quality_n += 1

    def feedback(self, run_id: str, user_id: str, score: int | None) -> None:
        known = self.run_agent.get(run_id)
        if known is None or score is None or known[1] != user_id:
            return
        key = (user_id, known[0])
        entry = self.preference.setdefault(key, [0.0, 0.0])
        entry[0] += (score - 1) / 4
        entry[1] += 1
        self.preference.move_to_end(key)
        while len(self.preference) > MAX_PREFERENCES:
            self.preference.popitem(last=False)

    def dump(self) -> dict[str, Any]:
        """The statistics as plain values (for a snapshot); in-flight counts are this
        instance's own dispatches, so they are not kept."""
        return {
            "agents": [
                [a, s.runs, s.successes, s.quality_sum, s.quality_n, s.cost_sum]
                for a, s in self.agents.items()
            ],
            "preference": [[u, a, v[0], v[1]] for (u, a), v in self.preference.items()],
            "run_agent": list(self.run_agent.items()),
        }

    @classmethod
    def from_dump(cls, data: dict[str, Any]) -> OutcomeStats:
        stats = cls()
        for agent_id, runs, successes, quality_sum, quality_n, cost_sum in data["agents"]:
            stats.agents[agent_id] = AgentStats(runs, successes, quality_sum, quality_n, cost_sum)
        kept = data["preference"][-MAX_PREFERENCES:]  # a dump lists them oldest first
        stats.preference = OrderedDict(((u, a), [float(t), float(n)]) for u, a, t, n in kept)
        stats.run_agent = OrderedDict(data["run_agent"])
        return stats

    def user_preference(self, user_id: str, agent_id: str) -> float:
        entry = self.preference.get((user_id, agent_id))
        return entry[0] / entry[1] if entry and entry[1] else 0.5


def score_agent(
    agent: AgentRecord,
    specialty: str,
    message: str,
    user_id: str,
    stats: OutcomeStats,
    weights: Weights,
    max_in_flight: int = 10,
    *,
    peers: Iterable[AgentRecord] | None = None,
) -> tuple[float, dict[str, float]]:
    """Total weighted score of one candidate and its per-criterion values.

    ``peers``: the agents it is ranked against (its goal's candidates). Cost efficiency is
    its mean cost against the dearest of them, so another goal's agents, however dear
    their answers, never move how this goal's agents rank. None: against every agent the
    statistics know, of every goal (what callers did before; another goal's traffic then
    changes this goal's choice).
    """
    st = stats.agents.get(agent.agent_id) or AgentStats()
    words = tokens(message)
    profile_words = profile_for(agent.specialty).keywords | tokens(agent.system_prompt)
    relevance = len(words & profile_words) / len(words) if words else 0.0
    if peers is None:
        known: Iterable[AgentStats] = stats.agents.values()
    else:
        known = [p for a in (agent, *peers) if (p := stats.agents.get(a.agent_id)) is not None]
    top_cost = max((s.mean_cost() for s in known if s.runs), default=0.0)
    criteria = {
        "specialty_match": 1.0 if agent.specialty == specialty else 0.0,
        "context_relevance": min(1.0, relevance),
        "past_performance": st.performance(),
        "resource_availability": max(0.0, 1.0 - st.in_flight / max_in_flight),
        "cost_efficiency": 1.0 - (st.mean_cost() / top_cost) if top_cost > 0 else 1.0,
        "user_preference": stats.user_preference(user_id, agent.agent_id),
    }
    w = weights.as_dict()
    total = sum(w[c] * criteria[c] for c in CRITERIA)
    return total, criteria
