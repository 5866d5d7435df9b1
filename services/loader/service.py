"""The loader: runs admitted tasks on lazily loaded agents through the LLM, and answers.

``task_admitted`` is keyed by agent_id, so an agent lives on one loader at a
time. Each task ends in exactly one terminal event whose event_id is derived
from the run_id: a task replayed after a crash produces the same event id, and
every reader (client, budget, analytics) treats the two as one. A run is its goal's:
what is known of runs here (answered, running, paid for) is by goal and run id, so a
run id another goal used too never stands for this goal's run.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from datetime import datetime
from typing import Any

from services.loader.pool import AgentInstance, AgentPool
from services.loader.settings import LoaderSettings
from services.loader.tiers import keyword_answer, static_answer
from services.loader.versions import Served, WorkflowVersions
from streams.clock import Clock
from streams.ended import EndedRuns, failed_call_id, follow_recent
from streams.events import (
    AgentEvicted,
    AgentLoaded,
    AgentRetired,
    AgentSpawned,
    Event,
    FailureReason,
    GoalAgentsChanged,
    ImprovementApplied,
    ImprovementRolledBack,
    LlmCallCompleted,
    TaskAdmitted,
    TaskRequested,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowVersionSaved,
    terminal_event_id,
)
from streams.kafka import Delivery, EventConsumer
from streams.llm import (
    Completion,
    LastCosts,
    LLMClient,
    LLMError,
    LLMRejected,
    LLMSettings,
    LLMUnavailable,
    LLMUnsettled,
    create_llm,
    worst_case_usd,
)
from streams.registry import AgentRecord, RegistryView
from streams.runtime import ServiceContext, until_stopped
from streams.specialties import default_prompt, profile_for
from streams.topics import partition_for, spec_for
from streams.views import TopicView
from streams.workflows import with_adjustments

__all__ = ["Breaker", "Loader", "main"]

log = logging.getLogger(__name__)
SOURCE = "loader"
# The longest answer a terminal event carries: with the run's ids and meta it stays well
# inside a Kafka record's default limit (1 MB), whatever the endpoint sent.
MAX_ANSWER_BYTES = 256 * 1024
_NS = uuid.UUID("0f3e9a8c-2d41-4c6b-9a77-3b1d5e2f8c90")


def _cost_id(attempt: str, legacy: bool) -> str:
    return str(uuid.uuid5(_NS, f"{attempt}:cost:{int(legacy)}"))


def _run_of(task: TaskAdmitted) -> tuple[str, str]:
    """The task's run: its goal and run id (another goal may use the same run id)."""
    return task.goal_id, task.run_id


class Breaker:
    """Stop calling an LLM that keeps failing; probe it again after a cool-down."""

    def __init__(self, clock: Clock, threshold: int = 3, cooldown: float = 15.0) -> None:
        self.clock = clock
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0

    def allow(self) -> bool:
        return self.clock.monotonic() >= self.open_until

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self.clock.monotonic() + self.cooldown


