"""A budget SIGKILLed after it wrote its decision and before it sent it: the next instance
sends it. The state a crash leaves (changelog written, output not sent, offset not
committed), made on purpose on the real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from streams.events import TaskAdmitted, TaskRequested, WorkflowFailed, terminal_event_id
from streams.kafka import EventProducer, KafkaSettings
from streams.registry import read_topics_to_end

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
E = TypeVar("E", TaskAdmitted, WorkflowFailed)

# The budget as it runs, except that its first task_admitted is never sent: the
# process flushes what it wrote (the table's changelog) and dies by SIGKILL.
_DIES_BEFORE_SENDING_TEMPLATE = textwrap.dedent(
    """
    import os, signal
    from faust.transport.producer import ProducerBuffer
    from services.budget.service import main
    from streams.codec import default_codec
    from streams.events import TaskAdmitted, WorkflowFailed
    from streams.runtime import service_main

    original = ProducerBuffer._send_pending

    def dies_on(event):
        return CONDITION

    async def send_pending(self, fut):
        # The decision's turn in the buffer: what came before it (the table's changelog)
        # is with the client; wait for the broker to have it, and die.
        topic = fut.message.channel.get_topic_name()
        if not topic.endswith("changelog") and dies_on(default_codec().decode(fut.message.value)):
            await self.app.producer._producer.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, fut)

    ProducerBuffer._send_pending = send_pending
    service_main("budget", main)
    """
)
_DIES_BEFORE_SENDING = _DIES_BEFORE_SENDING_TEMPLATE.replace(
    "CONDITION", "isinstance(event, TaskAdmitted)"
)


def _start(
    settings: KafkaSettings, data: Path, code: list[str], **extra: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **extra,
        **settings.env(),
        "ORCH_TOPIC_PREFIX": settings.prefix,
        "ORCH_DATA_DIR": str(data),
        "PYTHONUNBUFFERED": "1",
    }
    log = open(data / "budget.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, *code], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )


async def _admissions(settings: KafkaSettings, run_id: str) -> list[TaskAdmitted]:
    events = await read_topics_to_end(settings, [TaskAdmitted.topic])
    return [e for e in events if isinstance(e, TaskAdmitted) and e.run_id == run_id]


async def _failures(settings: KafkaSettings, run_id: str) -> list[WorkflowFailed]:
    events = await read_topics_to_end(settings, [WorkflowFailed.topic])
    return [e for e in events if isinstance(e, WorkflowFailed) and e.run_id == run_id]


async def _killed(dying: subprocess.Popen[bytes], data: Path, timeout: float) -> None:
    try:
        code = await asyncio.to_thread(dying.wait, timeout)
    finally:
        if dying.poll() is None:
            dying.kill()
    assert code == -signal.SIGKILL, (data / "budget.log").read_text()


async def _sent_by_the_next_instance(
    settings: KafkaSettings,
    data: Path,
    found_by: Callable[[], Awaitable[list[E]]],
    **env: str,
) -> list[E]:
    budget = _start(settings, data, ["-m", "services.budget"], **env)
    try:
        found: list[E] = []
        deadline = time.monotonic() + 90
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            found = await found_by()
        assert found, (data / "budget.log").read_text()[-3000:]
        return found
    finally:
        budget.terminate()
        try:
            budget.wait(30)
        except subprocess.TimeoutExpired:
            budget.kill()


async def test_a_decision_written_but_not_sent_is_sent_by_the_next_instance(
    settings: KafkaSettings, tmp_path: Path
):
    now = datetime.now(UTC)
    task = TaskRequested(
        source="router",
        run_id="r-crash",
        goal_id="g-crash",
        user_id="u1",
        agent_id="a1",
        specialty="general",
        message="hello",
        requested_at=now,
        deadline_at=now + timedelta(seconds=120),
    )
    dying = _start(settings, tmp_path, ["-c", _DIES_BEFORE_SENDING])
    try:
        async with EventProducer(settings) as producer:
            await producer.send(task)
    finally:
        await _killed(dying, tmp_path, 90)
    assert await _admissions(settings, task.run_id) == []

    found = await _sent_by_the_next_instance(
        settings, tmp_path, lambda: _admissions(settings, task.run_id)
    )
    assert len({e.event_id for e in found}) == 1


def waiting_task(goal: str, run: str, deadline_s: float) -> TaskRequested:
    """A task of ``goal`` for agent a1, due ``deadline_s`` from now."""
    now = datetime.now(UTC)
    return TaskRequested(
        source="router",
        run_id=run,
        goal_id=goal,
        user_id="u1",
        agent_id="a1",
        specialty="general",
        message="hello",
        requested_at=now,
        deadline_at=now + timedelta(seconds=deadline_s),
    )


# The same, for a decision a tick made: a waiting task's timeout. Ticks are not kept as
# applied events, so the replayed tick must find what it decided by its own id.
_DIES_BEFORE_SENDING_A_TIMEOUT = _DIES_BEFORE_SENDING_TEMPLATE.replace(
    "CONDITION", 'isinstance(event, WorkflowFailed) and event.reason == "timeout"'
)


async def test_a_ticks_decision_written_but_not_sent_is_sent_by_the_next_instance(
    settings: KafkaSettings, tmp_path: Path
):
    def task(run: str, deadline_s: float) -> TaskRequested:
        return waiting_task("g-tick", run, deadline_s)

    one_slot = {"ORCH_BUDGET_MAX_CONCURRENT": "1"}
    running = task("r-running", 600)
    dying = _start(settings, tmp_path, ["-c", _DIES_BEFORE_SENDING_A_TIMEOUT], **one_slot)
    try:
        async with EventProducer(settings) as producer:
            await producer.send(running)
            deadline = time.monotonic() + 90
            while not await _admissions(settings, running.run_id):
                assert time.monotonic() < deadline, (tmp_path / "budget.log").read_text()
                await asyncio.sleep(0.5)
            # It waits for the one slot; nothing else happens to the goal, so only a
            # tick can time it out.
            waiting = task("r-waiting", 3)
            await producer.send(waiting)
    finally:
        await _killed(dying, tmp_path, 60)
    assert await _failures(settings, waiting.run_id) == []

    found = await _sent_by_the_next_instance(
        settings, tmp_path, lambda: _failures(settings, waiting.run_id), **one_slot
    )
    assert {(e.event_id, e.reason) for e in found} == {
        (terminal_event_id(waiting.run_id), "timeout")
    }
