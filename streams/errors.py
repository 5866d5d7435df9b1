"""Every failure kind of the platform, in one tree.

OrchestratorError
├── InvalidRequest            bad input refused before anything is sent
├── InvalidSetting            an environment variable that does not parse or is out of range
├── DecodeError               bytes on a topic that cannot be decoded or validated
├── UnknownSchemaError(DecodeError)  a fingerprint no known writer schema has
├── RunFailed                 a run ended in workflow_failed
│   ├── BudgetExceededError   a goal limit stopped it (names the limit)
│   ├── LLMFailure            the LLM endpoint failed and no lower tier could answer
│   └── RunRejected           any other refusal (no agent, invalid, ...)
├── RunTimeout                no terminal event arrived in time
├── Refused                   a well-formed command the platform will not act on
│   ├── FeedbackRefused       feedback that changes nothing (reason says why)
│   │   ├── UnknownRun        no request with this run id is in the log
│   │   ├── NotRunOwner       the user giving feedback is not the one who asked
│   │   └── RateLimited       the user sent more feedback than the limit allows
│   ├── PromotionRefused      an improvement that may not be made platform-wide
│   └── NotOperator           the command needs an operator and the caller is not one
├── Unauthorized              no valid API key
├── NoVerdict                 a command was sent and no verdict came in time
└── StoreError                the analytics store refused or failed
    └── QueryRefused          the SQL surface refused a statement (names what)
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "BudgetExceededError",
    "DecodeError",
    "InvalidRequest",
    "InvalidSetting",
    "LLMFailure",
    "FeedbackRefused",
    "NoVerdict",
    "NotOperator",
    "NotRunOwner",
    "OrchestratorError",
    "QueryRefused",
    "PromotionRefused",
    "RateLimited",
    "Refused",
    "Unauthorized",
    "UnknownRun",
    "RunFailed",
    "RunRejected",
    "RunTimeout",
    "StoreError",
    "UnknownSchemaError",
    "refusal",
]


class OrchestratorError(Exception):
    """Base of every error the platform raises on purpose."""


class InvalidRequest(OrchestratorError, ValueError):
    """Input refused before anything was sent."""


class InvalidSetting(OrchestratorError, ValueError):
    """A setting's variable does not parse or is out of range (the message names it)."""


class DecodeError(OrchestratorError):
    """Bytes that could not be turned into a typed event."""

    def __init__(self, reason: str, *, topic: str | None = None) -> None:
        self.reason = reason
        self.topic = topic
        where = f" on topic {topic!r}" if topic else ""
        super().__init__(f"cannot decode event{where}: {reason}")


class UnknownSchemaError(DecodeError):
    """The writer schema's fingerprint is not known to this reader."""


class RunFailed(OrchestratorError):
    """A run ended in ``workflow_failed``."""

    def __init__(self, run_id: str, reason: str, detail: str, limit: str | None = None) -> None:
        self.run_id = run_id
        self.reason = reason
        self.detail = detail
        self.limit = limit
        super().__init__(f"run {run_id} failed ({reason}): {detail}")


class BudgetExceededError(RunFailed):
    """A goal limit (max_agents, max_concurrent, max_daily_cost) stopped the run."""


class LLMFailure(RunFailed):
    """The LLM endpoint failed for this run."""


class RunRejected(RunFailed):
    """The platform refused the run for another reason."""


class RunTimeout(OrchestratorError, TimeoutError):
    """No terminal event arrived before the deadline."""

    def __init__(self, run_id: str, timeout: float) -> None:
        self.run_id = run_id
        self.timeout = timeout
        super().__init__(f"run {run_id}: no answer within {timeout:g} s")


class BrokerUnavailable(OrchestratorError):
    """The broker did not acknowledge the request in time (an outage): no answer is awaited.

    Almost always the request was not written; a broker that wrote it and died before its
    acknowledgement runs it once, under this run id, after it is back.
    """

    def __init__(self, run_id: str, detail: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"run {run_id}: the Kafka broker is unreachable and did not acknowledge the"
            f" request ({detail}); it was most likely not sent"
        )


class Refused(OrchestratorError):
    """A well-formed command the platform will not act on; the message says why."""


class FeedbackRefused(Refused):
    """Feedback that is well formed but may not change anything."""


class UnknownRun(FeedbackRefused):
    """No request with this run id was seen."""


class NotRunOwner(FeedbackRefused):
    """The user (or the key's goal) does not own the run."""


class RateLimited(FeedbackRefused):
    """The user sent more feedback than the limit allows."""


_REFUSALS: dict[str, type[Refused]] = {}


def refusal(error_type: str | None, reason: str) -> Refused:
    """The typed error a verdict names (``FeedbackRefused`` when the name is not known)."""
    cls = _REFUSALS.get(error_type or "", FeedbackRefused)
    return cls(reason)


class PromotionRefused(Refused):
    """An improvement that may not be promoted to every goal."""


class NotOperator(Refused):
    """The command needs an operator's identity."""


class Unauthorized(OrchestratorError):
    """No valid API key came with the request."""


_REFUSALS.update(
    {
        cls.__name__: cls
        for cls in (
            FeedbackRefused,
            UnknownRun,
            NotRunOwner,
            RateLimited,
            PromotionRefused,
            NotOperator,
        )
    }
)


class NoVerdict(OrchestratorError, TimeoutError):
    """A command was sent, and its service gave no verdict in time (is it running?)."""


class StoreError(OrchestratorError):
    """The analytics store failed."""


class QueryRefused(StoreError):
    """The SQL surface refused a statement before it ran; the message names what, and why."""
