"""Session fixtures shared by every test tier: the real Kafka broker, and with
``ORCH_TEST_INFRA=containers`` a ClickHouse server (see tests/infra.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from local.localkafka import ensure_broker
from tests.infra import ContainerInfra, InfraError, infra_mode


@pytest.fixture(scope="session")
def containers() -> Iterator[ContainerInfra | None]:
    """The session's containers when ``ORCH_TEST_INFRA=containers``, else None."""
    try:
        mode = infra_mode()
    except InfraError as exc:
        pytest.fail(str(exc), pytrace=False)
    if mode != "containers":
        yield None
        return
    infra = ContainerInfra()
    try:
        yield infra
    finally:
        infra.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(containers: ContainerInfra | None) -> str:
    # Broker tests never skip: a missing broker is a failure, in CI and on a laptop alike.
    # The native broker is left running for fast reruns; `make test` stops it at the end.
    where = "in CI" if os.environ.get("CI") == "true" else "locally"
    try:
        return containers.kafka() if containers is not None else ensure_broker()
    except Exception as exc:
        pytest.fail(f"Kafka broker unavailable {where}: {exc}", pytrace=False)
