"""`orchestrator versions`, `rollback` and `replay`: workflow versions and routing policies."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from services.cli.common import (
    EXIT_INVALID,
    EXIT_TIMEOUT,
    JsonOpt,
    fail,
    kafka_settings,
    out,
    parse_duration,
    print_json,
    refused,
    require_kafka,
    run,
)
from streams.codec import default_codec
from streams.config import OperatorSettings
from streams.errors import DecodeError, InvalidRequest, NoVerdict
from streams.events import (
    DeadLetter,
    Event,
    ImprovementRolledBack,
    RollbackRequested,
    WorkflowAssessed,
    WorkflowCompleted,
    validate_identifier,
)
from streams.kafka import EventConsumer, KafkaSettings
from streams.registry import read_topics_to_end
from streams.versions import VERSION_TOPICS, VersionLedger, list_versions, request_rollback
from streams.workflows import goal_of

__all__ = ["VersionQuality", "measured_quality", "version_rows", "workflows_app"]

# Merged into the main app: these are top-level commands, not a group.
workflows_app = typer.Typer()


def _workflow_id(value: str, as_json: bool) -> str:
    goal, specialty = goal_of(value)
    try:
        for part in (specialty,) if goal is None else (goal, specialty):
            validate_identifier(part)
    except ValueError as exc:
        fail(
            f"workflow: {exc} (a workflow is SPECIALTY or GOAL/SPECIALTY)",
            EXIT_INVALID,
            as_json=as_json,
        )
    return value


# -- versions ---------------------------------------------------------------------------


@dataclass
class VersionQuality:
    """What the runs a version served measured: completed runs and assessed qualities."""

    runs: int = 0
    qualities: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return round(sum(self.qualities) / len(self.qualities), 4) if self.qualities else None


def measured_quality(events: Iterable[Event]) -> dict[tuple[str, int], VersionQuality]:
    """Per (workflow, version): runs from ``workflow_completed.meta`` joined to their quality.

    The loader labels each answer with the workflow and version that served it; a run's
    first ``workflow_assessed`` is its quality, as in the improvement service's canary test
    (which, like this, counts no ``unjudged`` run: its number is a guess, not a grade).
    """
    served: dict[str, tuple[str, int]] = {}
    first: dict[str, WorkflowAssessed] = {}
    for e in events:
        if isinstance(e, WorkflowCompleted):
            label = e.meta.get("workflow_version", "")
            if label.isdigit():
                served[e.run_id] = (e.meta.get("workflow_id") or e.specialty, int(label))
        elif isinstance(e, WorkflowAssessed):
            known = first.get(e.run_id)
            if known is None or e.occurred_at < known.occurred_at:
                first[e.run_id] = e
    out: dict[tuple[str, int], VersionQuality] = {}
    for run_id, key in served.items():
        stats = out.setdefault(key, VersionQuality())
        stats.runs += 1
        if run_id in first and first[run_id].method != "unjudged":
            stats.qualities.append(first[run_id].quality)
    return out


def version_rows(events: list[Event], workflow_id: str | None) -> list[dict[str, Any]]:
    """Every version of ``workflow_id`` (or of every workflow on the version topics)."""
    ledgers: dict[str, VersionLedger] = {}
    if workflow_id is not None:
        ledgers[workflow_id] = VersionLedger(workflow_id)
    for e in events:
        flow = getattr(e, "workflow_id", None)
        if e.topic in VERSION_TOPICS and isinstance(flow, str):
            if workflow_id is None or flow == workflow_id:
                ledgers.setdefault(flow, VersionLedger(flow)).apply(e)
    quality = measured_quality(events)
    rows = []
    for flow in sorted(ledgers):
        for row in ledgers[flow].listing():
            stats = quality.get((flow, row["version"]), VersionQuality())
            row.update(runs=stats.runs, assessed=len(stats.qualities), mean_quality=stats.mean)
            rows.append(row)
    return rows


def _change(row: dict[str, Any]) -> str:
    changes: dict[str, str] = row["changes"]
    if "rollback_from" in changes:
        return f"rollback v{changes['rollback_from']} → v{changes['rollback_to']}"
    text = changes.get("instructions") or changes.get("system_prompt") or row.get("note") or ""
    text = " ".join(text.split())
    return text if len(text) <= 70 else text[:69] + "…"


@workflows_app.command()
def versions(
    workflow: Annotated[
        str | None,
        typer.Argument(help="SPECIALTY (platform-wide) or GOAL/SPECIALTY; default: every one."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Each workflow's versions: traffic share, canary state and measured quality.

    Quality: each version's runs (workflow_completed) and their mean workflow_assessed.
    """
    if workflow is not None:
        workflow = _workflow_id(workflow, as_json)
    settings = kafka_settings()
    topics = [*VERSION_TOPICS, WorkflowCompleted.topic, WorkflowAssessed.topic]
    require_kafka(settings, as_json=as_json)
    events = run(read_topics_to_end(settings, topics), settings, as_json=as_json)
    rows = version_rows(events, workflow)
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print("no workflow has versions yet (each agent serves its own prompt, version 1)")
        return
    table = Table(title="workflow versions")
    for column in ("workflow", "v", "status", "share", "source", "runs", "quality", "change"):
        table.add_column(column, justify="right" if column in ("v", "share", "runs") else "left")
    colours = {"canary": "yellow", "base": "green", "rolled_back": "red"}
    for r in rows:
        colour = colours.get(r["status"], "dim")
        quality = "-" if r["mean_quality"] is None else f"{r['mean_quality']:.3f} ({r['assessed']})"
        table.add_row(
            escape(r["workflow_id"]),
            str(r["version"]),
            f"[{colour}]{r['status']}[/]",
            f"{r['traffic_share']:.0%}",
            r["change_source"],
            str(r["runs"]),
            quality,
            escape(_change(r)),
        )
    out.print(table)


