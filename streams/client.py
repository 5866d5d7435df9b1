"""The client SDK: ask the platform and await the answer, give feedback, set budgets.

``OrchestratorClient.ask`` produces ``request_received`` and waits for the one
terminal event of its run. Replies come through one consumer per client that
is assigned every partition of the terminal topics and positioned at their end
before the first request leaves, so no call pays for a group rebalance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka.errors import KafkaError
from pydantic import ValidationError

from streams.clock import Clock, SystemClock
from streams.config import OperatorSettings
from streams.errors import (
    BrokerUnavailable,
    BudgetExceededError,
    InvalidRequest,
    LLMFailure,
    NotOperator,
    NoVerdict,
    RunFailed,
    RunRejected,
    RunTimeout,
    refusal,
)
from streams.events import (
    MAX_WAIT_SECONDS,
    ApiKeyIssued,
    ApiKeyRevoked,
    BudgetUpdateRequested,
    Event,
    FeedbackDecided,
    FeedbackReceived,
    PromotionDecided,
    PromotionRequested,
    PromotionScope,
    RequestReceived,
    Role,
    WorkflowCompleted,
    WorkflowFailed,
)
from streams.kafka import AsyncLifecycle, EventConsumer, EventProducer, KafkaSettings
from streams.keys import mint_key, operators_from, read_keys

__all__ = ["Answer", "OrchestratorClient", "feedback_event", "invalid_request"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What a run answered, and how."""

    run_id: str
    agent_id: str | None
    specialty: str
    text: str
    cost_usd: float
    latency_ms: float
    degradation_tier: str

    @classmethod
    def from_event(cls, event: WorkflowCompleted, latency_ms: float) -> Answer:
        return cls(
            run_id=event.run_id,
            agent_id=event.agent_id,
            specialty=event.specialty,
            text=event.text,
            cost_usd=event.cost_usd,
            latency_ms=latency_ms,
            degradation_tier=event.degradation_tier,
        )


