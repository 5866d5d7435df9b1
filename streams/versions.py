"""The workflow version ledger, folded from the improvement service's public events.

The improvement service is the single writer of a workflow's versions
(``workflow_version_saved``, ``improvement_applied``, ``improvement_rolled_back``);
anyone may fold them to learn what serves now: :class:`VersionLedger` does, and the
service's own ledger adds its decisions to it. Version 1 is each agent's own prompt
(never saved as an event). The fold orders events by time, then by kind, so it does
not depend on the order topics are read in; but an event counts as no later than any
that came after it on its own topic (each topic is keyed by workflow id, so one
workflow's events of a kind are one partition's, in the order written). So a valid event
stamped ahead (an ``improvement_applied`` in year 8999) is read where the log has it:
the next decision (a rollback's or a promotion's ``improvement_applied``) still comes
after it. Folding by the log rather than by a reader's clock keeps every reader (the
improvement service, its snapshot's restore, the CLI reading from the beginning) at
the same result.

:func:`list_versions` and :func:`request_rollback` are the operator's side: read the
ledger, and ask the improvement service for a rollback with ``rollback_requested``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streams.clock import Clock, SystemClock
from streams.errors import InvalidRequest
from streams.events import (
    Event,
    ImprovementApplied,
    ImprovementRolledBack,
    RollbackRequested,
    WorkflowVersionSaved,
)
from streams.kafka import EventProducer, KafkaSettings
from streams.registry import read_topics_to_end
from streams.workflows import goal_of

__all__ = [
    "ORIGINAL_VERSION",
    "VERSION_TOPICS",
    "FlowState",
    "VersionLedger",
    "list_versions",
    "request_rollback",
]

ORIGINAL_VERSION = 1
VERSION_TOPICS = (WorkflowVersionSaved.topic, ImprovementApplied.topic, ImprovementRolledBack.topic)


@dataclass
class FlowState:
    """What serves now, derived from the ledger's events."""

    base: int = ORIGINAL_VERSION
    canary: int | None = None
    share: float = 0.0
    canary_since: datetime | None = None
    canary_improvement: str | None = None
    applied: set[int] = field(default_factory=set)
    rolled_back: dict[int, str] = field(default_factory=dict)


def _rank(event: Event) -> int:
    # Same-millisecond events of one decision: save, start a canary, roll back, then apply fully.
    if isinstance(event, WorkflowVersionSaved):
        return 0
    if isinstance(event, ImprovementApplied):
        return 1 if event.traffic_share < 1.0 else 3
    return 2


