"""Typed, frozen event models: one per Avro schema in ``schemas/``.

Every event shares the envelope of :class:`Event`. The ``.avsc`` files are the
contract; ``tests/unit/test_schema_parity.py`` holds these models to them field
by field.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

__all__ = [
    "ALL_EVENTS",
    "MAX_AUTOMATION_TTL_SECONDS",
    "MAX_MESSAGE_BYTES",
    "MAX_VERSION",
    "AdmissionGranted",
    "AdmissionReturned",
    "AgentEvicted",
    "ApiKeyIssued",
    "ApiKeyRevoked",
    "AgentLoaded",
    "AgentRetired",
    "AgentSpawned",
    "AutomationCreated",
    "BudgetExceeded",
    "BudgetReported",
    "BudgetTicked",
    "BudgetUpdateRequested",
    "DeadLetter",
    "Event",
    "FeedbackDecided",
    "FailureReason",
    "FeedbackReceived",
    "GoalAgentsChanged",
    "Identifier",
    "ImprovementApplied",
    "ImprovementAvailable",
    "ImprovementRolledBack",
    "LlmCallCompleted",
    "PatternDiscovered",
    "PromotionDecided",
    "PromotionRequested",
    "PromotionScope",
    "RequestReceived",
    "Role",
    "RollbackRequested",
    "RouteDecided",
    "SpawnApproved",
    "SpawnDenied",
    "SpawnRequested",
    "SpendDecided",
    "SpendRequested",
    "TaskAdmitted",
    "TaskRequested",
    "WorkflowAssessed",
    "WorkflowCompleted",
    "WorkflowFailed",
    "WorkflowStarted",
    "WorkflowVersionSaved",
    "event_class",
    "MAX_CONTEXT_BYTES",
    "MAX_FEEDBACK_CHARS",
    "MAX_RUN_ID_CHARS",
    "MAX_WAIT_SECONDS",
    "SPAWN_APPROVAL_SECONDS",
    "SPAWN_WRITE_SECONDS",
    "MAX_DAILY_COST_USD",
    "is_run_id_refusal",
    "new_event_id",
    "run_id_refusal_id",
    "terminal_event_id",
    "validate_identifier",
    "validate_message",
]

MAX_MESSAGE_BYTES = 32 * 1024
# A request's context (keys and values, UTF-8): the gateway's system message and history
# fit, and a task carrying message and context stays far inside a Kafka record (1 MB).
MAX_CONTEXT_BYTES = 64 * 1024
# A run id: every service keys tables, snapshots and the budget's record by it, so a
# made-up id of a megabyte would be kept whole in each (the SDK makes uuid4s: 36).
MAX_RUN_ID_CHARS = 200
# Feedback text: the improvement service reads it on its event loop, the guard compares
# instructions with it; what a person writes about one answer fits.
MAX_FEEDBACK_CHARS = 4_000
# A spawn approval older than this (by its occurred_at, the budget's clock) is not acted
# on: the spawner reports spawn_failed instead, and the budget gives the approval's place
# under max_agents back after twice this, so an approval nobody acts on (one the spawner
# cannot read, say) does not hold it for ever, and none is acted on after it was freed.
SPAWN_APPROVAL_SECONDS = 300.0
# The spawner asks the LLM for a prompt only for an approval at most this old (the template
# serves an older one): the budget's hold of the call's cost lapses at max(60 s, the LLM
# timeout + 30 s) after the approval, and a call begun later could run past it.
SPAWN_WRITE_SECONDS = 30.0
MAX_DAILY_COST_USD = 1e9
# A request's deadline is at most this long after the request: a lease, a queue's wait
# and every time sum the budget makes stay within reach of the clock.
MAX_WAIT_SECONDS = 86_400
# A workflow's versions count up from 1 and the next is the largest + 1: one version past
# what Avro's long holds (2**63 - 1 was valid) made every later one of that workflow fail
# to encode, for good.
MAX_VERSION = 2**31 - 1
# An automation lasts at most this long (ten years): 2**63 - 1 seconds overflowed the
# router's timedelta.
MAX_AUTOMATION_TTL_SECONDS = 10 * 365 * 86_400
# Later than this no event time is: adding a deadline, a lease or a grace to one can
# never overflow Python's datetime (year 9999).
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)
# Matched whole (fullmatch): with ``match`` a ``$`` also matched before a final newline, so
# "g1\n" was a goal id.
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,127}")


def new_event_id() -> str:
    return str(uuid.uuid4())


_TERMINAL_NS = uuid.UUID("0f3e9a8c-2d41-4c6b-9a77-3b1d5e2f8c90")


def terminal_event_id(run_id: str) -> str:
    """The one event id every terminal event of a run carries, whoever sends it.

    A replayed or raced terminal event (``workflow_completed`` or ``workflow_failed``)
    therefore has the same id as the first, and every reader (client, budget,
    analytics) keeps one outcome per run.
    """
    return str(uuid.uuid5(_TERMINAL_NS, f"{run_id}:terminal"))


# The router's namespace, where these ids were first derived: refusals already on the log
# are still recognised.
_RUN_ID_TAKEN_NS = uuid.UUID("c2d9e4f1-7a3b-4c5d-8e6f-a1b2c3d4e5f6")


def run_id_refusal_id(goal_id: str, run_id: str) -> str:
    """The id of the ``workflow_failed`` (reason ``invalid``) with which the router refuses
    ``goal_id``'s request under a run id another goal's request used.

    By goal and run (neither holds a NUL): never the run's :func:`terminal_event_id`, nor
    another goal's refusal's, and the same for every copy of the request.
    """
    return str(uuid.uuid5(_RUN_ID_TAKEN_NS, f"run id taken\x00{goal_id}\x00{run_id}"))


def is_run_id_refusal(event: Event) -> bool:
    """Whether ``event`` is such a refusal: the refused goal's own failure, not the end of
    the run its run id names (another goal's). A reader that folds terminal events by run
    id skips it; only the refused goal's client waits for it."""
    return (
        isinstance(event, WorkflowFailed)
        and event.reason == "invalid"  # before the hash: most failures are not refusals
        and event.event_id == run_id_refusal_id(event.goal_id, event.run_id)
    )


def _utcnow() -> datetime:
    # Envelope default for callers at the edge; services pass their clock's time.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def validate_identifier(value: str) -> str:
    """Goal, user and agent ids: 1-128 chars of letters, digits and ``_.:@-``."""
    if _IDENT.fullmatch(value) is None:
        raise ValueError(
            f"invalid identifier {value!r}: use 1-128 letters, digits or _ . : @ -,"
            " starting with a letter or digit"
        )
    return value


def validate_message(value: str) -> str:
    if not value.strip():
        raise ValueError("message is empty")
    size = len(value.encode("utf-8"))
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message is {size} bytes; the limit is {MAX_MESSAGE_BYTES}")
    return value


def _optional_identifier(value: str | None) -> str | None:
    return None if value is None else validate_identifier(value)


def validate_run_id(value: str) -> str:
    """Run ids: 1-200 characters, none of them blank or a control character."""
    if not value or len(value) > MAX_RUN_ID_CHARS or not value.isprintable() or value.isspace():
        raise ValueError(
            f"invalid run id {value[:40]!r}{'...' if len(value) > 40 else ''}: use 1-"
            f"{MAX_RUN_ID_CHARS} printable characters"
        )
    return value


def _optional_run_id(value: str | None) -> str | None:
    return None if value is None else validate_run_id(value)


Identifier = Annotated[str, AfterValidator(validate_identifier)]
OptionalIdentifier = Annotated[str | None, AfterValidator(_optional_identifier)]
Message = Annotated[str, AfterValidator(validate_message)]
RunId = Annotated[str, AfterValidator(validate_run_id)]
OptionalRunId = Annotated[str | None, AfterValidator(_optional_run_id)]
Tier = Literal[
    "llm", "legacy_routing", "legacy_static", "keyword", "static_fallback", "automation_cache"
]
Limit = Literal["max_agents", "max_concurrent", "max_daily_cost"]

FailureReason = Literal[
    "budget_exceeded", "llm_failure", "timeout", "invalid", "no_agent", "internal"
]
"""Why a run ended without an answer (``WorkflowFailed.reason``)."""

# Fields every event sets for itself, never taken from its cause.
_OWN_FIELDS = frozenset({"event_id", "event_type", "occurred_at", "source"})


class Event(BaseModel):
    """The envelope every event carries.

    ``topic`` names the topic (and Avro record) of a concrete event; ``key_field``
    the envelope or body field its Kafka key is taken from.
    """

    # No NaN or infinity in any number: JSON state (the budget's table) cannot keep them,
    # and every comparison with a NaN is false (a cap it meets never holds).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    topic: ClassVar[str]
    key_field: ClassVar[str]

    event_id: str = Field(default_factory=new_event_id)
    event_type: str
    occurred_at: datetime = Field(default_factory=_utcnow)
    source: str
    run_id: OptionalRunId = None
    goal_id: OptionalIdentifier = None
    user_id: OptionalIdentifier = None

    @field_validator("*", mode="after")
    @classmethod
    def _millis(cls, value: object) -> object:
        # Avro timestamp-millis keeps milliseconds; truncate so a round trip is exact.
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            value = value.astimezone(UTC)
            if value >= _LATEST:
                raise ValueError(f"a time after {_LATEST.year} ({value.isoformat()})")
            return value.replace(microsecond=value.microsecond // 1000 * 1000)
        return value

    def key(self) -> bytes | None:
        value = getattr(self, self.key_field)
        return None if value is None else str(value).encode("utf-8")

    @classmethod
    def caused_by(cls, cause: Event, /, **fields: Any) -> Self:
        """An event of this type that follows from ``cause``.

        The envelope (run, goal, user) and every other field the two types share (agent,
        specialty, message, context, deadlines...) come from ``cause``; ``fields`` give the
        rest (event_id, source, occurred_at, what is new) and override any of them.
        """
        mine, theirs = cls.model_fields, type(cause).model_fields
        shared = {n: getattr(cause, n) for n in mine if n in theirs and n not in _OWN_FIELDS}
        return cls(**(shared | fields))


class RequestReceived(Event):
    topic = "request_received"
    key_field = "run_id"
    event_type: Literal["request_received"] = "request_received"
    run_id: RunId
    goal_id: Identifier
    user_id: Identifier
    message: Message
    context: dict[str, str] = Field(default_factory=dict)
    deadline_at: datetime | None = None

    @field_validator("context")
    @classmethod
    def _context_fits(cls, value: dict[str, str]) -> dict[str, str]:
        # The router's task carries it on, with the message: both must fit one record.
        size = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in value.items())
        if size > MAX_CONTEXT_BYTES:
            raise ValueError(f"context is {size} bytes; the limit is {MAX_CONTEXT_BYTES}")
        return value

    @model_validator(mode="after")
    def _deadline_in_reach(self) -> Self:
        # Both times come from the sender's clock here. The events that follow carry this
        # deadline beside their own service's time, so only the request is checked.
        if self.deadline_at is not None:
            wait = (self.deadline_at - self.occurred_at).total_seconds()
            if wait > MAX_WAIT_SECONDS:
                raise ValueError(
                    f"deadline_at is {wait:.0f} s after occurred_at; at most"
                    f" {MAX_WAIT_SECONDS} s (a day) is allowed"
                )
        return self


class RouteDecided(Event):
    topic = "route_decided"
    key_field = "run_id"
    event_type: Literal["route_decided"] = "route_decided"
    run_id: RunId
    specialty: str
    agent_id: str | None = None
    action: Literal["reuse", "spawn", "wait", "automation", "degraded", "secondary"]
    scores: dict[str, float] = Field(default_factory=dict)
    criteria: dict[str, float] = Field(default_factory=dict)
    policy: str = "static"
    policy_version: int = 0
    probability: float = 1.0
    # What the policy saw, so its state can be rebuilt and replayed from the log.
    features: list[str] = Field(default_factory=list)
    # streams.signatures keys of the request: exact (response cache) and pattern.
    request_key: str = ""
    signature: str = ""
    # The model the chosen agent answers with (None: the platform's one model).
    model: str | None = None
    # The chance the platform's judge grades this run's answer (ORCH_JUDGE_RULE; None:
    # the sample, ORCH_JUDGE_SAMPLE); judged when streams.judging.judge_draw falls under it.
    judge_probability: float | None = Field(default=None, ge=0.0, le=1.0)


class SpawnRequested(Event):
    topic = "spawn_requested"
    key_field = "goal_id"
    event_type: Literal["spawn_requested"] = "spawn_requested"
    goal_id: Identifier
    specialty: str
    message: str = ""
    context: dict[str, str] = Field(default_factory=dict)
    # The model the new agent is to answer with (None: the platform's one model).
    model: str | None = None


class SpawnApproved(Event):
    topic = "spawn_approved"
    key_field = "goal_id"
    event_type: Literal["spawn_approved"] = "spawn_approved"
    goal_id: Identifier
    specialty: str
    message: str = ""
    context: dict[str, str] = Field(default_factory=dict)
    agents_after: int = 0
    model: str | None = None


class SpawnDenied(Event):
    topic = "spawn_denied"
    key_field = "goal_id"
    event_type: Literal["spawn_denied"] = "spawn_denied"
    goal_id: Identifier
    specialty: str
    limit: Limit
    detail: str
    model: str | None = None


class AgentSpawned(Event):
    topic = "agent_spawned"
    key_field = "agent_id"
    event_type: Literal["agent_spawned"] = "agent_spawned"
    agent_id: str
    specialty: str
    system_prompt: str
    temperature: float
    tools: list[str] = Field(default_factory=list)
    model: str = ""
    prompt_source: Literal["llm", "template"] = "template"
    version: int = 1


class _Task(Event):
    """A task for one agent: what the router asks for and the budget lets through alike."""

    run_id: RunId
    goal_id: Identifier
    agent_id: str
    specialty: str
    message: str
    context: dict[str, str] = Field(default_factory=dict)
    requested_at: datetime | None = None
    deadline_at: datetime | None = None
    # The admission token this task was let through with (see AdmissionGranted): the
    # router admitted it itself, and the budget only counts it. None: the budget decides.
    token: str | None = Field(default=None, max_length=64)


class TaskRequested(_Task):
    topic = "task_requested"
    key_field = "goal_id"
    event_type: Literal["task_requested"] = "task_requested"
    # The router instance asking (``holder``) for this many admission tokens of the goal.
    want_tokens: int = Field(default=0, ge=0, le=64)
    holder: str | None = Field(default=None, max_length=64)
    # The loader gives back a task admitted with ``token`` that it did not start (its
    # agent is retired, and only the budget may count a revival): decided afresh.
    given_back: bool = False


class TaskAdmitted(_Task):
    """A :class:`TaskRequested` the budget admitted (``TaskAdmitted.caused_by(request)``),
    or the router with an admission token (``token`` set)."""

    topic = "task_admitted"
    key_field = "agent_id"
    event_type: Literal["task_admitted"] = "task_admitted"
    # With a token: the token's slot is held for a task started by then, so the loader
    # starts it by then or gives it back to the budget (``TaskRequested.given_back``).
    start_by: datetime | None = None


class WorkflowStarted(Event):
    topic = "workflow_started"
    key_field = "run_id"
    event_type: Literal["workflow_started"] = "workflow_started"
    run_id: RunId
    agent_id: str
    specialty: str


class LlmCallCompleted(Event):
    topic = "llm_call_completed"
    key_field = "goal_id"
    event_type: Literal["llm_call_completed"] = "llm_call_completed"
    goal_id: Identifier
    agent_id: str | None = None
    model: str
    purpose: Literal["answer", "spawn_prompt", "judge", "improvement"] = "answer"
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0)
    ok: bool = True
    error: str | None = None