# -- rollback ---------------------------------------------------------------------------


def _default_target(rows: list[dict[str, Any]], workflow_id: str) -> int:
    """The version to go back to: the base while a canary runs, else the base's parent."""
    by_status = {r["status"]: r for r in rows if r["status"] in ("base", "canary")}
    base = by_status.get("base")
    if "canary" in by_status and base is not None:
        return int(base["version"])
    if base is None or base["parent_version"] is None:
        raise InvalidRequest(
            f"workflow {workflow_id!r} serves version 1 to everyone: nothing to roll back to"
        )
    return int(base["parent_version"])


def _answers(event: Event, asked: RollbackRequested) -> bool:
    if isinstance(event, ImprovementRolledBack):
        return (event.workflow_id, event.to_version, event.user_id) == (
            asked.workflow_id,
            asked.to_version,
            asked.user_id,
        )
    if isinstance(event, DeadLetter) and event.payload:
        try:
            return default_codec().decode(event.payload).event_id == asked.event_id
        except DecodeError:
            return False
    return False


async def _rollback(
    settings: KafkaSettings, workflow_id: str, to: int | None, user: str, reason: str, wait: float
) -> tuple[RollbackRequested, Event]:
    """Send the request, then wait for what the improvement service made of it."""
    replies = EventConsumer(
        settings,
        [ImprovementRolledBack.topic, DeadLetter.topic],
        group_id=None,
        from_end=True,
        source="cli",
        fetch_max_wait_ms=50,
    )
    # Positioned at the end before the request leaves, so its outcome cannot slip past.
    async with replies:
        if to is None:
            to = _default_target(await list_versions(settings, workflow_id), workflow_id)
        asked = await request_rollback(settings, workflow_id, to, user, reason=reason)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        async for batch in replies.batches(timeout_ms=100, idle=True):
            for delivery in batch:
                if _answers(delivery.event, asked):
                    return asked, delivery.event
            if loop.time() > deadline:
                break
    raise NoVerdict(
        f"rollback of {workflow_id} to v{to} sent (event {asked.event_id}); no outcome within"
        f" {wait:g}s: is the improvement service running?"
    )


