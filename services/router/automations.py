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

Nothing here grows with history or with one goal's traffic. Cached answers are kept per
goal (``per_goal``, of ``max_answers`` for all goals, and at most ``max_bytes`` of text;
an answer over ``answer_bytes`` is never cached): a goal's answers push out only its own,
and past a total cap the goal holding the most loses its oldest (``streams.quotas``), so
one goal's distinct requests never make another goal's earned cache miss. An answer is
kept where it can be served: under a (goal, signature) with a response cache in force.
One without (yet) waits among a few candidates per goal (a tenth of each cap): the
improvement service earns a response cache from runs the router has already answered, so
the answer that taught it is served at once instead of after one more LLM call; a
candidate moves into the cache when its automation comes, and back when it expires.
Expired automations are dropped (at most ``MAX_AUTOMATIONS`` are kept, the soonest to
expire leaving first). A TTL runs from the automation's stamp, or from the router's clock
plus a minute's skew when it is stamped further ahead.

A run waits here until its decision, its answer and its assessment are all known (the
three topics are read side by side), per goal too: at most a quarter of ``max_answers``
runs of one goal, ``max_answers`` in all, and their answers at most a quarter of
``max_bytes`` (a goal at most a quarter of that); past a cap the goal holding the most
loses the run it heard of longest ago, so one goal's burst of runs never pushes out the
run whose assessment would have cached another goal's answer. A run that can no longer
be cached (it failed, or its answer is degraded or too large) holds no answer while it
waits, and leaves once its decision and assessment are known too (what is kept does not
depend on the order the topics are read in); a failed run, which nobody assesses, waits
untouched, so it is among the first of its goal's to go.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from services.router.settings import not_ahead
from streams.clock import Clock
from streams.events import (
    AutomationCreated,
    Event,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
)
from streams.quotas import PerGoal
from streams.registry import RegistryView
from streams.signatures import exact_key, signature_of

__all__ = ["MAX_AUTOMATIONS", "AutomationHit", "Automations", "CachedAnswer"]

# Automations in force kept at most (the improvement service earns one per goal, signature
# and kind, for a TTL): past it the one that expires soonest is dropped.
MAX_AUTOMATIONS = 100_000


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

    def size(self) -> int:
        """Bytes it holds (its text and meta), what the cache's byte caps count."""
        meta = sum(len(k) + len(v) for k, v in self.meta.items())
        return len(self.text.encode("utf-8", "replace")) + meta + len(self.run_id)


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
    signature: str = ""  # the request's signature ("" unknown: a decision that had none)
    # The goal it waits under: the first one an event of the run named ("" none yet).
    owner: str = ""
    # It will never be cached (it failed, or its answer is degraded or too large): it
    # holds no answer, and only waits for the rest of the run.
    uncacheable: bool = False

    def size(self) -> int:
        """Bytes it holds, what the byte caps on waiting runs count."""
        held = len(self.key or "") + len(self.signature)
        return held + (self.answer.size() if self.answer is not None else 0)


class _Waiting:
    """run_id -> what is known of the run so far, filed under its goal (a
    :class:`PerGoal`), with run ids to find it by."""

    def __init__(self, per_goal: int, total: int, per_goal_bytes: int, total_bytes: int) -> None:
        self._runs: PerGoal[str, _Run] = PerGoal(
            per_goal, total, per_goal_weight=per_goal_bytes, total_weight=total_bytes
        )
        self._owner: dict[str, str] = {}  # run_id -> the goal it is filed under

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[str]:
        return (run_id for _, run_id, _ in self._runs.items())

    def values(self) -> Iterator[_Run]:
        return (run for _, _, run in self._runs.items())

    def items(self) -> Iterator[tuple[str, _Run]]:
        """Every run waiting, goal by goal, the least recently heard of first."""
        return ((run_id, run) for _, run_id, run in self._runs.items())

    @property
    def weight(self) -> int:
        return self._runs.weight

    def take(self, run_id: str, goal_id: str | None) -> _Run:
        """The run (new if unknown), out of the table until :meth:`put` back; filed
        under ``goal_id`` from now on if it waited under no goal."""
        owner = self._owner.pop(run_id, None)
        run = self._runs.pop(owner, run_id) if owner is not None else None
        if run is None:
            run = _Run()
        if not run.owner and goal_id:
            run.owner = goal_id
        return run

    def put(self, run_id: str, run: _Run) -> None:
        """Keep the run as its goal's newest; past a cap the run heard of longest ago of
        the goal over its share, or of the goal holding the most, goes."""
        self._owner[run_id] = run.owner
        for _, gone, _ in self._runs.put(run.owner, run_id, run, run.size()):
            del self._owner[gone]