class WorkflowCompleted(Event):
    """Terminal: the run answered. Keyed by goal_id so the budget owner sees it."""

    topic = "workflow_completed"
    key_field = "goal_id"
    event_type: Literal["workflow_completed"] = "workflow_completed"
    goal_id: Identifier
    run_id: RunId
    agent_id: str | None = None
    specialty: str
    text: str
    cost_usd: float = Field(default=0.0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0)
    degradation_tier: Tier = "llm"
    quality: float | None = None
    automation_id: str | None = None
    # What the endpoint said besides the text (e.g. a simulated world's hidden quality).
    meta: dict[str, str] = Field(default_factory=dict)


class WorkflowFailed(Event):
    """Terminal: the run ended without an answer, and says why."""

    topic = "workflow_failed"
    key_field = "goal_id"
    event_type: Literal["workflow_failed"] = "workflow_failed"
    goal_id: Identifier
    run_id: RunId
    reason: FailureReason
    detail: str
    limit: Limit | None = None
    agent_id: str | None = None
    specialty: str | None = None
    latency_ms: float = Field(default=0.0, ge=0)
    admitted: bool = False


class AgentLoaded(Event):
    topic = "agent_loaded"
    key_field = "agent_id"
    event_type: Literal["agent_loaded"] = "agent_loaded"
    agent_id: str
    specialty: str
    active_agents: int = 0


