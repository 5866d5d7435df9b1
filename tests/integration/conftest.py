"""Integration fixtures: a fresh topic namespace per test on the real broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from streams.kafka import KafkaSettings
from streams.topics import create_topics, delete_prefixed_topics


@pytest.fixture
async def settings(kafka_bootstrap: str) -> AsyncIterator[KafkaSettings]:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    await create_topics(kafka_bootstrap, prefix=prefix)
    yield KafkaSettings(kafka_bootstrap, prefix)
    # Every partition holds files open on the broker; a whole suite's worth would not fit.
    await delete_prefixed_topics(kafka_bootstrap, prefix)
