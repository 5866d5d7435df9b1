"""The improvement service: assesses runs, learns patterns, turns feedback into canaried prompts.

Three consumers:

- a view, outside any group (every partition): requests, routes, outcomes,
  assessments, the registry and this service's own decisions. Every instance
  folds the same :class:`ImprovementState`.
- the work group (``workflow_completed``, ``feedback_received``): one
  ``workflow_assessed`` per completed run (the world and heuristic paths never
  wait), and feedback checked for ownership: a user who does not own the run
  is dead-lettered with the reason, and nothing else happens.
- the version group (``improvement_available``, ``rollback_requested``, both
  keyed by workflow_id, range-assigned so partition p of both is on one
  instance): the single writer of each workflow's versions.

Pattern and canary decisions come from the view, so they see all runs; the
instance that owns the key's partition in the version group makes them, so
two instances never both decide. Version writes wait until the view has read
the version topics to their end, so a new owner after a rebalance continues
from the last version saved.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from services.improvement.assess import JUDGE_MAX_TOKENS, Assessor, judge_messages
from services.improvement.feedback import wants_improvement
from services.improvement.http import SlackSettings, build_app, build_runner
from services.improvement.instructions import (
    ADJUSTMENTS,
    clean_instruction,
    copies_text,
    guard_instruction,
    instruction_messages,
    match_adjustments,
    named_only,
)
from services.improvement.patterns import PatternSettings
from services.improvement.settings import ImprovementSettings
from services.improvement.state import (
    REVIEW_KIND,
    ImprovementState,
    RunInfo,
    pad_runs,
    state_from_v1,
)
from services.improvement.versions import VERSION_TOPICS, CanaryPolicy, ChangeSource
from streams.client import feedback_event
from streams.config import JudgeSettings, data_root
from streams.errors import (
    FeedbackRefused,
    NotRunOwner,
    PromotionRefused,
    RateLimited,
    UnknownRun,
)
from streams.events import (
    ApiKeyIssued,
    ApiKeyRevoked,
    AutomationCreated,
    BudgetExceeded,
    BudgetUpdateRequested,
    DeadLetter,
    Event,
    FeedbackDecided,
    FeedbackReceived,
    ImprovementAvailable,
    LlmCallCompleted,
    PatternDiscovered,
    PromotionDecided,
    PromotionRequested,
    PromotionScope,
    RequestReceived,
    RollbackRequested,
    RouteDecided,
    SpendDecided,
    SpendRequested,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowVersionSaved,
)
from streams.kafka import BACKGROUND_FETCH, Delivery, EventConsumer, dead_letter, failed_letter
from streams.keys import (
    DEFAULT_OPERATORS,
    KEY_TOPICS,
    Identity,
    KeyCatchUp,
    identify_reading,
    operators_from,
)
from streams.llm import (
    Completion,
    LastCosts,
    LLMClient,
    LLMError,
    LLMSettings,
    LLMUnsettled,
    PriceTable,
    create_llm,
    worst_case_usd,
)
from streams.quotas import PerGoal
from streams.runtime import ServiceContext
from streams.snapshots import SnapshotStore, Snapshotter
from streams.specialties import is_specialty_name
from streams.topics import partition_for
from streams.views import TopicView
from streams.workflows import (
    MAX_ADJUSTMENTS,
    goal_of,
    goal_workflow,
    join_instructions,
    parse_workflow,
    split_instructions,
)

__all__ = ["ImprovementConfig", "ImprovementService", "main", "serve"]

log = logging.getLogger(__name__)
SOURCE = "improvement"
VIEW_TOPICS = (
    RequestReceived.topic,
    RouteDecided.topic,
    WorkflowCompleted.topic,
    WorkflowFailed.topic,
    WorkflowAssessed.topic,
    PatternDiscovered.topic,
    AutomationCreated.topic,
    ApiKeyIssued.topic,
    ApiKeyRevoked.topic,
    FeedbackDecided.topic,
    LlmCallCompleted.topic,
    BudgetUpdateRequested.topic,
    BudgetExceeded.topic,
    ImprovementAvailable.topic,
    SpendDecided.topic,
    *VERSION_TOPICS,
)
WORK_TOPICS = (WorkflowCompleted.topic, FeedbackReceived.topic, PromotionRequested.topic)
COMMAND_TOPICS = (ImprovementAvailable.topic, RollbackRequested.topic)
# Bump when what ImprovementService.dump writes or what the view folds changes: older
# snapshots are then ignored and the next start folds the whole log, unless _UPGRADES
# says how to read them. 2: a signature keeps its latest run times, not every run id in
# the pattern window; outcomes without run ids; a joined, assessed run without its message.
# 3: a pattern's row holds when it was last decided (decided patterns are forgotten once
# their automations lapsed); a version 2 row reads as decided now, runs and patterns
# restore within the caps. 4: a run keeps the platform's version under a goal's own.
# 5: proposals waiting for review (a version 4 snapshot holds none: its writer kept none,
# so one made while an older instance ran is lost; its feedback can be given again), the
# last paid cost of each goal's platform calls and the feedback ids with a verdict (a
# version 4 one: none known). 6: a workflow's canary starts stamped ahead, with the time
# each counts from (a version 5 one: bounded by the restore's clock, as if read then).
SNAPSHOT_VERSION = 6
_NS = uuid.UUID("7d2e4b1a-3c5f-4a6e-8b9d-0e1f2a3b4c5d")
# The kinds of improvement_available the platform proposes; the single writer saves no other.
_KINDS = ("instructions", "approved", "goal_win")


@dataclass(frozen=True)
class ImprovementConfig:
    """Settings of one instance; :meth:`from_env` reads them from the environment."""

    http_host: str = "127.0.0.1"
    http_port: int | None = 8787  # 0: any free port; None: no HTTP endpoint
    port_file: Path | None = None
    slack: SlackSettings | None = None
    patterns: PatternSettings = field(default_factory=PatternSettings)
    canary: CanaryPolicy = field(default_factory=CanaryPolicy)
    judge_model: str | None = None
    judge_sample: float = 1.0  # share of runs the judge grades (ORCH_JUDGE_SAMPLE)
    view_wait_s: float = 2.0
    feedback_limit: int = 20  # feedback per user and window; more is refused
    feedback_window_s: float = 3600.0
    llm_reserve_usd: float = 0.002  # what a judge or rewrite call may cost, held against the goal
    promote_goals: int = 3  # goals whose canary of a change must win before every goal gets it
    # an LLM-written instruction from a user's feedback waits for an operator (ORCH_IMPROVE_REVIEW)
    review: bool = True
    # users trusted as operators without a key (ORCH_OPERATORS; the local CLI's identity)
    operators: frozenset[str] = frozenset({DEFAULT_OPERATORS})
    spend_wait_s: float = 5.0  # how long a platform call waits for the budget's hold
    max_in_flight: int = 64  # HTTP requests handled at once (ORCH_IMPROVE_MAX_IN_FLIGHT)
    key_share: float = 0.5  # of those, the share one key may hold (ORCH_IMPROVE_KEY_SHARE)
    max_runs: int | None = None  # runs kept (None: the state's default, 200,000)
    max_runs_per_goal: int | None = None  # of them, one goal's (None: 50,000)

    @classmethod
    def from_env(cls) -> ImprovementConfig:
        """From :class:`ImprovementSettings`, :class:`PatternSettings` and :class:`CanaryPolicy`;
        the port in use is written to ``<data_root>/run/improvement.port``."""
        settings = ImprovementSettings.from_env()
        secret = settings.slack_signing_secret
        return cls(
            http_host=settings.http_host,
            http_port=settings.http_port,
            port_file=data_root() / "run" / "improvement.port",
            slack=(
                SlackSettings(secret, settings.slack_bot_token, settings.slack_user_map)
                if secret
                else None
            ),
            patterns=PatternSettings.from_env(),
            canary=CanaryPolicy.from_env(),
            judge_model=settings.judge_model,
            judge_sample=JudgeSettings.read("sample"),
            feedback_limit=settings.feedback_limit,
            feedback_window_s=settings.feedback_window_s,
            llm_reserve_usd=settings.llm_reserve_usd,
            promote_goals=settings.promote_goals,
            review=settings.review,
            operators=operators_from(),
            max_in_flight=settings.max_in_flight,
            key_share=settings.key_share,
            max_runs=settings.max_runs,
            max_runs_per_goal=settings.max_runs_per_goal,
        )


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    return _from_v4({**data, "state": state_from_v1(data["state"])})


def _from_v2(data: dict[str, Any]) -> dict[str, Any]:
    # The restore reads a version 2 pattern row (no decision time) as it is.
    return _from_v3(data)


def _from_v3(data: dict[str, Any]) -> dict[str, Any]:
    return _from_v4({**data, "state": pad_runs(data["state"])})


def _from_v4(data: dict[str, Any]) -> dict[str, Any]:
    """What version 5 added, none known: a version 4 snapshot holds none of it."""
    state = {"pending": [], "decided": [], **data["state"]}
    return _from_v5({"last_cost": [], **data, "state": state})


def _from_v5(data: dict[str, Any]) -> dict[str, Any]:
    """As it is: a workflow's dump without its canary starts is read as one of version 5
    (WorkflowLedger.from_dump bounds them by the restore's clock)."""
    return data


# Older snapshot versions still read, with the way from each to the current one.
_UPGRADES = {1: _from_v1, 2: _from_v2, 3: _from_v3, 4: _from_v4, 5: _from_v5}


class _ViewBehind(TimeoutError):
    """The view has not read the version topics to their end: no command's fault, so the
    command is read again (by the next start or owner) rather than dead-lettered."""


# Runs whose approved platform-call holds are kept for their next attempt (see
# _earlier_attempts): at most this many, filed by goal, the goal holding the most losing
# its oldest past it (so another goal's traffic never pushes out a goal's holds, and one
# goal alone keeps them all).
_RUN_HOLDS = 20_000
_RUN_HOLDS_PER_GOAL = _RUN_HOLDS
# Cost reports of platform calls seen (so an earlier attempt's reported call is not counted
# again), filed by goal the same way: five times the holds.
_REPORTED = 100_000
_REPORTED_PER_GOAL = _REPORTED


def _hold_id(attempt: str, purpose: str) -> str:
    return str(uuid.uuid5(_NS, f"{attempt}:{purpose}:hold"))


def _cost_id(hold_id: str) -> str:
    """The cost report of the attempt that asked for ``hold_id``: anyone can derive it."""
    return str(uuid.uuid5(_NS, f"{hold_id}:cost"))


def _attempt(cause: str) -> str:
    """One attempt at the LLM call a causing event asks for (a judgement, an instruction).

    A cause read again (this instance was killed or paused and lost its partition before
    its result was on the log) is judged again by a real, paid call: with the cause's own
    id its cost report took the first call's id and the budget counted one of two paid
    calls (chaos seed 7: 17 judge calls paid and never counted). Each attempt's hold and
    cost report have their own ids; within an attempt they are resent under the same ones.
    """
    return f"{cause}:{uuid.uuid4().hex}"


class ImprovementService:
    """Handlers and decisions; Kafka is the context's producer and the consumers given to run()."""

    def __init__(
        self, ctx: ServiceContext, config: ImprovementConfig, llm: LLMClient | None
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.llm = llm
        self.assessor = Assessor(llm, model=config.judge_model, sample=config.judge_sample)
        self.state = ImprovementState(
            config.patterns,
            ctx.clock,
            max_runs=config.max_runs,
            max_runs_per_goal=config.max_runs_per_goal,
            feedback_window_s=config.feedback_window_s,
        )
        # Runs this process assessed, against a redelivery before the view reads the
        # assessment; one list for every goal is enough: past that the view's runs (per goal,
        # ImprovementState) say it was assessed, so another goal's traffic costs no judge call.
        self._assessed: OrderedDict[str, None] = OrderedDict()
        self._write_lock = asyncio.Lock()
        self._view: TopicView | None = None
        # A key issued a moment before it is used may not have been read yet: an unknown
        # key on HTTP reads the key topics up to now (at most once a second: anyone may send
        # key-shaped strings), and so does a command from a user not known as an operator
        # (each time: only clients inside the boundary write commands).
        self._http_keys = KeyCatchUp(self._sync_keys)
        self._command_keys = KeyCatchUp(self._sync_keys, interval=0.0)
        self._commands: EventConsumer | None = None
        self._owned: frozenset[int] = frozenset()
        self._waiters: dict[str, asyncio.Future[FeedbackDecided | PromotionDecided]] = {}
        self._holds: dict[str, asyncio.Future[SpendDecided]] = {}
        # spend request -> approved. Each attempt's request id is new, so a decision
        # forgotten costs at most a resend the budget answers the same: one list suffices.
        self._decided: OrderedDict[str, bool] = OrderedDict()
        # run -> approved holds of its platform calls, and the cost reports seen: an
        # attempt that held and never reported is counted by the next (_earlier_attempts).
        # Per goal (the goal the hold is on, the run's): one goal's calls never push out the
        # hold of another goal's run, whose next attempt would then not count a paid call.
        self._run_holds: PerGoal[str, list[str]] = PerGoal(_RUN_HOLDS_PER_GOAL, _RUN_HOLDS)
        # Per goal too, five times as many as the holds (as in one list before): a hold kept
        # has its report kept, so a later attempt on the run never counts a reported call.
        self._reported: PerGoal[str, bool] = PerGoal(_REPORTED_PER_GOAL, _REPORTED)
        self._last_cost = LastCosts()  # (goal, purpose) -> the last paid call's cost
        self._mine: OrderedDict[str, None] = OrderedDict()  # holds this process asked for
        # feedback this process is deciding or decided (never in a snapshot)
        self._deciding: OrderedDict[str, None] = OrderedDict()
        llm_settings = LLMSettings.from_env()
        self.prices: PriceTable = llm_settings.prices
        self.model = llm_settings.model
        self.http_port: int | None = None

    # -- knowledge -------------------------------------------------------------
    async def _run_known(self, run_id: str, ready: Callable[[RunInfo], bool]) -> RunInfo | None:
        """The run once the view has what ``ready`` needs; the view may lag the caller a moment."""

        def known() -> RunInfo | None:
            run = self.state.run(run_id)
            return run if run is not None and ready(run) else None

        found = known()
        if found is None and self._view is not None:
            found = await self._view.wait_for(known, self.config.view_wait_s)
        return found or self.state.run(run_id)

    def owns(self, key: str) -> bool:
        """Whether this instance decides for ``key`` (a signature or workflow id)."""
        if self._commands is None:
            return False
        physical = self.ctx.settings.topic(COMMAND_TOPICS[0])
        count = len(self._commands.raw.partitions_for_topic(physical) or ())
        if not count:
            return False
        # Kafka's default partitioner, so the owner is the one that gets the key's commands.
        return partition_for(key, count) in self._owned

    def _refresh_ownership(self) -> bool:
        if self._commands is None:
            return False
        physical = self.ctx.settings.topic(COMMAND_TOPICS[0])
        owned = frozenset(
            tp.partition for tp in self._commands.raw.assignment() if tp.topic == physical
        )
        changed = owned != self._owned
        self._owned = owned
        return changed

    # -- assessment --------------------------------------------------------------
    async def hold(
        self,
        goal_id: str | None,
        run_id: str,
        purpose: Literal["judge", "improvement"],
        messages: list[dict[str, str]],
        max_tokens: int,
        *,
        cause: str,
    ) -> bool:
        """Whether the budget held back the worst case of this call on ``goal_id``.

        The call is the goal's: it is made only once the budget service (the one writer
        of the goal's spend) has set its worst case aside, so it cannot push the day
        past ``max_daily_cost``. No answer in ``spend_wait_s``: no call.
        """
        if goal_id is None or self.llm is None:
            return False
        model = (self.config.judge_model if purpose == "judge" else None) or self.model
        amount = worst_case_usd(self.prices, model, messages, max_tokens)
        if not self.state.spend.allows(goal_id, self.ctx.clock.now(), amount):
            return False  # the log already says the goal cannot pay: skip the round trip
        request = SpendRequested(
            # One hold per attempt: a resent request is the same hold, a new attempt asks again.
            event_id=_hold_id(cause, purpose),
            source=SOURCE,
            run_id=run_id,
            goal_id=goal_id,
            purpose=purpose,
            amount_usd=amount,
            occurred_at=self.ctx.clock.now(),
        )
        self._mine[request.event_id] = None  # its attempt reports it (or dies with us)
        if len(self._mine) > 10_000:
            self._mine.popitem(last=False)
        if request.event_id in self._decided:
            return self._decided[request.event_id]
        waiter = self._holds.setdefault(
            request.event_id, asyncio.get_running_loop().create_future()
        )
        try:
            await self.ctx.producer.send(request)
            decided = await asyncio.wait_for(asyncio.shield(waiter), self.config.spend_wait_s)
            return decided.approved
        except TimeoutError:
            log.warning("no spend decision for %s on goal %s: no %s call", run_id, goal_id, purpose)
            return False
        finally:
            self._holds.pop(request.event_id, None)

    async def assess(self, event: WorkflowCompleted) -> list[Event]:
        known = self.state.run(event.run_id)
        if event.run_id in self._assessed or (
            known is not None and (known.assessed or known.quality is not None)
        ):
            return []  # a redelivery: the run has its one assessment
        message = ""
        probability: float | None = None  # of a judge: the router's, with its decision
        if self.assessor.needs_message(event):
            run = await self._run_known(
                event.run_id, lambda r: r.message is not None and r.routed_specialty is not None
            )
            if run is not None:
                message, probability = run.message or "", run.judge_probability
        # The judge is paid by the goal whose answer it grades; a goal at its limit gets none,
        # and a run outside the judge's sample asks for nothing.
        attempt = _attempt(event.event_id)
        may_spend = self.assessor.in_sample(event, probability) and await self.hold(
            event.goal_id,
            event.run_id,
            "judge",
            judge_messages(message, event.text),
            JUDGE_MAX_TOKENS,
            cause=attempt,
        )
        asked = judge_messages(message, event.text)

        async def judged_late(outcome: Completion | LLMError) -> None:
            # The judge's call went on past the timeout; the run was assessed without it.
            # What it cost is counted now, under the attempt's one cost id.
            late = self._judge_report(event, attempt, asked, outcome)
            await self.ctx.producer.deliver([late], what=f"the late judge cost of {event.run_id}")

        result = await self.assessor.assess(
            event,
            message,
            may_spend=may_spend,
            late=judged_late,
            request_id=_cost_id(_hold_id(attempt, "judge")),
            probability=probability,
        )
        now = self.ctx.clock.now()
        out: list[Event] = [
            WorkflowAssessed(
                event_id=str(uuid.uuid5(_NS, f"{event.run_id}:assessed")),
                source=SOURCE,
                run_id=event.run_id,
                goal_id=event.goal_id,
                user_id=event.user_id,
                agent_id=event.agent_id,
                specialty=event.specialty,
                quality=result.quality,
                method=result.method,
                cost_usd=event.cost_usd,
                occurred_at=now,
            )
        ]
        if not result.judge_settling and (
            result.judge_call is not None or result.judge_error is not None
        ):
            out.append(
                self._llm_call(
                    event.run_id,
                    event.goal_id,
                    "judge",
                    result.judge_call,
                    result.judge_error,
                    cause=attempt,
                )
            )
        if self.assessor.in_sample(event, probability):
            model = (
                (self.config.judge_model or self.model)
                if result.judge_call is None
                else (result.judge_call.model)
            )
            out += self._earlier_attempts(
                event.run_id,
                event.goal_id,
                "judge",
                cause=attempt,
                estimate=self._estimate(
                    event.goal_id, "judge", judge_messages(message, event.text), model
                ),
                model=model,
            )
        self._assessed[event.run_id] = None
        if len(self._assessed) > 100_000:
            self._assessed.popitem(last=False)
        return out

    def _judge_report(
        self,
        event: WorkflowCompleted,
        attempt: str,
        asked: list[dict[str, str]],
        outcome: Completion | LLMError,
    ) -> LlmCallCompleted:
        """The report of a judge call that ended after its caller gave up on it."""
        call = outcome if isinstance(outcome, Completion) else None
        error = None if call else f"{type(outcome).__name__}: {outcome}"
        worst = None
        if isinstance(outcome, LLMUnsettled):
            # Whether the endpoint billed it is not known: counted at its worst case.
            model = self.config.judge_model or self.model
            worst = worst_case_usd(self.prices, model, asked, JUDGE_MAX_TOKENS)
        return self._llm_call(
            event.run_id, event.goal_id, "judge", call, error, cause=attempt, counted_at=worst
        )

    def _llm_call(
        self,
        run_id: str,
        goal_id: str,
        purpose: Literal["judge", "improvement"],
        call: Completion | None,
        error: str | None,
        *,
        cause: str,
        counted_at: float | None = None,
    ) -> LlmCallCompleted:
        """The report of a platform call: ``call``'s cost, or (no call) ``counted_at`` for a
        call whose outcome is not known, or nothing."""
        # Judging an answer and rewriting feedback serve one goal's run: that goal pays,
        # within its max_daily_cost, like its own answers.
        event = LlmCallCompleted(
            # One id per attempt, derived from its hold (see _attempt): a resent report
            # counts once, a second call made for a redelivered cause counts too.
            event_id=_cost_id(_hold_id(cause, purpose)),
            source=SOURCE,
            run_id=run_id,
            goal_id=goal_id,
            model=call.model if call else (self.config.judge_model or "unknown"),
            purpose=purpose,
            prompt_tokens=call.prompt_tokens if call else 0,
            completion_tokens=call.completion_tokens if call else 0,
            cost_usd=call.cost_usd if call else (counted_at or 0.0),
            latency_ms=call.latency_ms if call else 0.0,
            ok=call is not None or counted_at is not None,
            error=None if call is not None else (error or "")[:500],
            occurred_at=self.ctx.clock.now(),
        )
        # At once: the next call must see this one's cost. It counts as reported only once
        # the view reads it back from the log: a snapshot taken before it was sent, then a
        # kill, once restored a state in which the next attempt took this paid call for
        # reported and never counted it (an attempt of this process is known by _mine).
        self.state.spend.apply(event)
        if call is not None:  # a real cost paid: what an unreported call is counted at
            self._last_cost.paid(goal_id, purpose, call.cost_usd)
        return event

    def _earlier_attempts(
        self,
        run_id: str,
        goal_id: str,
        purpose: Literal["judge", "improvement"],
        *,
        cause: str,
        estimate: float,
        model: str,
    ) -> list[LlmCallCompleted]:
        """Calls of earlier attempts at this run's platform calls that never reported.

        An attempt whose hold the budget approved may have paid its call and died before
        its report (a kill between the two). Its hold is on the log, so the next attempt
        counts it: at ``estimate`` (this attempt's cost, or the last one of the purpose),
        under the cost id that attempt's own report would carry, so a report that comes
        after all (a paused instance) counts once. An attempt killed after the approval
        but before its call is counted too, erring on the side of the cap.
        """
        own = _hold_id(cause, purpose)
        out: list[LlmCallCompleted] = []
        for hold in self._holds_of(goal_id, run_id):
            cost_id = _cost_id(hold)
            if hold == own or hold in self._mine or self._was_reported(goal_id, cost_id):
                continue
            event = LlmCallCompleted(
                event_id=cost_id,
                source=SOURCE,
                run_id=run_id,
                goal_id=goal_id,
                model=model,
                purpose=purpose,
                cost_usd=estimate,
                ok=True,
                error="an earlier attempt's hold was approved and its cost never reported;"
                " counted at the cost of this attempt's call or the last one",
                occurred_at=self.ctx.clock.now(),
            )
            self.state.spend.apply(event)
            self._mine[hold] = None  # counted now; reported once the view reads it back
            out.append(event)
        return out

    def _was_reported(self, goal_id: str, cost_id: str) -> bool:
        return bool(self._reported.get(goal_id, cost_id) or self._reported.get("", cost_id))

    def _holds_of(self, goal_id: str, run_id: str) -> list[str]:
        """The approved holds of the run's platform calls (an older snapshot's: no goal)."""
        holds = self._run_holds.get(goal_id, run_id) or []
        return holds + (self._run_holds.get("", run_id) or [])

    def _estimate(
        self,
        goal_id: str | None,
        purpose: str,
        messages: list[dict[str, str]],
        model: str,
        max_tokens: int = JUDGE_MAX_TOKENS,
    ) -> float:
        """What an unreported call of ``purpose`` is counted at: the goal's last one's cost,
        or the call's worst case when none is known yet."""
        last = self._last_cost.get(goal_id, purpose)
        return (
            last if last is not None else worst_case_usd(self.prices, model, messages, max_tokens)
        )

    # -- feedback ----------------------------------------------------------------
    async def check_owner(self, run_id: str, user_id: str, goal_id: str | None = None) -> RunInfo:
        """The run, when ``user_id`` owns it and (``goal_id`` given) it is of that goal.

        The owner is the run's first (see :meth:`ImprovementState.apply`); a goal named by
        the feedback (the key's, on HTTP) must be the run's, so feedback never proposes a
        change for a goal its sender does not speak for.
        """
        run = await self._run_known(run_id, lambda r: r.user_id is not None)
        if run is None or run.user_id is None:
            raise UnknownRun(f"unknown run {run_id!r}: no request with this run id was seen")
        if run.user_id != user_id:
            raise NotRunOwner(f"user {user_id!r} does not own run {run_id!r}; only its owner may")
        if goal_id is not None and run.goal_id != goal_id:
            raise NotRunOwner(
                f"run {run_id!r} is not of goal {goal_id!r}; feedback stays in its goal"
            )
        return run

    def check_rate(
        self, goal_id: str | None, user_id: str, feedback_id: str, now: datetime
    ) -> None:
        """Refuse (RateLimited) a user's feedback past the limit in the window before ``now``.

        ``now`` is this service's clock, never the feedback's own ``occurred_at``: that is the
        sender's choice, and feedback stamped an hour ahead (or spread over the past and the
        future) found no feedback in its window and passed the limit every time.
        """
        window = timedelta(seconds=self.config.feedback_window_s)
        since = now - window
        recent = self.state.feedback_count(goal_id, user_id, since, excluding=feedback_id)
        if recent >= self.config.feedback_limit:
            raise RateLimited(
                f"user {user_id!r} sent {self.config.feedback_limit} feedback in the last"
                f" {self.config.feedback_window_s / 60:g} minutes, the limit; try again later"
            )

    async def identify(self, key: str) -> Identity | None:
        return await identify_reading(self.state.keys, key, self._http_keys)

    async def _sync_keys(self) -> None:
        if self._view is not None:
            await self._view.sync(KEY_TOPICS, timeout=2.0)

    async def _operator_now(self, user_id: str | None) -> bool:
        """Whether ``user_id`` is an operator, the key topics read up to now first: an
        operator key issued just before the command counts, one revoked just before it
        does not (commands are few; each costs a read of the key topics' ends)."""
        if user_id is None:
            return False
        if user_id in self.config.operators:
            return True
        await self._command_keys()
        return self.is_operator(user_id)

    def _view_event(self, event: Event) -> None:
        if isinstance(event, SpendDecided):
            self._decided[event.request_id] = event.approved
            if len(self._decided) > 10_000:
                self._decided.popitem(last=False)
            if event.approved and event.run_id:
                holds = self._run_holds.get(event.goal_id, event.run_id)
                if holds is None:
                    self._run_holds.put(event.goal_id, event.run_id, [event.request_id])
                elif event.request_id not in holds:
                    holds.append(event.request_id)
            hold = self._holds.get(event.request_id)
            if hold is not None and not hold.done():
                hold.set_result(event)
            return
        if isinstance(event, LlmCallCompleted) and event.purpose in ("judge", "improvement"):
            self._reported.put(event.goal_id, event.event_id, True)
            if event.ok and event.error is None and event.cost_usd > 0:
                # A paid call's real cost (not an estimate): what an unreported one of the
                # same purpose is counted at, also by an instance that just started.
                self._last_cost.paid(event.goal_id, event.purpose, event.cost_usd)
        self.state.apply(event)
        if isinstance(event, FeedbackDecided | PromotionDecided):
            waiter = self._waiters.get(
                event.feedback_id if isinstance(event, FeedbackDecided) else event.request_id
            )
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    def dump(self) -> dict[str, Any]:
        """What the view folded, as plain values (for a snapshot)."""
        return {
            "state": self.state.dump(),
            "decided": list(self._decided.items()),
            "run_holds": [[run, list(holds), goal] for goal, run, holds in self._run_holds.items()],
            "reported": [[cost_id, goal] for goal, cost_id, _ in self._reported.items()],
            "last_cost": self._last_cost.dump(),
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace what the view folded with a :meth:`dump`; nothing changes if it fails."""
        decided = OrderedDict((str(i), bool(ok)) for i, ok in data["decided"])
        run_holds: PerGoal[str, list[str]] = PerGoal(_RUN_HOLDS_PER_GOAL, _RUN_HOLDS)
        for run, holds, *goal in data.get("run_holds", []):  # an older one's name no goal
            run_holds.put(str(goal[0]) if goal else "", str(run), [str(h) for h in holds])
        reported: PerGoal[str, bool] = PerGoal(_REPORTED_PER_GOAL, _REPORTED)
        for row in data.get("reported", []):  # an older snapshot's: cost ids, no goal
            cost_id, goal = (row, "") if isinstance(row, str) else row
            reported.put(str(goal), str(cost_id), True)
        last_cost = LastCosts()
        last_cost.restore(data["last_cost"])
        self.state.restore(data["state"])
        self._decided = decided
        self._run_holds = run_holds
        self._reported = reported
        self._last_cost = last_cost

    async def verdict(
        self, request_id: str, timeout: float
    ) -> FeedbackDecided | PromotionDecided | None:
        """The verdict on a feedback or promotion request, once the view has read it."""
        waiter = self._waiters.setdefault(request_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return None
        finally:
            self._waiters.pop(request_id, None)

    async def approve(
        self, improvement_id: str, user_id: str, scope: PromotionScope = "goal"
    ) -> PromotionRequested:
        """HTTP: an operator approves a goal's proposal waiting for review into the goal's
        canary (``scope="goal"``), or asks for a goal's saved improvement to serve every
        goal (``scope="all"``); :meth:`on_promotion` decides."""
        if (
            self.state.pending.get(improvement_id) is None
            and self.state.improvement(improvement_id) is None
        ):
            raise PromotionRefused(f"unknown improvement {improvement_id!r}")
        event = PromotionRequested(
            source=SOURCE,
            user_id=user_id,
            improvement_id=improvement_id,
            scope=scope,
            occurred_at=self.ctx.clock.now(),
        )
        await self._send_awaited(event)
        return event

    async def _send_awaited(self, event: FeedbackReceived | PromotionRequested) -> None:
        """Send a request whose verdict the caller waits for next (:meth:`verdict`, which
        removes the waiter). Waiting starts before sending, as the verdict may be read
        before send() returns; a request that was not sent leaves no waiter behind."""
        self._waiters[event.event_id] = asyncio.get_running_loop().create_future()
        try:
            await self.ctx.producer.send(event)
        except BaseException:
            self._waiters.pop(event.event_id, None)
            raise

    async def submit(
        self,
        run_id: str,
        user_id: str,
        score: int | None,
        text: str,
        channel: str,
        goal_id: str | None = None,
        *,
        wait: bool = False,
        event_id: str | None = None,
    ) -> FeedbackReceived:
        """HTTP and Slack: refuse early with the reason, else send ``feedback_received``.

        ``goal_id``: the caller's key is for this goal; a run of another goal is refused.
        ``wait``: the caller waits for the verdict next (:meth:`verdict`); without it
        (Slack answers at once) nothing is kept for the verdict. ``event_id``: derived
        from the request (Slack's signature), so one sent again is decided once.
        """
        now = self.ctx.clock.now()
        event = feedback_event(
            run_id,
            user_id=user_id,
            score=score,
            text=text,
            channel=channel,
            source=SOURCE,
            at=now,
            event_id=event_id,
        )
        run = await self.check_owner(run_id, user_id, goal_id)
        self.check_rate(run.goal_id, user_id, event.event_id, now)
        event = event.model_copy(update={"goal_id": run.goal_id})
        if wait:
            await self._send_awaited(event)
        else:
            await self.ctx.producer.send(event)
        return event

    def _dead_letter(
        self, event: Event, delivery: Delivery, reason: str, error_type: str
    ) -> DeadLetter:
        """A valid event this service refuses to apply: kept, with the reason, not dropped;
        an excerpt of it (:func:`streams.kafka.dead_letter`), so a large one still makes a
        dead letter the broker takes, and where the whole record is."""
        letter = dead_letter(
            source=SOURCE,
            topic=delivery.topic,
            partition=delivery.partition,
            offset=delivery.offset,
            key=event.key(),
            payload=self.ctx.producer.codec.encode(event),
            reason=reason,
            error_type=error_type,
        )
        return letter.model_copy(update={"occurred_at": self.ctx.clock.now()})

    def _verdict(
        self,
        event: FeedbackReceived,
        accepted: bool,
        reason: str,
        goal_id: str | None = None,
        improvement_id: str | None = None,
        error_type: str | None = None,
    ) -> FeedbackDecided:
        return FeedbackDecided(
            event_id=str(uuid.uuid5(_NS, f"{event.event_id}:decided")),
            source=SOURCE,
            run_id=event.run_id,
            goal_id=goal_id,
            user_id=event.user_id,
            feedback_id=event.event_id,
            accepted=accepted,
            reason=reason[:1000],
            error_type=error_type,
            improvement_id=improvement_id,
            occurred_at=self.ctx.clock.now(),
        )

    async def _instructions(
        self, event: FeedbackReceived, run: RunInfo, specialty: str, out: list[Event]
    ) -> tuple[list[str], str]:
        """The vetted instructions this feedback asks for, and how they were found.

        With an LLM (and budget left on the run's goal) the model turns the feedback into
        one short instruction; otherwise only the named adjustments apply. User text never
        reaches a system prompt itself. Raises FeedbackRefused when the guard says no.
        """
        messages = instruction_messages(specialty, event.score, event.text)
        attempt = _attempt(event.event_id)
        if self.llm is not None and await self.hold(
            run.goal_id, run.run_id, "improvement", messages, 120, cause=attempt
        ):
            assert run.goal_id is not None
            call: Completion | None = None
            error: str | None = None
            instruction: str | None = None
            try:
                call = await self.llm.complete(messages, temperature=0.0, max_tokens=120)
                instruction = clean_instruction(call.text)
            except LLMError as exc:
                error = f"{type(exc).__name__}: {exc}"
            out.append(
                self._llm_call(run.run_id, run.goal_id, "improvement", call, error, cause=attempt)
            )
            model = call.model if call is not None else self.model
            out += self._earlier_attempts(
                run.run_id,
                run.goal_id,
                "improvement",
                cause=attempt,
                estimate=self._estimate(
                    run.goal_id, "improvement", messages, model, max_tokens=120
                ),
                model=model,
            )
            if call is not None:
                if instruction is None:
                    return _named(event)  # nothing usable from the model: these still apply
                verdict = guard_instruction(instruction)
                if not verdict.ok:
                    raise FeedbackRefused(f"the change it asks for was refused: {verdict.why}")
                if copies_text(instruction, event.text):
                    # The model handed the user's words back: saved, they would be the
                    # user's text in the prompt verbatim, which the guard alone cannot vet.
                    # The platform's own wording of what it asks for still applies.
                    named = _named(event)
                    if named[0]:
                        return named
                    raise FeedbackRefused(
                        "the change it asks for was refused: the model's instruction copies"
                        " the feedback instead of rewording it"
                    )
                return [instruction], "llm"
        return _named(event)

    async def on_feedback(self, event: FeedbackReceived, delivery: Delivery) -> list[Event]:
        if self.state.feedback_decided(event.event_id) or event.event_id in self._deciding:
            # Decided already: read again after a crash, or a signed Slack command sent
            # again to another instance. No second verdict, no second paid call. Only a
            # verdict read from the log counts (and this process's own decisions under
            # way): a snapshot taken while the first was decided holds no verdict for it.
            # Before the checks: the rate is this service's clock's (check_rate), so one
            # read again later could be refused where the verdict on the log accepted it.
            log.info("feedback %s was decided already", event.event_id)
            return []
        now = self.ctx.clock.now()
        try:
            run = await self.check_owner(event.run_id, event.user_id, event.goal_id)
            self.check_rate(run.goal_id, event.user_id, event.event_id, now)
        except FeedbackRefused as exc:
            log.warning("feedback %s refused: %s", event.event_id, exc)
            return [
                self._verdict(event, False, str(exc), error_type=type(exc).__name__),
                self._dead_letter(event, delivery, str(exc), type(exc).__name__),
            ]
        self._deciding[event.event_id] = None
        while len(self._deciding) > 10_000:
            self._deciding.popitem(last=False)
        self.state.note_feedback(run.goal_id, event.user_id, event.event_id, now)
        specialty = run.workflow_id
        if not wants_improvement(event.score, event.text) or not specialty or not run.goal_id:
            return [self._verdict(event, True, "recorded; it asks for no change", run.goal_id)]
        if not is_specialty_name(specialty):
            # A run routed before pinned names were checked: no workflow is named after it.
            why = (
                "recorded; no prompt can change from it: its run's specialty"
                f" {specialty[:60]!r} is not a specialty name"
            )
            return [self._verdict(event, True, why, run.goal_id)]
        out: list[Event] = []
        try:
            instructions, how = await self._instructions(event, run, specialty, out)
        except FeedbackRefused as exc:
            log.warning("feedback %s refused: %s", event.event_id, exc)
            verdict = self._verdict(
                event, False, str(exc), run.goal_id, error_type=type(exc).__name__
            )
            return [*out, verdict]
        workflow = goal_workflow(run.goal_id, specialty)
        current = self.state.current_instructions(workflow)
        added = [i for i in instructions if i not in current]
        if not added:
            why = (
                "recorded; its goal's prompt already says what it asks"
                if instructions
                else ("recorded; no change could be drawn from it")
            )
            return [*out, self._verdict(event, True, why, run.goal_id)]
        improvement_id = f"imp_{uuid.uuid5(_NS, event.event_id).hex[:16]}"
        scored = f"score {event.score}" if event.score is not None else "no score"
        # What the LLM wrote from a user's words serves the goal's other users too: no rule
        # refuses every harmful paraphrase, so it waits for an operator unless one wrote it.
        review = (
            how == "llm"
            and self.config.review
            # A user key under an operator's name (ORCH_OPERATORS as this service reads it,
            # not as the shell that made the key did) is a tenant's user all the same.
            and (
                self.state.keys.holds_user_key(event.user_id)
                or not await self._operator_now(event.user_id)
            )
        )
        out.append(
            ImprovementAvailable(
                event_id=str(uuid.uuid5(_NS, f"{event.event_id}:available")),
                source=SOURCE,
                run_id=run.run_id,
                goal_id=run.goal_id,
                user_id=event.user_id,
                improvement_id=improvement_id,
                workflow_id=workflow,
                kind=REVIEW_KIND if review else "instructions",
                proposal=join_instructions(added),
                reason=f"{how} from feedback on run {run.run_id} ({scored})"[:1000],
                occurred_at=self.ctx.clock.now(),
            )
        )
        said = "; ".join(added)
        then = (
            f"; it waits for an operator's approval (orchestrator improve approve {improvement_id})"
            if review
            else ""
        )
        out.append(
            self._verdict(
                event,
                True,
                f"improvement {improvement_id} proposed for goal {run.goal_id} ({specialty}):"
                f" {said}{then}"[:1000],
                run.goal_id,
                improvement_id,
            )
        )
        return out

    def is_operator(self, user_id: str | None) -> bool:
        return user_id is not None and (
            user_id in self.config.operators or self.state.keys.is_operator(user_id)
        )

    async def on_promotion(self, event: PromotionRequested) -> list[Event]:
        """An operator's command on an improvement; each scope is its own request.

        ``goal`` (approve): a goal's proposal waiting for review goes to that goal's canary;
        one already saved stays as it is and the verdict says where it is. ``all``
        (promote): an improvement saved for one goal serves every goal (as a canary first).
        Until 2026-12-06 approving a saved improvement again promoted it, so a retried
        approval put one tenant's LLM-written instruction into every tenant's prompts.
        """
        if not await self._operator_now(event.user_id):
            what = "promoting" if event.scope == "all" else "approving"
            why = _not_operator(event.user_id, f"{what} an improvement")
            return [self._promotion_verdict(event, False, why, "NotOperator")]
        assert self._view is not None
        await self._sync_versions()
        # A proposal made a moment ago may not be in the view yet.
        await self._view.sync((ImprovementAvailable.topic,), timeout=10.0)
        saved = self.state.improvement(event.improvement_id)
        waiting = self.state.pending.get(event.improvement_id)
        if saved is None and waiting is None:
            why = f"unknown improvement {event.improvement_id!r}"
            return [self._promotion_verdict(event, False, why, "PromotionRefused")]
        if event.scope == "all":
            if saved is None:
                assert waiting is not None
                why = (
                    f"{event.improvement_id} waits for review in goal {waiting.goal_id}'s"
                    f" {waiting.workflow_id} and was never approved: approve it first"
                    f" (orchestrator improve approve {event.improvement_id}); once it is saved"
                    " for that goal it may be promoted"
                )
                return [self._promotion_verdict(event, False, why, "PromotionRefused")]
            return self._promote(event, saved)
        if saved is not None:
            # Approved already (or saved without review): a retry changes nothing.
            goal, _ = goal_of(saved.workflow_id)
            then = (
                f"; to make it serve every goal run `orchestrator improve promote"
                f" {event.improvement_id}`"
                if goal is not None
                else "; it serves every goal"
            )
            why = (
                f"{event.improvement_id} is already approved: saved as {self._where(saved)};"
                f" nothing changed{then}"
            )
            return [self._promotion_verdict(event, True, why, workflow_id=saved.workflow_id)]
        assert waiting is not None
        ledger = self.state.flows.get(waiting.workflow_id)
        if ledger is not None and ledger.state.canary is not None:
            # The single writer would skip it (one canary at a time) and the approval
            # would be lost: it stays waiting, and says when to approve it.
            why = (
                f"goal {waiting.goal_id}'s {waiting.workflow_id} is measuring canary"
                f" v{ledger.state.canary}; {event.improvement_id} waits: approve it again"
                " once that canary is decided"
            )
            return [self._promotion_verdict(event, False, why, "PromotionRefused")]
        # A goal's proposal waiting for review: approved, it goes to that goal's canary.
        return [
            ImprovementAvailable(
                event_id=str(uuid.uuid5(_NS, f"{event.event_id}:available")),
                source=SOURCE,
                run_id=waiting.run_id,
                goal_id=waiting.goal_id,
                user_id=event.user_id,
                improvement_id=event.improvement_id,
                workflow_id=waiting.workflow_id,
                kind="instructions",
                proposal=waiting.proposal,
                reason=f"approved by operator {event.user_id}: {event.reason}"[:1000],
                occurred_at=self.ctx.clock.now(),
            ),
            self._promotion_verdict(
                event,
                True,
                f"{event.improvement_id} goes to goal {waiting.goal_id}'s {waiting.workflow_id}"
                " as a canary; it serves no other goal unless an operator promotes it"
                f" (orchestrator improve promote {event.improvement_id})",
                workflow_id=waiting.workflow_id,
            ),
        ]

    def _promote(self, event: PromotionRequested, saved: WorkflowVersionSaved) -> list[Event]:
        """Scope ``all``: the saved goal improvement's lines proposed to every goal."""
        goal, specialty = goal_of(saved.workflow_id)
        if goal is None:
            why = (
                f"{event.improvement_id} is saved as {self._where(saved)}: it serves every"
                " goal already; nothing changed"
            )
            return [self._promotion_verdict(event, True, why, workflow_id=saved.workflow_id)]
        everyone = f"{event.improvement_id}-all"
        promoted = self.state.improvement(everyone)
        if promoted is not None:
            why = (
                f"{event.improvement_id} is already promoted: saved as {self._where(promoted)};"
                " nothing changed"
            )
            return [self._promotion_verdict(event, True, why, workflow_id=promoted.workflow_id)]
        added = saved.changes.get("added", "")
        if not added:
            why = f"{event.improvement_id} adds no instruction to {saved.workflow_id} to pass on"
            return [self._promotion_verdict(event, False, why, "PromotionRefused")]
        ledger = self.state.flows.get(specialty)
        if ledger is not None and ledger.state.canary is not None:
            # As for an approval: the single writer would skip it and the promotion be lost.
            why = (
                f"the platform-wide {specialty} is measuring canary v{ledger.state.canary};"
                f" promote {event.improvement_id} again once that canary is decided"
            )
            return [self._promotion_verdict(event, False, why, "PromotionRefused")]
        return [
            ImprovementAvailable(
                event_id=str(uuid.uuid5(_NS, f"{event.event_id}:available")),
                source=SOURCE,
                user_id=event.user_id,
                improvement_id=everyone,
                workflow_id=specialty,
                kind="approved",
                proposal=added,
                reason=f"promoted by operator {event.user_id}: {event.reason}"[:1000],
                occurred_at=self.ctx.clock.now(),
            ),
            self._promotion_verdict(
                event,
                True,
                f"{event.improvement_id} goes to every goal of {specialty} (as {everyone},"
                " a canary first)",
                workflow_id=specialty,
            ),
        ]

    def _where(self, saved: WorkflowVersionSaved) -> str:
        """Which version of which workflow ``saved`` is, and what it is now there."""
        goal, _ = goal_of(saved.workflow_id)
        whose = (
            f"goal {goal}'s workflow {saved.workflow_id}"
            if goal is not None
            else f"the platform-wide workflow {saved.workflow_id}"
        )
        ledger = self.state.flows.get(saved.workflow_id)
        rows = {row["version"]: row for row in ledger.listing()} if ledger is not None else {}
        row = rows.get(saved.version)
        now = (
            f" ({row['status'].replace('_', ' ')}, {row['traffic_share']:.0%} of its runs)"
            if row is not None
            else ""
        )
        return f"v{saved.version} of {whose}{now}"

    def _promotion_verdict(
        self,
        event: PromotionRequested,
        accepted: bool,
        reason: str,
        error_type: str | None = None,
        workflow_id: str | None = None,
    ) -> PromotionDecided:
        return PromotionDecided(
            event_id=str(uuid.uuid5(_NS, f"{event.event_id}:decided")),
            source=SOURCE,
            user_id=event.user_id,
            improvement_id=event.improvement_id,
            request_id=event.event_id,
            accepted=accepted,
            reason=reason[:1000],
            error_type=error_type,
            workflow_id=workflow_id,
            occurred_at=self.ctx.clock.now(),
        )

    async def handle_work(self, event: Event, delivery: Delivery) -> None:
        if isinstance(event, WorkflowCompleted):
            out = await self.assess(event)
        elif isinstance(event, FeedbackReceived):
            out = await self.on_feedback(event, delivery)
        elif isinstance(event, PromotionRequested):
            out = await self.on_promotion(event)
        else:
            return
        if out:
            # Until the broker has them: a cost report lost to a failed send was never
            # counted (the cause was dead-lettered and its attempt's hold is this process's).
            await self.ctx.producer.deliver(out, what=f"{event.event_type} results")

    # -- versions (single writer per workflow) ----------------------------------------
    async def _sync_versions(self) -> None:
        assert self._view is not None
        if not await self._view.sync(VERSION_TOPICS, timeout=10.0):
            raise _ViewBehind(f"view did not catch up with {sorted(VERSION_TOPICS)}")

    async def _write(self, decide: Callable[[], list[Event]]) -> list[Event]:
        async with self._write_lock:
            await self._sync_versions()
            events = decide()
            if events:
                await self.ctx.producer.send_many(events)
                for e in events:
                    self.state.apply(e)  # at once: the next decision must see this one
        return events

    def _refused(self, event: ImprovementAvailable) -> str | None:
        """Why ``event`` may never be saved, whatever the workflow holds; None if it may.

        Only what the platform proposes is saved, each kind with its checks:
        ``instructions`` (a goal's, from feedback) in that goal's workflow only;
        ``approved`` (an operator made a goal's change platform-wide) from an operator
        only, and it and ``goal_win`` (enough goals' canaries of it won) in platform-wide
        workflows only; every line they add passes the guard again here, where it is
        written. No kind replaces a system prompt: the platform never proposes one, and
        one saved would serve every goal of the specialty as its canary.
        """
        if event.kind not in _KINDS:
            return (
                f"kind {event.kind[:40]!r} is none the platform proposes"
                f" ({', '.join(_KINDS)}): an improvement adds vetted instructions and never"
                " replaces a system prompt"
            )
        try:
            goal, _ = parse_workflow(event.workflow_id)
        except ValueError as exc:
            return str(exc)
        if event.kind == "instructions" and goal is None:
            return "feedback instructions only change the goal they came from"
        if event.kind != "instructions" and goal is not None:
            return f"{event.kind} changes apply to platform-wide workflows only"
        if event.kind == "approved" and not self.is_operator(event.user_id):
            return _not_operator(event.user_id)
        if event.kind == "goal_win" and not named_only(event.proposal):
            return (
                "a goal's win reaches every goal only with the platform's named adjustments;"
                " other instructions need an operator's approval"
            )
        for line in split_instructions(event.proposal):
            verdict = guard_instruction(line)
            if not verdict.ok:
                return f"instruction refused: {verdict.why}"
        return None

    def _changes(self, event: ImprovementAvailable) -> dict[str, str] | str:
        """What a version of ``event`` (one :meth:`_refused` let through) holds: its vetted
        instructions added to the workflow's current ones, the latest ``MAX_ADJUSTMENTS``
        of them (all the loader serves: a version does not copy every earlier one); or why
        it is not saved now."""
        current = self.state.current_instructions(event.workflow_id)
        fresh = [line for line in split_instructions(event.proposal) if line not in current]
        if not fresh:
            return "the workflow already has these instructions"
        kept = [*current, *fresh][-MAX_ADJUSTMENTS:]
        changes = {"instructions": join_instructions(kept), "added": "\n".join(fresh)}
        if event.kind == "goal_win":
            goals = self.state.wins.get((event.workflow_id, event.proposal), set())
            if len(goals) < self.config.promote_goals:
                return (
                    f"won on {len(goals)} goal(s); {self.config.promote_goals} are needed"
                    " before every goal gets it"
                )
            changes["goals"] = ",".join(sorted(goals))
        return changes

    async def handle_command(self, event: Event, delivery: Delivery) -> None:
        """One version command. One that fails goes to dead_letter with the reason and the
        next is read: the command loop commits only what it handled, so an exception here
        stopped the service and the same command stopped it again at every start."""
        try:
            await self._command(event, delivery)
        except _ViewBehind:
            raise
        except Exception as exc:
            log.exception("%s %s failed; dead-lettered: %s", event.event_type, event.event_id, exc)
            await self.ctx.producer.send(
                failed_letter(
                    event,
                    exc,
                    source=SOURCE,
                    topic=delivery.topic,
                    partition=delivery.partition,
                    offset=delivery.offset,
                    codec=self.ctx.producer.codec,
                )
            )

    async def _command(self, event: Event, delivery: Delivery) -> None:
        now = self.ctx.clock.now
        if isinstance(event, ImprovementAvailable):
            if event.kind == REVIEW_KIND:
                # Waits in the view for an operator (on_promotion); no version is made.
                log.info("improvement %s waits for an operator", event.improvement_id)
                return
            if event.kind == "approved":
                await self._operator_now(event.user_id)  # another instance may know the key
            refused = self._refused(event)
            if refused is not None:
                # Not something the platform proposed: kept on dead_letter for a person to
                # look at, and no ledger is made for its workflow.
                log.warning(
                    "improvement %s on %s refused: %s",
                    event.improvement_id,
                    event.workflow_id[:200],
                    refused,
                )
                await self.ctx.producer.send(
                    self._dead_letter(event, delivery, refused, "ImprovementRefused")
                )
                return
            source: ChangeSource = (
                "automated" if event.kind == "goal_win" else "user" if event.user_id else "system"
            )
            if event.kind == "goal_win":
                self.state.apply(event)  # count the win before deciding on it
            refusal: list[str] = []

            def decide() -> list[Event]:
                changes = self._changes(event)
                if isinstance(changes, str):
                    refusal.append(changes)
                    return []
                return self.state.flow(event.workflow_id).propose(
                    event,
                    now=now(),
                    share=self.config.canary.share,
                    source=source,
                    changes=changes,
                )

            done = await self._write(decide)
            ledger = self.state.flows.get(event.workflow_id)
            if refusal:
                log.info(
                    "improvement %s on %s not saved: %s",
                    event.improvement_id,
                    event.workflow_id,
                    refusal[0],
                )
            elif not done and ledger is not None and ledger.state.canary is not None:
                # One canary at a time, or neither could be measured; the proposal stays
                # in the log as improvement_available for a person to look at.
                log.info(
                    "improvement %s on %s skipped: canary v%s is still being measured",
                    event.improvement_id,
                    event.workflow_id,
                    ledger.state.canary,
                )
        elif isinstance(event, RollbackRequested):
            if not await self._operator_now(event.user_id):
                reason = _not_operator(event.user_id, "rolling a workflow back")
                log.warning("rollback refused: %s", reason)
                await self.ctx.producer.send(
                    self._dead_letter(event, delivery, reason, "NotOperator")
                )
                return
            known = self.state.flows.get(event.workflow_id)  # none is made for a made-up one
            if known is None or not known.knows(event.to_version):
                reason = f"workflow {event.workflow_id[:200]!r} has no version {event.to_version}"
                log.warning("rollback refused: %s", reason)
                await self.ctx.producer.send(
                    self._dead_letter(event, delivery, reason, "UnknownVersion")
                )
                return
            reason = event.reason or f"requested by {event.user_id or 'an operator'}"
            await self._write(
                lambda: known.rollback(
                    event.to_version, now=now(), source="user", reason=reason, user_id=event.user_id
                ),
            )

    async def evaluate(self) -> None:
        """Decide on what changed since last time, for the keys this instance owns."""
        if self._refresh_ownership():
            self.state.dirty_signatures.update(self.state.learner)
            self.state.dirty_flows.update(self.state.flows)
        signatures, self.state.dirty_signatures = self.state.dirty_signatures, set()
        events: list[Event] = []
        for signature in signatures:
            if self.owns(signature):
                events.extend(self.state.learner.earned(signature))
        if events:
            try:
                await self.ctx.producer.deliver(events, what="pattern decisions")
            except BaseException:
                self.state.dirty_signatures |= signatures  # decided next time instead
                raise
            # Marked once on the log: marked before, a failed send was never retried and a
            # snapshot taken meanwhile kept a decision the log never got.
            for event in events:
                self.state.learner.learn(event)
        flows, self.state.dirty_flows = self.state.dirty_flows, set()
        for workflow_id in flows:
            if not self.owns(workflow_id):
                continue
            ledger = self.state.flow(workflow_id)
            if ledger.state.canary is None:
                continue
            decided = await self._write(self._judge(workflow_id))
            if decided:
                log.info("workflow %s: %s", workflow_id, ", ".join(e.event_type for e in decided))

    def _judge(self, workflow_id: str) -> Callable[[], list[Event]]:
        ledger = self.state.flow(workflow_id)

        def decide() -> list[Event]:
            canary = ledger.state.canary
            verdict, events = ledger.evaluate(self.ctx.clock.now(), self.config.canary)
            goal, specialty = goal_of(workflow_id)
            saved = ledger.versions.get(canary) if canary is not None else None
            added = saved.changes.get("added") if saved is not None else None
            beat = (
                verdict is not None
                and verdict.action == "promote"
                and verdict.p_better is not None
                and verdict.p_better < self.config.canary.alpha
            )
            if verdict is not None and beat and goal is not None and added and named_only(added):
                # A goal's change counts towards every goal having it only when it is the
                # platform's own words (an LLM-written line from one goal's feedback reaches
                # other goals only by an operator's approval) and it beat the goal's
                # baseline outright, not merely "not worse": goals are counted by id, and
                # one party may hold several.
                events.append(
                    ImprovementAvailable(
                        event_id=str(uuid.uuid5(_NS, f"{workflow_id}:win:{canary}")),
                        source=SOURCE,
                        goal_id=goal,
                        improvement_id=f"win_{uuid.uuid5(_NS, f'{specialty}:{added}').hex[:16]}",
                        workflow_id=specialty,
                        kind="goal_win",
                        proposal=added,
                        reason=f"goal {goal}: {verdict.reason}"[:1000],
                        occurred_at=self.ctx.clock.now(),
                    )
                )
            return events

        return decide

    async def _evaluate_forever(self, sweep_every_s: float = 300.0) -> None:
        assert self._view is not None
        last_sweep = self.ctx.clock.monotonic()
        while True:
            if self.ctx.clock.monotonic() - last_sweep >= sweep_every_s:
                last_sweep = self.ctx.clock.monotonic()
                forgotten = self.state.learner.sweep()
                log.debug("forgot %d signatures with no recent runs", forgotten)
            # At least once a second: a rebalance changes ownership without any new event.
            await self._view.changed(1.0)
            try:
                await self.evaluate()
            except Exception:
                log.exception("evaluation failed; retrying on the next change")

    # -- running -----------------------------------------------------------------
    async def _serve_http(self) -> web.AppRunner | None:
        if self.config.http_port is None:
            log.info("feedback HTTP endpoint disabled (ORCH_IMPROVE_PORT=off)")
            return None
        if self.config.slack is None:
            log.info("Slack /improve disabled: SLACK_SIGNING_SECRET is not set")
        app = build_app(
            self,
            self.config.slack,
            max_in_flight=self.config.max_in_flight,
            key_share=self.config.key_share,
        )
        runner = build_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, self.config.http_host, self.config.http_port)
        try:
            await site.start()
        except OSError as exc:
            # Another instance on this host has the port; this one still does the Kafka work.
            log.error(
                "feedback HTTP endpoint not started on port %s: %s", self.config.http_port, exc
            )
            await runner.cleanup()
            return None
        self.http_port = int(runner.addresses[0][1])  # the real one when asked for port 0
        if self.config.port_file is not None:
            self.config.port_file.parent.mkdir(parents=True, exist_ok=True)
            self.config.port_file.write_text(f"{self.http_port}\n")
        log.info("feedback endpoint on http://%s:%s/improve", self.config.http_host, self.http_port)
        return runner

    async def run(self) -> None:
        ctx = self.ctx
        # A view only skips bytes it cannot decode; the topic's own consumers dead-letter them.
        snapshots = Snapshotter(
            SnapshotStore(ctx.settings, SOURCE),
            SNAPSHOT_VERSION,
            self.dump,
            self.restore,
            upgrades=_UPGRADES,
        )
        # The view is what learning and the tables read: batched fetches, off the answer's path.
        view = TopicView(
            ctx.settings,
            VIEW_TOPICS,
            self._view_event,
            source=SOURCE,
            resume=snapshots.resume,
            **BACKGROUND_FETCH,
        )
        work = EventConsumer(
            ctx.settings, WORK_TOPICS, group_id=ctx.group, producer=ctx.producer, source=SOURCE
        )
        commands = EventConsumer(
            ctx.settings,
            COMMAND_TOPICS,
            group_id=f"{ctx.group}.versions",
            producer=ctx.producer,
            source=SOURCE,
            # Partition p of both command topics on one instance: one writer per workflow.
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        self._view = view
        self._commands = commands
        tasks: list[asyncio.Task[None]] = []
        reading: list[asyncio.Task[None]] = []  # the view and what snapshots it
        runner: web.AppRunner | None = None
        try:
            await view.start()
            reading.append(asyncio.create_task(view.wait(), name="improvement-view"))
            reading.append(asyncio.create_task(snapshots.run(view), name="improvement-snapshots"))
            await asyncio.wait_for(view.ready.wait(), 120)
            log.info(
                "improvement caught up: %d runs, %d workflows",
                len(self.state.runs),
                len(self.state.flows),
            )
            await work.start()
            await commands.start()
            tasks.append(asyncio.create_task(work.run_concurrently(self.handle_work)))
            tasks.append(asyncio.create_task(commands.run(self.handle_command)))
            tasks.append(asyncio.create_task(self._evaluate_forever()))
            runner = await self._serve_http()
            done, _ = await asyncio.wait(tasks + reading, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            # The work first, while the view still reads: a handler finishing on a stop may
            # wait for what only the view brings (the budget's decision on a judge's hold),
            # and with the view stopped first it waited out the drain instead.
            for group in (tasks, reading):
                for task in group:
                    task.cancel()
                await asyncio.gather(*group, return_exceptions=True)
            if runner is not None:
                await runner.cleanup()
                if self.config.port_file is not None:  # nobody serves on it any more
                    self.config.port_file.unlink(missing_ok=True)
            await snapshots.stop()
            # Stopping a consumer that never started (or failed to) is harmless.
            for consumer in (commands, work, view):
                await consumer.stop()


async def serve(
    ctx: ServiceContext,
    stop: asyncio.Event,
    *,
    config: ImprovementConfig | None = None,
    llm: LLMClient | None = None,
) -> None:
    """Run the service until ``stop``; tests pass a config and an in-memory LLM."""
    service = ImprovementService(ctx, config or ImprovementConfig.from_env(), llm)
    runner = asyncio.create_task(service.run())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()
    finally:
        stopper.cancel()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def main(ctx: ServiceContext, stop: asyncio.Event) -> None:
    llm = create_llm(LLMSettings.from_env(), ctx.clock)
    if llm is None:
        log.info("no LLM endpoint: assessing by world truth or heuristic, improving by template")
    try:
        await serve(ctx, stop, llm=llm)
    finally:
        if llm is not None:
            await llm.aclose()


def _named(event: FeedbackReceived) -> tuple[list[str], str]:
    """The platform's own named adjustments the feedback asks for, and how they were found."""
    names = match_adjustments(event.text, event.score)
    return [ADJUSTMENTS[n] for n in names], "named adjustments " + ", ".join(names)


def _not_operator(user_id: str | None, what: str = "approving an improvement") -> str:
    return f"{what} needs an operator; {user_id or 'nobody'!r} is not one"