class AgentEvicted(Event):
    topic = "agent_evicted"
    key_field = "agent_id"
    event_type: Literal["agent_evicted"] = "agent_evicted"
    agent_id: str
    specialty: str
    reason: str = "lru"


class AgentRetired(Event):
    topic = "agent_retired"
    key_field = "agent_id"
    event_type: Literal["agent_retired"] = "agent_retired"
    agent_id: str
    specialty: str
    reason: str = "idle"
    idle_seconds: float = Field(default=0.0, ge=0)


class GoalAgentsChanged(Event):
    """A goal's agent came to life, failed to, retired or was revived: the budget's count.

    ``max_agents`` counts a goal's live agents, and the budget owns goals by partition;
    ``agent_spawned``/``agent_retired`` are keyed by agent id, so the spawner (spawned,
    spawn_failed, with the approval's id) and the loader (retired, revived) send this
    notice keyed by goal as well.
    """

    topic = "goal_agents_changed"
    key_field = "goal_id"
    event_type: Literal["goal_agents_changed"] = "goal_agents_changed"
    goal_id: Identifier
    agent_id: str
    change: Literal["spawned", "spawn_failed", "retired", "revived"]
    approval_id: str | None = None


class BudgetExceeded(Event):
    topic = "budget_exceeded"
    key_field = "goal_id"
    event_type: Literal["budget_exceeded"] = "budget_exceeded"
    goal_id: Identifier
    limit: Limit
    current: float
    maximum: float


