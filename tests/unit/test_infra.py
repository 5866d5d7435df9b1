"""The test suites' infrastructure choice (tests/infra.py), without Docker."""

from __future__ import annotations

import sys
import types

import pytest

from tests.infra import (
    ContainerInfra,
    InfraError,
    compose_image,
    database_url,
    infra_mode,
    kafka_environment,
)


def test_native_is_the_default_and_a_typo_is_refused() -> None:
    assert infra_mode({}) == "native"
    assert infra_mode({"ORCH_TEST_INFRA": " "}) == "native"
    assert infra_mode({"ORCH_TEST_INFRA": "containers"}) == "containers"
    with pytest.raises(InfraError, match="native, containers, got 'docker'"):
        infra_mode({"ORCH_TEST_INFRA": "docker"})


def test_containers_run_the_images_of_the_compose_file() -> None:
    assert compose_image("kafka").startswith("apache/kafka:4.")
    assert compose_image("clickhouse").startswith("clickhouse/clickhouse-server:")
    with pytest.raises(InfraError, match="no service 'zookeeper'"):
        compose_image("zookeeper")


def test_the_broker_keeps_the_compose_settings_and_advertises_what_the_host_reaches() -> None:
    env = kafka_environment(45123)
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://127.0.0.1:45123"
    assert env["KAFKA_LISTENERS"] == "PLAINTEXT://:45123,CONTROLLER://:9093"
    # The rest is the compose file's: no auto-created topics, single-node factors.
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "EXTERNAL" not in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]


def test_a_database_url_keeps_the_credentials() -> None:
    base = "http://orch:s3cret@127.0.0.1:32768/default"
    assert database_url(base, "t_1") == "http://orch:s3cret@127.0.0.1:32768/t_1"


def test_without_the_extra_or_the_engine_the_session_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "docker", None)  # not installed
    with pytest.raises(InfraError, match=r"pip install -e '\.\[dev,containers\]'"):
        ContainerInfra().kafka()

    def from_env() -> object:
        raise ConnectionError("no socket at /var/run/docker.sock")

    monkeypatch.setitem(sys.modules, "docker", types.SimpleNamespace(from_env=from_env))
    with pytest.raises(InfraError, match="running Docker engine: no socket"):
        ContainerInfra().clickhouse()
