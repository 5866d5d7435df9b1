"""What the improvement service knows, folded from the log in any topic order (no I/O).

Each run is joined from up to five events (request, route, completion or
failure, assessment) that arrive from different topics and partitions in any
order; a run feeds the pattern learner and its workflow's canary statistics
exactly once, when the pieces each needs are there.

What is kept does not grow with history: the last ``_MAX_RUNS`` runs (for joining and
for feedback on them; a run with its signature and its assessment drops its message,
which nothing reads again), and per goal and signature what
:class:`~services.improvement.patterns.PatternLearner` bounds (a goal's runs count only
towards that goal's pattern). Names that repeat run
after run (users, goals, specialties, agents, versions) are interned, so a run holds
references, not copies, and a snapshot writes each once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from datetime import date, datetime
from operator import attrgetter
from sys import intern
from typing import Any

from services.improvement.patterns import PatternLearner, PatternSettings
from services.improvement.versions import WorkflowLedger
from streams.clock import Clock
from streams.config import BudgetSettings
from streams.events import (
    ApiKeyIssued,
    ApiKeyRevoked,
    AutomationCreated,
    BudgetExceeded,
    BudgetUpdateRequested,
    Event,
    FeedbackDecided,
    ImprovementApplied,
    ImprovementAvailable,
    ImprovementRolledBack,
    LlmCallCompleted,
    PatternDiscovered,
    RequestReceived,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowVersionSaved,
)
from streams.keys import KeyRegistry
from streams.workflows import split_instructions

__all__ = ["GoalSpend", "ImprovementState", "RunInfo", "state_from_v1"]

_MAX_RUNS = 200_000


def _shared(name: str | None) -> str | None:
    return None if name is None else intern(name)


@dataclass
class RunInfo:
    run_id: str
    message: str | None = None
    user_id: str | None = None
    goal_id: str | None = None
    specialty: str | None = None
    routed_specialty: str | None = None
    agent_id: str | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    version_label: str | None = None
    version_flow: str | None = None  # the workflow whose version served it
    quality: float | None = None  # a judged one (world, judge, heuristic), not an unjudged guess
    signature: str | None = None
    outcome_done: bool = False
    version_done: bool = False
    assessed: bool = False  # it has its one workflow_assessed, whatever the method
    judge_probability: float | None = None  # the router's, with its decision (route_decided)

    @property
    def workflow_id(self) -> str | None:
        return self.specialty or self.routed_specialty


class ImprovementState:
    """Runs, patterns and workflow ledgers; ``dirty_*`` say what to re-evaluate."""

    def __init__(self, patterns: PatternSettings, clock: Clock) -> None:
        # run_id -> the run; a run restored from a snapshot stays the row it was saved as
        # (a tuple of RunInfo's fields) until it is looked at: most never are again.
        self.runs: OrderedDict[str, RunInfo | tuple[Any, ...]] = OrderedDict()
        self.learner = PatternLearner(patterns, clock)
        self.flows: dict[str, WorkflowLedger] = {}
        self.dirty_signatures: set[str] = set()
        self.dirty_flows: set[str] = set()
        self.keys = KeyRegistry()
        self.spend = GoalSpend()
        # user -> feedback_id -> when its verdict was given, for the per-user rate limit
        self.feedback: dict[str, OrderedDict[str, datetime]] = {}
        # (specialty, instruction) -> goals whose canary of it beat their baseline
        self.wins: dict[tuple[str, str], set[str]] = {}

    def run(self, run_id: str) -> RunInfo | None:
        found = self.runs.get(run_id)
        if type(found) is tuple:
            found = self.runs[run_id] = RunInfo(*found)  # in place: the order stays
        return found  # type: ignore[return-value]

    def _run(self, run_id: str) -> RunInfo:
        found = self.run(run_id)
        if found is None:
            found = self.runs[run_id] = RunInfo(run_id)
            if len(self.runs) > _MAX_RUNS:
                self.runs.popitem(last=False)
        return found

    def flow(self, workflow_id: str) -> WorkflowLedger:
        found = self.flows.get(workflow_id)
        if found is None:
            found = self.flows[workflow_id] = WorkflowLedger(workflow_id)
        return found

    def note_feedback(self, user_id: str, feedback_id: str, at: datetime) -> None:
        seen = self.feedback.setdefault(user_id, OrderedDict())
        seen[feedback_id] = at
        while len(seen) > 1000:
            seen.popitem(last=False)

    def feedback_count(self, user_id: str, since: datetime, *, excluding: str) -> int:
        seen: dict[str, datetime] = self.feedback.get(user_id, {})
        return sum(1 for fid, at in seen.items() if at >= since and fid != excluding)

    def improvement(self, improvement_id: str) -> WorkflowVersionSaved | None:
        """The version an improvement saved, in whichever workflow it went."""
        for ledger in self.flows.values():
            for saved in ledger.versions.values():
                if saved.changes.get("improvement_id") == improvement_id:
                    return saved
        return None

    def apply(self, event: Event) -> None:
        if isinstance(event, ApiKeyIssued | ApiKeyRevoked):
            self.keys.apply(event)
            return
        if isinstance(event, LlmCallCompleted | BudgetUpdateRequested | BudgetExceeded):
            self.spend.apply(event)
            return
        if isinstance(event, FeedbackDecided):
            if event.user_id is not None and event.accepted:
                self.note_feedback(event.user_id, event.feedback_id, event.occurred_at)
            return
        if isinstance(event, ImprovementAvailable):
            if event.kind == "goal_win" and event.goal_id is not None:
                self.wins.setdefault((event.workflow_id, event.proposal), set()).add(event.goal_id)
            return
        if isinstance(event, PatternDiscovered | AutomationCreated):
            self.learner.learn(event)
            return
        if isinstance(event, WorkflowVersionSaved | ImprovementApplied | ImprovementRolledBack):
            if self.flow(event.workflow_id).apply(event):
                self.dirty_flows.add(event.workflow_id)
            return
        if not isinstance(
            event,
            RequestReceived | RouteDecided | WorkflowCompleted | WorkflowFailed | WorkflowAssessed,
        ):
            return
        run = self._run(event.run_id)
        # The first owner, goal and message seen stay the run's: every event of a run
        # carries its request's, so a later request_received under the same run id that
        # says otherwise is a replay or a forgery, and must not hand the run (and
        # feedback on it) to another user.
        run.user_id = run.user_id or _shared(event.user_id)
        run.goal_id = run.goal_id or _shared(event.goal_id)
        if isinstance(event, RequestReceived):
            run.message = run.message or event.message
        elif isinstance(event, RouteDecided):
            run.routed_specialty = _shared(event.specialty)
            if run.judge_probability is None:  # the first decision's, as the judge saw it
                run.judge_probability = event.judge_probability
        elif isinstance(event, WorkflowCompleted):
            run.specialty, run.agent_id = _shared(event.specialty), _shared(event.agent_id)
            run.completed_at = event.occurred_at
            run.version_label = _shared(event.meta.get("workflow_version"))
            run.version_flow = _shared(event.meta.get("workflow_id") or event.specialty)
        elif isinstance(event, WorkflowFailed):
            run.failed_at = event.occurred_at
            run.specialty = run.specialty or _shared(event.specialty)
            run.agent_id = run.agent_id or _shared(event.agent_id)
        elif not run.assessed and run.quality is None:  # the first assessment counts
            run.assessed = True
            # An unjudged run's heuristic number must not pass for a grade: the canary test
            # and the pattern's success rate count judged runs only.
            if event.method != "unjudged":
                run.quality = event.quality
        self._join(run)

    def _join(self, run: RunInfo) -> None:
        ended = run.completed_at or run.failed_at
        workflow = run.workflow_id
        if (
            run.signature is None
            and run.message is not None
            and run.goal_id is not None  # a pattern is one goal's: a run of none counts for none
            and workflow
            and ended
        ):
            run.signature = self.learner.observe(run.message, workflow, ended, goal_id=run.goal_id)
            self.dirty_signatures.add(run.signature)
        if run.signature is not None and not run.outcome_done and ended is not None:
            failed = run.completed_at is None
            if failed or run.quality is not None:
                run.outcome_done = True
                self.learner.outcome(
                    run.signature,
                    agent_id=run.agent_id,
                    goal_id=run.goal_id,
                    quality=None if failed else run.quality,
                    at=ended,
                )
                self.dirty_signatures.add(run.signature)
        if (
            not run.version_done
            and run.completed_at is not None
            and run.version_label is not None
            and run.quality is not None
            and run.specialty
        ):
            run.version_done = True
            flow = run.version_flow or run.specialty
            self.flow(flow).observe(run.run_id, run.version_label, run.quality, run.completed_at)
            self.dirty_flows.add(flow)
        if run.signature is not None and run.assessed:
            # Its signature and its one assessment are in: nothing reads the message again
            # (the assessor asks for it only before the assessment).
            run.message = None

    # -- snapshots -------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        """What :meth:`apply` folded, as plain values (for a snapshot)."""
        return {
            "runs": [run if type(run) is tuple else _run_row(run) for run in self.runs.values()],
            "patterns": self.learner.dump(),
            "flows": [[w, ledger.dump()] for w, ledger in self.flows.items()],
            "keys": self.keys.dump(),
            "spend": self.spend.dump(),
            "feedback": [(user, list(seen.items())) for user, seen in self.feedback.items()],
            "wins": [[w, text, sorted(goals)] for (w, text), goals in self.wins.items()],
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace the state with a :meth:`dump`, nothing changed if it fails; everything
        is then to be evaluated again (what was decided is in the state, so nothing twice)."""
        rows: list[tuple[Any, ...]] = data["runs"]
        if not all(type(row) is tuple and len(row) == _RUN_FIELDS for row in rows):
            raise ValueError(f"a run is not a row of {_RUN_FIELDS} fields")
        runs: OrderedDict[str, RunInfo | tuple[Any, ...]] = OrderedDict(
            (row[0], row) for row in rows
        )
        learner = PatternLearner(self.learner.settings, self.learner.clock)
        learner.restore(data["patterns"])
        flows = {w: WorkflowLedger.from_dump(w, raw) for w, raw in data["flows"]}
        keys = KeyRegistry()
        keys.restore(data["keys"])
        spend = GoalSpend(self.spend.default_limit)
        spend.restore(data["spend"])
        feedback = {user: OrderedDict(seen) for user, seen in data["feedback"]}
        wins = {(w, text): set(goals) for w, text, goals in data["wins"]}
        self.runs, self.learner, self.flows, self.keys = runs, learner, flows, keys
        self.spend, self.feedback, self.wins = spend, feedback, wins
        self.dirty_signatures, self.dirty_flows = set(learner), set(flows)

    def current_instructions(self, workflow_id: str) -> list[str]:
        """A workflow's vetted instructions in the version that serves everyone now."""
        ledger = self.flows.get(workflow_id)  # asking makes no ledger
        saved = ledger.versions.get(ledger.state.base) if ledger is not None else None
        return split_instructions(saved.changes.get("instructions")) if saved else []


