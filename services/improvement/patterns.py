"""The pattern learner: recurring run signatures in a sliding window, and the automations they earn.

Everything here is per goal: what one goal's runs teach changes only that goal
(docs/architecture.md, "The trust boundary"). A run's signature is
``signature_of(message, specialty)``; a goal's runs of one signature are that
goal's pattern, and another goal's runs of the same signature neither count
towards it, nor weigh on its statistics, nor veto what it earns. A signature seen
``threshold`` times by one goal within ``window_s`` (by the injected clock) is a
pattern of that goal: one ``pattern_discovered`` per (goal, signature), ever. A
goal's pattern whose runs keep succeeding earns one ``automation_created`` per
kind for that goal, ever; its ``goal_id`` is the goal and its ``automation_id``
names the goal too, so each goal earns its own:

- ``response_cache``: the router answers a request of that goal identical to one
  of its earlier runs (same ``exact_key(message, specialty)``) from that goal's last
  good answer, for ``ttl_seconds``, with no LLM call. The event's ``signature`` is
  the pattern's; the router computes ``exact_key`` per request itself.
- ``direct_route``: requests of that goal with this signature go straight to
  ``agent_id``, the agent with the best mean quality on the goal's pattern.

"Keep succeeding" means: at least ``min_successes`` assessed runs of the goal in the
window, their mean quality at least ``min_quality``, and no failure among the goal's
last ``recent`` outcomes. Nothing here does I/O; :meth:`PatternLearner.evaluate`
returns the events to send.

What is kept is bounded (docs/architecture.md, "Restarts start from a snapshot"): a
pattern keeps the first ``EXAMPLE_CHARS`` of its latest message (what
``pattern_discovered`` carries), a goal holds at most ``max_per_goal`` patterns (past it
its least recently seen undecided pattern goes first, then its least recently seen
decided one) and all goals together ``max_patterns`` (past it the goal holding the most
loses one), so one goal's traffic never pushes another goal's patterns out. A pattern no
run of which is left in the window is forgotten by :meth:`PatternLearner.sweep`; one that
was decided (discovered or automated) only once ``ttl_seconds`` have also passed since its
last decision, so its automations have lapsed in the router. Should it come back, it is
decided again under the same event ids (derived from goal, signature and kind): the sink
keeps one row per event id, and the router takes the second ``automation_created`` as the
same automation, renewed.

Decisions read back from the log count only when they are of this kind: a
``pattern_discovered`` without a goal, or an ``automation_created`` without one or
with an id other than :func:`automation_id` of its goal (what the learner wrote
before patterns were per goal, on every goal's runs together), marks nothing, so
each goal earns its own on its own runs.
"""

from __future__ import annotations

import bisect
import hashlib
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, NamedTuple

from services.improvement.stamps import not_ahead
from streams.clock import Clock
from streams.events import (
    MAX_AUTOMATION_TTL_SECONDS,
    AutomationCreated,
    Event,
    PatternDiscovered,
)
from streams.quotas import Tally
from streams.settings import EnvSettings, comma_list, parsed, setting
from streams.signatures import signature_of

__all__ = [
    "AUTOMATION_KINDS",
    "EXAMPLE_CHARS",
    "PatternLearner",
    "PatternSettings",
    "automation_id",
]

SOURCE = "improvement"
AUTOMATION_KINDS = ("response_cache", "direct_route")
_NS = uuid.UUID("5b0c6f0e-8f7a-4b59-9d1e-2c4a7e3b9a01")
EXAMPLE_CHARS = 500  # of a pattern's message: what pattern_discovered carries


def automation_id(signature: str, kind: str, goal_id: str) -> str:
    """The id of the ``kind`` automation a goal earns on a signature: one per goal."""
    return "auto_" + hashlib.sha256(f"{goal_id}|{signature}|{kind}".encode()).hexdigest()[:16]


