"""What the improvement service knows, folded from the log in any topic order (no I/O).

Each run is joined from up to five events (request, route, completion or
failure, assessment) that arrive from different topics and partitions in any
order; a run feeds the pattern learner and its workflow's canary statistics
exactly once, when the pieces each needs are there.

What is kept does not grow with history: the last ``_MAX_RUNS`` runs (for joining and
for feedback on them), at most ``_MAX_RUNS_PER_GOAL`` of them of one goal, and past the
overall cap the goal holding the most loses its oldest, so one goal's flood never evicts
another goal's runs (its feedback would find no run). A run whose signature is known and
that cannot be assessed any more (it has its assessment, or it failed: only completed
runs are assessed) drops its message, which nothing reads again. Per goal and signature
:class:`~services.improvement.patterns.PatternLearner` bounds what it keeps (a goal's runs
count only towards that goal's pattern). The spend copy keeps the last two UTC days (only
today's is read) and the feedback times only those within two rate windows of the latest.
Names that repeat run
after run (users, goals, specialties, agents, versions) are interned, so a run holds
references, not copies, and a snapshot writes each once.

An event's own ``occurred_at`` is its sender's choice: a cost's day, a verdict's time and
a run's end count no further ahead than this service's clock (plus a minute's skew,
:func:`~services.improvement.stamps.not_ahead`) when they are folded, and a goal's cost
limit is the last update read from the log, whatever its stamp. A request's run id is its
sender's choice too: the router's refusal of a request under one another goal used is no
event of that run, and is not folded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta
from operator import attrgetter
from sys import intern
from typing import Any, NamedTuple

from services.improvement.patterns import PatternLearner, PatternSettings
from services.improvement.stamps import not_ahead
from services.improvement.versions import WorkflowLedger
from streams.clock import Clock, SystemClock
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
    is_run_id_refusal,
)
from streams.keys import KeyRegistry
from streams.quotas import Tally
from streams.workflows import split_instructions

__all__ = [
    "REVIEW_KIND",
    "GoalSpend",
    "ImprovementState",
    "Pending",
    "Proposals",
    "RunInfo",
    "state_from_v1",
]

_MAX_RUNS = 200_000
_MAX_RUNS_PER_GOAL = 50_000
_MAX_FEEDBACK_USERS = 100_000  # users whose recent feedback times are kept
_SPEND_DAYS = 2  # UTC days of spend kept: today's is read, yesterday's while days turn
# improvement_available of this kind: a goal's instruction the LLM wrote from a user's
# feedback, waiting for an operator's approval before it becomes the goal's canary
REVIEW_KIND = "review"
_MAX_PENDING = 10_000  # proposals waiting for review, the oldest forgotten past it
_MAX_PENDING_PER_GOAL = 100  # of them, one goal's (its oldest forgotten first)
_MAX_DECIDED = 100_000  # feedback ids with a verdict on the log, kept to skip one read again


def _shared(name: str | None) -> str | None:
    return None if name is None else intern(name)


def _judged(assessed: bool, completed_at: datetime | None, failed_at: datetime | None) -> bool:
    """Whether a run can no longer be assessed: it has its one assessment, or it failed
    (only a completed run is assessed). Then nothing reads its message once its
    signature is known (the assessor asks for it only before the assessment)."""
    return assessed or (completed_at is None and failed_at is not None)


class Pending(NamedTuple):
    """A goal's proposal waiting for an operator (``improvement_available`` of REVIEW_KIND)."""

    workflow_id: str
    goal_id: str
    run_id: str | None
    user_id: str | None
    proposal: str