# A run as a tuple of its fields in order, which RunInfo(*row) reads back.
_run_row = attrgetter(*(f.name for f in fields(RunInfo)))
_RUN_FIELDS = len(fields(RunInfo))
_MESSAGE, _SIGNATURE, _ASSESSED = (
    [f.name for f in fields(RunInfo)].index(name) for name in ("message", "signature", "assessed")
)


def state_from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`ImprovementState.dump` wrote in the improvement service's snapshot
    version 1, as it writes it now: a signature's runs, ``(time, run_id)``, become their
    times (the restore keeps the latest), its outcomes lose their run ids, and a run with
    its signature and its assessment loses its message; fields added since (the router's
    chance of a judge) are unknown. A signature's row stays one of every goal's runs
    together, which :meth:`PatternLearner.restore` splits per goal."""
    patterns = [
        (sig, specialty, example, [at for at, _ in seen], [(o[0], *o[2:]) for o in outcomes], *rest)
        for sig, specialty, example, seen, outcomes, *rest in data["patterns"]
    ]
    runs = [
        (*row[:_MESSAGE], None, *row[_MESSAGE + 1 :])
        if row[_SIGNATURE] is not None and row[_ASSESSED]
        else tuple(row)
        for row in data["runs"]
    ]
    # Fields added since version 1 (the router's chance of a judge) start unknown.
    runs = [(*row, *(None,) * (_RUN_FIELDS - len(row))) for row in runs]
    return {**data, "patterns": patterns, "runs": runs}


class GoalSpend:
    """Each goal's LLM spend per UTC day and its cost limit, as the budget's events tell them.

    The budget service is the authority; this copy only keeps the platform's own
    calls (the judge, prompt rewrites) from spending what a goal no longer has.
    """

    def __init__(self, default_limit: float | None = None) -> None:
        self.default_limit: float = (
            default_limit if default_limit is not None else BudgetSettings.read("max_daily_cost")
        )
        self._spent: dict[tuple[str, date], float] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._limits: dict[str, tuple[datetime, float]] = {}
        self._exceeded: set[tuple[str, date]] = set()

    def apply(self, event: Event) -> None:
        if event.goal_id is None:
            return
        if isinstance(event, LlmCallCompleted):
            if event.event_id in self._seen:
                return
            self._seen[event.event_id] = None
            if len(self._seen) > 100_000:
                self._seen.popitem(last=False)
            day = (event.goal_id, event.occurred_at.date())
            self._spent[day] = self._spent.get(day, 0.0) + event.cost_usd
        elif isinstance(event, BudgetUpdateRequested) and event.max_daily_cost is not None:
            known = self._limits.get(event.goal_id)
            if known is None or known[0] <= event.occurred_at:  # the latest update wins
                self._limits[event.goal_id] = (event.occurred_at, event.max_daily_cost)
        elif isinstance(event, BudgetExceeded) and event.limit == "max_daily_cost":
            self._exceeded.add((event.goal_id, event.occurred_at.date()))

    def dump(self) -> dict[str, Any]:
        """Spend, limits and refusals as plain values (for a snapshot)."""
        return {
            "spent": list(self._spent.items()),
            "seen": list(self._seen),
            "limits": list(self._limits.items()),
            "exceeded": sorted(self._exceeded),
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace spend, limits and refusals with a :meth:`dump`."""
        spent = {(g, d): float(usd) for (g, d), usd in data["spent"]}
        seen = OrderedDict.fromkeys(str(i) for i in data["seen"])
        limits = {g: (at, float(usd)) for g, (at, usd) in data["limits"]}
        exceeded = {(g, d) for g, d in data["exceeded"]}
        self._spent, self._seen, self._limits, self._exceeded = spent, seen, limits, exceeded

    def limit(self, goal_id: str) -> float:
        known = self._limits.get(goal_id)
        return known[1] if known is not None else self.default_limit

    def spent(self, goal_id: str, day: date) -> float:
        return self._spent.get((goal_id, day), 0.0)

    def allows(self, goal_id: str | None, now: datetime, reserve: float) -> bool:
        """Whether ``goal_id`` may still pay ``reserve`` USD today (None: nobody to charge)."""
        if goal_id is None:
            return False
        day = now.date()
        if (goal_id, day) in self._exceeded:
            return False
        return self.spent(goal_id, day) + reserve <= self.limit(goal_id) + 1e-12
