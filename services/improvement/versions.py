"""Workflow versions of one specialty: the ledger folded from events, canary statistics, rollback.

Version 1 is each agent's own prompt (never saved as an event). An improvement
saves version ``max + 1`` (parent: the version serving now) and applies it to
``share`` of runs; the loader labels each run's ``workflow_completed`` with
``meta["workflow_version"]``. Runs served by the canary are compared with runs
served by the base since the canary started (Welch's t-test, one-sided):

- worse with p < alpha after ``min_runs`` on each side: roll back;
- not worse by more than ``margin`` with p < alpha after ``promote_runs``: promote
  (``improvement_applied`` with ``traffic_share`` 1.0);
- still undecided after ``max_runs``: keep whichever mean is higher.

The test is repeated as runs arrive, which raises the real false-rollback rate
above alpha; that errs on the safe side, as the parent is known to work.

A rollback (automatic or ``rollback_requested``) emits ``improvement_rolled_back``,
a ``workflow_version_saved`` that records it (a new version number whose
``changes`` name ``rollback_from``/``rollback_to``; it carries no prompt), and
``improvement_applied(to_version, 1.0)`` so the latest ``improvement_applied``
alone tells a reader what serves. The fold orders events by time, then by kind,
so it does not depend on the order topics are read in.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from services.improvement.stats import mean, welch
from streams.config import env_float, env_int
from streams.events import (
    Event,
    ImprovementApplied,
    ImprovementAvailable,
    ImprovementRolledBack,
    WorkflowVersionSaved,
)
from streams.workflows import goal_of

__all__ = [
    "ORIGINAL_VERSION",
    "VERSION_TOPICS",
    "CanaryPolicy",
    "FlowState",
    "Verdict",
    "WorkflowLedger",
    "judge_canary",
]

SOURCE = "improvement"
ORIGINAL_VERSION = 1
VERSION_TOPICS = (WorkflowVersionSaved.topic, ImprovementApplied.topic, ImprovementRolledBack.topic)
ChangeSource = Literal["user", "system", "automated"]
_NS = uuid.UUID("a4f1d2c3-6b7e-4e8f-9a0b-1c2d3e4f5a6b")
_MAX_OBSERVATIONS = 5000


@dataclass(frozen=True)
class CanaryPolicy:
    share: float = 0.5
    min_runs: int = 10
    promote_runs: int = 20
    max_runs: int = 200
    alpha: float = 0.05
    margin: float = 0.05

    @classmethod
    def from_env(cls) -> CanaryPolicy:
        policy = cls(
            share=env_float("ORCH_CANARY_SHARE", 0.5),
            min_runs=env_int("ORCH_CANARY_MIN_RUNS", 10),
            promote_runs=env_int("ORCH_CANARY_PROMOTE_RUNS", 20, minimum=0),
            max_runs=env_int("ORCH_CANARY_MAX_RUNS", 200, minimum=0),
            alpha=env_float("ORCH_CANARY_ALPHA", 0.05, minimum=0, maximum=1),
            margin=env_float("ORCH_CANARY_MARGIN", 0.05),
        )
        if not 0.0 < policy.share <= 1.0:
            raise ValueError(f"ORCH_CANARY_SHARE must be in (0, 1], got {policy.share}")
        if policy.min_runs < 2:
            raise ValueError("ORCH_CANARY_MIN_RUNS must be at least 2 (a t-test needs variance)")
        return policy


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "rollback", "promote"]
    reason: str
    canary_n: int
    control_n: int
    canary_mean: float
    control_mean: float
    p_value: float | None = None


def judge_canary(
    canary: Sequence[float], control: Sequence[float], policy: CanaryPolicy
) -> Verdict:
    """What to do with a canary given the qualities of its runs and of the base's runs."""
    nc, nb, mc, mb = len(canary), len(control), mean(canary), mean(control)
    summary = f"canary {mc:.3f} over {nc} runs vs base {mb:.3f} over {nb} runs"

    def verdict(
        action: Literal["wait", "rollback", "promote"], why: str, p: float | None
    ) -> Verdict:
        return Verdict(action, f"{summary}: {why}", nc, nb, mc, mb, p)

    if nc < policy.min_runs or nb < policy.min_runs:
        return verdict("wait", f"need {policy.min_runs} runs on each side", None)
    worse = welch(canary, control)
    if worse.p_less < policy.alpha:
        return verdict(
            "rollback",
            f"worse, one-sided Welch p={worse.p_less:.4g} < {policy.alpha:g}",
            worse.p_less,
        )
    if nc >= policy.promote_runs:
        ok = welch(canary, control, shift=policy.margin)
        if ok.p_greater < policy.alpha:
            return verdict(
                "promote",
                f"not worse by more than {policy.margin:g}, one-sided Welch"
                f" p={ok.p_greater:.4g} < {policy.alpha:g}",
                ok.p_greater,
            )
    if nc >= policy.max_runs:
        action: Literal["rollback", "promote"] = "promote" if mc >= mb else "rollback"
        return verdict(action, f"undecided after {nc} runs; keeping the higher mean", None)
    return verdict("wait", f"undecided (p={worse.p_less:.4g})", worse.p_less)


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


