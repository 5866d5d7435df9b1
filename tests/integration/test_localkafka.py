"""The local broker launcher against the real broker: metadata, reuse and status."""

from __future__ import annotations

import os
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from local.localkafka import broker_status, ensure_broker

pytestmark = pytest.mark.broker


async def test_broker_answers_metadata(kafka_bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    assert cluster["brokers"], cluster
    assert cluster["controller_id"] >= 0


def test_ensure_broker_again_reuses_the_running_broker(kafka_bootstrap: str) -> None:
    before = broker_status()
    started = time.monotonic()
    assert ensure_broker() == kafka_bootstrap
    assert time.monotonic() - started < 5.0
    assert broker_status()["pid"] == before["pid"]


def test_status_reports_running(kafka_bootstrap: str) -> None:
    status = broker_status()
    assert status["running"] is True
    assert status["bootstrap"] == kafka_bootstrap
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        assert isinstance(status["pid"], int)
        os.kill(status["pid"], 0)  # raises if the reported pid is not a live process
