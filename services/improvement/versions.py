"""The single writer's side of workflow versions: canary statistics, promotion, rollback.

The fold of the version events is :class:`streams.versions.VersionLedger`. Version 1
is each agent's own prompt (never saved as an event). An improvement saves version
``max + 1`` (parent: the version serving now) and applies it to ``share`` of runs;
the loader labels each run's ``workflow_completed`` with
``meta["workflow_version"]``. Runs served by the canary are compared with runs
served by the base since the canary started (Welch's t-test, one-sided):

- worse with p < alpha after ``min_runs`` on each side: roll back;
- not worse by more than ``margin`` with p < alpha after ``promote_runs``: promote
  (``improvement_applied`` with ``traffic_share`` 1.0);
- still undecided after ``max_runs``: keep whichever mean is higher.

The test is repeated as runs arrive, which raises the real false-rollback rate
above alpha; that errs on the safe side, as the parent is known to work.

A canary's start and its runs' ends are stamped by their senders: each counts no later
than this service's clock when it read it, plus a minute
(:func:`~services.improvement.stamps.not_ahead`). A start stamped in year 8999 with
nothing after it on its topic counted no run at all, and the canary was never judged.
The start's bound is this ledger's alone (kept in its snapshot): the order of the events,
and so what serves, stays the log's, as every reader (the loader, the CLI) folds it.

A rollback (automatic or ``rollback_requested``) emits ``improvement_rolled_back``,
a ``workflow_version_saved`` that records it (a new version number whose
``changes`` name ``rollback_from``/``rollback_to``; it carries no prompt), and
``improvement_applied(to_version, 1.0)`` so the latest ``improvement_applied``
alone tells a reader what serves.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal, NamedTuple

from services.improvement.stamps import not_ahead
from services.improvement.stats import mean, welch
from streams.events import (
    Event,
    ImprovementApplied,
    ImprovementAvailable,
    ImprovementRolledBack,
    WorkflowVersionSaved,
    event_class,
)
from streams.settings import EnvSettings, setting
from streams.versions import ORIGINAL_VERSION, VERSION_TOPICS, FlowState, VersionLedger
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
ChangeSource = Literal["user", "system", "automated"]
_NS = uuid.UUID("a4f1d2c3-6b7e-4e8f-9a0b-1c2d3e4f5a6b")
_MAX_OBSERVATIONS = 5000


class CanaryPolicy(EnvSettings):
    """How a new version is measured against the base, and when it is kept or rolled back."""

    title: ClassVar[str] = "Canary and rollback"

    share: float = setting(
        "ORCH_CANARY_SHARE",
        0.5,
        "Share of runs a new version serves while it is measured; more than 0 and at most 1 "
        "(1 makes it the base at once, with no canary).",
        read_by="improvement",
        gt=0,
        le=1,
    )
    min_runs: int = setting(
        "ORCH_CANARY_MIN_RUNS",
        10,
        "Runs needed on each side before any verdict; at least 2 (a t-test needs variance).",
        read_by="improvement",
        ge=2,
    )
    promote_runs: int = setting(
        "ORCH_CANARY_PROMOTE_RUNS",
        20,
        "Canary runs needed before it can be promoted (shown not worse than the base by more "
        "than `ORCH_CANARY_MARGIN`); >= 0.",
        read_by="improvement",
        ge=0,
    )
    max_runs: int = setting(
        "ORCH_CANARY_MAX_RUNS",
        200,
        "Canary runs after which a test still undecided keeps the version with the higher mean "
        "quality; >= 0.",
        read_by="improvement",
        ge=0,
    )
    alpha: float = setting(
        "ORCH_CANARY_ALPHA",
        0.05,
        "Significance level of the rollback and promotion tests; 0-1.",
        read_by="improvement",
        ge=0,
        le=1,
    )
    margin: float = setting(
        "ORCH_CANARY_MARGIN",
        0.05,
        "Quality a canary may lose against the base and still be promoted; any number.",
        read_by="improvement",
    )


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "rollback", "promote"]
    reason: str
    canary_n: int
    control_n: int
    canary_mean: float
    control_mean: float
    p_value: float | None = None
    # One-sided Welch p for "the canary is better than the base" (no margin): what a
    # goal's win must show before it counts towards every goal having the change.
    p_better: float | None = None


def judge_canary(
    canary: Sequence[float], control: Sequence[float], policy: CanaryPolicy
) -> Verdict:
    """What to do with a canary given the qualities of its runs and of the base's runs."""
    nc, nb, mc, mb = len(canary), len(control), mean(canary), mean(control)
    summary = f"canary {mc:.3f} over {nc} runs vs base {mb:.3f} over {nb} runs"

    if nc < policy.min_runs or nb < policy.min_runs:
        why = f"need {policy.min_runs} runs on each side"
        return Verdict("wait", f"{summary}: {why}", nc, nb, mc, mb)
    worse = welch(canary, control)

    def verdict(
        action: Literal["wait", "rollback", "promote"], why: str, p: float | None
    ) -> Verdict:
        return Verdict(action, f"{summary}: {why}", nc, nb, mc, mb, p, worse.p_greater)

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