class BudgetUpdateRequested(Event):
    topic = "budget_update_requested"
    key_field = "goal_id"
    event_type: Literal["budget_update_requested"] = "budget_update_requested"
    goal_id: Identifier
    max_agents: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)
    # At most a billion USD a day: a cap past it is no cap, and 1e308 overflowed the
    # budget's arithmetic (every task asking for admission tokens failed in its handler).
    max_daily_cost: float | None = Field(default=None, ge=0, le=MAX_DAILY_COST_USD)
    # Quality given up per USD of an answer's cost: the router maximises
    # quality - cost_weight * cost_usd for this goal.
    cost_weight: float | None = Field(default=None, ge=0, le=1_000_000)


class FeedbackReceived(Event):
    topic = "feedback_received"
    key_field = "run_id"
    event_type: Literal["feedback_received"] = "feedback_received"
    run_id: RunId
    user_id: Identifier
    score: int | None = Field(default=None, ge=1, le=5)
    text: str = Field(default="", max_length=MAX_FEEDBACK_CHARS)
    channel: str = "sdk"


class WorkflowAssessed(Event):
    topic = "workflow_assessed"
    key_field = "run_id"
    event_type: Literal["workflow_assessed"] = "workflow_assessed"
    run_id: RunId
    agent_id: str | None = None
    specialty: str
    quality: float
    # "unjudged": the run was outside the judge's sample (ORCH_JUDGE_SAMPLE) and ``quality``
    # is only the heuristic's guess (services/improvement/assess.py); learn it from feedback.
    method: Literal["judge", "heuristic", "world", "unjudged"] = "heuristic"
    # What the assessed answer cost (its LLM call), so quality can be weighed against it.
    cost_usd: float = Field(default=0.0, ge=0)


