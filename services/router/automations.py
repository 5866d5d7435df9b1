"""Automations the router serves: cached answers to identical requests, and direct routes.

The improvement service decides what to automate (``automation_created``); the
router keeps what it needs to act on it, folded from the log like the rest of its
knowledge: which run had which request key (``route_decided``) and what the
LLM answered it (``workflow_completed``).

Answers never cross goals: a cached answer is kept under its goal and the request
key, and only a request of that same goal is served it. Automations are per goal
too: each is kept under its goal, and serves only the goal it was earned by
(``goal_id``), so one goal's runs never turn on an automation for another. A
response cache without a goal (one written before automations were per goal)
serves no goal. A direct route pins an agent, and an agent belongs to one goal, so
it serves only that goal (a route without a goal: only the goal the registry says
its agent belongs to).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from streams.events import (
    AutomationCreated,
    Event,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
)
from streams.registry import RegistryView
from streams.signatures import exact_key, signature_of

__all__ = ["AutomationHit", "Automations", "CachedAnswer"]


class CachedAnswer(NamedTuple):
    """What the router keeps of an LLM answer to serve it again (not the whole event)."""

    run_id: str
    goal_id: str | None
    agent_id: str | None
    text: str
    meta: dict[str, str]

    @classmethod
    def of(cls, e: WorkflowCompleted) -> CachedAnswer:
        return cls(e.run_id, e.goal_id, e.agent_id, e.text, dict(e.meta))


@dataclass(frozen=True)
class AutomationHit:
    automation: AutomationCreated
    specialty: str
    cached: CachedAnswer | None = None  # set for a response-cache hit


@dataclass
class _Run:
    key: str | None = None
    goal_id: str | None = None  # the goal the request was routed for
    answer: CachedAnswer | None = None
    quality: float | None = None


# (goal_id, request key): one goal's answer is never another's.
_AnswerKey = tuple[str, str]
# (kind, goal_id, signature): one goal's automation is never another's.
_AutomationKey = tuple[str, str | None, str]


class Automations:
    def __init__(self, max_answers: int = 20_000, min_quality: float = 0.6) -> None:
        self._automations: dict[_AutomationKey, AutomationCreated] = {}
        self._expires: dict[_AutomationKey, datetime] = {}
        self._specialties: set[str] = set()
        self._answers: OrderedDict[_AnswerKey, CachedAnswer] = OrderedDict()
        self._quality: dict[_AnswerKey, float] = {}
        # run_id -> what is known of the run so far (its request key, its LLM answer, the
        # answer's quality), until all three are: the topics are read side by side, so
        # after a restart they arrive in any order.
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._max = max_answers
        self.min_quality = min_quality

    def __len__(self) -> int:
        return len(self._automations)

    def learn(self, event: Event) -> None:
        if isinstance(event, AutomationCreated):
            if event.kind == "response_cache" and event.goal_id is None:
                return  # an older one, earned on every goal's runs: it serves no goal
            key = (event.kind, event.goal_id, event.signature)
            self._automations[key] = event
            self._expires[key] = event.occurred_at + timedelta(seconds=event.ttl_seconds)
            self._specialties.add(event.specialty)
        elif isinstance(event, RouteDecided) and event.request_key:
            run = self._run(event.run_id)
            run.key, run.goal_id = event.request_key, event.goal_id
            self._complete(event.run_id)
        elif isinstance(event, WorkflowCompleted):
            if event.degradation_tier != "llm":
                self._runs.pop(event.run_id, None)  # never cached: not an LLM answer
                return
            self._run(event.run_id).answer = CachedAnswer.of(event)
            self._complete(event.run_id)
        elif isinstance(event, WorkflowAssessed):
            # An unjudged answer's quality is a guess: it is never served again as good.
            unjudged = event.method == "unjudged"
            self._run(event.run_id).quality = -1.0 if unjudged else event.quality
            self._complete(event.run_id)

    def dump(self) -> dict[str, Any]:
        """What was learned, as plain values (for a snapshot; answers are immutable but for
        their meta, which nothing changes once kept)."""
        return {
            "automations": [e.model_dump(mode="json") for e in self._automations.values()],
            "answers": [
                (key, tuple(a), self._quality.get(key)) for key, a in self._answers.items()
            ],
            "runs": [
                (run_id, r.key, r.goal_id, tuple(r.answer) if r.answer else None, r.quality)
                for run_id, r in self._runs.items()
            ],
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace what was learned with a :meth:`dump`."""
        fresh = Automations(self._max, self.min_quality)
        for raw in data["automations"]:
            fresh.learn(AutomationCreated.model_validate(raw))
        for key, answer, quality in data["answers"]:
            fresh._answers[key] = CachedAnswer._make(answer)
            if quality is not None:
                fresh._quality[key] = float(quality)
        for run_id, request_key, goal, answer, quality in data["runs"]:
            cached = CachedAnswer._make(answer) if answer is not None else None
            fresh._runs[run_id] = _Run(request_key, goal, cached, quality)
        self.__dict__.update(fresh.__dict__)

    def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = _Run()
            if len(self._runs) > self._max:
                self._runs.popitem(last=False)
        return run

    def _complete(self, run_id: str) -> None:
        run = self._runs[run_id]
        if run.key is None or run.answer is None or run.quality is None:
            return
        del self._runs[run_id]
        goal_id = run.answer.goal_id
        if goal_id is None or goal_id != run.goal_id:
            return  # whose answer it is is unclear: it serves nobody
        key, quality = (goal_id, run.key), run.quality
        # Keep the best answer seen for an identical request, not merely the latest.
        if quality >= self.min_quality and quality >= self._quality.get(key, -1.0):
            self._answers[key] = run.answer
            self._quality[key] = quality
            self._answers.move_to_end(key)
            if len(self._answers) > self._max:
                old, _ = self._answers.popitem(last=False)
                self._quality.pop(old, None)

    def lookup(
        self,
        message: str,
        specialty: str,
        now: datetime,
        goal_id: str | None,
        registry: RegistryView | None = None,
        *,
        context: Mapping[str, str] | None = None,
    ) -> AutomationHit | None:
        """The automation that serves this request of ``goal_id`` in ``specialty`` now, if any.

        A cache hit first: only an answer computed for ``goal_id`` itself, for the same
        message with the same ``context`` (the caller's system message and earlier turns
        shape the answer, and are that caller's). The routing
        policy picks the specialty before this is asked, so an automation only ever
        saves the cost of the answer the policy chose, never replaces it with another
        specialty's. Only an automation ``goal_id`` itself earned serves it: another
        goal's response cache or direct route for the same signature does not. A direct
        route serves only the goal its agent belongs to: the ``registry`` says whose the
        agent is; without it, the route's own ``goal_id``.
        """
        if goal_id is None or specialty not in self._specialties:
            return None
        sig = signature_of(message, specialty)
        cache_key = ("response_cache", goal_id, sig)
        cache = self._automations.get(cache_key)
        if cache is not None and cache.goal_id == goal_id and now < self._expires[cache_key]:
            answer = self._answers.get((goal_id, exact_key(message, specialty, context)))
            if answer is not None and answer.goal_id == goal_id:
                return AutomationHit(cache, specialty, answer)
        # The goal's own route; else one without a goal, whose agent's goal decides.
        for route_key in (("direct_route", goal_id, sig), ("direct_route", None, sig)):
            route = self._automations.get(route_key)
            if (
                route is not None
                and route.agent_id
                and route.goal_id in (None, goal_id)
                and _owner(route, registry) == goal_id
                and now < self._expires[route_key]
            ):
                return AutomationHit(route, specialty)
        return None


def _owner(route: AutomationCreated, registry: RegistryView | None) -> str | None:
    """The goal of the route's agent: the registry's word, else what the route says."""
    agent = registry.get(route.agent_id) if registry is not None and route.agent_id else None
    return agent.goal_id if agent is not None else route.goal_id