class _Observation(NamedTuple):
    at: datetime
    label: str
    quality: float


class WorkflowLedger(VersionLedger):
    """The versions of one workflow, the runs each version served, and the decisions."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(workflow_id)
        self._observations: OrderedDict[str, _Observation] = OrderedDict()
        # improvement_applied starting a canary, stamped further ahead than this service's
        # clock (plus a minute) when it read it -> the time it counts from instead
        self._starts: dict[str, datetime] = {}

    def apply(self, event: Event, now: datetime | None = None) -> bool:
        """Fold a version event in; False when already known (our own, read back).

        ``now``: this service's clock as it reads ``event``. A canary's start stamped
        further ahead than that (plus a minute) counts from no later than it, for good: the
        bound is fixed when the start is read (a bound moving with the clock would count no
        run ever), and kept in the snapshot, so a restart counts the runs the live service
        did. Where it falls among the other events stays its stamp's (see the module).
        """
        if not super().apply(event):
            return False
        if now is not None and isinstance(event, ImprovementApplied) and event.traffic_share < 1:
            start = not_ahead(event.occurred_at, now)
            if start < event.occurred_at:
                self._starts[event.event_id] = start
        return True

    def _ordered(self) -> list[tuple[datetime, Event]]:
        """The fold's order, every reader's; only the time a canary counts from may be
        earlier here (see :meth:`apply`)."""
        return [(min(at, self._starts.get(e.event_id, at)), e) for at, e in super()._ordered()]

    def observe(self, run_id: str, label: str, quality: float, at: datetime) -> None:
        """A run this workflow served: its version label and assessed quality."""
        self._observations[run_id] = _Observation(at, label, quality)
        if len(self._observations) > _MAX_OBSERVATIONS:
            self._observations.popitem(last=False)

    def dump(self) -> dict[str, Any]:
        """The version events and observed runs as plain values (for a snapshot)."""
        return {
            "events": [e.model_dump(mode="json") for e in self._events.values()],
            "observations": [(run, *o) for run, o in self._observations.items()],
            "starts": list(self._starts.items()),
        }

    @classmethod
    def from_dump(
        cls, workflow_id: str, data: dict[str, Any], now: datetime | None = None
    ) -> WorkflowLedger:
        """A :meth:`dump` read back. A dump without the canary starts' bounds (snapshot
        version 5) bounds them by ``now``, the restore's clock, as if read now."""
        ledger = cls(workflow_id)
        starts = data.get("starts")
        for raw in data["events"]:
            event = event_class(raw["event_type"]).model_validate(raw)
            ledger.apply(event, now if starts is None else None)
        for event_id, start in starts or ():
            if not isinstance(start, datetime):
                raise ValueError(f"canary start {event_id!r} counts from {start!r}")
            ledger._starts[str(event_id)] = start
        for run, *observed in data["observations"]:
            ledger._observations[run] = _Observation._make(observed)
        return ledger

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
