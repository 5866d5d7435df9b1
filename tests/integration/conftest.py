"""Integration fixtures: a fresh topic namespace per test on the real broker."""

from __future__ import annotations

import uuid

import pytest

from streams.kafka import KafkaSettings
from streams.topics import create_topics


@pytest.fixture
async def settings(kafka_bootstrap: str) -> KafkaSettings:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    await create_topics(kafka_bootstrap, prefix=prefix)
    return KafkaSettings(kafka_bootstrap, prefix)
