"""The pattern learner: recurring run signatures in a sliding window, and the automations they earn.

A run's signature is ``signature_of(message, specialty)``. A signature seen
``threshold`` times within ``window_s`` (by the injected clock) is a pattern:
one ``pattern_discovered``, ever. A pattern whose runs keep succeeding earns one
``automation_created`` per kind, ever:

- ``response_cache``: the router answers a request identical to one of the
  pattern's runs (same ``exact_key(message, specialty)``) from the last good
  answer, for ``ttl_seconds``, with no LLM call. The event's ``signature`` is
  the pattern's; the router computes ``exact_key`` per request itself.
- ``direct_route``: requests with this signature go straight to ``agent_id``,
  the agent with the best mean quality on the pattern (of goal ``goal_id``).

"Keep succeeding" means: at least ``min_successes`` assessed runs in the window,
their mean quality at least ``min_quality``, and no failure among the last
``recent`` outcomes. Nothing here does I/O; :meth:`PatternLearner.evaluate`
returns the events to send.
"""

from __future__ import annotations

import bisect
import hashlib
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, NamedTuple

from streams.clock import Clock
from streams.events import AutomationCreated, Event, PatternDiscovered
from streams.settings import EnvSettings, comma_list, parsed, setting
from streams.signatures import signature_of

__all__ = [
    "AUTOMATION_KINDS",
    "PatternLearner",
    "PatternSettings",
    "automation_id",
]

SOURCE = "improvement"
AUTOMATION_KINDS = ("response_cache", "direct_route")
_NS = uuid.UUID("5b0c6f0e-8f7a-4b59-9d1e-2c4a7e3b9a01")


def automation_id(signature: str, kind: str) -> str:
    return "auto_" + hashlib.sha256(f"{signature}|{kind}".encode()).hexdigest()[:16]


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
        "Seconds an automation stays in force after it is created; a whole number >= 0.",
        read_by="improvement (the router applies it)",
        ge=0,
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


_OUTCOMES = 200  # the last outcomes of a signature that are weighed (by arrival)


@dataclass
class _Pattern:
    signature: str
    specialty: str
    example: str
    # The latest runs' times, oldest first, at most the threshold: enough to tell whether
    # the window holds a pattern's worth of runs (the count in the window, up to it).
    seen: list[datetime] = field(default_factory=list)
    outcomes: deque[_Outcome] = field(default_factory=lambda: deque(maxlen=_OUTCOMES))
    discovered: bool = False
    automated: set[str] = field(default_factory=set)


class PatternLearner:
    """Counts signatures and decides on patterns and automations; state folds from events."""

    def __init__(self, settings: PatternSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self._patterns: dict[str, _Pattern] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._patterns))

    @property
    def _kept(self) -> int:
        """How many of a signature's latest run times are kept (see :class:`_Pattern`)."""
        return max(self.settings.threshold, 1)

    def _get(self, signature: str, specialty: str = "", example: str = "") -> _Pattern:
        found = self._patterns.get(signature)
        if found is None:
            found = self._patterns[signature] = _Pattern(signature, specialty, example)
        return found

    # -- folding ---------------------------------------------------------------
    def observe(self, message: str, specialty: str, at: datetime) -> str:
        """One finished run (completed or failed), once per run (the state's join sees to
        it); returns its signature.

        Only the latest ``threshold`` run times are kept, so a signature's state does not
        grow with its runs: the window holds ``threshold`` runs exactly when it holds the
        latest ``threshold`` (they come in any time order; an older one is not kept).
        """
        signature = signature_of(message, specialty)
        pattern = self._get(signature, specialty, message)
        pattern.example = message
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
        """How a run of the pattern went: its assessed quality, or None when it failed."""
        self._get(signature).outcomes.append(_Outcome(at, agent_id, goal_id, quality))

    def learn(self, event: Event) -> None:
        """Our own earlier decisions, read back from the log: never made twice."""
        if isinstance(event, PatternDiscovered):
            self._get(event.signature, event.specialty, event.example_message).discovered = True
        elif isinstance(event, AutomationCreated):
            self._get(event.signature, event.specialty).automated.add(event.kind)

    # -- snapshots -------------------------------------------------------------
    def dump(self) -> list[tuple[Any, ...]]:
        """Every signature's latest run times, outcomes and decisions as plain values
        (copied; times and outcomes are immutable, shared)."""
        return [
            (
                p.signature,
                p.specialty,
                p.example,
                tuple(p.seen),
                tuple(tuple(o) for o in p.outcomes),
                p.discovered,
                tuple(sorted(p.automated)),
            )
            for p in self._patterns.values()
        ]

    def restore(self, rows: list[tuple[Any, ...]]) -> None:
        """Replace every signature with those of a :meth:`dump`."""
        patterns: dict[str, _Pattern] = {}
        for signature, specialty, example, seen, outcomes, discovered, automated in rows:
            pattern = _Pattern(signature, specialty, example)
            pattern.seen = sorted(seen)[-self._kept :]
            pattern.outcomes.extend(map(_Outcome._make, outcomes))
            pattern.discovered, pattern.automated = bool(discovered), set(automated)
            patterns[signature] = pattern
        self._patterns = patterns

    # -- deciding --------------------------------------------------------------
    def occurrences(self, signature: str) -> int:
        """Runs of ``signature`` in the window, counted up to the threshold."""
        pattern = self._patterns.get(signature)
        if pattern is None:
            return 0
        self._prune(pattern)
        return len(pattern.seen)

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
        """Forget signatures with no run left in the window that earned nothing; how many."""
        idle = []
        for signature, pattern in self._patterns.items():
            self._prune(pattern)
            if not pattern.seen and not pattern.discovered and not pattern.automated:
                idle.append(signature)
        for signature in idle:
            del self._patterns[signature]
        return len(idle)

    def evaluate(self, signature: str) -> list[Event]:
        """Events this signature has earned and not yet had; marks them as had."""
        pattern = self._patterns.get(signature)
        if pattern is None:
            return []
        self._prune(pattern)
        now = self.clock.now()
        out: list[Event] = []
        if not pattern.discovered and len(pattern.seen) >= self.settings.threshold:
            pattern.discovered = True
            out.append(
                PatternDiscovered(
                    event_id=str(uuid.uuid5(_NS, f"{signature}:discovered")),
                    source=SOURCE,
                    signature=signature,
                    specialty=pattern.specialty,
                    occurrences=len(pattern.seen),
                    example_message=pattern.example[:500],
                    occurred_at=now,
                )
            )
        wanted = [k for k in self.settings.kinds if k not in pattern.automated]
        if pattern.discovered and wanted and self._succeeding(pattern):
            agent_id, goal_id = self._best_agent(pattern)
            for kind in wanted:
                pattern.automated.add(kind)
                out.append(
                    AutomationCreated(
                        event_id=str(uuid.uuid5(_NS, f"{signature}:{kind}")),
                        source=SOURCE,
                        goal_id=goal_id,
                        automation_id=automation_id(signature, kind),
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
    def _best_agent(pattern: _Pattern) -> tuple[str | None, str | None]:
        by_agent: dict[str, list[float]] = {}
        goals: dict[str, str | None] = {}
        for o in pattern.outcomes:
            if o.agent_id and o.quality is not None:
                by_agent.setdefault(o.agent_id, []).append(o.quality)
                goals[o.agent_id] = o.goal_id
        if not by_agent:
            return None, None
        # Best mean quality; more runs breaks a tie (better evidence), then the id.
        best = max(
            by_agent, key=lambda a: (sum(by_agent[a]) / len(by_agent[a]), len(by_agent[a]), a)
        )
        return best, goals[best]
