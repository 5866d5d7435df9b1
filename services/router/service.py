"""The router: picks a specialty and an agent for each request, or asks for a spawn.

Requests come from the router group (``request_received``, keyed by run_id).
What every instance must know (the registry, spawn denials, outcomes to learn
from) is read by each instance from all partitions, outside the group. A request
that waits for a spawn keeps its offset uncommitted until it is resolved, so a
crash replays it instead of losing it. A request's producer chooses its run id: a
request under one another goal's request has is refused with a failure of its own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from services.router.automations import AutomationHit, Automations
from services.router.policy import (
    Features,
    GoalPolicies,
    Policy,
    arm_name,
    features_of,
    make_policy,
    split_arm,
)
from services.router.scoring import OutcomeStats, Weights, score_agent
from services.router.settings import RouterSettings
from services.router.tokens import AdmissionTokens, Token
from streams.config import BudgetSettings, JudgeSettings
from streams.ended import EndedRuns
from streams.events import (
    AdmissionGranted,
    AgentRetired,
    AgentSpawned,
    AutomationCreated,
    BudgetReported,
    Event,
    FailureReason,
    FeedbackReceived,
    Limit,
    RequestReceived,
    RouteDecided,
    SpawnDenied,
    SpawnRequested,
    TaskAdmitted,
    TaskRequested,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
    is_run_id_refusal,
    run_id_refusal_id,
    terminal_event_id,
)
from streams.judging import JudgeRule, judge_draw
from streams.kafka import Delivery, EventConsumer
from streams.llm import LLMSettings
from streams.quotas import PerGoal
from streams.registry import AgentRecord, RegistryView
from streams.runtime import ServiceContext, until_stopped
from streams.signatures import exact_key, signature_of
from streams.snapshots import SnapshotStore, Snapshotter
from streams.specialties import PROFILES, asked_specialty, is_specialty_name
from streams.views import TopicView

__all__ = ["Router", "main"]

log = logging.getLogger(__name__)
SOURCE = "router"
_NS = uuid.UUID("c2d9e4f1-7a3b-4c5d-8e6f-a1b2c3d4e5f6")
# A task without a deadline, or a spawn request, is sent at most this many times more.
_MAX_RESENDS = 12
E = TypeVar("E", TaskRequested, SpawnRequested)


def _id(run_id: str, what: str) -> str:
    """An id derived from the run: a request routed again after a crash sends the same ids."""
    return str(uuid.uuid5(_NS, f"{run_id}:{what}"))


# Bump when what Router.dump writes or what Router.learn folds changes: older snapshots
# are then ignored and the next start folds the whole log. 3: a policy per goal (what a
# version 2 snapshot learned came from every goal at once and cannot be split).
SNAPSHOT_VERSION = 3
# Runs whose learning the router remembers (decision, assessment, feedback), oldest forgotten,
# per goal (see _Runs): _MAX_RUNS still to teach, and half as many markers of runs that
# taught (or never will); past either the goal holding the most loses its oldest, so
# another goal's burst never pushes a goal's runs out, and a goal alone may hold them all.
_MAX_RUNS = 100_000
_MAX_RUNS_PER_GOAL = _MAX_RUNS
# Distinct users whose feedback is kept for a run whose decision (and so its user) is not
# read yet: the owner's is the one that counts, and nobody else's may crowd it out for long.
_MAX_FEEDBACK_USERS = 8
# Runs with feedback read before anything else of the run (after a restart the topics are
# read side by side): kept aside, the oldest forgotten past this, so that feedback on runs
# the router never sees (made-up run ids) cannot push real runs' signals out of _runs.
_MAX_EARLY_FEEDBACK = 10_000
# A run id longer than any the platform makes is not one the router will see routed.
_MAX_RUN_ID = 200
KNOWLEDGE_TOPICS = (
    AdmissionGranted.topic,
    BudgetReported.topic,
    RouteDecided.topic,
    TaskAdmitted.topic,
    AutomationCreated.topic,
    AgentSpawned.topic,
    AgentRetired.topic,
    SpawnDenied.topic,
    WorkflowCompleted.topic,
    WorkflowFailed.topic,
    WorkflowAssessed.topic,
    FeedbackReceived.topic,
)


@dataclass
class _Unanswered:
    """A task or spawn request this router sent and has seen no decision on yet."""

    event: TaskRequested | SpawnRequested
    resend_at: datetime
    deadline: datetime | None  # None: none (a spawn's wait ends by spawn_timeout)
    sent: int = 1


@dataclass(slots=True)
class _RunSignals:
    """What one run can teach the policy, gathered from topics read side by side.

    A run teaches at most once: from a judged assessment (world, judge, heuristic) as soon
    as its decision is known, or, when its assessment is ``unjudged``, from its user's
    first scored feedback (reward (score - 1) / 4, at the cost the assessment carried).
    Feedback is kept until the assessment says which applies, so the result does not
    depend on the order the topics are read in.
    """

    routed: bool = False  # a route_decided was read
    goal: str = ""  # whose policy it teaches
    decision: tuple[Features, str] | None = None  # None: routed, but it teaches nothing
    user: str | None = None  # who asked: only their feedback counts
    judged: tuple[float, float] | None = None  # (quality, cost) of a judged assessment
    unjudged: float | None = None  # cost of an answer assessed unjudged
    feedback: dict[str, float] | None = None  # user -> reward of their first scored feedback
    done: bool = False  # taught the policy, or never will

    def row(self, run_id: str) -> list[Any]:
        decision = self.decision
        return [
            run_id,
            self.routed,
            decision[0].as_list() if decision is not None else None,
            decision[1] if decision is not None else None,
            self.user,
            list(self.judged) if self.judged is not None else None,
            self.unjudged,
            sorted(self.feedback.items()) if self.feedback is not None else None,
            self.done,
            self.goal,
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> tuple[str, _RunSignals]:
        run_id, routed, words, arm, user, judged, unjudged, feedback, done, *goal = row
        return str(run_id), cls(
            routed=bool(routed),
            goal=str(goal[0]) if goal else "",  # rows of older dumps name no goal
            decision=(Features.from_list(words), str(arm)) if words is not None else None,
            user=None if user is None else str(user),
            judged=(float(judged[0]), float(judged[1])) if judged is not None else None,
            unjudged=None if unjudged is None else float(unjudged),
            feedback={str(u): float(r) for u, r in feedback} if feedback is not None else None,
            done=bool(done),
        )


class _Runs:
    """run_id -> :class:`_RunSignals`, filed under its goal (a :class:`PerGoal`, like the
    automations' waiting runs): the first goal an event of the run names ("" until then).

    Runs still to teach and the markers of runs that taught (or never will) are kept
    apart, each table with per-goal shares: a run that taught becomes a marker, which only
    another marker can push out, so markers never cost a run still waiting for its
    assessment or its user's feedback its place. A marker forgotten lets a late decision
    or assessment of its run start a wait again (it teaches only if both come again, a
    redelivery of both); a waiting run forgotten teaches nothing ever.
    """

    def __init__(self, per_goal: int, total: int) -> None:
        self._pending: PerGoal[str, _RunSignals] = PerGoal(per_goal, total)
        self._done: PerGoal[str, None] = PerGoal(max(1, per_goal // 2), max(1, total // 2))
        self._owner: dict[str, str] = {}  # run_id -> the goal it waits under
        self._marked: dict[str, str] = {}  # run_id -> the goal of its marker

    def __len__(self) -> int:
        return len(self._pending) + len(self._done)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._owner or run_id in self._marked

    def get(self, run_id: str) -> _RunSignals | None:
        goal = self._owner.get(run_id)
        if goal is not None:
            return self._pending.get(goal, run_id)
        goal = self._marked.get(run_id)
        return None if goal is None else _RunSignals(routed=True, goal=goal, done=True)

    def put(self, run_id: str, run: _RunSignals) -> None:
        """Keep a run new to the table as its goal's newest (a marker if it is done)."""
        if run.done:
            self._marked[run_id] = run.goal
            for _, old, _ in self._done.put(run.goal, run_id, None):
                del self._marked[old]
        else:
            self._owner[run_id] = run.goal
            for _, old, _ in self._pending.put(run.goal, run_id, run):
                del self._owner[old]

    def settle(self, run_id: str, run: _RunSignals, goal: str) -> None:
        """After an event of the run: a run done becomes a marker (its goal's newest), and
        a run filed under no goal is filed under ``goal`` (the first an event named)."""
        owner = self._owner.get(run_id)
        if owner is None or not (run.done or (not owner and goal)):
            return
        self._pending.pop(owner, run_id)
        del self._owner[run_id]
        run.goal = run.goal or goal
        self.put(run_id, run)

    def rows(self) -> list[list[Any]]:
        """What is kept, waiting runs first, each table goal by goal, oldest first."""
        rows = [run.row(run_id) for _, run_id, run in self._pending.items()]
        return rows + [
            _RunSignals(routed=True, goal=goal, done=True).row(run_id)
            for goal, run_id, _ in self._done.items()
        ]


class _RunOwners:
    """run_id -> the goal whose run it is: the first goal it was routed for (here, or by
    any instance: read on ``route_decided``).

    ``request_received`` is public and its producer chooses the run id: another goal's
    request under one is refused (see :meth:`Router.handle`). Filed per goal (a
    :class:`PerGoal`, like :class:`_Runs`): a goal's flood of run ids pushes out only its
    own, and past the total the goal holding the most loses its oldest.
    """

    def __init__(self, per_goal: int, total: int) -> None:
        self._runs: PerGoal[str, None] = PerGoal(per_goal, total)
        self._goal: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._goal)

    def get(self, run_id: str) -> str | None:
        return self._goal.get(run_id)

    def claim(self, run_id: str, goal_id: str) -> None:
        """``run_id`` is ``goal_id``'s, unless a goal is known for it already."""
        if run_id in self._goal:
            return
        self._goal[run_id] = goal_id
        for _, old, _ in self._runs.put(goal_id, run_id, None):
            del self._goal[old]

    def rows(self) -> list[list[str]]:
        """(goal, run) of every run kept, goal by goal, oldest first."""
        return [[goal, run] for goal, run, _ in self._runs.items()]


