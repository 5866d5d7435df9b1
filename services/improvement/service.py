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
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.partitioner import murmur2

from services.improvement.assess import Assessor
from services.improvement.errors import FeedbackRefused, NotRunOwner, UnknownRun
from services.improvement.feedback import (
    clean_proposal,
    improvement_messages,
    template_prompt,
    wants_improvement,
)
from services.improvement.http import SlackSettings, build_app
from services.improvement.patterns import PatternSettings
from services.improvement.state import ImprovementState, RunInfo
from services.improvement.versions import VERSION_TOPICS, CanaryPolicy, ChangeSource
from streams.config import env_int
from streams.errors import InvalidRequest
from streams.events import (
    AgentRetired,
    AgentSpawned,
    AutomationCreated,
    DeadLetter,
    Event,
    FeedbackReceived,
    ImprovementAvailable,
    LlmCallCompleted,
    PatternDiscovered,
    RequestReceived,
    RollbackRequested,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
)
from streams.kafka import Delivery, EventConsumer
from streams.llm import Completion, LLMClient, LLMError, LLMSettings, create_llm
from streams.service import ServiceContext

__all__ = ["ImprovementConfig", "ImprovementService", "main", "serve"]

log = logging.getLogger(__name__)
SOURCE = "improvement"
VIEW_TOPICS = (
    RequestReceived.topic,
    RouteDecided.topic,
    WorkflowCompleted.topic,
    WorkflowFailed.topic,
    WorkflowAssessed.topic,
    AgentSpawned.topic,
    AgentRetired.topic,
    PatternDiscovered.topic,
    AutomationCreated.topic,
    *VERSION_TOPICS,
)
WORK_TOPICS = (WorkflowCompleted.topic, FeedbackReceived.topic)
COMMAND_TOPICS = (ImprovementAvailable.topic, RollbackRequested.topic)
_NS = uuid.UUID("7d2e4b1a-3c5f-4a6e-8b9d-0e1f2a3b4c5d")


def _env_port() -> int | None:
    text = os.environ.get("ORCH_IMPROVE_PORT", "8787").strip().lower()
    if text in ("off", "none", ""):
        return None
    try:
        return env_int("ORCH_IMPROVE_PORT", 8787, minimum=0, maximum=65535)
    except ValueError:
        raise ValueError(f"ORCH_IMPROVE_PORT must be 0-65535 or 'off', got {text!r}") from None


def _slack_users(text: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs if k.strip() and v.strip()}


@dataclass(frozen=True)
class ImprovementConfig:
    """Settings of one instance; :meth:`from_env` documents the variables."""

    http_host: str = "127.0.0.1"
    http_port: int | None = 8787  # 0: any free port; None: no HTTP endpoint
    port_file: Path | None = None
    slack: SlackSettings | None = None
    patterns: PatternSettings = field(default_factory=PatternSettings)
    canary: CanaryPolicy = field(default_factory=CanaryPolicy)
    judge_model: str | None = None
    view_wait_s: float = 2.0

    @classmethod
    def from_env(cls) -> ImprovementConfig:
        """``ORCH_IMPROVE_HOST``/``ORCH_IMPROVE_PORT`` (default 127.0.0.1:8787, 0 = free port,
        ``off`` = none), the port written to ``<data_root>/run/improvement.port``;
        ``SLACK_SIGNING_SECRET`` (enables Slack), ``SLACK_BOT_TOKEN``, ``ORCH_SLACK_USERS``;
        ``ORCH_JUDGE_MODEL``; pattern and canary settings (see their modules)."""
        from streams.localkafka import data_root

        secret = os.environ.get("SLACK_SIGNING_SECRET", "").strip()
        slack = (
            SlackSettings(
                secret,
                os.environ.get("SLACK_BOT_TOKEN", "").strip() or None,
                _slack_users(os.environ.get("ORCH_SLACK_USERS", "")),
            )
            if secret
            else None
        )
        return cls(
            http_host=os.environ.get("ORCH_IMPROVE_HOST", "127.0.0.1"),
            http_port=_env_port(),
            port_file=data_root() / "run" / "improvement.port",
            slack=slack,
            patterns=PatternSettings.from_env(),
            canary=CanaryPolicy.from_env(),
            judge_model=os.environ.get("ORCH_JUDGE_MODEL", "").strip() or None,
        )


