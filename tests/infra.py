"""Where the test suites get Kafka and ClickHouse from: ``ORCH_TEST_INFRA``.

- ``native`` (default, what CI runs here): the project's own KRaft broker from Maven jars
  (``local.localkafka``) and the embedded ClickHouse engine (chdb).
- ``containers`` (a machine with Docker): testcontainers runs the images
  ``docker-compose.yml`` names, a Kafka broker and a ClickHouse server, for the session.
  The integration and end-to-end suites then run against them unchanged, and the
  ClickHouse adapter's contract tests also run against the server (the ``CLICKHOUSE_URL``
  path of the analytics service).

Nothing here skips: a source that cannot start fails the session and says why.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from streams.config import ROOT

MODES = ("native", "containers")
COMPOSE = ROOT / "docker-compose.yml"


class InfraError(RuntimeError):
    """The chosen infrastructure cannot be had here."""


def infra_mode(environ: Mapping[str, str] | None = None) -> str:
    value = (os.environ if environ is None else environ).get("ORCH_TEST_INFRA", "").strip()
    if not value:
        return "native"
    if value not in MODES:
        raise InfraError(f"ORCH_TEST_INFRA must be one of {', '.join(MODES)}, got {value!r}")
    return value


def _compose_service(name: str, compose: Path = COMPOSE) -> dict[str, Any]:
    spec = yaml.safe_load(compose.read_text())
    try:
        service: dict[str, Any] = spec["services"][name]
    except KeyError as exc:
        raise InfraError(f"{compose.name} has no service {name!r}") from exc
    return service


def compose_image(name: str, compose: Path = COMPOSE) -> str:
    """The image ``docker-compose.yml`` runs for service ``name``."""
    image = _compose_service(name, compose).get("image")
    if not isinstance(image, str) or not image:
        raise InfraError(f"{compose.name}: service {name!r} names no image")
    return image


def kafka_environment(port: int, compose: Path = COMPOSE) -> dict[str, str]:
    """The compose file's broker settings, with one listener that the host reaches on
    ``port`` (mapped to the same port inside, so the advertised address is right on both
    sides) and the controller on the container's own loopback."""
    env = {k: str(v) for k, v in _compose_service("kafka", compose)["environment"].items()}
    env.update(
        KAFKA_LISTENERS=f"PLAINTEXT://:{port},CONTROLLER://:9093",
        KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://127.0.0.1:{port}",
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
        KAFKA_INTER_BROKER_LISTENER_NAME="PLAINTEXT",
    )
    return env


def database_url(base: str, database: str) -> str:
    """``base`` (a server URL) pointing at ``database``."""
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    raise InfraError(f"{what} did not become ready within {timeout:g} s")


class ContainerInfra:
    """Kafka and ClickHouse containers for one test session (started on first use)."""

    def __init__(self) -> None:
        self._containers: list[Any] = []
        self._kafka: str | None = None
        self._clickhouse: str | None = None

    def _docker_ready(self) -> None:
        try:
            import docker  # testcontainers' own client

            docker.from_env().ping()
        except ImportError as exc:
            raise InfraError(
                "ORCH_TEST_INFRA=containers needs the containers extra:"
                " pip install -e '.[dev,containers]'"
            ) from exc
        except Exception as exc:
            raise InfraError(
                f"ORCH_TEST_INFRA=containers needs a running Docker engine: {exc}"
            ) from exc

    def kafka(self) -> str:
        if self._kafka is None:
            self._docker_ready()
            from testcontainers.core.container import DockerContainer

            from local.localkafka import kafka_answers

            port = _free_port()
            container = DockerContainer(compose_image("kafka")).with_bind_ports(port, port)
            for key, value in kafka_environment(port).items():
                container.with_env(key, value)
            container.start()
            self._containers.append(container)
            bootstrap = f"127.0.0.1:{port}"
            _wait(f"Kafka container at {bootstrap}", lambda: kafka_answers(bootstrap), 120)
            self._kafka = bootstrap
        return self._kafka

    def clickhouse(self) -> str:
        """The server's URL (user and password in it), database ``default``."""
        if self._clickhouse is None:
            self._docker_ready()
            from testcontainers.clickhouse import ClickHouseContainer

            user, password = "orchestrator", secrets.token_hex(16)
            container = ClickHouseContainer(
                compose_image("clickhouse"), username=user, password=password, dbname="default"
            )
            container.start()
            self._containers.append(container)
            host = container.get_container_host_ip()
            port = container.get_exposed_port(8123)
            self._clickhouse = f"http://{user}:{password}@{host}:{port}/default"
        return self._clickhouse

    def fresh_database(self) -> str:
        """A URL of a new, empty database on the server (a test's own namespace)."""
        import clickhouse_connect

        base = self.clickhouse()
        name = f"t_{uuid.uuid4().hex[:10]}"
        client = clickhouse_connect.get_client(dsn=base)
        try:
            client.command(f"CREATE DATABASE {name}")
        finally:
            client.close()
        return database_url(base, name)

    def stop(self) -> None:
        while self._containers:
            self._containers.pop().stop()