def _goal_of(registry: RegistryView, agent_id: str) -> str | None:
    record = registry.get(agent_id)
    return record.goal_id if record is not None else None


@dataclass
class _Waiter:
    request: RequestReceived
    future: asyncio.Future[AgentRecord | SpawnDenied] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Router:
    """Routing decisions; I/O is the producer passed in, state is rebuilt from events."""

    def __init__(
        self,
        ctx: ServiceContext,
        weights: Weights | None = None,
        policy: Policy | GoalPolicies | None = None,
    ) -> None:
        self.ctx = ctx
        self.ended = EndedRuns(ctx.clock)
        settings = RouterSettings.from_env()
        self.weights = weights or settings.weights
        # A policy per goal: one goal's outcomes never move another goal's routing.
        self.policy = (
            policy
            if isinstance(policy, GoalPolicies)
            else GoalPolicies(
                policy or make_policy(settings=settings),
                max_goals=settings.max_goals,
                max_word_stats=settings.max_word_stats,
                promote_goals=settings.promote_goals,
            )
        )
        specialties = list(settings.arms) or list(PROFILES)
        # With several models the policy chooses (specialty, model): each arm named
        # `specialty@model`, the platform's own model first.
        llm = LLMSettings.from_env()
        names = llm.model_names
        self.models: tuple[str, ...] = (
            (llm.default_model, *(m for m in names if m != llm.default_model))
            if len(names) > 1
            else ()
        )
        self.default_model = llm.default_model
        self.arms = (
            [arm_name(s, m) for s in specialties for m in self.models]
            if self.models
            else specialties
        )
        # goal -> quality it gives up per USD of an answer (the budget's reports)
        self.cost_weights: dict[str, float] = {}
        # run_id -> its decision, assessment and feedback, until it has taught the policy
        # (then a marker that it did), per goal: see _Runs
        self._runs = self._new_runs()
        # run_id -> the goal it was first routed for (see _RunOwners)
        self._owners = self._new_owners()
        # run_id -> user -> reward: feedback on runs not in _runs yet (see _MAX_EARLY_FEEDBACK)
        self._early_feedback: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.registry = RegistryView()
        self._cache_limits = {
            "per_goal": settings.cache_per_goal,
            "max_bytes": settings.cache_bytes,
            "answer_bytes": settings.cache_answer_bytes,
        }
        self.automations = self._automations()
        self.stats = OutcomeStats()
        self.spawn_timeout = settings.spawn_timeout
        self.model_busy = settings.model_busy
        self.busy_margin = settings.busy_margin
        # Which answers the judge grades: decided here, where what the policy knows is
        # (ORCH_JUDGE_RULE), logged on route_decided for the improvement service.
        judge = JudgeSettings.from_env()
        # One rule per goal: another goal's traffic never spends a goal's share of the judge.
        self._judge_settings = (judge.sample, judge.rule)
        JudgeRule(*self._judge_settings)  # refuses bad settings at start
        self._judges: OrderedDict[str, JudgeRule] = OrderedDict()
        self._max_judges = settings.max_goals
        # (goal_id, specialty) -> requests waiting for that agent to exist
        self._waiting: dict[tuple[str, str], list[_Waiter]] = defaultdict(list)
        self._dispatched: dict[str, str] = {}  # run_id -> agent_id, until its outcome
        # Tasks (by run id) and spawn requests (by goal and specialty) sent with no decision
        # seen yet: sent again, same id, until one comes (see resend_unanswered).
        self.resend_seconds = settings.resend_seconds
        self._unanswered: dict[str | tuple[str, str], _Unanswered] = {}
        # Slots the budget set aside for this instance (ORCH_ADMISSION_TOKENS; 0: none),
        # and what this instance sent for each run (its token, agent and specialty), until the
        # run ends.
        self.tokens = AdmissionTokens(
            BudgetSettings.read("admission_tokens"),
            max_goals=settings.max_goals,
            life_seconds=BudgetSettings.read("admission_token_seconds"),
        )
        self._sent: OrderedDict[str, tuple[Token | None, str, str]] = OrderedDict()
        self._started = ctx.clock.now()

    # -- knowledge -----------------------------------------------------------
    def learn(self, event: Event) -> None:
        if is_run_id_refusal(event):
            # Not the outcome of the run its id names (another goal's): nothing of that run
            # (its wait, its agent's load, its cached answer) ends with it.
            return
        self.ended.apply(event)
        if isinstance(event, TaskAdmitted | WorkflowCompleted | WorkflowFailed) and event.run_id:
            self._unanswered.pop(event.run_id, None)
            if not isinstance(event, TaskAdmitted):
                self._sent.pop(event.run_id, None)
        elif isinstance(event, AgentSpawned | SpawnDenied) and event.goal_id:
            self._unanswered.pop((event.goal_id, self._arm_of(event)), None)
        elif isinstance(event, BudgetReported):
            self.cost_weights[event.goal_id] = event.cost_weight
        elif isinstance(event, AdmissionGranted):
            self.tokens.granted(event, self.ctx.clock.now())
        record = self.registry.apply(event)
        self.automations.learn(event)
        if isinstance(event, RouteDecided):
            if event.goal_id:
                self._owners.claim(event.run_id, event.goal_id)
            # A direct route's answer teaches the policy like any (the policy chose its arm);
            # a cached answer's decision says policy "automation" and teaches nothing.
            run = self._signals(event.run_id, event.goal_id)
            if not run.done:
                # A later decision of the run (a secondary agent served it) replaces the first.
                teaches = event.features and event.policy not in ("forced", "automation")
                arm = arm_name(event.specialty, event.model)
                run.routed, run.user, run.goal = True, event.user_id, event.goal_id or ""
                run.decision = (Features.from_list(event.features), arm) if teaches else None
                self._teach(event.run_id, run, event.goal_id)
        elif isinstance(event, AgentSpawned) and record is not None:
            for waiter in self._waiting.pop((record.goal_id, self._arm_of(record)), []):
                if not waiter.future.done():
                    waiter.future.set_result(record)
        elif isinstance(event, AgentRetired):
            pass
        elif isinstance(event, SpawnDenied) and event.goal_id:
            for waiter in self._waiting.pop((event.goal_id, self._arm_of(event)), []):
                if not waiter.future.done():
                    waiter.future.set_result(event)
        elif isinstance(event, WorkflowCompleted | WorkflowFailed):
            agent_id = self._dispatched.pop(event.run_id, None) or event.agent_id
            if agent_id and agent_id in self.stats.agents:
                self.stats.agents[agent_id].in_flight = max(
                    0, self.stats.agents[agent_id].in_flight - 1
                )
            cost = event.cost_usd if isinstance(event, WorkflowCompleted) else 0.0
            self.stats.completed(
                event.run_id,
                agent_id,
                event.user_id,
                cost,
                isinstance(event, WorkflowCompleted),
                event.goal_id,
            )
        elif isinstance(event, WorkflowAssessed):
            unjudged = event.method == "unjudged"
            if not unjudged:  # an agent's quality is what graders said, not a guess
                self.stats.assessed(event.agent_id, event.quality)
            # Catching up after a restart reads the topics side by side: the assessment
            # may come before its decision, and is kept until then. The first one counts.
            run = self._signals(event.run_id, event.goal_id)
            if not run.done and run.judged is None and run.unjudged is None:
                if unjudged:
                    run.unjudged = event.cost_usd
                else:
                    run.judged = (event.quality, event.cost_usd)
                self._teach(event.run_id, run, event.goal_id)
        elif isinstance(event, FeedbackReceived):
            self.stats.feedback(event.run_id, event.user_id, event.score)
            if event.score is None:
                return
            reward = (event.score - 1) / 4
            known = self._runs.get(event.run_id)
            if known is None:  # nothing else of the run read yet: kept aside, not in _runs
                self._feedback_early(event.run_id, event.user_id, reward)
            elif not known.done:
                given = known.feedback if known.feedback is not None else {}
                if event.user_id not in given and len(given) < _MAX_FEEDBACK_USERS:
                    given[event.user_id] = reward
                known.feedback = given
                self._teach(event.run_id, known, event.goal_id)

    def _feedback_early(self, run_id: str, user_id: str, reward: float) -> None:
        if len(run_id) > _MAX_RUN_ID:
            return
        given = self._early_feedback.get(run_id)
        if given is None:
            given = self._early_feedback[run_id] = {}
            if len(self._early_feedback) > _MAX_EARLY_FEEDBACK:
                self._early_feedback.popitem(last=False)
        if user_id not in given and len(given) < _MAX_FEEDBACK_USERS:
            given[user_id] = reward

    def _signals(self, run_id: str, goal_id: str | None) -> _RunSignals:
        found = self._runs.get(run_id)
        if found is None:
            found = _RunSignals(goal=goal_id or "", feedback=self._early_feedback.pop(run_id, None))
            self._runs.put(run_id, found)
        return found

    @staticmethod
    def _new_runs() -> _Runs:
        return _Runs(_MAX_RUNS_PER_GOAL, _MAX_RUNS)

    @staticmethod
    def _new_owners() -> _RunOwners:
        return _RunOwners(_MAX_RUNS_PER_GOAL, _MAX_RUNS)

    def _automations(self) -> Automations:
        return Automations(clock=self.ctx.clock, **self._cache_limits)

    def _teach(self, run_id: str, run: _RunSignals, goal_id: str | None) -> None:
        """Update the policy from the run once what it teaches is known (see _RunSignals)."""
        self._learn_from(run)
        self._runs.settle(run_id, run, goal_id or "")

    def _learn_from(self, run: _RunSignals) -> None:
        if run.done or not run.routed or (run.judged is None and run.unjudged is None):
            return
        if run.decision is None:
            run.done = True  # forced or automated: nothing to teach, whatever comes later
        elif run.judged is not None:
            self.policy.update(run.goal, *run.decision, *run.judged)
            run.done = True
        elif run.user is not None and run.feedback and run.user in run.feedback:
            assert run.unjudged is not None
            # A user's own score teaches the policy but raises no change: only the platform's
            # assessments may make a goal forget what it learned.
            self.policy.update(
                run.goal, *run.decision, run.feedback[run.user], run.unjudged, detect=False
            )
            run.done = True
        if run.done:  # a marker from now on: later feedback or decisions teach nothing
            run.decision, run.feedback = None, None

    # -- snapshots -------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        """What :meth:`learn` folded, as plain values (for a snapshot)."""
        return {
            "policy": self.policy.name,
            "learned": self.policy.dump() if self.policy.learned else None,
            "runs": self._runs.rows(),
            "run_owners": self._owners.rows(),
            "early_feedback": [
                [run, sorted(given.items())] for run, given in self._early_feedback.items()
            ],
            "ended": self.ended.dump(),
            "registry": self.registry.dump(),
            "registry_retired_first": self.registry.retired_first(),
            "automations": self.automations.dump(),
            "stats": self.stats.dump(),
            "cost_weights": dict(self.cost_weights),
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace what was learned with a :meth:`dump`; nothing changes if it fails."""
        if data["policy"] != self.policy.name:
            raise ValueError(f"a snapshot of the {data['policy']} policy, not {self.policy.name}")
        runs = self._new_runs()
        for row in data["runs"]:  # an older snapshot's are in one list, oldest first
            runs.put(*_RunSignals.from_row(row))
        owners = self._new_owners()
        for goal, run in data.get("run_owners", []):  # an older snapshot has none
            owners.claim(str(run), str(goal))
        # An older snapshot has none (its feedback-only runs are in its runs).
        early = OrderedDict(
            (str(run), {str(u): float(r) for u, r in given})
            for run, given in data.get("early_feedback", [])
        )
        weights = {str(g): float(w) for g, w in data.get("cost_weights", {}).items()}
        ended = EndedRuns(self.ctx.clock)
        ended.restore(data["ended"])
        registry = RegistryView()
        # An older snapshot has none: its registry applied no retirement read first.
        registry.restore(data["registry"], data.get("registry_retired_first", []))
        automations = self._automations()
        automations.restore(data["automations"])
        stats = OutcomeStats.from_dump(data["stats"], lambda agent: _goal_of(registry, agent))
        if self.policy.learned:
            self.policy.restore(data["learned"])
        self._runs, self._early_feedback, self.ended = runs, early, ended
        self._owners = owners
        self.registry, self.automations, self.stats = registry, automations, stats
        self.cost_weights = weights

    # -- requests --------------------------------------------------------------
    def choose(
        self, request: RequestReceived
    ) -> tuple[str, AgentRecord | None, RouteDecided, AutomationHit | None]:
        asked = asked_specialty(request.context)  # a name _route has checked
        features = features_of(request.message)
        model: str | None = None  # any of the specialty's agents; a new one on the default
        busy: dict[str, int] = {}  # models left out of the choice, with their answers in flight
        judge: float | None = None  # the chance the judge grades it (None: the sample)
        fresh: float | None = None  # the chosen arm's expected reward (a learned policy)
        if asked:
            specialty, probability, policy, version = asked, 1.0, "forced", 0
            arm_scores: dict[str, float] = {asked: 1.0}
        else:
            weight = self.cost_weights.get(request.goal_id, 0.0)
            offered, busy = self._offered_arms(request.goal_id, features, weight)
            choice = self.policy.choose(request.goal_id, features, offered, weight)
            specialty, model = split_arm(choice.specialty)
            probability = choice.probability
            policy, version = self.policy.name, self.policy.version(request.goal_id)
            arm_scores = choice.scores
            fresh = self.policy.expected(request.goal_id, features, choice.specialty, weight)
            known = self.policy.known(request.goal_id, features, choice.specialty)
            rule = self.judge_of(request.goal_id)
            _, judge = rule.decide(known, judge_draw(request.run_id), choice.explored)
        # An automation only serves the specialty the policy chose: it saves cost,
        # it never overrides what the policy learned about quality. A cached answer is
        # served only if it is worth at least what a fresh one is expected to give.
        hit = (
            None
            if asked
            else self.automations.lookup(
                request.message,
                specialty,
                self.ctx.clock.now(),
                request.goal_id,
                self.registry,
                context=request.context,
                at_least=fresh,
            )
        )
        candidates = [
            a
            for a in (
                self.registry.live(goal_id=request.goal_id, specialty=specialty)
                or self.registry.retired(request.goal_id, specialty)
            )
            if model is None or self._model_of(a) == model
        ]
        if hit is not None and hit.automation.agent_id:
            pinned = [a for a in candidates if a.agent_id == hit.automation.agent_id]
            candidates = pinned or candidates
        scored = [
            (
                *score_agent(
                    a,
                    specialty,
                    request.message,
                    request.user_id,
                    self.stats,
                    self.weights,
                    peers=candidates,  # cost weighed against the goal's own agents
                ),
                a,
            )
            for a in candidates
        ]
        best = max(scored, key=lambda s: s[0], default=None)
        decision = RouteDecided(
            event_id=_id(request.run_id, "route"),
            source=SOURCE,
            run_id=request.run_id,
            goal_id=request.goal_id,
            user_id=request.user_id,
            specialty=specialty,
            agent_id=best[2].agent_id if best else None,
            action="reuse" if best else "spawn",
            scores={
                **{f"specialty:{k}": round(v, 6) for k, v in arm_scores.items()},
                **{f"busy:{m}": float(n) for m, n in busy.items()},
                **{s[2].agent_id: round(s[0], 6) for s in scored},
            },
            criteria={k: round(v, 6) for k, v in best[1].items()} if best else {},
            policy=policy,
            policy_version=version,
            probability=probability,
            model=model,
            judge_probability=judge,
            features=features.as_list(),
            request_key=exact_key(request.message, specialty, request.context),
            signature=signature_of(request.message, specialty),
            occurred_at=self.ctx.clock.now(),
        )
        if hit is not None and hit.cached is not None:
            # The answer is the cache's, not the chosen arm's: an earlier answer, kept for
            # being good, at no cost, maybe another model's. Learned from, it would show
            # the arm better and cheaper than it is, so it teaches nothing (nor replays).
            decision = decision.model_copy(update={"action": "automation", "policy": "automation"})
        elif hit is not None:
            decision = decision.model_copy(update={"action": "automation"})
        return specialty, (best[2] if best else None), decision, hit

    def judge_of(self, goal: str) -> JudgeRule:
        """The goal's own judge rule (its share and running mean), the least recently used
        forgotten past ``ORCH_ROUTER_MAX_GOALS`` goals."""
        rule = self._judges.get(goal)
        if rule is None:
            rule = self._judges[goal] = JudgeRule(*self._judge_settings)
            while len(self._judges) > self._max_judges:
                self._judges.popitem(last=False)
        else:
            self._judges.move_to_end(goal)
        return rule

    def _offered_arms(
        self, goal: str, features: Features, cost_weight: float
    ) -> tuple[list[str], dict[str, int]]:
        """The arms the policy may choose from now, and the models left out as busy with
        their answers in flight: a model with ``model_busy`` or more of this instance's
        answers in flight is left out while another is not (load as a signal: a slow or
        saturated model does not hold every request up), unless the learned policy
        expects this request to lose more than ``busy_margin`` of reward by it. The set is
        decided before the policy draws, so the decision's probability stays exact."""
        if not self.models or self.model_busy <= 0:
            return self.arms, {}
        flying: dict[str, int] = dict.fromkeys(self.models, 0)
        for agent_id, st in self.stats.agents.items():
            if st.in_flight > 0 and (agent := self.registry.get(agent_id)) is not None:
                model = self._model_of(agent)
                flying[model] = flying.get(model, 0) + st.in_flight
        busy = {m: n for m, n in flying.items() if n >= self.model_busy}
        if not busy or len(busy) >= len(self.models):
            return self.arms, {}
        free = [a for a in self.arms if split_arm(a)[1] not in busy]
        if self.policy.learned and self.busy_margin < 1.0:
            taken = [a for a in self.arms if split_arm(a)[1] in busy]
            best_free = max(self.policy.estimate(goal, features, a, cost_weight) for a in free)
            best_busy = max(self.policy.estimate(goal, features, a, cost_weight) for a in taken)
            if best_free < best_busy - self.busy_margin:
                return self.arms, {}  # worth the wait: the busy model's answer is better
        return free, busy

    def _model_of(self, agent: AgentRecord) -> str:
        return agent.model or self.default_model

    def _arm_of(self, event: AgentRecord | AgentSpawned | SpawnDenied | SpawnRequested) -> str:
        """The arm an agent (or a spawn asked for one) serves: what requests wait on."""
        if not self.models:
            return event.specialty
        return arm_name(event.specialty, event.model or self.default_model)

    def _from_cache(self, request: RequestReceived, hit: AutomationHit) -> WorkflowCompleted:
        cached = hit.cached
        assert cached is not None
        latency = 0.0
        if request.occurred_at is not None:
            latency = (self.ctx.clock.now() - request.occurred_at).total_seconds() * 1000.0
        return WorkflowCompleted(
            event_id=terminal_event_id(request.run_id),
            source=SOURCE,
            run_id=request.run_id,
            goal_id=request.goal_id,
            user_id=request.user_id,
            agent_id=cached.agent_id,
            specialty=hit.specialty,
            text=cached.text,
            cost_usd=0.0,
            latency_ms=max(0.0, latency),
            degradation_tier="automation_cache",
            automation_id=hit.automation.automation_id,
            meta={**cached.meta, "cached_from_run": cached.run_id},
            occurred_at=self.ctx.clock.now(),
        )

    def _task(
        self, request: RequestReceived, agent: AgentRecord, specialty: str | None = None
    ) -> TaskRequested:
        """The task for ``agent``; ``specialty`` (when it is not the agent's) is what the
        policy chose and no agent of the goal serves: the loader answers it as secondary
        routing."""
        st = self.stats.agents[agent.agent_id]
        st.in_flight += 1
        self._dispatched[request.run_id] = agent.agent_id
        return TaskRequested.caused_by(
            request,
            event_id=_id(request.run_id, "task"),
            source=SOURCE,
            agent_id=agent.agent_id,
            specialty=specialty or agent.specialty,
            requested_at=request.occurred_at,
            occurred_at=self.ctx.clock.now(),
        )

    def _failed(
        self,
        request: RequestReceived,
        reason: FailureReason,
        detail: str,
        limit: Limit | None = None,
        specialty: str | None = None,
    ) -> WorkflowFailed:
        return WorkflowFailed.caused_by(
            request,
            event_id=terminal_event_id(request.run_id),
            source=SOURCE,
            reason=reason,
            detail=detail,
            limit=limit,
            specialty=specialty,
            occurred_at=self.ctx.clock.now(),
        )

    def _secondary(self, request: RequestReceived, decision: RouteDecided) -> AgentRecord | None:
        """The goal's live agent that suits ``request`` best when no agent of the chosen
        specialty may be made: the policy's score of the agent's specialty first, then the
        agent's own score. None when the request pinned its specialty or the goal has no
        live agent (a retired one would count against max_agents again)."""
        if decision.policy == "forced":
            return None
        live = self.registry.live(goal_id=request.goal_id)

        def rank(agent: AgentRecord) -> tuple[float, float]:
            chosen = decision.scores.get(f"specialty:{self._arm_of(agent)}", 0.0)
            own, _ = score_agent(
                agent,
                agent.specialty,
                request.message,
                request.user_id,
                self.stats,
                self.weights,
                peers=live,
            )
            return chosen, own

        return max(live, key=rank, default=None)

    async def handle(self, event: Event, delivery: Delivery) -> None:
        if not isinstance(event, RequestReceived):
            return
        if self.ended.has(event.run_id, event.goal_id):
            return  # routed and answered before a restart or rebalance: nothing to do again
        if self._taken(event.run_id, event.goal_id):
            # Its producer chose a run id another goal's request has: both routed, each
            # service would take one for the other (its answer, its end, its analytics
            # row), and dropped, its client waited for ever. Every copy of a run id comes
            # to this instance (request_received is keyed by run id).
            await self._end(self._refused(event))
            return
        self._owners.claim(event.run_id, event.goal_id)
        try:
            await self._route(event)
        except Exception as exc:
            # The request still ends, and says why; the consumer dead-letters the event.
            await self._end(
                self._failed(event, "internal", f"routing failed: {type(exc).__name__}: {exc}")
            )
            raise

    def _taken(self, run_id: str, goal_id: str) -> bool:
        """Whether a request of another goal than ``goal_id`` used ``run_id``: routed (by
        any instance), or ended (a refusal is no use of it)."""
        owner = self._owners.get(run_id)
        if owner is not None:
            return owner != goal_id
        return self.ended.has(run_id)  # the caller asked for goal_id's own first

    def _refused(self, request: RequestReceived) -> WorkflowFailed:
        return WorkflowFailed.caused_by(
            request,
            event_id=run_id_refusal_id(request.goal_id, request.run_id),
            source=SOURCE,
            reason="invalid",
            detail=(
                "the run id is another request's already: send this request under a new"
                " run id (the SDK makes a uuid4 for each)"
            ),
            occurred_at=self.ctx.clock.now(),
        )

    async def _end(self, terminal: Event, *others: Event) -> None:
        """Send a run's terminal event (and what goes with it) until the broker has it."""
        await self.ctx.producer.deliver(
            [*others, terminal], what=f"the end of run {terminal.run_id}"
        )

    async def _route(self, event: RequestReceived) -> None:
        producer = self.ctx.producer
        now = self.ctx.clock.now()
        if event.deadline_at is not None and event.deadline_at <= now:
            await self._end(self._failed(event, "timeout", "deadline passed before routing"))
            return
        asked = asked_specialty(event.context)
        if asked and not is_specialty_name(asked):
            # The name becomes an agent's specialty and a workflow id (<goal>/<specialty>):
            # a '/' in it made the improvement service save a version it could not write.
            # Asked for by name, so refused by name rather than routed somewhere else.
            detail = (
                f"context specialty {asked[:60]!r} is not a specialty name: use a lower-case"
                " letter, then up to 47 lower-case letters, digits or _ (e.g. code,"
                " customer_support), or leave it out to let the platform choose"
            )
            await self._end(self._failed(event, "invalid", detail))
            return
        specialty, agent, decision, hit = self.choose(event)
        if hit is not None and hit.cached is not None:
            await self._end(self._from_cache(event, hit), decision)
            return
        if agent is not None:
            # The task is what the run's outcome depends on: it must reach the budget.
            await self._dispatch(self._task(event, agent), decision)
            return
        model = decision.model or (self.default_model if self.models else None)
        key = (event.goal_id, arm_name(specialty, model) if self.models else specialty)
        waiter = _Waiter(event)
        first = not self._waiting.get(key)
        self._waiting[key].append(waiter)
        if first:
            spawn = SpawnRequested(
                event_id=_id(event.run_id, "spawn"),
                source=SOURCE,
                goal_id=event.goal_id,
                run_id=event.run_id,
                user_id=event.user_id,
                specialty=specialty,
                message=event.message,
                # Not the request's context (the caller's system message, earlier turns):
                # nothing that makes the agent reads it, and it stays on the request's
                # own events instead of travelling to the budget and the spawner.
                model=model,
                occurred_at=now,
            )
            self._expect(spawn, key)
            await producer.send_many([spawn, decision])
        else:
            await producer.send(decision.model_copy(update={"action": "wait"}))
        try:
            outcome = await asyncio.wait_for(asyncio.shield(waiter.future), self.spawn_timeout)
        except TimeoutError:
            if waiter in self._waiting.get(key, []):
                self._waiting[key].remove(waiter)
            await self._end(
                self._failed(
                    event,
                    "no_agent",
                    f"no {specialty} agent became available within {self.spawn_timeout:g} s",
                    specialty=specialty,
                )
            )
            return
        if isinstance(outcome, SpawnDenied):
            fallback = self._secondary(event, decision) if outcome.limit == "max_agents" else None
            if fallback is not None:
                # At its agent limit the goal still answers: its best agent for this request
                # serves it (the seed's secondary tier). The second decision names that
                # agent's specialty, so the outcome teaches the policy about what served.
                secondary = decision.model_copy(
                    update={
                        "event_id": _id(event.run_id, "secondary"),
                        "action": "secondary",
                        "specialty": fallback.specialty,
                        "model": self._model_of(fallback) if self.models else None,
                        "agent_id": fallback.agent_id,
                        "occurred_at": self.ctx.clock.now(),
                    }
                )
                await self._dispatch(self._task(event, fallback, specialty), secondary)
                return
            await self._end(
                self._failed(
                    event,
                    "budget_exceeded",
                    outcome.detail,
                    limit=outcome.limit,
                    specialty=specialty,
                )
            )
            return
        await self._dispatch(self._task(event, outcome))

    async def _dispatch(self, task: TaskRequested, *others: Event) -> None:
        """Send ``task`` to the budget to decide, or admit it here with an admission token.

        With a token the budget's copy names it (the token's slot becomes the run's), and
        once the broker has it, the loader's admission starts the run by the token's
        ``bind_by``. A retired agent's task goes to the budget: its revival needs a place
        under max_agents."""
        now = self.ctx.clock.now()
        want = self.tokens.ask(task.goal_id, now)
        if want:
            task = task.model_copy(update={"want_tokens": want, "holder": self.tokens.holder})
        # A request this instance sent before (redelivered) goes as it went: its task id is
        # the same, so the budget reads it as a replay and decides nothing new. With the same
        # token and agent, every copy of an admission names one agent, whose loader runs
        # one of them or gives them all back.
        sent = self._sent.get(task.run_id)
        token = None
        if sent is not None:
            token, agent, specialty = sent
            task = task.model_copy(update={"agent_id": agent, "specialty": specialty})
        elif self._may_use_token(task):
            token = self.tokens.take(task.goal_id, task.message, task.context, now)
        if sent is None and self.tokens.enabled:
            self._sent[task.run_id] = (token, task.agent_id, task.specialty)
            while len(self._sent) > _MAX_RUNS:
                self._sent.popitem(last=False)
        if token is None:
            await self.ctx.producer.deliver([self._expect(task), *others], what="a task")
            return
        bound = task.model_copy(update={"token": token.token})
        # The budget's copy first, until the broker has it: an admission on the log without
        # its binding (this instance dying between two partitions' writes) would leave the
        # budget to decide the same task again when another instance routes it.
        await self.ctx.producer.deliver([bound, *others], what="a task")
        admitted = TaskAdmitted.caused_by(
            bound,
            event_id=_id(task.run_id, "admitted"),
            source=SOURCE,
            start_by=token.bind_by,
            occurred_at=self.ctx.clock.now(),
        )
        await self.ctx.producer.deliver([admitted], what=f"the admission of run {task.run_id}")

    def assigned(self) -> None:
        """Requests partitions were given to this instance (at its start or a rebalance)."""
        self._started = self.ctx.clock.now()

    def _may_use_token(self, task: TaskRequested) -> bool:
        """Not for a retired agent (its revival needs a place under max_agents), nor for a
        request that came before this instance was last given partitions: another
        instance may have sent its task, and what the budget decided for it stands."""
        if not self.tokens.enabled:
            return False
        record = self.registry.get(task.agent_id)
        if record is not None and record.retired:
            return False
        return task.requested_at is None or task.requested_at >= self._started

    async def return_tokens(self, *, everything: bool = False) -> None:
        """Tell the budget which tokens this instance will not use (all of them on a stop)."""
        for returned in self.tokens.returns(self.ctx.clock.now(), everything=everything):
            await self.ctx.producer.send(returned)

    # -- sending again what got no decision ------------------------------------------
    def _expect(self, event: E, spawn_key: tuple[str, str] | None = None) -> E:
        """Remember ``event`` until its decision (or the run's outcome) is seen."""
        if self.resend_seconds > 0:
            now = self.ctx.clock.now()
            deadline = event.deadline_at if isinstance(event, TaskRequested) else None
            key = spawn_key if spawn_key is not None else event.run_id or event.event_id
            self._unanswered[key] = _Unanswered(
                event, now + timedelta(seconds=self.resend_seconds), deadline
            )
            if len(self._unanswered) > 100_000:
                self._unanswered.pop(next(iter(self._unanswered)))
        return event

    async def resend_unanswered(self) -> int:
        """Send again, under the same id, each task or spawn request still without a decision.

        The budget decides once per event id: for one it has seen it sends the same decision
        again (or nothing, for a task still waiting in its queue); one it never saw (an
        input its consumer lost around a crash, a pause or a rebalance) it decides now, so
        the run still ends: answered, refused, or failed at its deadline. A task is sent a
        last time once its deadline has passed, a spawn request while requests wait for it.
        Returns how many were sent.
        """
        now = self.ctx.clock.now()
        sent = 0
        for key, waiting in list(self._unanswered.items()):
            if waiting.resend_at > now:
                continue
            spawn = isinstance(waiting.event, SpawnRequested)
            if spawn and not self._waiting.get(key):  # type: ignore[arg-type]
                self._unanswered.pop(key, None)  # nobody waits for it any more
                continue
            last = (
                waiting.deadline is not None and now > waiting.deadline
            ) or waiting.sent > _MAX_RESENDS
            if last:
                self._unanswered.pop(key, None)
            else:
                # Backing off (then 5, 10, 20, 40, and every 80 s): a budget that is only
                # slow, not gone, would otherwise read every waiting task again every 5 s,
                # and fall further behind by it. A task is still sent once more right
                # after its deadline (no sooner than the base interval from now).
                backoff = self.resend_seconds * 2 ** min(waiting.sent - 1, 4)
                waiting.resend_at = now + timedelta(seconds=backoff)
                if waiting.deadline is not None:
                    after_deadline = waiting.deadline + timedelta(seconds=0.5)
                    waiting.resend_at = max(
                        min(waiting.resend_at, after_deadline),
                        now + timedelta(seconds=self.resend_seconds),
                    )
            waiting.sent += 1
            log.warning(
                "run %s: no decision on its %s %.0f s after it was sent; sending it again",
                waiting.event.run_id,
                waiting.event.event_type,
                (now - waiting.event.occurred_at).total_seconds(),
            )
            await self.ctx.producer.send(waiting.event)
            sent += 1
        return sent


def snapshotter(ctx: ServiceContext, router: Router) -> Snapshotter:
    """Snapshots of the router's knowledge: a restart folds only what came after one."""
    store = SnapshotStore(ctx.settings, SOURCE)
    return Snapshotter(store, SNAPSHOT_VERSION, router.dump, router.restore)


async def main(ctx: ServiceContext, stop: asyncio.Event) -> None:
    router = Router(ctx)
    snapshots = snapshotter(ctx, router)
    knowledge = TopicView(
        ctx.settings, KNOWLEDGE_TOPICS, router.learn, source=SOURCE, resume=snapshots.resume
    )
    requests = EventConsumer(
        ctx.settings,
        [RequestReceived.topic],
        group_id=ctx.group,
        producer=ctx.producer,
        source=SOURCE,
    )
    requests.on_assigned.append(lambda _assigned: router.assigned())
    await knowledge.start()
    saving = asyncio.create_task(snapshots.run(knowledge), name="router-snapshots")

    async def resend() -> None:
        while router.resend_seconds > 0:
            await asyncio.sleep(min(1.0, router.resend_seconds / 2))
            try:
                await router.resend_unanswered()
            except Exception:  # the broker is away: the next round sends them
                log.warning("sending unanswered tasks again failed", exc_info=True)

    resending = asyncio.create_task(resend(), name="router-resend")

    async def give_back() -> None:
        while router.tokens.enabled:
            await asyncio.sleep(1.0)
            try:
                await router.return_tokens()
            except Exception:  # their slots lapse by themselves
                log.warning("giving admission tokens back failed", exc_info=True)

    returning = asyncio.create_task(give_back(), name="router-tokens")
    try:
        await asyncio.wait_for(knowledge.ready.wait(), 120)
        log.info("router caught up: %d agents known", len(router.registry.agents))
        await requests.start()
        try:
            await until_stopped(stop, requests.run_concurrently(router.handle))
        finally:
            await requests.stop()
            if router.tokens.enabled:
                try:
                    await asyncio.wait_for(router.return_tokens(everything=True), 5.0)
                except Exception:  # their slots lapse by themselves
                    log.warning("giving admission tokens back at the stop failed")
    finally:
        saving.cancel()
        resending.cancel()
        returning.cancel()
        await asyncio.gather(saving, resending, returning, return_exceptions=True)
        await snapshots.stop()
        await knowledge.stop()