class Loader:
    def __init__(
        self,
        ctx: ServiceContext,
        llm: LLMClient | None,
        llm_settings: LLMSettings,
        *,
        capacity: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.llm = llm
        self.llm_settings = llm_settings
        self.settings = LoaderSettings.from_env()
        self.pool = AgentPool(capacity or self.settings.capacity)
        self.registry = RegistryView()
        self.versions = WorkflowVersions()
        self.idle_seconds = self.settings.idle_seconds
        self._untold: list[Event] = []  # retirement events a failed send may not have told
        self.max_tokens = llm_settings.max_tokens
        self.degrade = self.settings.degraded_answers
        self.breaker = Breaker(ctx.clock, cooldown=llm_settings.breaker_cooldown_s)
        self._finished: OrderedDict[tuple[str, str], None] = OrderedDict()  # (goal, run)
        # (goal, run, token) of token admissions given back: any other copy of one is given
        # back too (an agent retired then is not retired for good; a copy must not run later).
        self._given: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        # model -> the cost of the last answer call paid with it (an unknown call's estimate)
        self._last_cost = LastCosts()  # (goal, model) -> its last paid answer's cost
        # (goal, run) -> cost events sent without waiting, and their acknowledgements
        self._acks: dict[tuple[str, str], list[tuple[LlmCallCompleted, asyncio.Future[Any]]]] = {}
        self.ended = EndedRuns(ctx.clock)
        # This process's attempts (workflow_started ids), and per running task: its
        # attempt and the earlier attempts of the same run that may have paid a call.
        self._own_attempts: set[str] = set()
        self._attempt: dict[tuple[str, str], tuple[str, list[str]]] = {}  # by (goal, run)
        # (goal, run) -> (cost id, model) of its answer call given up on at the timeout,
        # still running (its cost to come)
        self._settling: dict[tuple[str, str], tuple[str, str]] = {}
        self._partitions = spec_for(TaskAdmitted.topic).partitions
        self.owned_partitions: set[int] | None = None  # None: all (no group yet)

    # -- registry -----------------------------------------------------------
    def learn(self, event: Event) -> None:
        self.registry.apply(event)
        self.versions.learn(event)

    def _owns(self, agent_id: str) -> bool:
        if self.owned_partitions is None:
            return True
        return partition_for(agent_id, self._partitions) in self.owned_partitions

    async def retire_idle(self) -> list[AgentRetired]:
        """Retire agents of this loader's partitions that sat idle too long."""
        now = self.ctx.clock.now()
        # Retirements a failed send may not have told: the same events again, except for
        # agents a task revived meanwhile (the revival said so).
        out: list[Event] = [
            e
            for e in self._untold
            if (record := self.registry.get(getattr(e, "agent_id", ""))) is not None
            and record.retired
        ]
        self._untold = []
        candidates = [r for r in self.registry.live() if self._owns(r.agent_id)]
        retired: list[AgentRetired] = []
        for record, idle in self.pool.idle(candidates, now, self.idle_seconds):
            if self.pool.drop(record.agent_id) is not None:
                out.append(self._evicted(record.agent_id, record.specialty, "retired", now))
            event = AgentRetired(
                source=SOURCE,
                goal_id=record.goal_id,
                agent_id=record.agent_id,
                specialty=record.specialty,
                reason=f"idle {idle / 3600:.1f} h",
                idle_seconds=idle,
                occurred_at=now,
            )
            # Marked before the send, and kept whatever the send does (part of it may have
            # reached the budget): a task that revives the agent sees it retired and says so.
            record.retired = True
            self.pool.last_used.pop(record.agent_id, None)
            out.append(event)
            if record.goal_id:
                out.append(self._agents_changed(record, "retired", now))
            retired.append(event)
        if out:
            try:
                await self.ctx.producer.send_many(out)
            except BaseException:
                # Perhaps nobody was told (a broker outage): the next sweep sends them again;
                # an event read twice is one retirement to every reader.
                self._untold = out
                raise
        return retired

    def _agents_changed(self, record: AgentRecord, change: str, now: datetime) -> GoalAgentsChanged:
        """The goal-keyed notice the budget counts live agents by (max_agents)."""
        return GoalAgentsChanged(
            source=SOURCE,
            goal_id=record.goal_id,
            agent_id=record.agent_id,
            change=change,  # type: ignore[arg-type]
            occurred_at=now,
        )

    def _evicted(self, agent_id: str, specialty: str, reason: str, now: datetime) -> AgentEvicted:
        record = self.registry.get(agent_id)
        return AgentEvicted(
            source=SOURCE,
            goal_id=record.goal_id if record else None,
            agent_id=agent_id,
            specialty=specialty,
            reason=reason,
            occurred_at=now,
        )

    # -- tasks ---------------------------------------------------------------
    async def handle(self, event: Event, delivery: Delivery | None = None) -> None:
        if not isinstance(event, TaskAdmitted):
            return
        run = _run_of(event)
        if run in self._finished or self.ended.has(event.run_id, event.goal_id):
            # Answered already, here or by an earlier owner of this agent's partition
            # (a replay after a crash or a rebalance): no second LLM call, no second answer.
            return
        if run in self._attempt:
            # Being answered here: the budget sent its admission again (the router sends a
            # task again while it has seen no decision on it).
            return
        if event.token is not None and await self._given_back(event):
            return
        try:
            terminal = await self._run(event)
        except Exception as exc:  # an answer must come even when this code has a bug
            log.exception("task %s failed inside the loader", event.run_id)
            terminal = self._failure(
                event, "internal", f"loader error: {type(exc).__name__}: {exc}"
            )
        _, uncounted = self._attempt.get(run, ("", []))
        for charge in self._unrepeated(event, uncounted):
            ack = await self.ctx.producer.enqueue(charge)
            self._acks.setdefault(run, []).append((charge, ack))
        # The LLM call's cost event went out right after the call; the broker has it
        # before the answer goes out. Once the run has an answer on the log, no later
        # owner counts this attempt's call, so an answer acknowledged ahead of its cost
        # (the cost's first send failed and was retried behind it) and a kill then lost
        # the cost for good (a path that fits chaos seed 8's answer calls paid once and
        # never counted, with no repeat of their run).
        for cost, ack in self._acks.pop(run, []):
            try:
                await ack
            except Exception:  # not acknowledged: send it again (same id) until it is
                await self.ctx.producer.deliver([cost], what=f"the cost of run {event.run_id}")
        if self.ended.has(event.run_id, event.goal_id):
            # Another owner answered it while this one worked (it was paused, or lost the
            # partition): its answer stands; the cost of this call is still counted.
            log.warning(
                "run %s was answered elsewhere meanwhile; this answer is dropped", event.run_id
            )
        else:
            await self.ctx.producer.deliver([terminal], what=f"the answer of run {event.run_id}")
        self._finished[run] = None
        own, _ = self._attempt.pop(run, ("", []))
        self._own_attempts.discard(own)
        if len(self._finished) > 50_000:
            self._finished.popitem(last=False)

    async def _given_back(self, task: TaskAdmitted) -> bool:
        """A task the router admitted with a token that may not start here: given back.

        The token held its slot for a task started by ``start_by``, and a retired agent's
        revival needs a place under the goal's max_agents that only the budget can give. A
        task past either (its own deadline still ahead) goes to the budget, which frees
        the token's slot and decides the task as any other; its admission comes back here
        without a token. Nothing of the run is started or marked done here.
        """
        now = self.ctx.clock.now()
        given = (*_run_of(task), str(task.token))
        if given in self._given:
            return True  # another copy of one given back: the budget decides it now
        if task.deadline_at is not None and task.deadline_at <= now:
            return False  # failed at its deadline as any task
        record = self.registry.get(task.agent_id)
        late = task.start_by is not None and task.start_by <= now
        if not late and not (record is not None and record.retired):
            return False
        self._given[given] = None
        while len(self._given) > 50_000:
            self._given.popitem(last=False)
        back = TaskRequested.caused_by(
            task,
            event_id=str(uuid.uuid5(_NS, f"{task.run_id}:given-back:{task.token}")),
            source=SOURCE,
            given_back=True,
            occurred_at=now,
        )
        log.info(
            "run %s: its admission token %s cannot be used (%s); given back to the budget",
            task.run_id,
            task.token,
            "started too late" if late else f"agent {task.agent_id} is retired",
        )
        await self.ctx.producer.deliver([back], what=f"the task of run {task.run_id}")
        return True

    def _unrepeated(self, task: TaskAdmitted, lost: list[str]) -> list[LlmCallCompleted]:
        """Earlier attempts' possible calls when this attempt paid for none to compare.

        Their cost is unknown: each is counted at the cost of the last answer this loader
        was paid for with the same model, or of the agent's newest answer on the terminal
        topics (an estimate), or, with neither known, at the worst
        case of the call (every one of ``max_tokens`` generated, a token per byte of the
        prompt), under the attempt's own cost id (its loader's report, if it comes back,
        counts once).
        """
        if not lost or self.ended.has(task.run_id, task.goal_id):
            # The owner that answered counted them, at the cost of its call.
            return []
        record = self.registry.get(task.agent_id)
        model = (record.model if record else "") or self.llm_settings.model
        messages = [
            {"role": "system", "content": record.system_prompt if record else ""},
            {"role": "system", "content": str(sorted(task.context.items()))},
            {"role": "user", "content": task.message},
        ]
        # This process's last paid answer of the goal with the model, or (a loader just
        # restarted) the agent's newest answer on the terminal topics.
        known = self._last_cost.get(task.goal_id, model)
        if known is None:
            known = self.ended.last_cost(task.goal_id, task.agent_id)
        worst = worst_case_usd(self.llm_settings.prices, model, messages, self.max_tokens)
        if known is not None and known <= worst:
            usd, how = known, "the cost of the last answer of this model or agent"
        else:
            # Never more than the call could cost: an answer's cost on the log is whatever
            # its producer wrote (1.7e308 once charged a goal its whole budget).
            usd, how = worst, "the call's worst case"
        return [
            self._call_event(
                task,
                model,
                event_id=_cost_id(earlier, False),
                cost_usd=usd,
                ok=True,
                error="an earlier attempt of this run stopped without reporting its cost and"
                f" this one made no call to compare; counted at {how}",
            )
            for earlier in lost
        ]

    def _call_event(self, task: TaskAdmitted, model: str, **fields: Any) -> LlmCallCompleted:
        """An answer call's report: its goal, run and agent, and ``fields``."""
        return LlmCallCompleted.caused_by(
            task,
            source=SOURCE,
            model=model,
            purpose="answer",
            occurred_at=self.ctx.clock.now(),
            **fields,
        )

    def _paid(
        self, task: TaskAdmitted, done: Completion, cost_id: str, **fields: Any
    ) -> LlmCallCompleted:
        """The report of a call the endpoint answered (and billed), under ``cost_id``."""
        return self._call_event(
            task,
            done.model,
            event_id=cost_id,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            cost_usd=done.cost_usd,
            latency_ms=done.latency_ms,
            ok=True,
            **fields,
        )

    def _latency(self, task: TaskAdmitted) -> float:
        if task.requested_at is None:
            return 0.0
        return max(0.0, (self.ctx.clock.now() - task.requested_at).total_seconds() * 1000.0)

    def _failure(self, task: TaskAdmitted, reason: FailureReason, detail: str) -> WorkflowFailed:
        return WorkflowFailed.caused_by(
            task,
            event_id=terminal_event_id(task.run_id),
            source=SOURCE,
            reason=reason,
            detail=detail,
            latency_ms=self._latency(task),
            admitted=True,
            occurred_at=self.ctx.clock.now(),
        )

    def _answer(
        self,
        task: TaskAdmitted,
        text: str,
        tier: str,
        cost: float,
        meta: dict[str, str] | None = None,
    ) -> WorkflowCompleted:
        meta = dict(meta or {})
        size = len(text.encode("utf-8"))
        if size > MAX_ANSWER_BYTES:
            # An endpoint that ignored max_tokens: the whole answer would not fit a Kafka
            # record, the broker would refuse the terminal event for good and the run
            # would never end. What fits is the answer, and it says it was cut.
            text = text.encode("utf-8")[:MAX_ANSWER_BYTES].decode("utf-8", "ignore")
            meta["truncated"] = f"{size} bytes, kept {len(text.encode('utf-8'))}"
        pending = self._settling.get(_run_of(task))
        if pending is not None:
            # A call given up on at the timeout still runs: the budget keeps the task's
            # hold until its cost comes (see _settled), under the id and model named here,
            # and counts the hold itself if no report comes by the hold's lapse (this
            # loader killed before the call ended).
            meta["cost_pending"] = "true"
            meta["cost_id"], meta["cost_model"] = pending
        specialty = task.specialty
        record = self.registry.get(task.agent_id)
        if record is not None and record.specialty != task.specialty:
            # Secondary routing: the goal had no agent of the chosen specialty and could make
            # none; another of its agents answered. The answer says so, and names who served.
            meta["requested_specialty"] = task.specialty
            specialty = record.specialty
            if tier == "llm":
                tier = "legacy_routing"
        return WorkflowCompleted.caused_by(
            task,
            event_id=terminal_event_id(task.run_id),
            source=SOURCE,
            specialty=specialty,
            text=text,
            cost_usd=cost,
            latency_ms=self._latency(task),
            degradation_tier=tier,
            meta=meta,
            occurred_at=self.ctx.clock.now(),
        )

    async def _run(self, task: TaskAdmitted) -> Event:
        now = self.ctx.clock.now()
        # Attempts before this one (an owner killed or cut off mid-task) may have paid for
        # an LLM call whose cost never reached the budget: counted by this attempt, at the
        # cost of its own call, or at the call's worst case if it makes none (handle()).
        # An attempt whose call failed for good (its report says so) paid nothing.
        run, goal = _run_of(task), task.goal_id
        lost = [
            a
            for a in self.ended.attempts(task.run_id, goal_id=goal)
            if a not in self._own_attempts and not self.ended.unbilled(task.run_id, a, goal_id=goal)
        ]
        self._attempt[run] = ("", lost)
        if task.deadline_at is not None and task.deadline_at <= now:
            retired = self.registry.get(task.agent_id)
            if retired is not None and retired.retired and retired.goal_id:
                # The budget counted the agent live again when it admitted this task; it
                # was not revived.
                await self.ctx.producer.deliver(
                    [self._agents_changed(retired, "retired", now)],
                    what=f"agent {retired.agent_id} still retired",
                )
            return self._failure(task, "timeout", "deadline passed before the task could start")
        record = self.registry.get(task.agent_id)
        if record is None:
            # The registry view may lag the spawn by a moment; give it a short chance.
            for _ in range(50):
                await asyncio.sleep(0.05)
                record = self.registry.get(task.agent_id)
                if record is not None:
                    break
        if record is None:
            return self._failure(task, "no_agent", f"agent {task.agent_id} is not in the registry")
        if record.goal_id and record.goal_id != task.goal_id:
            # An agent serves its own goal only: its prompt may have been written from that
            # goal's first request, and its versions are that goal's. The router never
            # sends one goal's task to another's agent; this holds whoever sends one.
            log.warning(
                "run %s of goal %s named agent %s of goal %s; refused",
                task.run_id,
                task.goal_id,
                record.agent_id,
                record.goal_id,
            )
            return self._failure(
                task, "no_agent", f"agent {task.agent_id} is not an agent of goal {task.goal_id}"
            )
        revived = record.retired
        if revived:
            # The router revived a retired agent rather than spawning another one;
            # it is live again here, and idle again 24 h after this task.
            record.retired = False
            log.info("reviving retired agent %s for run %s", record.agent_id, task.run_id)
        instance, change = self.pool.acquire(record, now)
        started = WorkflowStarted.caused_by(task, source=SOURCE, occurred_at=now)
        self._own_attempts.add(started.event_id)
        self._attempt[run] = (started.event_id, lost)
        notices: list[Event] = [started]
        if revived and record.goal_id:
            notices.append(self._agents_changed(record, "revived", now))
        if change.loaded is not None:
            notices.append(
                AgentLoaded(
                    source=SOURCE,
                    goal_id=record.goal_id,
                    agent_id=record.agent_id,
                    specialty=record.specialty,
                    active_agents=len(self.pool),
                    occurred_at=now,
                )
            )
        notices += [
            self._evicted(i.record.agent_id, i.record.specialty, "lru", now) for i in change.evicted
        ]
        # The attempt is on Kafka before its call can be paid: a loader killed during or
        # after the call leaves its workflow_started behind, and the next owner counts
        # the call (see _call). Sent until acknowledged (a broker outage makes the task
        # wait here, with no call made); the other notices need not wait.
        await self.ctx.producer.deliver([started], what=f"the start of run {task.run_id}")
        sent = asyncio.create_task(self.ctx.producer.send_many(notices[1:]))
        try:
            if self.ended.has(task.run_id, task.goal_id):
                # Answered by another owner while this one waited for the broker.
                return self._failure(task, "internal", "answered elsewhere meanwhile")
            latest = min(
                (t for t in (task.deadline_at, task.start_by) if t is not None), default=None
            )
            if latest is not None and latest <= self.ctx.clock.now():
                # The budget frees a slot on the promise that no call starts past this
                # (a task's deadline, or the start deadline of the token it was admitted with).
                return self._failure(
                    task, "timeout", "deadline passed while the broker was unreachable"
                )
            return await self._answer_with_tiers(task, instance)
        finally:
            await sent

    async def _call(
        self, task: TaskAdmitted, instance: AgentInstance, *, legacy: bool
    ) -> tuple[str, float, dict[str, str]]:
        assert self.llm is not None
        record = instance.record
        served = Served(1, None)
        if legacy:
            profile = profile_for(record.specialty)
            messages = [
                {"role": "system", "content": default_prompt(record.specialty)},
                {"role": "user", "content": task.message},
            ]
            model, temperature = self.llm_settings.model, profile.temperature
        else:
            served = self.versions.serve_for(task.goal_id, record.specialty, task.run_id)
            prompt = served.system_prompt or record.system_prompt
            messages = instance.messages(
                task.message, task.context, with_adjustments(prompt, served.instructions)
            )
            model, temperature = record.model or self.llm_settings.model, record.temperature
        started = self.ctx.clock.now()
        attempt, lost = self._attempt.get(_run_of(task), (task.run_id, []))

        async def settled(outcome: Completion | LLMError) -> None:
            await self._settled(task, model, _cost_id(attempt, legacy), messages, outcome)

        try:
            done = await self.llm.complete(
                messages,
                temperature=temperature,
                model=model,
                max_tokens=self.max_tokens,
                late=settled,
                request_id=_cost_id(attempt, legacy),
            )
        except (LLMUnavailable, LLMRejected) as exc:
            if exc.settling:
                self._settling[_run_of(task)] = (_cost_id(attempt, legacy), model)
            # Failed for good, the report's id says so to whoever runs the task next (this
            # attempt paid nothing); a call that goes on past the timeout may still be paid,
            # and its real report comes later under the attempt's cost id.
            failed = {} if exc.settling else {"event_id": failed_call_id(attempt, legacy)}
            await self.ctx.producer.send(
                self._call_event(
                    task,
                    model,
                    **failed,
                    ok=False,
                    error=f"{type(exc).__name__}: {exc}"[:500],
                    latency_ms=max(0.0, (self.ctx.clock.now() - started).total_seconds() * 1e3),
                )
            )
            raise
        # One id per attempt and kind of call: a call made again after a crash was paid
        # again, so it counts again; this record sent twice counts once.
        cost = self._paid(task, done, _cost_id(attempt, legacy))
        charges = [cost]
        if done.cost_usd > 0:
            self._last_cost.paid(task.goal_id, model, done.cost_usd)
        if not legacy and lost:
            # An earlier attempt of this run that started and never answered may have paid
            # for the same call: counted at this call's cost under that attempt's own cost
            # id, so if its loader comes back and reports the real cost, it counts once.
            charges += [
                cost.model_copy(
                    update={
                        "event_id": _cost_id(earlier, False),
                        "error": "an earlier attempt of this run stopped without reporting"
                        " its cost; counted at the cost of the same call made again",
                    }
                )
                for earlier in lost
            ]
            self._attempt[_run_of(task)] = (attempt, [])
        for charge in charges:
            ack = await self.ctx.producer.enqueue(charge)
            self._acks.setdefault(_run_of(task), []).append((charge, ack))
        # What the endpoint said (bounded by Completion), but never under a key this loader
        # sets: the budget reads cost_pending/cost_id/cost_model, the improvement service
        # workflow_version/workflow_id; an endpoint's own would hold or free budget, or
        # credit another version.
        own = {"truncated", "cost_pending", "cost_id", "cost_model", "requested_specialty"}
        own |= {"workflow_version", "workflow_id", "platform_version"}
        meta = {key: value for key, value in done.meta.items() if key not in own}
        if not legacy:
            meta["workflow_version"] = str(served.version)
            meta["workflow_id"] = served.workflow_id
            if served.platform_version is not None:
                # A goal's own version sits on the platform's: the run is in both trials.
                meta["platform_version"] = str(served.platform_version)
        return done.text, done.cost_usd, meta

    async def _settled(
        self,
        task: TaskAdmitted,
        model: str,
        cost_id: str,
        messages: list[dict[str, str]],
        outcome: Completion | LLMError,
    ) -> None:
        """A call given up on at the timeout ended: what the endpoint billed is counted.

        The run already has its answer (a timeout or a lower tier); the budget kept the
        task's hold for this report (the answer said ``cost_pending``).
        """
        self._settling.pop(_run_of(task), None)
        if isinstance(outcome, Completion):
            if outcome.cost_usd > 0:
                self._last_cost.paid(task.goal_id, model, outcome.cost_usd)
            cost = self._paid(
                task,
                outcome,
                cost_id,
                error="answered after the run's timeout; the answer was not used, the call"
                " was billed and is counted",
            )
        elif isinstance(outcome, LLMUnsettled):
            cost = self._call_event(
                task,
                model,
                event_id=cost_id,
                cost_usd=worst_case_usd(self.llm_settings.prices, model, messages, self.max_tokens),
                ok=True,
                error=f"{outcome}; counted at the call's worst case",
            )
        else:
            # Refused or failed in the end: nothing was billed. Said under the cost id the
            # answer named, so the budget lets the task's hold go rather than count it.
            cost = self._call_event(
                task,
                model,
                event_id=cost_id,
                ok=False,
                error=f"given up on at the timeout, then failed: {outcome}; nothing billed"[:500],
            )
        await self.ctx.producer.deliver([cost], what=f"the late cost of run {task.run_id}")

    async def _answer_with_tiers(self, task: TaskAdmitted, instance: AgentInstance) -> Event:
        why = "no LLM endpoint is configured"
        if self.llm is not None and self.breaker.allow():
            try:
                text, cost, meta = await self._call(task, instance, legacy=False)
                self.breaker.success()
                return self._answer(task, text, "llm", cost, meta)
            except LLMRejected as exc:
                # The agent's own config was refused (model, prompt): its specialty's
                # default agent still may answer.
                why = f"the agent's configuration was refused: {exc}"
                try:
                    text, cost, meta = await self._call(task, instance, legacy=True)
                    return self._answer(task, text, "legacy_static", cost, meta)
                except (LLMUnavailable, LLMRejected) as exc2:
                    why = f"the default agent failed too: {exc2}"
            except LLMUnavailable as exc:
                self.breaker.failure()
                why = str(exc)
        elif self.llm is not None:
            why = "the LLM endpoint failed repeatedly; calls are paused for a moment"
        if not self.degrade:
            return self._failure(task, "llm_failure", why)
        hint = keyword_answer(task.specialty, task.message)
        if hint is not None:
            return self._answer(task, hint, "keyword", 0.0)
        return self._answer(task, static_answer(task.run_id), "static_fallback", 0.0)


async def _sweep(loader: Loader, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            retired = await loader.retire_idle()
            if retired:
                log.info("retired %d idle agents", len(retired))
        except Exception:
            log.exception("idle sweep failed")


async def main(ctx: ServiceContext, stop: asyncio.Event) -> None:
    settings = LLMSettings.from_env()
    llm = create_llm(settings, ctx.clock)
    if llm is None:
        log.warning("no LLM endpoint configured: answers come from the degraded tiers")
    loader = Loader(ctx, llm, settings)
    registry = TopicView(
        ctx.settings,
        [
            AgentSpawned.topic,
            AgentRetired.topic,
            WorkflowVersionSaved.topic,
            ImprovementApplied.topic,
            ImprovementRolledBack.topic,
        ],
        loader.learn,
        source=SOURCE,
    )
    tasks = EventConsumer(
        ctx.settings,
        [TaskAdmitted.topic],
        group_id=ctx.group,
        producer=ctx.producer,
        source=SOURCE,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    # A rebalance waits for running tasks to end (a task's LLM call is bounded by the
    # LLM deadline), so the partition's next owner never runs a task this one still runs.
    tasks.drain_s = settings.timeout_s + 10.0
    await registry.start()
    ended_ready = asyncio.Event()
    ended = asyncio.create_task(
        follow_recent(
            ctx.settings,
            loader.ended,
            ended_ready,
            window_s=loader.settings.ended_window_seconds,
            source=SOURCE,
            attempts=True,
        )
    )
    sweeper: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(registry.ready.wait(), 120)
        # What an earlier owner already answered is known before any task is taken.
        await asyncio.wait_for(ended_ready.wait(), 120)
        await tasks.start()
        loader.owned_partitions = set()

        async def _track_assignment() -> None:
            while True:
                loader.owned_partitions = {tp.partition for tp in tasks.raw.assignment()}
                await asyncio.sleep(1.0)

        tracker = asyncio.create_task(_track_assignment())
        sweeper = asyncio.create_task(_sweep(loader, loader.settings.sweep_seconds))
        try:
            await until_stopped(stop, tasks.run_concurrently(loader.handle))
        finally:
            tracker.cancel()
            await tasks.stop()
    finally:
        if sweeper is not None:
            sweeper.cancel()
        ended.cancel()
        await registry.stop()
        if llm is not None:
            await llm.aclose()