class Proposals:
    """Proposals waiting for review by improvement id, oldest first: at most
    ``_MAX_PENDING_PER_GOAL`` of one goal (its oldest forgotten) and ``_MAX_PENDING`` in
    all (the oldest of the goal holding the most forgotten). A forgotten one is approved
    no more; its feedback can be given again."""

    def __init__(self) -> None:
        self._all: OrderedDict[str, Pending] = OrderedDict()
        self._of: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def get(self, improvement_id: str) -> Pending | None:
        return self._all.get(improvement_id)

    def add(self, improvement_id: str, proposal: Pending) -> None:
        if improvement_id in self._all:
            return  # read again (a replay): it keeps its place
        mine = self._of.setdefault(proposal.goal_id, OrderedDict())
        while len(mine) >= _MAX_PENDING_PER_GOAL:
            self.pop(next(iter(mine)))
        mine = self._of.setdefault(proposal.goal_id, OrderedDict())
        mine[improvement_id] = None
        self._all[improvement_id] = proposal
        while len(self._all) > _MAX_PENDING:
            # The oldest of the goal holding the most: goals at their own cap never push
            # out another goal's only proposal.
            fullest = max(self._of.values(), key=len)
            self.pop(next(iter(fullest)))

    def pop(self, improvement_id: str) -> None:
        found = self._all.pop(improvement_id, None)
        if found is None:
            return
        mine = self._of[found.goal_id]
        del mine[improvement_id]
        if not mine:
            del self._of[found.goal_id]

    def dump(self) -> list[list[Any]]:
        return [[i, *p] for i, p in self._all.items()]

    @classmethod
    def restore(cls, rows: list[list[Any]]) -> Proposals:
        found = cls()
        for row in rows:
            if len(row) != len(Pending._fields) + 1:
                raise ValueError("a proposal waiting for review is not a row of its fields")
            found.add(row[0], Pending(*row[1:]))
        return found


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
    # A run of a goal's own workflow: the platform-wide version under it (its specialty's
    # workflow), so the platform's trial measures the goal's runs too.
    platform_label: str | None = None

    @property
    def workflow_id(self) -> str | None:
        return self.specialty or self.routed_specialty


class _RunTable:
    """Runs by id, at most ``max_per_goal`` of one goal (its oldest goes first) and
    ``max_runs`` in all (past it, the oldest of the goal holding the most goes): O(1) each."""

    def __init__(self, max_runs: int, max_per_goal: int) -> None:
        self.max_runs, self.max_per_goal = max(1, max_runs), max(1, max_per_goal)
        self.runs: OrderedDict[str, RunInfo | tuple[Any, ...]] = OrderedDict()
        # goal (None: not known yet) -> its runs' ids, oldest first; and how many each holds
        self._by_goal: dict[str | None, OrderedDict[str, None]] = {}
        self._tally: Tally[str | None] = Tally()

    def keep(self, run_id: str, run: RunInfo | tuple[Any, ...], goal_id: str | None) -> None:
        """Keep a new run within its goal's quota and the overall cap (evicting first)."""
        self._make_room(goal_id)
        while len(self.runs) >= self.max_runs:
            self._evict(self._tally.largest())
        self.runs[run_id] = run
        self._by_goal.setdefault(goal_id, OrderedDict())[run_id] = None
        self._tally.add(goal_id)

    def regroup(self, run_id: str, goal_id: str) -> None:
        """A run first seen without a goal learnt its goal: it counts towards that goal now,
        as its newest run (in the table's order too, so a snapshot restores the same order)."""
        self._remove(None, run_id)
        self._make_room(goal_id)
        self._by_goal.setdefault(goal_id, OrderedDict())[run_id] = None
        self._tally.add(goal_id)
        self.runs.move_to_end(run_id)

    def _make_room(self, goal_id: str | None) -> None:
        while self._tally.count(goal_id) >= self.max_per_goal:
            self._evict(goal_id)

    def _evict(self, goal_id: str | None) -> None:
        """Forget the goal's oldest run."""
        run_id = next(iter(self._by_goal[goal_id]))
        self._remove(goal_id, run_id)
        del self.runs[run_id]

    def _remove(self, goal_id: str | None, run_id: str) -> None:
        runs = self._by_goal[goal_id]
        del runs[run_id]
        if not runs:
            del self._by_goal[goal_id]
        self._tally.remove(goal_id)