class PatternSettings(EnvSettings):
    """When runs of one signature make a pattern, and when a pattern earns automations."""

    title: ClassVar[str] = "Patterns and automations"

    window_s: float = setting(
        "ORCH_PATTERN_WINDOW_S",
        24 * 3600.0,
        "Sliding window, in seconds, in which runs of one signature and their outcomes count; "
        ">= 0.",
        read_by="improvement",
        shown="`24 * 3600.0`",
        ge=0,
    )
    threshold: int = setting(
        "ORCH_PATTERN_THRESHOLD",
        3,
        "Runs of one signature within the window that make it a pattern "
        "(`pattern_discovered`, once); >= 0.",
        read_by="improvement",
        ge=0,
    )
    min_successes: int = setting(
        "ORCH_AUTOMATION_MIN_RUNS",
        3,
        "Assessed runs a pattern needs in the window before it earns automations; >= 0.",
        read_by="improvement",
        ge=0,
    )
    min_quality: float = setting(
        "ORCH_AUTOMATION_MIN_QUALITY",
        0.6,
        "Mean assessed quality those runs need, 0-1; the last 5 outcomes must also hold no "
        "failure.",
        read_by="improvement",
        ge=0,
        le=1,
    )
    ttl_seconds: int = setting(
        "ORCH_AUTOMATION_TTL_S",
        3600,
        "Seconds an automation stays in force after it is created; a whole number from 0 "
        "to ten years (315360000).",
        read_by="improvement (the router applies it)",
        ge=0,
        le=MAX_AUTOMATION_TTL_SECONDS,
    )
    kinds: tuple[str, ...] = setting(
        "ORCH_AUTOMATION_KINDS",
        AUTOMATION_KINDS,
        "Comma-separated kinds a pattern may earn: `response_cache`, `direct_route`; other "
        "names are refused. Set but empty means none.",
        read_by="improvement",
        shown="`response_cache,direct_route`",
        blank="keep",
    )
    max_per_goal: int = setting(
        "ORCH_PATTERN_MAX_PER_GOAL",
        10_000,
        "Patterns (signatures with recent runs, or decided) one goal keeps; past it the goal's "
        "least recently seen undiscovered pattern is forgotten first, then its least recently "
        "seen decided one (decided again, under the same event ids, should it come back); >= 1.",
        read_by="improvement",
        ge=1,
    )
    max_patterns: int = setting(
        "ORCH_PATTERN_MAX",
        500_000,
        "Patterns all goals keep together; past it the goal holding the most loses one (as "
        "above), so a goal holding fewer is never pushed out by another's runs; >= 1.",
        read_by="improvement",
        ge=1,
    )
    recent: ClassVar[int] = 5
    """The last outcomes of a pattern that must hold no failure."""

    _kinds = parsed("kinds", lambda text: _kinds(text))


def _kinds(text: str) -> tuple[str, ...]:
    kinds = comma_list(text)
    unknown = sorted(set(kinds) - set(AUTOMATION_KINDS))
    if unknown:
        raise ValueError(
            f"ORCH_AUTOMATION_KINDS: unknown kind(s) {', '.join(unknown)};"
            f" use {', '.join(AUTOMATION_KINDS)}"
        )
    return kinds


class _Outcome(NamedTuple):
    at: datetime
    agent_id: str | None
    goal_id: str | None
    quality: float | None  # None: the run failed


_OUTCOMES = 200  # the last outcomes of a goal's pattern that are weighed (by arrival)
_ROW = 9  # fields of a dumped pattern: see PatternLearner.dump
_UNTIMED_ROW = 8  # ... of one dumped before decisions had a time (snapshot version 2)
_LEGACY_ROW = 7  # ... and of one dumped before patterns were per goal (no goal)


@dataclass
class _Pattern:
    goal_id: str
    signature: str
    specialty: str
    example: str
    # The goal's latest runs' times, oldest first, at most the threshold: enough to tell
    # whether the window holds a pattern's worth of runs (the count in the window, up to it).
    seen: list[datetime] = field(default_factory=list)
    outcomes: deque[_Outcome] = field(default_factory=lambda: deque(maxlen=_OUTCOMES))
    discovered: bool = False
    automated: set[str] = field(default_factory=set)
    decided_at: datetime | None = None  # the latest decision's (discovered, automated)

    @property
    def decided(self) -> bool:
        return self.discovered or bool(self.automated)


@dataclass
class _GoalPatterns:
    """One goal's signatures, least recently seen first: undecided ones, then decided ones."""

    undecided: OrderedDict[str, None] = field(default_factory=OrderedDict)
    decided: OrderedDict[str, None] = field(default_factory=OrderedDict)


