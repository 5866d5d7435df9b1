"""Every failure kind of the platform, in one tree.

OrchestratorError
├── InvalidRequest            bad input refused before anything is sent
├── DecodeError               bytes on a topic that cannot be decoded or validated
├── UnknownSchemaError(DecodeError)  a fingerprint no known writer schema has
├── RunFailed                 a run ended in workflow_failed
│   ├── BudgetExceededError   a goal limit stopped it (names the limit)
│   ├── LLMFailure            the LLM endpoint failed and no lower tier could answer
│   └── RunRejected           any other refusal (no agent, invalid, ...)
├── RunTimeout                no terminal event arrived in time
└── StoreError                the analytics store refused or failed
"""

from __future__ import annotations

__all__ = [
    "BudgetExceededError",
    "DecodeError",
    "InvalidRequest",
    "LLMFailure",
    "OrchestratorError",
    "RunFailed",
    "RunRejected",
    "RunTimeout",
    "StoreError",
    "UnknownSchemaError",
]


class OrchestratorError(Exception):
    """Base of every error the platform raises on purpose."""


class InvalidRequest(OrchestratorError, ValueError):
    """Input refused before anything was sent."""


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


class StoreError(OrchestratorError):
    """The analytics store failed."""