class VersionLedger:
    """The versions of one workflow (a specialty, or a goal's own) and which one serves."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self._events: dict[str, Event] = {}
        self._state: FlowState | None = None

    def apply(self, event: Event) -> bool:
        """Fold a version event in; False when already known (our own, read back)."""
        if not isinstance(event, WorkflowVersionSaved | ImprovementApplied | ImprovementRolledBack):
            return False
        if event.event_id in self._events:
            return False
        self._events[event.event_id] = event
        self._state = None
        return True

    @property
    def state(self) -> FlowState:
        if self._state is None:
            self._state = self._fold()
        return self._state

    def _ordered(self) -> list[tuple[datetime, Event]]:
        """The events as the fold reads them, each with the time it counts at: its own, or
        the earliest of those after it on its topic if that is earlier (events are kept in
        the order read, each topic's in its log order); by that time, then kind, then the
        order read."""
        events = list(self._events.values())
        at = [e.occurred_at for e in events]
        later: dict[str, datetime] = {}  # topic -> the earliest time of what came after
        for i in reversed(range(len(events))):
            topic = events[i].topic
            if topic in later and later[topic] < at[i]:
                at[i] = later[topic]
            later[topic] = at[i]
        order = sorted(range(len(events)), key=lambda i: (at[i], _rank(events[i]), i))
        return [(at[i], events[i]) for i in order]

    def _fold(self) -> FlowState:
        st = FlowState()
        for at, e in self._ordered():
            if isinstance(e, ImprovementApplied):
                st.applied.add(e.version)
                if e.traffic_share >= 1.0:
                    st.base, st.canary, st.share = e.version, None, 0.0
                    st.canary_since = st.canary_improvement = None
                else:
                    st.canary, st.share = e.version, e.traffic_share
                    st.canary_since, st.canary_improvement = at, e.improvement_id
            elif isinstance(e, ImprovementRolledBack):
                st.rolled_back[e.from_version] = e.reason
                if st.canary == e.from_version:
                    st.canary, st.share, st.canary_since, st.canary_improvement = (
                        None,
                        0.0,
                        None,
                        None,
                    )
                if st.base == e.from_version:
                    st.base = e.to_version
        return st

    @property
    def versions(self) -> dict[int, WorkflowVersionSaved]:
        return {e.version: e for e in self._events.values() if isinstance(e, WorkflowVersionSaved)}

    def next_version(self) -> int:
        return max([ORIGINAL_VERSION, *self.versions]) + 1

    def knows(self, version: int) -> bool:
        return version == ORIGINAL_VERSION or version in self.versions

    def has_improvement(self, improvement_id: str) -> bool:
        return any(
            v.changes.get("improvement_id") == improvement_id for v in self.versions.values()
        )

    def prompt_of(self, version: int) -> str | None:
        saved = self.versions.get(version)
        return saved.changes.get("system_prompt") if saved is not None else None

    # -- reading ---------------------------------------------------------------
    def listing(self) -> list[dict[str, Any]]:
        """Every version, oldest first, with what it is now (for ``orchestrator versions``)."""
        st = self.state
        rows: list[dict[str, Any]] = [
            {
                "workflow_id": self.workflow_id,
                "version": ORIGINAL_VERSION,
                "parent_version": None,
                "change_source": "system",
                "changes": {},
                "user_id": None,
                "saved_at": None,
                "note": "each agent's own system prompt"
                if goal_of(self.workflow_id)[0] is None
                else "what the platform serves for the specialty",
            }
        ]
        for v in sorted(self.versions.values(), key=lambda e: e.version):
            rows.append(
                {
                    "workflow_id": self.workflow_id,
                    "version": v.version,
                    "parent_version": v.parent_version,
                    "change_source": v.change_source,
                    "changes": dict(v.changes),
                    "user_id": v.user_id,
                    "saved_at": v.occurred_at.isoformat(),
                    "note": v.changes.get("reason", ""),
                }
            )
        for row in rows:
            version = row["version"]
            if version == st.canary:
                row["status"], row["traffic_share"] = "canary", st.share
            elif version == st.base:
                row["status"], row["traffic_share"] = "base", 1.0 - st.share
            elif version in st.rolled_back:
                row["status"], row["traffic_share"] = "rolled_back", 0.0
                row["note"] = st.rolled_back[version]
            elif "rollback_from" in row["changes"]:
                row["status"], row["traffic_share"] = "rollback_record", 0.0
            elif version in st.applied or version == ORIGINAL_VERSION:
                row["status"], row["traffic_share"] = "superseded", 0.0
            else:
                row["status"], row["traffic_share"] = "saved", 0.0
        return rows


async def _ledger(settings: KafkaSettings, workflow_id: str) -> VersionLedger:
    ledger = VersionLedger(workflow_id)
    for event in await read_topics_to_end(settings, VERSION_TOPICS):
        if getattr(event, "workflow_id", None) == workflow_id:
            ledger.apply(event)
    return ledger


async def list_versions(settings: KafkaSettings, workflow_id: str) -> list[dict[str, Any]]:
    """Every version of ``workflow_id`` (a specialty), oldest first.

    Each row: workflow_id, version, parent_version, change_source, changes,
    user_id, saved_at (ISO or None), note, status (``base``, ``canary``,
    ``rolled_back``, ``rollback_record``, ``superseded``, ``saved``) and
    traffic_share. Version 1, each agent's own prompt, is always listed.
    """
    return (await _ledger(settings, workflow_id)).listing()


async def request_rollback(
    settings: KafkaSettings,
    workflow_id: str,
    to_version: int,
    user_id: str,
    *,
    reason: str = "",
    clock: Clock | None = None,
) -> RollbackRequested:
    """Send ``rollback_requested``; the improvement service applies it (change_source user).

    Raises InvalidRequest when the workflow has no such version or already serves it.
    """
    ledger = await _ledger(settings, workflow_id)
    if not ledger.knows(to_version):
        known = ", ".join(str(r["version"]) for r in ledger.listing())
        raise InvalidRequest(
            f"workflow {workflow_id!r} has no version {to_version}; it has {known}"
        )
    st = ledger.state
    if st.canary is None and st.base == to_version:
        raise InvalidRequest(f"workflow {workflow_id!r} already serves version {to_version}")
    try:
        event = RollbackRequested(
            source="cli",
            user_id=user_id,
            workflow_id=workflow_id,
            to_version=to_version,
            reason=reason,
            occurred_at=(clock or SystemClock()).now(),
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    async with EventProducer(settings, client_id="orchestrator.cli") as producer:
        await producer.send(event)
    return event
