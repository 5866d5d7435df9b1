"""Why the improvement service refuses feedback, as exceptions under the platform's tree.

OrchestratorError (streams.errors)
├── InvalidRequest            bad input (missing text and score, bad score, bad ids)
└── FeedbackRefused           valid feedback the service will not apply
    ├── UnknownRun            no request with this run id is in the log
    └── NotRunOwner           the user giving feedback is not the one who asked
"""

from __future__ import annotations

from streams.errors import OrchestratorError

__all__ = ["FeedbackRefused", "NotRunOwner", "UnknownRun"]


class FeedbackRefused(OrchestratorError):
    """Feedback that is well formed but may not change anything."""


class UnknownRun(FeedbackRefused):
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"unknown run {run_id!r}: no request with this run id was seen")


class NotRunOwner(FeedbackRefused):
    def __init__(self, run_id: str, user_id: str) -> None:
        self.run_id = run_id
        self.user_id = user_id
        super().__init__(f"user {user_id!r} does not own run {run_id!r}; only its owner may")
