"""The budget ticks the goals whose records it recovered, not only those it wrote: a goal's
waiting task times out on the instance its partition moved to, with nothing else
happening to the goal. On the real broker."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.budget.service import APP_NAME
from streams.events import TaskRequested, WorkflowFailed, terminal_event_id
from streams.kafka import EventProducer, KafkaSettings
from tests.integration.test_budget_crash import _admissions, _failures, _start, waiting_task

pytestmark = pytest.mark.broker


def _task(run: str, deadline_s: float) -> TaskRequested:
    return waiting_task("g-moved", run, deadline_s)


async def _all_committed(settings: KafkaSettings, data: Path) -> None:
    """Until the budget's group has committed every task sent so far: each was read and
    handled, its record written first (Faust flushes the table's writes before it commits)."""
    topic = settings.topic(TaskRequested.topic)
    admin = AIOKafkaAdminClient(**settings.client_args())
    consumer = AIOKafkaConsumer(**settings.client_args())
    await admin.start()
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)  # an unassigned consumer's first end_offsets is slow
        consumer.pause(*parts)
        ends = await consumer.end_offsets(parts)
        deadline = time.monotonic() + 60
        while True:
            done = await admin.list_consumer_group_offsets(settings.prefix + APP_NAME)
            behind = [tp for tp in parts if (done[tp].offset if tp in done else 0) < ends[tp]]
            if not behind:
                return
            assert time.monotonic() < deadline, (behind, (data / "budget.log").read_text())
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
        await admin.close()


def _stop(budget: subprocess.Popen[bytes]) -> None:
    budget.terminate()
    try:
        budget.wait(30)
    except subprocess.TimeoutExpired:
        budget.kill()


async def test_a_waiting_task_times_out_on_the_instance_that_recovered_its_goal(
    settings: KafkaSettings, tmp_path: Path
):
    one_slot = {"ORCH_BUDGET_MAX_CONCURRENT": "1"}
    # The first instance never ticks: the goal is queued there, and stops with nothing
    # of it left to read, so only the second instance's tick of what it recovered can
    # end the waiting task.
    first = _start(
        settings, tmp_path, ["-m", "services.budget"], **one_slot, ORCH_BUDGET_TICK_SECONDS="3600"
    )
    try:
        async with EventProducer(settings) as producer:
            running = _task("r-running", 600)
            await producer.send(running)
            deadline = time.monotonic() + 90
            while not await _admissions(settings, running.run_id):
                assert time.monotonic() < deadline, (tmp_path / "budget.log").read_text()
                await asyncio.sleep(0.5)
            # Due soon: its wait is most of the test's time. 10 s still leaves the first
            # instance, caught up already, far more than it needs to read and queue it.
            waiting = _task("r-waiting", 10)
            await producer.send(waiting)
        await _all_committed(settings, tmp_path)  # read, queued and committed
    finally:
        _stop(first)
    assert await _failures(settings, waiting.run_id) == []

    second = _start(settings, tmp_path, ["-m", "services.budget"], **one_slot)
    try:
        found: list[WorkflowFailed] = []
        deadline = time.monotonic() + 90
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            found = await _failures(settings, waiting.run_id)
        assert found, (tmp_path / "budget.log").read_text()[-3000:]
    finally:
        _stop(second)
    assert {(e.event_id, e.reason) for e in found} == {
        (terminal_event_id(waiting.run_id), "timeout")
    }