def invalid_request(exc: ValidationError) -> InvalidRequest:
    """One readable line per problem, without pydantic's internals."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{field}: {msg}")
    return InvalidRequest("; ".join(parts))


def feedback_event(
    run_id: str,
    *,
    user_id: str,
    score: int | None,
    text: str,
    channel: str,
    source: str,
    at: datetime | None = None,
    event_id: str | None = None,
) -> FeedbackReceived:
    """The one way ``/improve`` feedback becomes an event, for the SDK, the CLI and the
    improvement service's HTTP and Slack endpoints alike: a bad field is refused as
    :class:`~streams.errors.InvalidRequest` naming it. ``event_id``: one derived from what
    was sent (a signed Slack command), so the same request sent again is the same event."""
    try:
        event = FeedbackReceived(
            source=source,
            run_id=run_id,
            user_id=user_id,
            score=score,
            text=text,
            channel=channel,
            occurred_at=at or datetime.now(UTC),
        )
    except ValidationError as exc:
        raise invalid_request(exc) from None
    return event if event_id is None else event.model_copy(update={"event_id": event_id})


def _failure(event: WorkflowFailed) -> RunFailed:
    if event.reason == "budget_exceeded":
        return BudgetExceededError(event.run_id, event.reason, event.detail, event.limit)
    if event.reason == "llm_failure":
        return LLMFailure(event.run_id, event.reason, event.detail)
    return RunRejected(event.run_id, event.reason, event.detail, event.limit)


class OrchestratorClient(AsyncLifecycle):
    """Async client of the platform; use as ``async with OrchestratorClient() as c``."""

    def __init__(
        self,
        settings: KafkaSettings | None = None,
        *,
        source: str = "sdk",
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings or KafkaSettings.from_env()
        self.source = source
        self.clock = clock or SystemClock()
        self._producer = EventProducer(self.settings, client_id=f"orchestrator.{source}")
        self._replies = EventConsumer(
            self.settings,
            [
                WorkflowCompleted.topic,
                WorkflowFailed.topic,
                FeedbackDecided.topic,
                PromotionDecided.topic,
            ],
            group_id=None,
            from_end=True,
            source=source,
        )
        # id -> (its future, the kinds of reply it takes, the goal an answer must be of)
        self._waiting: dict[
            str, tuple[asyncio.Future[Event], tuple[type[Event], ...], str | None]
        ] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._producer.start()
        await self._replies.start()
        self._reader = asyncio.create_task(self._read_replies(), name="orchestrator-replies")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._replies.stop()
        await self._producer.stop()

    async def stop(self) -> None:
        await self.close()

    async def _read_replies(self) -> None:
        async for batch in self._replies.batches(timeout_ms=1000):
            for delivery in batch:
                event = delivery.event
                if isinstance(event, FeedbackDecided):
                    run_id: str | None = event.feedback_id
                elif isinstance(event, PromotionDecided):
                    run_id = event.request_id
                else:
                    run_id = event.run_id
                waiting = self._waiting.get(run_id) if run_id else None
                if waiting is None:
                    continue
                future, kinds, goal_id = waiting
                # The reply it waits for: its kind, and for an answer the request's goal. Any
                # event naming the id once did (a verdict under a run's id ended the wait
                # with an AssertionError; another goal's answer was taken for the run's).
                if not isinstance(event, kinds) or (
                    goal_id is not None and event.goal_id != goal_id
                ):
                    log.warning(
                        "%s %s names a wait for another reply; ignored", event.event_type, run_id
                    )
                    continue
                if not future.done():
                    future.set_result(event)

    def request(
        self,
        message: str,
        *,
        goal_id: str,
        user_id: str,
        context: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> RequestReceived:
        """The validated request event, or :class:`InvalidRequest` before anything is sent."""
        if not 0 < timeout <= MAX_WAIT_SECONDS:  # NaN fails this too
            raise InvalidRequest(
                f"timeout: {timeout:g} s; give more than 0 and at most {MAX_WAIT_SECONDS} s"
            )
        fields = {str(k): str(v) for k, v in (context or {}).items()}
        if len(fields) != len(context or {}):
            raise InvalidRequest("context: keys that are the same as text (1 and '1')")
        now = self.clock.now()
        try:
            return RequestReceived(
                source=self.source,
                run_id=str(uuid.uuid4()),
                goal_id=goal_id,
                user_id=user_id,
                message=message,
                context=fields,
                occurred_at=now,
                deadline_at=now + timedelta(seconds=timeout),
            )
        except ValidationError as exc:
            raise invalid_request(exc) from None

    async def ask(
        self,
        message: str,
        *,
        goal_id: str,
        user_id: str,
        context: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Answer:
        """Send a request and wait for its answer; a failed run raises a typed error."""
        request = self.request(
            message, goal_id=goal_id, user_id=user_id, context=context, timeout=timeout
        )
        assert request.run_id is not None
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiting[request.run_id] = (future, (WorkflowCompleted, WorkflowFailed), goal_id)
        started = self.clock.monotonic()
        try:
            try:
                await self._producer.send(request)
            except KafkaError as exc:  # a broker outage longer than the send's timeout
                raise BrokerUnavailable(request.run_id, f"{type(exc).__name__}: {exc}") from exc
            try:
                event = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise RunTimeout(request.run_id, timeout) from None
        finally:
            self._waiting.pop(request.run_id, None)
        latency_ms = (self.clock.monotonic() - started) * 1000.0
        if isinstance(event, WorkflowCompleted):
            return Answer.from_event(event, latency_ms)
        assert isinstance(event, WorkflowFailed)
        raise _failure(event)

    async def _verdict(self, event: Event, timeout: float) -> Event:
        """Send a command and wait for the verdict that names its event id."""
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        kind = FeedbackDecided if isinstance(event, FeedbackReceived) else PromotionDecided
        self._waiting[event.event_id] = (future, (kind,), None)
        try:
            await self._producer.send(event)
            try:
                return await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise NoVerdict(
                    f"{event.event_type} {event.event_id} was sent, but no verdict came within"
                    f" {timeout:g} s; is the improvement service running?"
                ) from None
        finally:
            self._waiting.pop(event.event_id, None)

    async def feedback(
        self,
        run_id: str,
        *,
        user_id: str,
        score: int | None = None,
        text: str = "",
        channel: str = "sdk",
        timeout: float = 30.0,
    ) -> FeedbackDecided:
        """Tell the platform how a run went (``/improve``) and wait for its verdict.

        Returns the accepted verdict (its ``reason`` says what will change, its
        ``improvement_id`` the change proposed, if any). Raises a
        :class:`~streams.errors.FeedbackRefused` subclass (``UnknownRun``,
        ``NotRunOwner``, ``RateLimited``) when refused, ``NoVerdict`` on timeout.
        """
        event = feedback_event(
            run_id,
            user_id=user_id,
            score=score,
            text=text,
            channel=channel,
            source=self.source,
            at=self.clock.now(),
        )
        verdict = await self._verdict(event, timeout)
        assert isinstance(verdict, FeedbackDecided)
        if not verdict.accepted:
            raise refusal(verdict.error_type, verdict.reason)
        return verdict

    async def approve(
        self, improvement_id: str, *, user_id: str, reason: str = "", timeout: float = 30.0
    ) -> PromotionDecided:
        """Approve a goal's proposal that waits for review into that goal's canary;
        ``user_id`` must be an operator. Approving again what is already approved changes
        nothing (the verdict's ``reason`` says which version it is); :meth:`promote` alone
        makes it serve every goal.

        Raises ``NotOperator`` or ``PromotionRefused`` when refused, ``NoVerdict`` on timeout.
        """
        return await self._promotion(improvement_id, "goal", user_id, reason, timeout)

    async def promote(
        self, improvement_id: str, *, user_id: str, reason: str = "", timeout: float = 30.0
    ) -> PromotionDecided:
        """Make an improvement saved for one goal serve every goal (a platform-wide canary
        first); ``user_id`` must be an operator. One still waiting for review is refused
        (approve it first); one promoted already is left as it is.

        Raises ``NotOperator`` or ``PromotionRefused`` when refused, ``NoVerdict`` on timeout.
        """
        return await self._promotion(improvement_id, "all", user_id, reason, timeout)

    async def _promotion(
        self, improvement_id: str, scope: PromotionScope, user_id: str, reason: str, timeout: float
    ) -> PromotionDecided:
        try:
            event = PromotionRequested(
                source=self.source,
                user_id=user_id,
                improvement_id=improvement_id,
                reason=reason,
                scope=scope,
                occurred_at=self.clock.now(),
            )
        except ValidationError as exc:
            raise invalid_request(exc) from None
        verdict = await self._verdict(event, timeout)
        assert isinstance(verdict, PromotionDecided)
        if not verdict.accepted:
            raise refusal(verdict.error_type, verdict.reason)
        return verdict

    async def create_key(
        self, goal_id: str, user_id: str, role: Role = "user", *, label: str = ""
    ) -> tuple[str, ApiKeyIssued]:
        """A new API key for the HTTP surfaces; the key is returned once and kept nowhere.

        An operator is known by user id alone (``ORCH_OPERATORS`` names users; an operator
        key makes its user an operator in every goal), so a user key is refused for a user
        id that is an operator's, and an operator key for one that holds user keys: a
        tenant's user named like an operator spoke as one (its feedback's instructions
        skipped the operator's review)."""
        try:
            key, event = mint_key(goal_id, user_id, role, source=self.source, label=label)
        except ValidationError as exc:
            raise invalid_request(exc) from None
        keys = await read_keys(self.settings)
        if role == "user" and (user_id in operators_from() or keys.is_operator(user_id)):
            raise InvalidRequest(
                f"user {user_id!r} is an operator (ORCH_OPERATORS or an operator key), and an"
                " operator is known by user id in every goal: choose another user id"
            )
        if role == "operator" and keys.holds_user_key(user_id):
            raise InvalidRequest(
                f"user {user_id!r} holds user keys; an operator key would make that user an"
                " operator in every goal: choose another user id (or revoke those keys)"
            )
        await self._producer.send(event)
        return key, event

    async def revoke_key(self, key_id: str, *, user_id: str | None = None) -> ApiKeyRevoked:
        """Revoke a key for good. A key id never issued is refused (``InvalidRequest``): a
        mistyped id reported as revoked left the real key working. Revoking again is allowed
        and changes nothing."""
        keys = await read_keys(self.settings)
        if not keys.known(key_id):
            raise InvalidRequest(f"key {key_id!r} was never issued (see `orchestrator keys list`)")
        event = ApiKeyRevoked(source=self.source, key_id=key_id, user_id=user_id)
        await self._producer.send(event)
        return event

    async def set_budget(
        self, goal_id: str, *, user_id: str | None = None, **limits: Any
    ) -> BudgetUpdateRequested:
        """Change a goal's limits: max_agents, max_concurrent, max_daily_cost, and its
        cost_weight (quality given up per USD of an answer, for the router).

        ``user_id`` (default ``ORCH_OPERATOR_USER``, else ``operator``) must be an operator:
        named in the budget service's ``ORCH_OPERATORS`` or holding an operator key.
        """
        user_id = user_id or OperatorSettings.read("operator_user")
        allowed = {"max_agents", "max_concurrent", "max_daily_cost", "cost_weight"}
        unknown = sorted(set(limits) - allowed)
        if unknown:
            raise InvalidRequest(
                f"unknown budget field(s) {', '.join(unknown)}; use {', '.join(sorted(allowed))}"
            )
        if not any(v is not None for v in limits.values()):
            raise InvalidRequest(f"give at least one of {', '.join(sorted(allowed))}")
        try:
            event = BudgetUpdateRequested(
                source=self.source,
                goal_id=goal_id,
                user_id=user_id,
                occurred_at=self.clock.now(),
                **limits,
            )
        except ValidationError as exc:
            raise invalid_request(exc) from None
        # The budget service checks it again where it applies the change; asked here too, a
        # refusal is told to the one who asked instead of reaching only the dead letters.
        if user_id not in operators_from():
            if not (await read_keys(self.settings)).is_operator(user_id):
                raise NotOperator(
                    f"changing goal {goal_id}'s budget needs an operator; {user_id!r} is not one"
                    " (not in ORCH_OPERATORS here, which should be the budget service's, and"
                    " holding no operator key)"
                )
        await self._producer.send(event)
        return event