class PatternDiscovered(Event):
    topic = "pattern_discovered"
    key_field = "signature"
    event_type: Literal["pattern_discovered"] = "pattern_discovered"
    signature: str
    specialty: str
    occurrences: int
    example_message: str = ""


class AutomationCreated(Event):
    topic = "automation_created"
    key_field = "signature"
    event_type: Literal["automation_created"] = "automation_created"
    automation_id: str
    signature: str
    kind: Literal["direct_route", "response_cache"]
    specialty: str
    agent_id: str | None = None
    ttl_seconds: int = Field(default=3600, ge=0, le=MAX_AUTOMATION_TTL_SECONDS)


class ImprovementAvailable(Event):
    topic = "improvement_available"
    key_field = "workflow_id"
    event_type: Literal["improvement_available"] = "improvement_available"
    improvement_id: str
    workflow_id: str
    kind: str
    proposal: str
    reason: str = ""


class ImprovementApplied(Event):
    topic = "improvement_applied"
    key_field = "workflow_id"
    event_type: Literal["improvement_applied"] = "improvement_applied"
    improvement_id: str
    workflow_id: str
    version: int = Field(ge=0, le=MAX_VERSION)
    traffic_share: float = 1.0


class ImprovementRolledBack(Event):
    topic = "improvement_rolled_back"
    key_field = "workflow_id"
    event_type: Literal["improvement_rolled_back"] = "improvement_rolled_back"
    workflow_id: str
    from_version: int = Field(ge=0, le=MAX_VERSION)
    to_version: int = Field(ge=0, le=MAX_VERSION)
    reason: str