class _LogView:
    """Folds the view topics and knows how far it has applied each partition."""

    def __init__(self, consumer: EventConsumer, apply: Callable[[Event], None]) -> None:
        self.consumer = consumer
        self._apply = apply
        self._applied: dict[TopicPartition, int] = {}
        self._busy = False
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        raw = self.consumer.raw
        start_ends = await raw.end_offsets(list(raw.assignment()))
        while True:
            if not self.ready.is_set() and await self._reached(start_ends):
                self.ready.set()
            fetched = await raw.getmany(timeout_ms=100, max_records=1000)
            self._busy = True
            try:
                for tp, records in fetched.items():
                    for record in records:
                        # Undecodable records go to dead_letter inside decode() and still count
                        # as read, so sync() never waits for a record it will never apply.
                        delivery = await self.consumer.decode(record)
                        if delivery is not None:
                            try:
                                self._apply(delivery.event)
                            except Exception:  # one odd event must not stop the view
                                log.exception("view failed on %s@%s", tp, record.offset)
                        self._applied[tp] = record.offset + 1
            finally:
                self._busy = False
            if fetched:
                self.changed.set()

    async def _reached(self, ends: dict[TopicPartition, int]) -> bool:
        raw = self.consumer.raw
        for tp, end in ends.items():
            # Position covers offsets that hold no record (transaction markers, compaction).
            if self._applied.get(tp, 0) < end and (self._busy or await raw.position(tp) < end):
                return False
        return True

    async def sync(self, topics: Iterable[str], timeout: float = 10.0) -> None:
        """Wait until every record now in ``topics`` has been applied."""
        raw = self.consumer.raw
        physical = {self.consumer.settings.topic(t) for t in topics}
        ends = await raw.end_offsets([tp for tp in raw.assignment() if tp.topic in physical])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self._reached(ends):
            if loop.time() > deadline:
                raise TimeoutError(f"view did not catch up with {sorted(physical)}")
            await asyncio.sleep(0.01)


