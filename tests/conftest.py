"""Session fixtures shared by every test tier: the real Kafka broker."""

from __future__ import annotations

import os

import pytest

from local.localkafka import ensure_broker


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    # Broker tests never skip: a missing broker is a failure, in CI and on a laptop alike.
    # The broker is left running for fast reruns; `make test` stops it at the end.
    try:
        return ensure_broker()
    except Exception as exc:
        where = "in CI" if os.environ.get("CI") == "true" else "locally"
        pytest.fail(f"Kafka broker unavailable {where}: {exc}", pytrace=False)