class WorkflowVersionSaved(Event):
    topic = "workflow_version_saved"
    key_field = "workflow_id"
    event_type: Literal["workflow_version_saved"] = "workflow_version_saved"
    workflow_id: str
    version: int = Field(ge=0, le=MAX_VERSION)
    parent_version: int | None = Field(default=None, ge=0, le=MAX_VERSION)
    changes: dict[str, str] = Field(default_factory=dict)
    change_source: Literal["user", "system", "automated"] = "system"


class RollbackRequested(Event):
    """Command: serve ``to_version`` of a workflow again (``orchestrator rollback``)."""

    topic = "rollback_requested"
    key_field = "workflow_id"
    event_type: Literal["rollback_requested"] = "rollback_requested"
    workflow_id: str
    to_version: int = Field(ge=0, le=MAX_VERSION)
    reason: str = ""


Role = Literal["user", "operator"]


class ApiKeyIssued(Event):
    """An API key for the HTTP surfaces: only its SHA-256 is kept, never the key itself."""

    topic = "api_key_issued"
    key_field = "key_id"
    event_type: Literal["api_key_issued"] = "api_key_issued"
    goal_id: Identifier
    user_id: Identifier
    key_id: str
    key_hash: str
    role: Role = "user"
    label: str = ""


class ApiKeyRevoked(Event):
    topic = "api_key_revoked"
    key_field = "key_id"
    event_type: Literal["api_key_revoked"] = "api_key_revoked"
    key_id: str
    reason: str = ""


class FeedbackDecided(Event):
    """The improvement service's verdict on one ``feedback_received`` (``feedback_id``)."""

    topic = "feedback_decided"
    key_field = "run_id"
    event_type: Literal["feedback_decided"] = "feedback_decided"
    run_id: RunId
    feedback_id: str
    accepted: bool
    reason: str = ""
    error_type: str | None = None  # the refusal's kind (streams.errors), when refused
    improvement_id: str | None = None


PromotionScope = Literal["goal", "all"]


class PromotionRequested(Event):
    """Command from an operator. ``scope="goal"`` (``orchestrator improve approve``): a
    goal's proposal waiting for review goes to that goal's canary. ``scope="all"``
    (``orchestrator improve promote``): an improvement saved for one goal serves every goal.
    Events written before ``scope`` existed read as ``"goal"``."""

    topic = "promotion_requested"
    key_field = "improvement_id"
    event_type: Literal["promotion_requested"] = "promotion_requested"
    improvement_id: str
    reason: str = ""
    scope: PromotionScope = "goal"


class PromotionDecided(Event):
    """The verdict on a ``promotion_requested`` (``request_id``)."""

    topic = "promotion_decided"
    key_field = "improvement_id"
    event_type: Literal["promotion_decided"] = "promotion_decided"
    improvement_id: str
    request_id: str
    accepted: bool
    reason: str = ""
    error_type: str | None = None
    workflow_id: str | None = None


class SpendRequested(Event):
    """Command: hold back ``amount_usd`` of a goal's day for one LLM call the platform makes."""

    topic = "spend_requested"
    key_field = "goal_id"
    event_type: Literal["spend_requested"] = "spend_requested"
    goal_id: Identifier
    purpose: Literal["judge", "improvement"]
    amount_usd: float = Field(ge=0)