class ImprovementService:
    """Handlers and decisions; Kafka is the context's producer and the consumers given to run()."""

    def __init__(
        self, ctx: ServiceContext, config: ImprovementConfig, llm: LLMClient | None
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.llm = llm
        self.assessor = Assessor(llm, model=config.judge_model)
        self.state = ImprovementState(config.patterns, ctx.clock)
        self._assessed: OrderedDict[str, None] = OrderedDict()
        self._write_lock = asyncio.Lock()
        self._view: _LogView | None = None
        self._commands: EventConsumer | None = None
        self._owned: frozenset[int] = frozenset()
        self.http_port: int | None = None

    # -- knowledge -------------------------------------------------------------
    async def _run_known(self, run_id: str, ready: Callable[[RunInfo], bool]) -> RunInfo | None:
        """The run once the view has what ``ready`` needs; the view may lag the caller a moment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.view_wait_s
        while True:
            run = self.state.run(run_id)
            if run is not None and ready(run):
                return run
            if loop.time() >= deadline:
                return run
            await asyncio.sleep(0.02)

    def owns(self, key: str) -> bool:
        """Whether this instance decides for ``key`` (a signature or workflow id)."""
        if self._commands is None:
            return False
        physical = self.ctx.settings.topic(COMMAND_TOPICS[0])
        count = len(self._commands.raw.partitions_for_topic(physical) or ())
        if not count:
            return False
        # Kafka's default partitioner, so the owner is the one that gets the key's commands.
        return (murmur2(key.encode()) & 0x7FFFFFFF) % count in self._owned

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
    async def assess(self, event: WorkflowCompleted) -> list[Event]:
        known = self.state.run(event.run_id)
        if event.run_id in self._assessed or (known is not None and known.quality is not None):
            return []  # a redelivery: the run has its one assessment
        message = ""
        if self.assessor.needs_message(event):
            run = await self._run_known(event.run_id, lambda r: r.message is not None)
            message = (run.message or "") if run is not None else ""
        result = await self.assessor.assess(event, message)
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
                occurred_at=now,
            )
        ]
        if result.judge_call is not None or result.judge_error is not None:
            out.append(
                self._llm_call(
                    event.run_id,
                    "judge",
                    result.judge_call,
                    result.judge_error,
                    cause=event.event_id,
                )
            )
        self._assessed[event.run_id] = None
        if len(self._assessed) > 100_000:
            self._assessed.popitem(last=False)
        return out

    def _llm_call(
        self,
        run_id: str,
        purpose: Literal["judge", "improvement"],
        call: Completion | None,
        error: str | None,
        *,
        cause: str,
    ) -> LlmCallCompleted:
        # Judging and rewriting prompts is the platform's own learning, not the user's
        # work: it is charged to the platform's goal (ORCH_PLATFORM_GOAL), where spend per
        # goal shows it, and never eats into a user goal's daily budget.
        return LlmCallCompleted(
            # One call per causing event: a redelivered cause does not count its cost twice.
            event_id=str(uuid.uuid5(_NS, f"{cause}:{purpose}")),
            source=SOURCE,
            run_id=run_id,
            goal_id=os.environ.get("ORCH_PLATFORM_GOAL", "platform"),
            model=call.model if call else (self.config.judge_model or "unknown"),
            purpose=purpose,
            prompt_tokens=call.prompt_tokens if call else 0,
            completion_tokens=call.completion_tokens if call else 0,
            cost_usd=call.cost_usd if call else 0.0,
            latency_ms=call.latency_ms if call else 0.0,
            ok=call is not None,
            error=None if call is not None else (error or "")[:500],
            occurred_at=self.ctx.clock.now(),
        )

    # -- feedback ----------------------------------------------------------------
    async def check_owner(self, run_id: str, user_id: str) -> RunInfo:
        run = await self._run_known(run_id, lambda r: r.user_id is not None)
        if run is None or run.user_id is None:
            raise UnknownRun(run_id)
        if run.user_id != user_id:
            raise NotRunOwner(run_id, user_id)
        return run

    async def submit(
        self, run_id: str, user_id: str, score: int | None, text: str, channel: str
    ) -> FeedbackReceived:
        """HTTP and Slack: refuse early with the reason, else send ``feedback_received``."""
        from pydantic import ValidationError

        try:
            event = FeedbackReceived(
                source=SOURCE,
                run_id=run_id,
                user_id=user_id,
                score=score,
                text=text,
                channel=channel,
                occurred_at=self.ctx.clock.now(),
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidRequest(problems) from None
        run = await self.check_owner(run_id, user_id)
        event = event.model_copy(update={"goal_id": run.goal_id})
        await self.ctx.producer.send(event)
        return event

    def _dead_letter(
        self, event: Event, delivery: Delivery, reason: str, error_type: str
    ) -> DeadLetter:
        """A valid event this service refuses to apply: kept, with the reason, not dropped."""
        return DeadLetter(
            source=SOURCE,
            original_topic=delivery.topic,
            partition=delivery.partition,
            offset=delivery.offset,
            original_key=event.key(),
            payload=self.ctx.producer.codec.encode(event),
            reason=reason,
            error_type=error_type,
            occurred_at=self.ctx.clock.now(),
        )

    async def on_feedback(self, event: FeedbackReceived, delivery: Delivery) -> list[Event]:
        try:
            run = await self.check_owner(event.run_id, event.user_id)
        except FeedbackRefused as exc:
            log.warning("feedback %s refused: %s", event.event_id, exc)
            return [self._dead_letter(event, delivery, str(exc), type(exc).__name__)]
        workflow = run.workflow_id
        if not wants_improvement(event.score, event.text) or not workflow:
            return []
        current = self.state.current_prompt(workflow, run.agent_id)
        out: list[Event] = []
        proposal, how = None, "template"
        if self.llm is not None:
            call: Completion | None = None
            error: str | None = None
            try:
                call = await self.llm.complete(
                    improvement_messages(workflow, current, event.score, event.text),
                    temperature=0.3,
                    max_tokens=600,
                )
                proposal = clean_proposal(call.text)
                how = "llm" if proposal else "template"
            except LLMError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if run.goal_id:
                out.append(
                    self._llm_call(run.run_id, "improvement", call, error, cause=event.event_id)
                )
        proposal = proposal or template_prompt(current, event.text)
        if proposal is None:
            return out  # the prompt already says what this feedback asks
        scored = f"score {event.score}" if event.score is not None else "no score"
        out.append(
            ImprovementAvailable(
                event_id=str(uuid.uuid5(_NS, f"{event.event_id}:available")),
                source=SOURCE,
                run_id=run.run_id,
                goal_id=run.goal_id,
                user_id=event.user_id,
                improvement_id=f"imp_{uuid.uuid5(_NS, event.event_id).hex[:16]}",
                workflow_id=workflow,
                kind="system_prompt",
                proposal=proposal,
                reason=f"{how} rule from feedback on run {run.run_id} ({scored}): {event.text}"[
                    :1000
                ],
                occurred_at=self.ctx.clock.now(),
            )
        )
        return out

    async def handle_work(self, event: Event, delivery: Delivery) -> None:
        if isinstance(event, WorkflowCompleted):
            out = await self.assess(event)
        elif isinstance(event, FeedbackReceived):
            out = await self.on_feedback(event, delivery)
        else:
            return
        if out:
            await self.ctx.producer.send_many(out)

    # -- versions (single writer per workflow) ----------------------------------------
    async def _write(self, decide: Callable[[], list[Event]]) -> list[Event]:
        async with self._write_lock:
            assert self._view is not None
            await self._view.sync(VERSION_TOPICS)
            events = decide()
            if events:
                await self.ctx.producer.send_many(events)
                for e in events:
                    self.state.apply(e)  # at once: the next decision must see this one
        return events

    async def handle_command(self, event: Event, delivery: Delivery) -> None:
        now = self.ctx.clock.now
        if isinstance(event, ImprovementAvailable):
            ledger = self.state.flow(event.workflow_id)
            source: ChangeSource = "user" if event.user_id else "system"
            done = await self._write(
                lambda: ledger.propose(
                    event, now=now(), share=self.config.canary.share, source=source
                ),
            )
            if not done and ledger.state.canary is not None:
                # One canary at a time, or neither could be measured; the proposal stays
                # in the log as improvement_available for a person to look at.
                log.info(
                    "improvement %s on %s skipped: canary v%s is still being measured",
                    event.improvement_id,
                    event.workflow_id,
                    ledger.state.canary,
                )
        elif isinstance(event, RollbackRequested):
            ledger = self.state.flow(event.workflow_id)
            if not ledger.knows(event.to_version):
                reason = f"workflow {event.workflow_id!r} has no version {event.to_version}"
                log.warning("rollback refused: %s", reason)
                await self.ctx.producer.send(
                    self._dead_letter(event, delivery, reason, "UnknownVersion")
                )
                return
            reason = event.reason or f"requested by {event.user_id or 'an operator'}"
            await self._write(
                lambda: ledger.rollback(
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
                events.extend(self.state.learner.evaluate(signature))
        if events:
            await self.ctx.producer.send_many(events)
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
        return lambda: ledger.evaluate(self.ctx.clock.now(), self.config.canary)[1]

    async def _evaluate_forever(self, sweep_every_s: float = 300.0) -> None:
        assert self._view is not None
        last_sweep = self.ctx.clock.monotonic()
        while True:
            if self.ctx.clock.monotonic() - last_sweep >= sweep_every_s:
                last_sweep = self.ctx.clock.monotonic()
                forgotten = self.state.learner.sweep()
                log.debug("forgot %d signatures with no recent runs", forgotten)
            try:
                await asyncio.wait_for(self._view.changed.wait(), 1.0)
            except TimeoutError:
                pass  # a rebalance changes ownership without any new event
            self._view.changed.clear()
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
        runner = web.AppRunner(build_app(self, self.config.slack), access_log=None)
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
        view = EventConsumer(ctx.settings, VIEW_TOPICS, group_id=None, source=SOURCE)
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
        self._view = _LogView(view, self.state.apply)
        self._commands = commands
        tasks: list[asyncio.Task[None]] = []
        runner: web.AppRunner | None = None
        try:
            await view.start()
            tasks.append(asyncio.create_task(self._view.run(), name="improvement-view"))
            await asyncio.wait_for(self._view.ready.wait(), 120)
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
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if runner is not None:
                await runner.cleanup()
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
