"""The budget service: a Faust table of per-goal budget state, one writer per goal.

Every event that changes a goal's budget is keyed by goal_id and read by one
agent from one multi-topic subscription, so a goal's events are applied in order
by the one instance that owns its partition; the table follows the partition.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faust import current_event

from services.budget.state import BudgetDefaults, BudgetState, RunStore
from services.budget.ticks import BusyGoals
from streams.codec import default_codec
from streams.config import BudgetSettings
from streams.errors import NotOperator
from streams.events import (
    AdmissionReturned,
    BudgetReported,
    BudgetTicked,
    BudgetUpdateRequested,
    DeadLetter,
    Event,
    GoalAgentsChanged,
    LlmCallCompleted,
    SpawnRequested,
    SpendRequested,
    TaskRequested,
    WorkflowCompleted,
    WorkflowFailed,
)
from streams.faust_app import CODEC_NAME, EventTopic, create_app, start_app
from streams.kafka import failed_letter
from streams.keys import KeyView, operators_from
from streams.runtime import ServiceContext
from streams.topics import PARTITIONS

__all__ = ["APP_NAME", "BUDGET_TOPICS", "RUNS_TABLE_NAME", "TABLE_NAME", "main"]

log = logging.getLogger(__name__)

APP_NAME = "orchestrator.budget"
TABLE_NAME = "budget"
# Queued and running tasks by run id, outside the goal's record (which stays small).
# Faust writes a table's changelog to the partition of the event being processed
# (Table.partition_for_key without use_partitioner), so a run's entry sits on its
# goal's partition and moves with it.
RUNS_TABLE_NAME = "budget-runs"
BUDGET_TOPICS = (
    SpawnRequested.topic,
    TaskRequested.topic,
    LlmCallCompleted.topic,
    WorkflowCompleted.topic,
    WorkflowFailed.topic,
    BudgetUpdateRequested.topic,
    SpendRequested.topic,
    BudgetTicked.topic,
    GoalAgentsChanged.topic,
    AdmissionReturned.topic,
)


async def main(ctx: ServiceContext, stop: asyncio.Event) -> None:
    defaults = BudgetDefaults.from_env()
    app = create_app(APP_NAME, ctx.settings)
    table = app.Table(TABLE_NAME, default=None, partitions=PARTITIONS)
    runs = RunStore(app.Table(RUNS_TABLE_NAME, default=None, partitions=PARTITIONS))
    topic = EventTopic(
        app,
        topics=[ctx.settings.topic(t) for t in BUDGET_TOPICS],
        key_serializer="raw",
        value_serializer="orch-avro",
        event_source="budget",
        event_settings=ctx.settings,
    )

    outputs: dict[str, Any] = {}

    def _output(name: str) -> Any:
        if name not in outputs:
            outputs[name] = app.topic(
                ctx.settings.topic(name), key_serializer="raw", value_serializer=CODEC_NAME
            )
        return outputs[name]

    # Goals with tasks queued or running: the tick reads only theirs, not every record.
    busy = BusyGoals(table)

    async def _recovered() -> None:
        # After every recovery (this instance's partitions changed, or it started): goals
        # whose records came from the changelog, another instance's writes, are ticked too.
        busy.recovered(table.items())

    table.on_recover(_recovered)
    keys = KeyView(ctx.settings, operators=operators_from())
    changed: set[str] = set()  # goals whose record changed since their last report

    async def _report(goal: str) -> None:
        """The goal's view on ``budget_reported`` (compacted), read by `budget show`."""
        raw = table.get(goal)
        if raw:  # None when the goal's partition moved to another instance meanwhile
            view = BudgetState.from_dict(raw, runs, defaults).summary(ctx.clock.now())
            report = BudgetReported(source="budget", occurred_at=ctx.clock.now(), **view)
            await _output(BudgetReported.topic).send(key=report.key(), value=report)

    async def _apply(event: Event) -> None:
        assert event.goal_id is not None
        if isinstance(event, BudgetUpdateRequested) and not await keys.is_operator(event.user_id):
            # Checked again here, whoever produced it: limits change only for an operator.
            raise NotOperator(
                f"changing goal {event.goal_id}'s budget needs an operator;"
                f" {event.user_id or 'nobody'!r} is not one"
            )
        raw = table.get(event.goal_id)
        if raw:
            state = BudgetState.from_dict(raw, runs, defaults)
        else:
            state = BudgetState.new(event.goal_id, defaults, runs)
        decision = state.handle(event, ctx.clock.now(), defaults)
        if decision.changed or not raw:
            record = state.to_dict()
            # A tick that found nothing to do (a goal waiting on a hold's lapse is ticked
            # each second) leaves the record as it was: nothing to write.
            if not (isinstance(event, BudgetTicked) and raw and record == raw):
                table[event.goal_id] = record
            # After the write: one that raised left the old record, and the set as it was.
            busy.note(event.goal_id, record)
        if isinstance(event, BudgetUpdateRequested):
            await _report(event.goal_id)  # a limit shows at once
        else:
            changed.add(event.goal_id)  # coalesced: reported by the timer below
        # Behind the table's writes in Faust's producer buffer, without waiting for the
        # broker (one agent handles every goal's events one at a time; waiting put a
        # broker round trip between any two decisions). The buffer hands its messages
        # to the client in order, so a decision never reaches the broker before the
        # record that remembers it: sent directly, an admission could go out and the
        # record of it die with the process, and the input, read again, was decided
        # again from the older record (chaos seed 5: a run answered, then failed as
        # waiting for a slot, under one terminal id). Faust flushes the buffer before
        # it commits the offsets of the events that caused these (at least once).
        for out in decision.events:
            _output(out.topic).send_soon(key=out.key(), value=out)

    async def _dead_letter(event: Event, exc: Exception) -> None:
        """The event stays on ``dead_letter`` with the reason, not only in a log line."""
        current = current_event()
        message = current.message if current is not None else None
        letter = failed_letter(
            event,
            exc,
            source="budget",
            topic=ctx.settings.logical(message.topic) if message else event.topic,
            partition=message.partition if message else -1,
            offset=message.offset if message else -1,
            codec=default_codec(),
        )
        await _output(DeadLetter.topic).send(key=letter.key(), value=letter)

    tick_every = BudgetSettings.read("tick_seconds")

    @app.timer(interval=tick_every)  # type: ignore[untyped-decorator]
    async def tick() -> None:
        """A tick for each goal of this instance's partitions with tasks queued or running.

        The ticks go through the goal's own partition like every other event, so a
        task waiting past its deadline ends (and a lapsed lease frees its slot) even
        when nothing else happens to its goal. Idle goals' records are not read
        (``services/budget/ticks.py``).
        """
        for goal in busy.due(10_000):
            event = BudgetTicked(source="budget", goal_id=goal)
            await _output(BudgetTicked.topic).send(key=event.key(), value=event)

    report_every = BudgetSettings.read("report_seconds")

    @app.timer(interval=report_every)  # type: ignore[untyped-decorator]
    async def report() -> None:
        """At most one report per changed goal per interval, off the request path."""
        goals = list(changed)
        changed.clear()
        for goal in goals:
            await _report(goal)

    @app.agent(topic)
    async def apply(stream: Any) -> None:
        async for event in stream:
            if not isinstance(event, Event) or event.goal_id is None:
                continue
            try:
                await _apply(event)
            except Exception as exc:  # one bad event must not stop every goal's budget
                log.exception("budget failed on %s %s", event.event_type, event.event_id)
                await _dead_letter(event, exc)

    await keys.start()
    try:
        await start_app(app, ctx.settings)
        try:
            await stop.wait()
        finally:
            await app.stop()
    finally:
        await keys.stop()