class SpendDecided(Event):
    """The budget's answer to a ``spend_requested`` (``request_id``): held back, or refused."""

    topic = "spend_decided"
    key_field = "goal_id"
    event_type: Literal["spend_decided"] = "spend_decided"
    goal_id: Identifier
    request_id: str
    approved: bool
    reason: str = ""


class AdmissionGranted(Event):
    """Slots the budget set aside for one router instance (``holder``) to admit tasks with.

    Each token is one of the goal's ``max_concurrent`` slots and ``hold_usd`` of its day,
    both held by the budget from now on. The holder admits a task with one (a task whose
    worst case fits ``hold_usd``) by telling the budget (``task_requested`` naming the
    token) and the loader (``task_admitted`` with ``start_by`` = ``bind_by``) at once; a
    token not used by then is never used, and its slot comes back once no task it let
    start can still run.
    """

    topic = "admission_granted"
    key_field = "goal_id"
    event_type: Literal["admission_granted"] = "admission_granted"
    goal_id: Identifier
    holder: str = Field(max_length=64)
    tokens: list[Annotated[str, Field(max_length=64)]] = Field(max_length=64)
    hold_usd: float = Field(ge=0)
    bind_by: datetime


class AdmissionReturned(Event):
    """The holder will not use these tokens: the budget may give their slots back now."""

    topic = "admission_returned"
    key_field = "goal_id"
    event_type: Literal["admission_returned"] = "admission_returned"
    goal_id: Identifier
    holder: str = Field(max_length=64)
    tokens: list[Annotated[str, Field(max_length=64)]] = Field(max_length=64)


class BudgetTicked(Event):
    """The budget's clock for one goal: lets waiting tasks time out with no other event."""

    topic = "budget_ticked"
    key_field = "goal_id"
    event_type: Literal["budget_ticked"] = "budget_ticked"
    goal_id: Identifier


class BudgetReported(Event):
    """The budget's view of one goal now: its limits and what it uses (the latest per goal).

    A read model the budget service publishes, coalesced (at most one per goal per
    ``ORCH_BUDGET_REPORT_SECONDS``, and at once when a limit changes); ``spent_today``
    is the spend filed under ``day`` (UTC), ``held`` the worst cases held back for calls
    not yet paid.
    """

    topic = "budget_reported"
    key_field = "goal_id"
    event_type: Literal["budget_reported"] = "budget_reported"
    goal_id: Identifier
    max_agents: int
    max_concurrent: int
    max_daily_cost: float
    agents: int
    in_flight: int
    queued: int
    spent_today: float
    held: float
    day: str
    cost_weight: float = 0.0


class DeadLetter(Event):
    topic = "dead_letter"
    key_field = "original_topic"
    event_type: Literal["dead_letter"] = "dead_letter"
    original_topic: str
    partition: int = -1
    offset: int = -1
    original_key: bytes | None = None
    payload: bytes = b""
    reason: str
    error_type: str = "DecodeError"


ALL_EVENTS: tuple[type[Event], ...] = (
    RequestReceived,
    RouteDecided,
    SpawnRequested,
    SpawnApproved,
    SpawnDenied,
    AgentSpawned,
    TaskRequested,
    TaskAdmitted,
    WorkflowStarted,
    LlmCallCompleted,
    WorkflowCompleted,
    WorkflowFailed,
    AgentLoaded,
    AgentEvicted,
    GoalAgentsChanged,
    AgentRetired,
    BudgetExceeded,
    BudgetUpdateRequested,
    FeedbackReceived,
    WorkflowAssessed,
    PatternDiscovered,
    AutomationCreated,
    ImprovementAvailable,
    ImprovementApplied,
    ImprovementRolledBack,
    WorkflowVersionSaved,
    RollbackRequested,
    ApiKeyIssued,
    ApiKeyRevoked,
    FeedbackDecided,
    PromotionRequested,
    PromotionDecided,
    SpendRequested,
    SpendDecided,
    AdmissionGranted,
    AdmissionReturned,
    BudgetTicked,
    BudgetReported,
    DeadLetter,
)

_BY_TYPE = {cls.topic: cls for cls in ALL_EVENTS}


def event_class(event_type: str) -> type[Event]:
    try:
        return _BY_TYPE[event_type]
    except KeyError:
        raise KeyError(f"unknown event type {event_type!r}") from None
