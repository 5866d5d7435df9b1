"""Workflow versions for the CLI: list them from the log, ask the service to roll one back."""

from __future__ import annotations

from typing import Any

from services.improvement.versions import VERSION_TOPICS, WorkflowLedger
from streams.clock import Clock, SystemClock
from streams.errors import InvalidRequest
from streams.events import RollbackRequested
from streams.kafka import EventProducer, KafkaSettings
from streams.registry import read_topics_to_end

__all__ = ["list_versions", "request_rollback"]


async def _ledger(settings: KafkaSettings, workflow_id: str) -> WorkflowLedger:
    ledger = WorkflowLedger(workflow_id)
    for event in await read_topics_to_end(settings, VERSION_TOPICS):
        if getattr(event, "workflow_id", None) == workflow_id:
            ledger.apply(event)
    return ledger


async def list_versions(settings: KafkaSettings, workflow_id: str) -> list[dict[str, Any]]:
    """Every version of ``workflow_id`` (a specialty), oldest first.

    Each row: workflow_id, version, parent_version, change_source, changes,
    user_id, saved_at (ISO or None), note, status (``base``, ``canary``,
    ``rolled_back``, ``rollback_record``, ``superseded``, ``saved``) and
    traffic_share. Version 1, each agent's own prompt, is always listed.
    """
    return (await _ledger(settings, workflow_id)).listing()


async def request_rollback(
    settings: KafkaSettings,
    workflow_id: str,
    to_version: int,
    user_id: str,
    *,
    reason: str = "",
    clock: Clock | None = None,
) -> RollbackRequested:
    """Send ``rollback_requested``; the improvement service applies it (change_source user).

    Raises InvalidRequest when the workflow has no such version or already serves it.
    """
    ledger = await _ledger(settings, workflow_id)
    if not ledger.knows(to_version):
        known = ", ".join(str(r["version"]) for r in ledger.listing())
        raise InvalidRequest(
            f"workflow {workflow_id!r} has no version {to_version}; it has {known}"
        )
    st = ledger.state
    if st.canary is None and st.base == to_version:
        raise InvalidRequest(f"workflow {workflow_id!r} already serves version {to_version}")
    try:
        event = RollbackRequested(
            source="cli",
            user_id=user_id,
            workflow_id=workflow_id,
            to_version=to_version,
            reason=reason,
            occurred_at=(clock or SystemClock()).now(),
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    async with EventProducer(settings, client_id="orchestrator.cli") as producer:
        await producer.send(event)
    return event