class PatternLearner:
    """Counts each goal's signatures and decides on its patterns and automations; state
    folds from events. Iterating gives the signatures (any goal's) it knows."""

    def __init__(self, settings: PatternSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        # signature -> goal -> that goal's pattern of it (never one of several goals)
        self._patterns: dict[str, dict[str, _Pattern]] = {}
        # goal -> its signatures in eviction order, and how many each goal holds
        self._goals: dict[str, _GoalPatterns] = {}
        self._tally: Tally[str] = Tally()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._patterns))

    def __len__(self) -> int:
        """How many patterns (goal, signature) are kept."""
        return self._tally.total

    @property
    def _kept(self) -> int:
        """How many of a pattern's latest run times are kept (see :class:`_Pattern`)."""
        return max(self.settings.threshold, 1)

    def _get(
        self, goal_id: str, signature: str, specialty: str = "", example: str = ""
    ) -> _Pattern:
        found = self._patterns.get(signature, {}).get(goal_id)
        if found is None:
            found = _Pattern(goal_id, signature, specialty, example[:EXAMPLE_CHARS])
            self._add(found)
        return found

    def _add(self, pattern: _Pattern) -> None:
        """Keep a new pattern, within its goal's quota and the overall cap (evicting first)."""
        goal_id = pattern.goal_id
        while self._tally.count(goal_id) >= self.settings.max_per_goal:
            self._evict(goal_id)
        while self._tally.total >= self.settings.max_patterns:
            self._evict(self._tally.largest())
        self._patterns.setdefault(pattern.signature, {})[goal_id] = pattern
        index = self._goals.setdefault(goal_id, _GoalPatterns())
        (index.decided if pattern.decided else index.undecided)[pattern.signature] = None
        self._tally.add(goal_id)

    def _evict(self, goal_id: str) -> None:
        """Forget the goal's least recently seen pattern, an undecided one if it has any."""
        index = self._goals[goal_id]
        tier = index.undecided or index.decided
        signature = next(iter(tier))
        self._forget(self._patterns[signature][goal_id])

    def _forget(self, pattern: _Pattern) -> None:
        signature, goal_id = pattern.signature, pattern.goal_id
        goals = self._patterns[signature]
        del goals[goal_id]
        if not goals:
            del self._patterns[signature]
        index = self._goals[goal_id]
        index.undecided.pop(signature, None)
        index.decided.pop(signature, None)
        self._tally.remove(goal_id)
        if not self._tally.count(goal_id):
            del self._goals[goal_id]

    def _seen(self, pattern: _Pattern) -> None:
        """The pattern had a run: it is its goal's most recently seen."""
        index = self._goals[pattern.goal_id]
        (index.decided if pattern.decided else index.undecided).move_to_end(pattern.signature)

    def _decide(self, pattern: _Pattern, at: datetime) -> None:
        """Mark the pattern decided (after setting ``discovered`` or ``automated``)."""
        if pattern.decided_at is None or at > pattern.decided_at:
            pattern.decided_at = at
        index = self._goals[pattern.goal_id]
        if pattern.signature in index.undecided:
            del index.undecided[pattern.signature]
            index.decided[pattern.signature] = None

    # -- folding ---------------------------------------------------------------
    def observe(self, message: str, specialty: str, at: datetime, *, goal_id: str) -> str:
        """One finished run of ``goal_id`` (completed or failed), once per run (the state's
        join sees to it); returns its signature. It counts towards that goal's pattern only.

        Only the latest ``threshold`` run times are kept, so a pattern's state does not
        grow with its runs: the window holds ``threshold`` runs exactly when it holds the
        latest ``threshold`` (they come in any time order; an older one is not kept).
        """
        signature = signature_of(message, specialty)
        pattern = self._get(goal_id, signature, specialty, message)
        pattern.example = message[:EXAMPLE_CHARS]
        self._seen(pattern)
        seen = pattern.seen  # oldest first
        if len(seen) < self._kept:
            bisect.insort(seen, at)
        elif at > seen[0]:
            del seen[0]
            bisect.insort(seen, at)
        return signature

    def outcome(
        self,
        signature: str,
        *,
        agent_id: str | None,
        goal_id: str | None,
        quality: float | None,
        at: datetime,
    ) -> None:
        """How a run of ``goal_id``'s pattern went: its assessed quality, or None when it
        failed. A run of no goal counts for no pattern, nor one whose pattern was forgotten."""
        pattern = None if goal_id is None else self._patterns.get(signature, {}).get(goal_id)
        if pattern is not None:
            pattern.outcomes.append(_Outcome(at, agent_id, goal_id, quality))

    def learn(self, event: Event) -> None:
        """Our own earlier decisions, read back from the log: never made twice. Only a
        goal's own decisions count (see the module's docstring): an older one, made on
        every goal's runs together, marks nothing and the goal earns its own."""
        goal_id = event.goal_id
        if goal_id is None:
            return
        # A decision stamped far ahead (year 8999) was never lapsed: its pattern was never
        # forgotten. It counts from no later than the clock (and a minute's skew).
        at = not_ahead(event.occurred_at, self.clock.now())
        if isinstance(event, PatternDiscovered):
            pattern = self._get(goal_id, event.signature, event.specialty, event.example_message)
            pattern.discovered = True
            self._decide(pattern, at)
        elif isinstance(event, AutomationCreated):
            if event.automation_id == automation_id(event.signature, event.kind, goal_id):
                pattern = self._get(goal_id, event.signature, event.specialty)
                pattern.automated.add(event.kind)
                self._decide(pattern, at)

    # -- snapshots -------------------------------------------------------------
    def dump(self) -> list[tuple[Any, ...]]:
        """Every goal's patterns, their latest run times, outcomes and decisions, as plain
        values (copied; times and outcomes are immutable, shared), each goal's in eviction
        order, so a restore keeps the same ones. The goal comes last."""
        rows: list[tuple[Any, ...]] = []
        for goal_id, index in self._goals.items():
            for signature in (*index.undecided, *index.decided):
                p = self._patterns[signature][goal_id]
                rows.append(
                    (
                        p.signature,
                        p.specialty,
                        p.example,
                        tuple(p.seen),
                        tuple(tuple(o) for o in p.outcomes),
                        p.discovered,
                        tuple(sorted(p.automated)),
                        p.decided_at,
                        p.goal_id,
                    )
                )
        return rows

    def restore(self, rows: list[tuple[Any, ...]]) -> None:
        """Replace every pattern with those of a :meth:`dump`; raises, changing nothing, on
        a row it cannot read.

        A row of the learner before patterns were per goal (seven fields, no goal: one
        signature's runs of every goal together) is split by the goals its outcomes name:
        each goal gets its own outcomes, and as its run times those outcomes' times (a run
        not yet assessed is not counted; what cannot be told to be a goal's counts for
        none). What that row had decided (discovered, automated) was decided on every
        goal's runs, so it is not carried over: each goal earns its own.

        The caps hold as in :meth:`observe`: rows past them evict as runs would (a goal's
        least recently seen first), whatever the snapshot held. A decision dumped without
        its time (snapshot version 2) counts as made now, so it is kept one automation TTL.
        """
        fresh = PatternLearner(self.settings, self.clock)

        def add(pattern: _Pattern) -> None:
            if pattern.goal_id in fresh._patterns.get(pattern.signature, {}):
                raise ValueError(f"pattern {pattern.signature} of {pattern.goal_id} twice")
            pattern.example = pattern.example[:EXAMPLE_CHARS]
            fresh._add(pattern)

        now = self.clock.now()
        for row in rows:
            if len(row) in (_ROW, _UNTIMED_ROW):
                signature, specialty, example, seen, outcomes, discovered, automated = row[:7]
                goal = row[-1]
                if not isinstance(goal, str):
                    raise ValueError(f"pattern {signature} has no goal")
                pattern = _Pattern(goal, signature, specialty, example)
                pattern.seen = sorted(seen)[-self._kept :]
                pattern.outcomes.extend(map(_Outcome._make, outcomes))
                pattern.discovered, pattern.automated = bool(discovered), set(automated)
                if pattern.decided:
                    decided_at = row[7] if len(row) == _ROW else None
                    if decided_at is not None and not isinstance(decided_at, datetime):
                        raise ValueError(f"pattern {signature}: decided at {decided_at!r}")
                    pattern.decided_at = decided_at or now
                add(pattern)
            elif len(row) == _LEGACY_ROW:
                signature, specialty, example, _seen, outcomes, _discovered, _automated = row
                by_goal: dict[str, list[_Outcome]] = {}
                for o in map(_Outcome._make, outcomes):
                    if o.goal_id is not None:
                        by_goal.setdefault(o.goal_id, []).append(o)
                for goal, own in by_goal.items():
                    pattern = _Pattern(goal, signature, specialty, example)
                    pattern.seen = sorted(o.at for o in own)[-self._kept :]
                    pattern.outcomes.extend(own)
                    add(pattern)
            else:
                raise ValueError(f"a pattern is a row of {_ROW} fields, not {len(row)}")
        self._patterns, self._goals, self._tally = fresh._patterns, fresh._goals, fresh._tally

    # -- deciding --------------------------------------------------------------
    def occurrences(self, signature: str, goal_id: str | None = None) -> int:
        """Runs of ``signature`` by ``goal_id`` in the window, counted up to the threshold;
        without a goal, those of every goal added up (each counted up to the threshold)."""
        goals = self._patterns.get(signature, {})
        patterns = list(goals.values()) if goal_id is None else [goals.get(goal_id)]
        count = 0
        for pattern in patterns:
            if pattern is not None:
                self._prune(pattern)
                count += len(pattern.seen)
        return count

    def _prune(self, pattern: _Pattern) -> None:
        since = self.clock.now() - timedelta(seconds=self.settings.window_s)
        # Runs arrive from many partitions, not in time order: filter, do not pop the left.
        if any(at < since for at in pattern.seen):
            pattern.seen = [at for at in pattern.seen if at >= since]
        if any(o.at < since for o in pattern.outcomes):
            kept_outcomes = [o for o in pattern.outcomes if o.at >= since]
            pattern.outcomes.clear()
            pattern.outcomes.extend(kept_outcomes)

    def sweep(self) -> int:
        """Forget goals' patterns with no run left in the window, once ``ttl_seconds``
        have passed since the last decision of one that was decided (so what it earned has
        lapsed); how many patterns."""
        forgotten = 0
        lapsed = self.clock.now() - timedelta(seconds=self.settings.ttl_seconds)
        for goals in list(self._patterns.values()):
            for pattern in list(goals.values()):
                self._prune(pattern)
                if not pattern.seen and (
                    not pattern.decided
                    or pattern.decided_at is None
                    or pattern.decided_at <= lapsed
                ):
                    self._forget(pattern)
                    forgotten += 1
        return forgotten

    def evaluate(self, signature: str) -> list[Event]:
        """Events each goal's pattern of this signature has earned and not yet had; marks
        them as had. Each goal is judged on its own runs alone."""
        out = self.earned(signature)
        for event in out:
            self.learn(event)
        return out

    def earned(self, signature: str) -> list[Event]:
        """What :meth:`evaluate` returns, marking nothing: a service marks them (``learn``)
        once they are on the log, so no snapshot holds a decision the log never got."""
        goals = self._patterns.get(signature, {})
        out: list[Event] = []
        for goal_id in sorted(goals):
            out += self._evaluate(goals[goal_id])
        return out

    def _evaluate(self, pattern: _Pattern) -> list[Event]:
        wanted = [k for k in self.settings.kinds if k not in pattern.automated]
        if pattern.discovered and not wanted:
            return []  # all this goal's pattern can earn, it has (many goals, one signature)
        self._prune(pattern)
        now = self.clock.now()
        signature, goal_id = pattern.signature, pattern.goal_id
        out: list[Event] = []
        discovered = pattern.discovered
        if not discovered and len(pattern.seen) >= self.settings.threshold:
            discovered = True
            out.append(
                PatternDiscovered(
                    event_id=str(uuid.uuid5(_NS, f"{signature}:discovered:{goal_id}")),
                    source=SOURCE,
                    goal_id=goal_id,
                    signature=signature,
                    specialty=pattern.specialty,
                    occurrences=len(pattern.seen),
                    example_message=pattern.example[:EXAMPLE_CHARS],
                    occurred_at=now,
                )
            )
        if discovered and wanted and self._succeeding(pattern):
            agent_id = self._best_agent(pattern)
            for kind in wanted:
                out.append(
                    AutomationCreated(
                        event_id=str(uuid.uuid5(_NS, f"{signature}:{kind}:{goal_id}")),
                        source=SOURCE,
                        goal_id=goal_id,
                        automation_id=automation_id(signature, kind, goal_id),
                        signature=signature,
                        kind=kind,  # type: ignore[arg-type]
                        specialty=pattern.specialty,
                        agent_id=agent_id,
                        ttl_seconds=self.settings.ttl_seconds,
                        occurred_at=now,
                    )
                )
        return out

    def _succeeding(self, pattern: _Pattern) -> bool:
        ordered = sorted(pattern.outcomes, key=lambda o: o.at)
        recent = ordered[-self.settings.recent :]
        if any(o.quality is None for o in recent):
            return False
        qualities = [o.quality for o in ordered if o.quality is not None]
        if len(qualities) < self.settings.min_successes:
            return False
        return sum(qualities) / len(qualities) >= self.settings.min_quality

    @staticmethod
    def _best_agent(pattern: _Pattern) -> str | None:
        """The agent with the best mean quality on the goal's own runs of the pattern."""
        by_agent: dict[str, list[float]] = {}
        for o in pattern.outcomes:
            if o.agent_id and o.quality is not None:
                by_agent.setdefault(o.agent_id, []).append(o.quality)
        if not by_agent:
            return None
        # Best mean quality; more runs breaks a tie (better evidence), then the id.
        return max(
            by_agent, key=lambda a: (sum(by_agent[a]) / len(by_agent[a]), len(by_agent[a]), a)
        )