@dataclass(frozen=True)
class _Observation:
    at: datetime
    label: str
    quality: float


def _rank(event: Event) -> int:
    # Same-millisecond events of one decision: save, start a canary, roll back, then apply fully.
    if isinstance(event, WorkflowVersionSaved):
        return 0
    if isinstance(event, ImprovementApplied):
        return 1 if event.traffic_share < 1.0 else 3
    return 2


class WorkflowLedger:
    """The versions of one workflow (a specialty) and the runs each version served."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self._events: dict[str, Event] = {}
        self._state: FlowState | None = None
        self._observations: OrderedDict[str, _Observation] = OrderedDict()

    # -- folding ---------------------------------------------------------------
    def apply(self, event: Event) -> bool:
        """Fold a version event in; False when already known (our own, read back)."""
        if not isinstance(event, WorkflowVersionSaved | ImprovementApplied | ImprovementRolledBack):
            return False
        if event.event_id in self._events:
            return False
        self._events[event.event_id] = event
        self._state = None
        return True

    def observe(self, run_id: str, label: str, quality: float, at: datetime) -> None:
        """A run this workflow served: its version label and assessed quality."""
        self._observations[run_id] = _Observation(at, label, quality)
        if len(self._observations) > _MAX_OBSERVATIONS:
            self._observations.popitem(last=False)

    @property
    def state(self) -> FlowState:
        if self._state is None:
            self._state = self._fold()
        return self._state

    def _fold(self) -> FlowState:
        st = FlowState()
        ordered = sorted(self._events.values(), key=lambda e: (e.occurred_at, _rank(e)))
        for e in ordered:
            if isinstance(e, ImprovementApplied):
                st.applied.add(e.version)
                if e.traffic_share >= 1.0:
                    st.base, st.canary, st.share = e.version, None, 0.0
                    st.canary_since = st.canary_improvement = None
                else:
                    st.canary, st.share = e.version, e.traffic_share
                    st.canary_since, st.canary_improvement = e.occurred_at, e.improvement_id
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

    # -- deciding --------------------------------------------------------------
    def _id(self, what: str) -> str:
        return str(uuid.uuid5(_NS, f"{self.workflow_id}:{what}"))

    def propose(
        self,
        improvement: ImprovementAvailable,
        *,
        now: datetime,
        share: float,
        source: ChangeSource,
        changes: dict[str, str] | None = None,
    ) -> list[Event]:
        """Save and apply an improvement as the next version; nothing while a canary runs.

        ``changes`` say what the version holds (default: the proposal as the whole
        system prompt); the improvement id and reason are added to them.
        """
        if self.state.canary is not None or self.has_improvement(improvement.improvement_id):
            return []
        version, parent = self.next_version(), self.state.base
        changes = {
            **(changes if changes is not None else {"system_prompt": improvement.proposal}),
            "improvement_id": improvement.improvement_id,
        }
        if improvement.reason:
            changes["reason"] = improvement.reason[:500]
        return [
            WorkflowVersionSaved(
                event_id=self._id(f"v{version}"),
                source=SOURCE,
                run_id=improvement.run_id,
                user_id=improvement.user_id,
                goal_id=goal_of(self.workflow_id)[0],
                workflow_id=self.workflow_id,
                version=version,
                parent_version=parent,
                changes=changes,
                change_source=source,
                occurred_at=now,
            ),
            ImprovementApplied(
                event_id=self._id(f"apply:{version}:{share}"),
                source=SOURCE,
                improvement_id=improvement.improvement_id,
                workflow_id=self.workflow_id,
                version=version,
                traffic_share=min(1.0, share),
                occurred_at=now,
            ),
        ]

    def rollback(
        self,
        to_version: int,
        *,
        now: datetime,
        source: ChangeSource,
        reason: str,
        user_id: str | None = None,
    ) -> list[Event]:
        """Serve ``to_version`` to everyone again; nothing when it already does."""
        if not self.knows(to_version):
            raise ValueError(f"workflow {self.workflow_id} has no version {to_version}")
        st = self.state
        from_version = st.canary if st.canary is not None else st.base
        if from_version == to_version:
            return []
        record = self.next_version()
        return [
            ImprovementRolledBack(
                event_id=self._id(f"rollback:{record}"),
                source=SOURCE,
                user_id=user_id,
                workflow_id=self.workflow_id,
                from_version=from_version,
                to_version=to_version,
                reason=reason,
                occurred_at=now,
            ),
            WorkflowVersionSaved(
                event_id=self._id(f"v{record}"),
                source=SOURCE,
                user_id=user_id,
                workflow_id=self.workflow_id,
                version=record,
                parent_version=from_version,
                changes={
                    "rollback_from": str(from_version),
                    "rollback_to": str(to_version),
                    "reason": reason[:500],
                },
                change_source=source,
                occurred_at=now,
            ),
            ImprovementApplied(
                event_id=self._id(f"apply:{record}:restore"),
                source=SOURCE,
                user_id=user_id,
                improvement_id=f"rollback-{self.workflow_id}-{record}",
                workflow_id=self.workflow_id,
                version=to_version,
                traffic_share=1.0,
                occurred_at=now,
            ),
        ]

    def samples(self) -> tuple[list[float], list[float]]:
        """Qualities of the canary's runs and of the base's runs since the canary started."""
        st = self.state
        if st.canary is None or st.canary_since is None:
            return [], []
        canary_label, base_label = str(st.canary), str(st.base)
        canary: list[float] = []
        control: list[float] = []
        for o in self._observations.values():
            if o.at < st.canary_since:
                continue
            if o.label == canary_label:
                canary.append(o.quality)
            elif o.label == base_label:
                control.append(o.quality)
        return canary, control

    def evaluate(self, now: datetime, policy: CanaryPolicy) -> tuple[Verdict | None, list[Event]]:
        """Roll back or promote the running canary when the statistics say so."""
        st = self.state
        if st.canary is None:
            return None, []
        canary, control = self.samples()
        verdict = judge_canary(canary, control, policy)
        if verdict.action == "rollback":
            reason = f"automatic: v{st.canary} {verdict.reason}"
            return verdict, self.rollback(st.base, now=now, source="automated", reason=reason)
        if verdict.action == "promote":
            return verdict, [
                ImprovementApplied(
                    event_id=self._id(f"promote:{st.canary}"),
                    source=SOURCE,
                    improvement_id=st.canary_improvement or f"promote-{st.canary}",
                    workflow_id=self.workflow_id,
                    version=st.canary,
                    traffic_share=1.0,
                    occurred_at=now,
                )
            ]
        return verdict, []

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