class _Kept(NamedTuple):
    """A cached answer, its quality and the signature whose response cache serves it."""

    answer: CachedAnswer
    quality: float
    signature: str
    size: int


# (goal_id, request key): one goal's answer is never another's.
_AnswerKey = tuple[str, str]
# (kind, goal_id, signature): one goal's automation is never another's.
_AutomationKey = tuple[str, str | None, str]


class Automations:
    def __init__(
        self,
        max_answers: int = 20_000,
        min_quality: float = 0.6,
        *,
        per_goal: int = 1_000,
        max_bytes: int = 64 * 1024 * 1024,
        answer_bytes: int = 16 * 1024,
        clock: Clock | None = None,
    ) -> None:
        self._automations: dict[_AutomationKey, AutomationCreated] = {}
        self._expires: dict[_AutomationKey, datetime] = {}
        # (expiry, order, key) of every automation kept, soonest first (stale ones skipped)
        self._expiry: list[tuple[datetime, int, _AutomationKey]] = []
        self._order = 0
        self._specialties: dict[str, int] = {}  # specialty -> automations kept for it
        self._cache_goals: dict[str, int] = {}  # goal -> its response caches kept
        # Answers a response cache in force serves, per goal; and candidates: answers of a
        # (goal, signature) without one (yet). A request key is in one of them at most.
        self._answers: PerGoal[str, _Kept] = PerGoal(per_goal, max_answers, total_weight=max_bytes)
        self._candidates: PerGoal[str, _Kept] = PerGoal(
            max(1, per_goal // 10), max(1, max_answers // 10), total_weight=max(1, max_bytes // 10)
        )
        # (goal, signature) -> request keys of its answers in either table
        self._keys: dict[tuple[str, str], set[str]] = {}
        # run_id -> what is known of the run so far (its request key, its LLM answer, the
        # answer's quality), until all three are: the topics are read side by side, so
        # after a restart they arrive in any order. A quarter of each cap for one goal.
        waiting_bytes = max(max_bytes // 4, 8 * answer_bytes)
        self._runs = _Waiting(
            max(1, max_answers // 4), max_answers, waiting_bytes // 4, waiting_bytes
        )
        self._max = max_answers
        self._per_goal, self._max_bytes, self.answer_bytes = per_goal, max_bytes, answer_bytes
        self.min_quality = min_quality
        self.clock = clock

    def __len__(self) -> int:
        return len(self._automations)

    def learn(self, event: Event) -> None:
        if self.clock is not None:
            self.prune(self.clock.now())
        if isinstance(event, AutomationCreated):
            if event.kind == "response_cache" and event.goal_id is None:
                return  # an older one, earned on every goal's runs: it serves no goal
            self._keep_automation(event)
        elif isinstance(event, RouteDecided) and event.request_key:
            run = self._runs.take(event.run_id, event.goal_id)
            run.key, run.goal_id = event.request_key, event.goal_id
            run.signature = event.signature
            self._complete(event.run_id, run)
        elif isinstance(event, WorkflowCompleted):
            run = self._runs.take(event.run_id, event.goal_id)
            answer = CachedAnswer.of(event)
            # Not an LLM answer, or too large to keep: never cached, and not held while
            # the run's decision or assessment is still to come.
            if event.degradation_tier != "llm" or answer.size() > self.answer_bytes:
                run.answer, run.uncacheable = None, True
            elif not run.uncacheable:
                run.answer = answer
            self._complete(event.run_id, run)
        elif isinstance(event, WorkflowAssessed):
            run = self._runs.take(event.run_id, event.goal_id)
            # An unjudged answer's quality is a guess: it is never served again as good.
            run.quality = -1.0 if event.method == "unjudged" else event.quality
            self._complete(event.run_id, run)
        elif isinstance(event, WorkflowFailed):
            # No answer is coming. Marked, not dropped: a decision or an assessment read
            # after it (the topics are read side by side) would start the wait again, and
            # a fold's result would depend on the order it read them in.
            run = self._runs.take(event.run_id, event.goal_id)
            run.answer, run.uncacheable = None, True
            self._complete(event.run_id, run)

    # -- automations in force --------------------------------------------------------
    def _keep_automation(self, event: AutomationCreated) -> None:
        key = (event.kind, event.goal_id, event.signature)
        now = self.clock.now() if self.clock is not None else None
        if now is not None and event.occurred_at != not_ahead(event.occurred_at, now):
            # Its TTL runs from its stamp, but from no later than the router's clock (and a
            # skew): one stamped in year 8999 never expired. Kept with the stamp it is
            # timed by, so a snapshot's restore does not give it a new life.
            event = event.model_copy(update={"occurred_at": not_ahead(event.occurred_at, now)})
        expires = event.occurred_at + timedelta(seconds=event.ttl_seconds)
        if now is not None and expires <= now:
            return  # expired already: it would serve nothing
        old = self._automations.get(key)
        if old is not None:  # the same (goal, signature): its answers stay where they are
            _count(self._specialties, old.specialty, -1)
        elif event.kind == "response_cache" and event.goal_id is not None:
            _count(self._cache_goals, event.goal_id, 1)
        _count(self._specialties, event.specialty, 1)
        self._automations[key] = event
        self._expires[key] = expires
        self._order += 1
        heapq.heappush(self._expiry, (expires, self._order, key))
        if len(self._expiry) > 2 * len(self._expires) + 64:  # drop what is stale
            self._expiry = [(e, n, k) for e, n, k in self._expiry if self._expires.get(k) == e]
            heapq.heapify(self._expiry)
        if len(self._automations) > MAX_AUTOMATIONS:
            self._drop_soonest()
        if old is None and event.kind == "response_cache" and event.goal_id is not None:
            self._move(event.goal_id, event.signature, self._candidates, self._answers)
            # Answers whose decision carried no signature: any cache of their goal may serve.
            self._move(event.goal_id, "", self._candidates, self._answers)

    def prune(self, now: datetime) -> None:
        """Drop the automations expired at ``now`` (an answer they served becomes a
        candidate again)."""
        while self._expiry and self._expiry[0][0] <= now:
            self._drop_soonest()

    def _drop_soonest(self) -> None:
        while self._expiry:
            expires, _, key = heapq.heappop(self._expiry)
            if self._expires.get(key) == expires:
                self._drop_automation(key)
                return

    def _drop_automation(self, key: _AutomationKey) -> None:
        event = self._automations.pop(key)
        del self._expires[key]
        _count(self._specialties, event.specialty, -1)
        kind, goal_id, signature = key
        if kind == "response_cache" and goal_id is not None:
            _count(self._cache_goals, goal_id, -1)
            self._move(goal_id, signature, self._answers, self._candidates)
            if goal_id not in self._cache_goals:
                self._move(goal_id, "", self._answers, self._candidates)

    def _serves(self, goal_id: str, signature: str) -> bool:
        """Whether a response cache of the goal is in force for answers of ``signature``
        (any of the goal's when the signature is unknown: a decision that carried none)."""
        if signature:
            return ("response_cache", goal_id, signature) in self._automations
        return goal_id in self._cache_goals

    # -- cached answers --------------------------------------------------------------
    def _move(
        self, goal_id: str, signature: str, src: PerGoal[str, _Kept], dst: PerGoal[str, _Kept]
    ) -> None:
        for request_key in list(self._keys.get((goal_id, signature), ())):
            kept = src.pop(goal_id, request_key)
            if kept is not None:
                self._put(dst, goal_id, request_key, kept)

    def _put(self, table: PerGoal[str, _Kept], goal_id: str, request_key: str, kept: _Kept) -> None:
        self._keys.setdefault((goal_id, kept.signature), set()).add(request_key)
        for goal, key, old in table.put(goal_id, request_key, kept, kept.size):
            self._unindex(goal, key, old.signature)

    def _unindex(self, goal_id: str, request_key: str, signature: str) -> None:
        keys = self._keys.get((goal_id, signature))
        if keys is not None:
            keys.discard(request_key)
            if not keys:
                del self._keys[(goal_id, signature)]

    def _kept(self, goal_id: str, request_key: str) -> _Kept | None:
        found = self._answers.get(goal_id, request_key)
        return found if found is not None else self._candidates.get(goal_id, request_key)

    def _cache(self, goal_id: str, request_key: str, kept: _Kept) -> None:
        """Keep an answer: in the cache when a response cache serves it, else a candidate."""
        for table in (self._answers, self._candidates):
            old = table.pop(goal_id, request_key)
            if old is not None:
                self._unindex(goal_id, request_key, old.signature)
        served = self._serves(goal_id, kept.signature)
        self._put(self._answers if served else self._candidates, goal_id, request_key, kept)

    def dump(self) -> dict[str, Any]:
        """What was learned, as plain values (for a snapshot; answers are immutable but for
        their meta, which nothing changes once kept)."""
        if self.clock is not None:
            self.prune(self.clock.now())
        return {
            "automations": [e.model_dump(mode="json") for e in self._automations.values()],
            # ((goal, request key), answer, quality, signature): older dumps hold only the
            # first three
            "answers": [
                ((goal, key), tuple(k.answer), k.quality, k.signature)
                for table in (self._answers, self._candidates)
                for goal, key, k in table.items()
            ],
            # (run, request key, goal, answer, quality, signature, goal it waits under,
            # uncacheable): older dumps hold only the first five or six
            "runs": [
                (
                    run_id,
                    r.key,
                    r.goal_id,
                    tuple(r.answer) if r.answer else None,
                    r.quality,
                    r.signature,
                    r.owner,
                    r.uncacheable,
                )
                for run_id, r in self._runs.items()
            ],
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace what was learned with a :meth:`dump` (or an older one's), under the same
        caps as what is learned."""
        fresh = Automations(
            self._max,
            self.min_quality,
            per_goal=self._per_goal,
            max_bytes=self._max_bytes,
            answer_bytes=self.answer_bytes,
            clock=self.clock,
        )
        for raw in data["automations"]:
            fresh.learn(AutomationCreated.model_validate(raw))
        for row in data["answers"]:
            (goal_id, request_key), answer, quality = row[:3]
            signature = str(row[3]) if len(row) > 3 else ""
            cached = CachedAnswer._make(answer)
            # An older dump kept answers whose goal had no response cache too, and no
            # quality for some: kept as the answers learned now would be.
            if quality is None or cached.size() > fresh.answer_bytes:
                continue
            kept = _Kept(cached, float(quality), signature, cached.size())
            fresh._cache(str(goal_id), str(request_key), kept)
        for row in data["runs"]:
            run_id, request_key, goal, answer, quality = row[:5]
            pending = CachedAnswer._make(answer) if answer is not None else None
            if pending is not None and pending.size() > fresh.answer_bytes:
                continue
            signature = str(row[5]) if len(row) > 5 else ""
            # An older dump kept one list for every goal: a run waits under the goal its
            # decision or its answer names, and the caps of each goal hold as it is read.
            owner = str(row[6]) if len(row) > 6 else goal or (pending.goal_id if pending else "")
            uncacheable = bool(row[7]) if len(row) > 7 else False
            run = _Run(request_key, goal, pending, quality, signature, owner or "", uncacheable)
            fresh._runs.put(str(run_id), run)
        self.__dict__.update(fresh.__dict__)

    def _complete(self, run_id: str, run: _Run) -> None:
        """Cache the run's answer once all of it is known; until then it waits again."""
        answered = run.answer is not None or run.uncacheable
        if run.key is None or not answered or run.quality is None:
            self._runs.put(run_id, run)
            return
        if run.answer is None:
            return  # nothing to cache, and nothing more of the run to wait for
        goal_id = run.answer.goal_id
        if goal_id is None or goal_id != run.goal_id:
            return  # whose answer it is is unclear: it serves nobody
        quality = run.quality
        kept = self._kept(goal_id, run.key)
        # Keep the best answer seen for an identical request, not merely the latest.
        if quality >= self.min_quality and quality >= (kept.quality if kept else -1.0):
            size = run.answer.size()
            self._cache(goal_id, run.key, _Kept(run.answer, quality, run.signature, size))

    def lookup(
        self,
        message: str,
        specialty: str,
        now: datetime,
        goal_id: str | None,
        registry: RegistryView | None = None,
        *,
        context: Mapping[str, str] | None = None,
        at_least: float | None = None,
    ) -> AutomationHit | None:
        """The automation that serves this request of ``goal_id`` in ``specialty`` now, if any.

        ``at_least``: the reward a fresh answer of the chosen arm is expected to give (its
        quality less the goal's price of its cost). A cached answer costs nothing, so its
        reward is its quality; one below ``at_least`` is not served, and the request goes
        to the LLM (or a direct route) instead: the cache saves money only where the goal
        would rather have the old answer than pay for a new one.

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
        self.prune(now)
        if goal_id is None or specialty not in self._specialties:
            return None
        sig = signature_of(message, specialty)
        cache_key = ("response_cache", goal_id, sig)
        cache = self._automations.get(cache_key)
        if cache is not None and cache.goal_id == goal_id and now < self._expires[cache_key]:
            kept = self._answers.get(goal_id, exact_key(message, specialty, context))
            if (
                kept is not None
                and kept.answer.goal_id == goal_id
                and (at_least is None or kept.quality >= at_least)
            ):
                return AutomationHit(cache, specialty, kept.answer)
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


def _count(counts: dict[str, int], key: str, delta: int) -> None:
    left = counts.get(key, 0) + delta
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _owner(route: AutomationCreated, registry: RegistryView | None) -> str | None:
    """The goal of the route's agent: the registry's word, else what the route says."""
    agent = registry.get(route.agent_id) if registry is not None and route.agent_id else None
    return agent.goal_id if agent is not None else route.goal_id
