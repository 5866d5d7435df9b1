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
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from streams.events import TaskAdmitted, TaskRequested
from streams.kafka import EventProducer, KafkaSettings
from streams.registry import read_topics_to_end

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]

# The budget as it runs, except that its first task_admitted is never sent: the
# process flushes what it wrote (the table's changelog) and dies by SIGKILL.
_DIES_BEFORE_SENDING = textwrap.dedent(
    """
    import os, signal
    from faust.topics import Topic
    from services.budget.service import main
    from streams.events import TaskAdmitted
    from streams.runtime import service_main

    original = Topic.send

    async def send(self, *args, **kwargs):
        if isinstance(kwargs.get("value"), TaskAdmitted):
            await self.app.producer.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, *args, **kwargs)

    Topic.send = send
    service_main("budget", main)
    """
)


def _start(settings: KafkaSettings, data: Path, code: list[str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap,
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
        code = await asyncio.to_thread(dying.wait, 90)
    finally:
        if dying.poll() is None:
            dying.kill()
    assert code == -signal.SIGKILL, (tmp_path / "budget.log").read_text()
    assert await _admissions(settings, task.run_id) == []

    budget = _start(settings, tmp_path, ["-m", "services.budget"])
    try:
        found: list[TaskAdmitted] = []
        deadline = time.monotonic() + 90
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(1)
            found = await _admissions(settings, task.run_id)
        assert found, (tmp_path / "budget.log").read_text()[-3000:]
        assert len({e.event_id for e in found}) == 1
    finally:
        budget.terminate()
        try:
            budget.wait(30)
        except subprocess.TimeoutExpired:
            budget.kill()
