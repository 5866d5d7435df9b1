"""Agent selection: the six criteria, their weights, and the outcome statistics behind them.

Criteria (each in 0..1): specialty match, context relevance, past performance,
resource availability, cost efficiency and user preference. The weights come
from configuration; the statistics are folded in from outcome events, so a
learned policy can replace or extend them without changing the router.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from streams.quotas import PerGoal
from streams.registry import AgentRecord
from streams.specialties import profile_for, tokens

__all__ = [
    "CRITERIA",
    "MAX_PREFERENCES",
    "MAX_RUN_AGENTS",
    "AgentStats",
    "OutcomeStats",
    "Weights",
    "score_agent",
]

# (user, agent) preferences kept: every user who scores a run makes one per agent, so the
# least recently scored pair leaves past this (a user with none scores 0.5, neutral). Kept
# per goal (the scored run's, its agent's): past this the goal holding the most loses its
# least recently scored, so one goal's users never push out another goal's users'
# preferences, and a goal alone keeps them all.
MAX_PREFERENCES = 100_000
# Runs whose agent and user are kept for their feedback, per goal the same way.
MAX_RUN_AGENTS = 100_000

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


def _preferences() -> PerGoal[tuple[str, str], list[float]]:
    return PerGoal(MAX_PREFERENCES, MAX_PREFERENCES)


def _run_agents() -> PerGoal[str, tuple[str, str]]:
    return PerGoal(MAX_RUN_AGENTS, MAX_RUN_AGENTS)


@dataclass
class OutcomeStats:
    """What the router has seen of each agent and each user's experience with it."""

    agents: dict[str, AgentStats] = field(default_factory=lambda: defaultdict(AgentStats))
    # goal -> (user_id, agent_id) -> [score sum, count], least recently scored first
    preference: PerGoal[tuple[str, str], list[float]] = field(default_factory=_preferences)
    # goal -> run_id -> (agent_id, user_id), the newest
    run_agent: PerGoal[str, tuple[str, str]] = field(default_factory=_run_agents)
    # run_id -> the goal it is kept under in run_agent; (user, agent) -> in preference
    _run_goal: dict[str, str] = field(default_factory=dict)
    _pair_goal: dict[tuple[str, str], str] = field(default_factory=dict)

    def completed(
        self,
        run_id: str,
        agent_id: str | None,
        user_id: str | None,
        cost: float,
        ok: bool,
        goal_id: str | None = None,
    ) -> None:
        if not agent_id:
            return
        st = self.agents[agent_id]
        st.runs += 1
        st.successes += int(ok)
        st.cost_sum += cost
        self._keep_run(run_id, agent_id, user_id or "", goal_id or "")

    def _keep_run(self, run_id: str, agent_id: str, user_id: str, goal: str) -> None:
        old = self._run_goal.pop(run_id, None)
        if old is not None:
            self.run_agent.pop(old, run_id)
        self._run_goal[run_id] = goal
        for _, gone, _ in self.run_agent.put(goal, run_id, (agent_id, user_id)):
            del self._run_goal[gone]

    def _keep_preference(self, goal: str, key: tuple[str, str], entry: list[float]) -> None:
        old = self._pair_goal.pop(key, None)
        if old is not None:
            self.preference.pop(old, key)
        self._pair_goal[key] = goal
        for _, gone, _ in self.preference.put(goal, key, entry):
            del self._pair_goal[gone]

    def preferences(self) -> list[tuple[str, str]]:
        """The (user, agent) pairs kept, goal by goal, least recently scored first."""
        return [key for _, key, _ in self.preference.items()]

    def assessed(self, agent_id: str | None, quality: float) -> None:
        if agent_id:
            st = self.agents[agent_id]
            st.quality_sum += quality
            st.quality_n += 1

    def feedback(self, run_id: str, user_id: str, score: int | None) -> None:
        goal = self._run_goal.get(run_id)
        known = self.run_agent.get(goal, run_id) if goal is not None else None
        if goal is None or known is None or score is None or known[1] != user_id:
            return
        key = (user_id, known[0])
        owner = self._pair_goal.get(key)
        found = self.preference.get(owner, key) if owner is not None else None
        entry = found if found is not None else [0.0, 0.0]
        entry[0] += (score - 1) / 4
        entry[1] += 1
        self._keep_preference(goal, key, entry)  # the goal's most recently scored

    def dump(self) -> dict[str, Any]:
        """The statistics as plain values (for a snapshot); in-flight counts are this
        instance's own dispatches, so they are not kept."""
        return {
            "agents": [
                [a, s.runs, s.successes, s.quality_sum, s.quality_n, s.cost_sum]
                for a, s in self.agents.items()
            ],
            "preference": [[u, a, v[0], v[1], g] for g, (u, a), v in self.preference.items()],
            "run_agent": [[r, [a, u], g] for g, r, (a, u) in self.run_agent.items()],
        }

    @classmethod
    def from_dump(
        cls, data: dict[str, Any], goal_of: Callable[[str], str | None] | None = None
    ) -> OutcomeStats:
        """The statistics of a :meth:`dump`; ``goal_of`` (agent -> its goal) files the
        rows of an older dump, which name no goal (kept under "" when it does not know)."""
        stats = cls()

        def goal(agent: str, named: list[Any]) -> str:
            if named:
                return str(named[0])
            return (goal_of(agent) if goal_of is not None else None) or ""

        for agent_id, runs, successes, quality_sum, quality_n, cost_sum in data["agents"]:
            stats.agents[agent_id] = AgentStats(runs, successes, quality_sum, quality_n, cost_sum)
        # Oldest first within each goal; an older dump's rows name no goal (kept under "").
        for u, a, t, n, *named in data["preference"]:
            key = (str(u), str(a))
            stats._keep_preference(goal(key[1], named), key, [float(t), float(n)])
        for run, (agent, user), *named in data["run_agent"]:
            stats._keep_run(str(run), str(agent), str(user), goal(str(agent), named))
        return stats

    def user_preference(self, user_id: str, agent_id: str) -> float:
        key = (user_id, agent_id)
        goal = self._pair_goal.get(key)
        entry = self.preference.get(goal, key) if goal is not None else None
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