def rater(goal_id: str | None, user_id: str) -> str:
    """Whose feedback rate a feedback counts towards: the user within its goal. User ids
    are the tenants' own names, so two goals' users called ``admin`` are two people, and
    one tenant's feedback never uses up another's limit."""
    return f"{goal_id or ''}\x1f{user_id}"


class ImprovementState:
    """Runs, patterns and workflow ledgers; ``dirty_*`` say what to re-evaluate."""

    def __init__(
        self,
        patterns: PatternSettings,
        clock: Clock,
        *,
        max_runs: int | None = None,
        max_runs_per_goal: int | None = None,
        feedback_window_s: float = 3600.0,
    ) -> None:
        self._table = _RunTable(
            _MAX_RUNS if max_runs is None else max_runs,
            _MAX_RUNS_PER_GOAL if max_runs_per_goal is None else max_runs_per_goal,
        )
        self.feedback_window_s = feedback_window_s
        self.clock = clock
        # run_id -> the run; a run restored from a snapshot stays the row it was saved as
        # (a tuple of RunInfo's fields) until it is looked at: most never are again.
        self.runs = self._table.runs
        self.learner = PatternLearner(patterns, clock)
        self.flows: dict[str, WorkflowLedger] = {}
        self.dirty_signatures: set[str] = set()
        self.dirty_flows: set[str] = set()
        self.keys = KeyRegistry()
        self.spend = GoalSpend(clock=clock)
        # who (goal and user, see rater) -> feedback_id -> when it was decided (this service's
        # clock, never the feedback's own stamp), for the per-user rate limit; in the order of
        # their latest feedback
        self.feedback: dict[str, OrderedDict[str, datetime]] = {}
        # (specialty, instruction) -> goals whose canary of it beat their baseline
        self.wins: dict[tuple[str, str], set[str]] = {}
        # improvement_id -> a goal's proposal waiting for review
        self.pending = Proposals()
        # feedback ids whose verdict was read from the log, oldest first
        self.decided: OrderedDict[str, None] = OrderedDict()

    def run(self, run_id: str) -> RunInfo | None:
        found = self.runs.get(run_id)
        if type(found) is tuple:
            found = self.runs[run_id] = RunInfo(*found)  # in place: the order stays
        return found  # type: ignore[return-value]

    def _run(self, run_id: str, goal_id: str | None) -> RunInfo:
        found = self.run(run_id)
        if found is None:
            found = RunInfo(run_id, goal_id=goal_id)
            self._table.keep(run_id, found, goal_id)
        return found

    def flow(self, workflow_id: str) -> WorkflowLedger:
        found = self.flows.get(workflow_id)
        if found is None:
            found = self.flows[workflow_id] = WorkflowLedger(workflow_id)
        return found

    def note_feedback(
        self, goal_id: str | None, user_id: str, feedback_id: str, at: datetime
    ) -> None:
        """An accepted feedback of ``user_id`` of ``goal_id``, decided at ``at`` (this
        service's clock, not the feedback's stamp). Times older than two rate windows before
        it are dropped, the user's and those of users whose latest feedback is that old
        (users are kept in the order of their latest): a rate check looks one window back
        from the clock, which may lag the latest a little."""
        user_id = rater(goal_id, user_id)
        seen = self.feedback.pop(user_id, None) or OrderedDict()
        self.feedback[user_id] = seen  # the latest user to give feedback
        seen[feedback_id] = at
        horizon = at - timedelta(seconds=2 * self.feedback_window_s)
        while len(seen) > 1000 or next(iter(seen.values())) < horizon:
            seen.popitem(last=False)
            if not seen:
                del self.feedback[user_id]
                break
        while self.feedback:
            user, oldest = next(iter(self.feedback.items()))
            if len(self.feedback) <= _MAX_FEEDBACK_USERS and next(reversed(oldest.values())) >= (
                horizon
            ):
                break
            del self.feedback[user]

    def feedback_decided(self, feedback_id: str) -> bool:
        """Whether a verdict on this feedback is on the log (as far as this view has read)."""
        return feedback_id in self.decided

    def feedback_count(
        self, goal_id: str | None, user_id: str, since: datetime, *, excluding: str
    ) -> int:
        seen: dict[str, datetime] = self.feedback.get(rater(goal_id, user_id), {})
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
            self.decided[event.feedback_id] = None
            while len(self.decided) > _MAX_DECIDED:
                self.decided.popitem(last=False)
            # What on_feedback noted: accepted, or refused for the change it asked for (the
            # guard's FeedbackRefused comes after the rate check), so a restart counts the
            # same feedback against the user's rate as the live service did.
            counted = event.accepted or event.error_type == "FeedbackRefused"
            if event.user_id is not None and counted:
                at = not_ahead(event.occurred_at, self.clock.now())
                self.note_feedback(event.goal_id, event.user_id, event.feedback_id, at)
            return
        if isinstance(event, ImprovementAvailable):
            if event.kind == "goal_win" and event.goal_id is not None:
                self.wins.setdefault((event.workflow_id, event.proposal), set()).add(event.goal_id)
            elif event.kind == REVIEW_KIND and event.goal_id is not None:
                self.pending.add(
                    event.improvement_id,
                    Pending(
                        event.workflow_id,
                        intern(event.goal_id),
                        event.run_id,
                        event.user_id,
                        event.proposal,
                    ),
                )
            return
        if isinstance(event, PatternDiscovered | AutomationCreated):
            self.learner.learn(event)
            return
        if isinstance(event, WorkflowVersionSaved | ImprovementApplied | ImprovementRolledBack):
            if isinstance(event, WorkflowVersionSaved):
                # Waiting no more once saved (not once approved: the writer may skip an
                # approval, a canary being measured, and the proposal must stay).
                self.pending.pop(str(event.changes.get("improvement_id", "")))
            if self.flow(event.workflow_id).apply(event, self.clock.now()):
                self.dirty_flows.add(event.workflow_id)
            return
        if not isinstance(
            event,
            RequestReceived | RouteDecided | WorkflowCompleted | WorkflowFailed | WorkflowAssessed,
        ):
            return
        if is_run_id_refusal(event):
            # The router's refusal of another goal's request under this run id: no end of
            # this run (its later completion never counted as its pattern's outcome), and
            # read first, it made the run the refused goal's (and feedback on it theirs).
            return
        run = self._run(event.run_id, _shared(event.goal_id))
        # The first owner, goal and message seen stay the run's: every event of a run
        # carries its request's, so a later request_received under the same run id that
        # says otherwise is a replay or a forgery, and must not hand the run (and
        # feedback on it) to another user.
        run.user_id = run.user_id or _shared(event.user_id)
        if run.goal_id is None and event.goal_id is not None:
            run.goal_id = intern(event.goal_id)
            self._table.regroup(run.run_id, run.goal_id)
        if isinstance(event, RequestReceived):
            run.message = run.message or event.message
        elif isinstance(event, RouteDecided):
            run.routed_specialty = _shared(event.specialty)
            if run.judge_probability is None:  # the first decision's, as the judge saw it
                run.judge_probability = event.judge_probability
        elif isinstance(event, WorkflowCompleted):
            run.specialty, run.agent_id = _shared(event.specialty), _shared(event.agent_id)
            run.completed_at = self._ended(event)
            run.version_label = _shared(event.meta.get("workflow_version"))
            run.version_flow = _shared(event.meta.get("workflow_id") or event.specialty)
            run.platform_label = _shared(event.meta.get("platform_version"))
        elif isinstance(event, WorkflowFailed):
            run.failed_at = self._ended(event)
            run.specialty = run.specialty or _shared(event.specialty)
            run.agent_id = run.agent_id or _shared(event.agent_id)
            if event.reason not in _AGENTS_FAILURES and run.completed_at is None:
                # A deadline, a budget or a request the client chose failed it, not the
                # agent: no outcome of the pattern (a user's own short deadlines once kept
                # a goal's automations from ever being earned).
                run.outcome_done = True
        elif not run.assessed and run.quality is None:  # the first assessment counts
            run.assessed = True
            # An unjudged run's heuristic number must not pass for a grade: the canary test
            # and the pattern's success rate count judged runs only.
            if event.method != "unjudged":
                run.quality = event.quality
        self._join(run)

    def _ended(self, event: WorkflowCompleted | WorkflowFailed) -> datetime:
        """When a run ended, for its pattern's window and outcomes and its canary's samples."""
        # Its stamp (the loader's, the router's, the budget's), but no later than the clock
        # plus a minute: one stamped in year 8999 stayed in the window for good, was always
        # the most recent outcome (a failure kept its pattern from any automation) and a run
        # of every later canary. Kept as the run's, so a snapshot restores what was counted.
        return not_ahead(event.occurred_at, self.clock.now())

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
            if run.platform_label is not None and flow != run.specialty:
                # The goal's canary and the platform's draw apart (streams: share_of per
                # workflow), so each trial compares its own versions fairly on these runs.
                under = run.specialty
                self.flow(under).observe(
                    run.run_id, run.platform_label, run.quality, run.completed_at
                )
                self.dirty_flows.add(under)
        if run.signature is not None and _judged(run.assessed, run.completed_at, run.failed_at):
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
            "pending": self.pending.dump(),
            "decided": list(self.decided),
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace the state with a :meth:`dump`, nothing changed if it fails; everything
        is then to be evaluated again (what was decided is in the state, so nothing twice)."""
        rows: list[tuple[Any, ...]] = data["runs"]
        if not all(type(row) is tuple and len(row) == _RUN_FIELDS for row in rows):
            raise ValueError(f"a run is not a row of {_RUN_FIELDS} fields")
        # The same caps as the fold: a snapshot written before them restores within them.
        table = _RunTable(self._table.max_runs, self._table.max_per_goal)
        for row in rows:
            if row[0] in table.runs:
                raise ValueError(f"run {row[0]!r} twice")
            table.keep(row[0], _lean(row), row[_GOAL])
        learner = PatternLearner(self.learner.settings, self.learner.clock)
        learner.restore(data["patterns"])
        now = self.clock.now()
        flows = {w: WorkflowLedger.from_dump(w, raw, now) for w, raw in data["flows"]}
        keys = KeyRegistry()
        keys.restore(data["keys"])
        spend = GoalSpend(self.spend.default_limit, clock=self.clock)
        spend.restore(data["spend"])
        feedback = {user: OrderedDict(seen) for user, seen in data["feedback"]}
        for user in list(feedback)[: max(0, len(feedback) - _MAX_FEEDBACK_USERS)]:
            del feedback[user]
        wins = {(w, text): set(goals) for w, text, goals in data["wins"]}
        pending = Proposals.restore(data["pending"])
        decided = OrderedDict.fromkeys(str(i) for i in data["decided"][-_MAX_DECIDED:])
        self._table, self.runs = table, table.runs
        self.learner, self.flows, self.keys = learner, flows, keys
        self.spend, self.feedback, self.wins = spend, feedback, wins
        self.pending, self.decided = pending, decided
        self.dirty_signatures, self.dirty_flows = set(learner), set(flows)

    def current_instructions(self, workflow_id: str) -> list[str]:
        """A workflow's vetted instructions in the version that serves everyone now."""
        ledger = self.flows.get(workflow_id)  # asking makes no ledger
        saved = ledger.versions.get(ledger.state.base) if ledger is not None else None
        return split_instructions(saved.changes.get("instructions")) if saved else []


