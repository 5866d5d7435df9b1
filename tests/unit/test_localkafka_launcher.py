"""The local broker launcher's configuration and its failures, without starting a broker."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from local import localkafka
from local.localkafka import LocalKafkaError, ensure_broker, stop_broker
from streams.config import bootstrap_servers


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("ORCH_KAFKA_PORT", raising=False)
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ORCH_KAFKA_LIBS", str(tmp_path / "libs"))
    return tmp_path


@pytest.fixture
def free_port(monkeypatch: pytest.MonkeyPatch) -> int:
    for _ in range(20):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port: int = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))  # the controller port must be free too
            except OSError:
                continue
        monkeypatch.setenv("ORCH_KAFKA_PORT", str(port))
        return port
    pytest.fail("no pair of free ports found")


@pytest.fixture
def foreign_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_bootstrap_servers_follows_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bootstrap_servers() == "127.0.0.1:9092"
    monkeypatch.setenv("ORCH_KAFKA_PORT", "19092")
    assert bootstrap_servers() == "127.0.0.1:19092"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker-a:9092,broker-b:9092")
    assert bootstrap_servers() == "broker-a:9092,broker-b:9092"


def test_rendered_properties_use_the_ports_and_data_dir(isolated: Path) -> None:
    text = localkafka.render_properties(19092).read_text()
    assert "${" not in text
    assert "listeners=CLIENT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in text
    assert "controller.quorum.voters=1@127.0.0.1:19093" in text
    assert f"log.dirs={isolated / 'kafka' / 'data'}" in text


def test_every_listener_asks_for_credentials(isolated: Path) -> None:
    path = localkafka.render_properties(19092)
    text = path.read_text()
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")
    assert (
        props["listener.security.protocol.map"] == "CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT"
    )
    assert "PLAINTEXT://" not in text.replace("SASL_PLAINTEXT", "")
    # The broker's own passwords: long, drawn afresh at each render, readable by the owner only.
    first = localkafka._broker_auth()["sasl_plain_password"]
    assert len(first) >= 40
    assert path.stat().st_mode & 0o077 == 0
    localkafka.render_properties(19092)
    assert localkafka._broker_auth()["sasl_plain_password"] != first


def test_a_broker_started_before_authentication_is_named(isolated: Path) -> None:
    old = (
        "listeners=PLAINTEXT://127.0.0.1:19092\nadvertised.listeners=PLAINTEXT://127.0.0.1:19092\n"
    )
    (isolated / "kafka").mkdir(parents=True, exist_ok=True)
    (isolated / "kafka" / "server.properties").write_text(old)
    with pytest.raises(LocalKafkaError, match="older version.*orchestrator down"):
        localkafka._broker_auth()


def test_port_taken_by_something_else_is_named(free_port: int) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", free_port))
        squatter.listen()
        with pytest.raises(LocalKafkaError, match=rf"port {free_port} .*ORCH_KAFKA_PORT"):
            ensure_broker(timeout=5)


def test_missing_java_is_explained(free_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(LocalKafkaError, match="openjdk-17-jre-headless"):
        ensure_broker(timeout=5)


def test_missing_mvn_is_explained(free_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def which(name: str) -> str | None:
        return "/usr/bin/java" if name == "java" else None

    monkeypatch.setattr(shutil, "which", which)
    with pytest.raises(LocalKafkaError, match="mvn not found"):
        ensure_broker(timeout=5)


def test_stop_never_kills_a_process_that_is_not_our_broker(
    isolated: Path, foreign_process: subprocess.Popen[bytes]
) -> None:
    pid_file = isolated / "kafka" / "broker.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{foreign_process.pid}\n")
    assert stop_broker(timeout=1) is False
    assert foreign_process.poll() is None
    assert not pid_file.exists()


class _Squatter:
    """Listens on a port the way a local user could while the broker starts, and keeps
    every byte sent to it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.received = b""
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.settimeout(0.5)
            with conn, contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    self.received += chunk

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_a_process_that_took_the_port_is_never_sent_a_password(
    isolated: Path,
    free_port: int,
    foreign_process: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Our broker is starting (its process lives) but another user's process has the port.
    def ours(pid: int) -> bool:
        return pid == foreign_process.pid and foreign_process.poll() is None

    monkeypatch.setattr(localkafka, "_is_our_broker", ours)
    localkafka.render_properties(free_port)
    broker_password = localkafka._broker_auth()["sasl_plain_password"]
    squatter = _Squatter(free_port)
    try:
        # A data dir from before logins: its one call with the broker's PLAIN login waits
        # for the port to be the broker's, which it never is here.
        with pytest.raises(LocalKafkaError, match=f"cannot tell that port {free_port}"):
            localkafka._add_client_user(
                "java", isolated, f"127.0.0.1:{free_port}", foreign_process.pid, timeout=1.0
            )
        assert squatter.connections == 0
        # The readiness probe logs in with SCRAM: a user name and a nonce, no password.
        creds = {"mechanism": "SCRAM-SHA-512", "username": "orchestrator", "password": "pw-xyz"}
        (isolated / "kafka" / "client.json").write_text(json.dumps(creds))
        with pytest.raises(LocalKafkaError, match="did not answer"):
            localkafka._wait_ready(f"127.0.0.1:{free_port}", foreign_process.pid, timeout=2.0)
    finally:
        squatter.close()
    assert squatter.connections >= 1
    assert broker_password.encode() not in squatter.received
    assert b"pw-xyz" not in squatter.received


def test_a_listening_socket_is_told_apart_by_its_owner(free_port: int) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port))
        listener.listen()
        assert localkafka._held_by(os.getpid(), free_port)
        assert not localkafka._held_by(os.getpid(), free_port + 1)
    assert not localkafka._held_by(os.getpid(), free_port)