@workflows_app.command()
def rollback(
    workflow: Annotated[str, typer.Argument(help="SPECIALTY or GOAL/SPECIALTY.")],
    to: Annotated[
        int | None,
        typer.Option(
            "--to",
            min=1,
            help="The version to serve again (default: the base while a canary runs,"
            " else the version the base came from).",
        ),
    ] = None,
    as_user: Annotated[
        str | None,
        typer.Option(
            "--as",
            help="The operator asking (default $ORCH_OPERATOR_USER, else `operator`); the"
            " improvement service acts only for operators (ORCH_OPERATORS or an operator key).",
        ),
    ] = None,
    reason: Annotated[str, typer.Option(help="Why; kept on the version record.")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the outcome.")] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Serve an earlier version of a workflow to everyone again (operators only).

    Exit 0 rolled back, 1 refused by the improvement service (not an operator), 2 invalid
    (a malformed name, or a version the workflow does not have), 3 no outcome in time.
    """
    workflow = _workflow_id(workflow, as_json)
    user = as_user or OperatorSettings.read("operator_user")
    try:
        user = validate_identifier(user)
    except ValueError as exc:
        fail(f"--as: {exc}", EXIT_INVALID, as_json=as_json)
    settings = kafka_settings()
    try:
        require_kafka(settings, as_json=as_json)
        asked, outcome = run(
            _rollback(settings, workflow, to, user, reason, timeout), settings, as_json=as_json
        )
    except InvalidRequest as exc:
        fail(str(exc), EXIT_INVALID, as_json=as_json)
    except NoVerdict as exc:
        fail(str(exc), EXIT_TIMEOUT, as_json=as_json)
    if isinstance(outcome, DeadLetter):
        fail(
            refused(outcome.reason),
            as_json=as_json,
            error_type=outcome.error_type,
            event_id=asked.event_id,
        )
    assert isinstance(outcome, ImprovementRolledBack)
    done = {
        "rolled_back": True,
        "workflow_id": workflow,
        "from_version": outcome.from_version,
        "to_version": outcome.to_version,
        "user_id": user,
        "event_id": asked.event_id,
    }
    if as_json:
        print_json(done)
    else:
        out.print(
            f"{escape(workflow)}: version {outcome.to_version} serves everyone again"
            f" (was {outcome.from_version}); asked by {escape(user)}"
        )


# -- replay -----------------------------------------------------------------------------


def _replay(policies: list[str], arms: list[str], since: datetime | None, as_json: bool) -> Any:
    """The router's own offline replay (``python -m services.router.replay``), as JSON.

    The policies it scores are the router's learning code; the CLI runs the router's
    command the way it runs a service, instead of importing it.
    """
    require_kafka(kafka_settings(), as_json=as_json)
    argv = [sys.executable, "-m", "services.router.replay", "--arms", ",".join(arms)]
    for name in policies:
        argv += ["--policy", name]
    if since is not None:
        argv += ["--since", since.isoformat()]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        fail(lines[-1] if lines else f"replay exited {done.returncode}", as_json=as_json)
    return json.loads(done.stdout)


@workflows_app.command()
def replay(
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy", help="A policy to score: static or learned; repeat it (default: both)."
        ),
    ] = None,
    arms: Annotated[
        str | None,
        typer.Option(
            "--arms", help="Comma-separated specialties it may choose (default: those logged)."
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only decisions of the last DURATION (24h, 7d).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score routing policies on the recorded log, offline: IPS and SNIPS estimates of each
    one's mean quality, beside what the live policy earned (no LLM call)."""
    chosen = policy or ["static", "learned"]
    for name in chosen:
        if name not in ("static", "learned"):
            fail(
                f"--policy {name!r}: replay knows static and learned", EXIT_INVALID, as_json=as_json
            )
    try:
        window = datetime.now(UTC) - parse_duration(since) if since is not None else None
    except ValueError as exc:
        fail(f"--since: {exc}", EXIT_INVALID, as_json=as_json)
    choices = [a.strip() for a in (arms or "").split(",") if a.strip()]
    results = _replay(chosen, choices, window, as_json)
    if as_json:
        print_json(results)
        return
    if not results[0]["decisions"]:
        out.print("no assessed routing decision in the log yet: nothing to replay")
        return
    table = Table(title=f"replay over {results[0]['decisions']} logged decisions")
    for column in ("policy", "matched", "IPS", "SNIPS", "± stderr", "live", "beats live"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for r in results:
        table.add_row(
            r["candidate"],
            str(r["matched"]),
            f"{r['ips']:.3f}",
            f"{r['snips']:.3f}",
            f"{r['stderr']:.3f}",
            f"{r['live_mean']:.3f} ({escape(r['live_policy'])})",
            "[green]yes[/]" if r["beats_live"] else "no",
        )
    out.print(table)