# Failures that say something of the agent or the platform serving it; the others (a
# timeout, a budget, an invalid request) come of what the client or its goal chose.
_AGENTS_FAILURES = frozenset({"llm_failure", "internal", "no_agent"})

# A run as a tuple of its fields in order, which RunInfo(*row) reads back.
_run_row = attrgetter(*(f.name for f in fields(RunInfo)))
_RUN_FIELDS = len(fields(RunInfo))
_MESSAGE, _SIGNATURE, _ASSESSED, _GOAL, _COMPLETED, _FAILED = (
    [f.name for f in fields(RunInfo)].index(name)
    for name in ("message", "signature", "assessed", "goal_id", "completed_at", "failed_at")
)


def _lean(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A dumped run as the fold keeps it now: without its message once nothing reads it
    (a snapshot written before failed runs dropped theirs keeps them)."""
    if (
        row[_MESSAGE] is not None
        and row[_SIGNATURE] is not None
        and _judged(row[_ASSESSED], row[_COMPLETED], row[_FAILED])
    ):
        return (*row[:_MESSAGE], None, *row[_MESSAGE + 1 :])
    return row


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
    # Fields added since version 1 (the router's chance of a judge, the platform's version
    # under a goal's own) start unknown.
    return pad_runs({**data, "patterns": patterns, "runs": runs})


class GoalSpend:
    """Each goal's LLM spend per UTC day and its cost limit, as the budget's events tell them.

    The budget service is the authority; this copy only keeps the platform's own
    calls (the judge, prompt rewrites) from spending what a goal no longer has.

    A cost or refusal counts for the UTC day of its stamp, but of no stamp further ahead
    than ``clock`` (plus a minute): one stamped in year 8999 made its day the latest seen,
    and no cost of today was counted again. A goal's limit is its last update read from
    the log (the order the budget applies them in), not the one stamped latest: one stamped
    in year 8999 stayed the limit for good.
    """

    def __init__(self, default_limit: float | None = None, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.default_limit: float = (
            default_limit if default_limit is not None else BudgetSettings.read("max_daily_cost")
        )
        self._spent: dict[tuple[str, date], float] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._limits: dict[str, tuple[datetime, float]] = {}
        self._exceeded: set[tuple[str, date]] = set()
        self._latest: date | None = None  # the latest day of a spend or refusal seen

    def apply(self, event: Event) -> None:
        if event.goal_id is None:
            return
        if isinstance(event, LlmCallCompleted):
            if event.event_id in self._seen:
                return
            self._seen[event.event_id] = None
            if len(self._seen) > 100_000:
                self._seen.popitem(last=False)
            day = self._day(event.occurred_at)
            if self._current(day):
                self._spent[event.goal_id, day] = self.spent(event.goal_id, day) + event.cost_usd
        elif isinstance(event, BudgetUpdateRequested) and event.max_daily_cost is not None:
            # The last one read wins: a goal's updates are one partition's (keyed by goal),
            # read in the order the budget applied them. Its stamp is only kept.
            self._limits[event.goal_id] = (event.occurred_at, event.max_daily_cost)
        elif isinstance(event, BudgetExceeded) and event.limit == "max_daily_cost":
            day = self._day(event.occurred_at)
            if self._current(day):
                self._exceeded.add((event.goal_id, day))

    def _day(self, stamp: datetime) -> date:
        """The UTC day a cost or refusal stamped ``stamp`` counts for."""
        return not_ahead(stamp, self.clock.now()).date()

    def _current(self, day: date) -> bool:
        """Whether ``day`` is among the last ``_SPEND_DAYS`` UTC days seen (only today's is
        read); a later day than any seen drops those that are no longer."""
        if self._latest is not None and day <= self._latest:
            return day > self._latest - timedelta(days=_SPEND_DAYS)
        self._latest = day
        first = day - timedelta(days=_SPEND_DAYS - 1)
        if any(d < first for _, d in self._spent):
            self._spent = {k: usd for k, usd in self._spent.items() if k[1] >= first}
        if any(d < first for _, d in self._exceeded):
            self._exceeded = {k for k in self._exceeded if k[1] >= first}
        return True

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
        days = [d for _, d in (*spent, *exceeded)]
        self._spent, self._seen, self._limits, self._exceeded = spent, seen, limits, exceeded
        self._latest = None
        if days:
            self._current(max(days))  # what a snapshot of before kept beyond the days goes

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


def pad_runs(data: dict[str, Any]) -> dict[str, Any]:
    """A dump whose runs have fewer fields than a run has now, the new ones unknown."""
    runs = [(*row, *(None,) * (_RUN_FIELDS - len(row))) for row in data["runs"]]
    return {**data, "runs": runs}
