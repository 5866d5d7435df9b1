"""The local broker launcher against the real broker: metadata, reuse and status."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from local.localkafka import broker_status, ensure_broker, kafka_answers
from streams.config import kafka_auth, kafka_client_args

pytestmark = pytest.mark.broker


async def test_broker_answers_metadata(kafka_bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(**kafka_client_args(kafka_bootstrap))
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


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port: int = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    pytest.fail("no pair of free ports found")


async def _answers(bootstrap: str, **auth: Any) -> bool:
    return await asyncio.to_thread(kafka_answers, bootstrap, 8.0, auth)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, int]]:
    """A broker of its own data dir: the test replaces its credentials."""
    port = _free_port_pair()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    env |= {"ORCH_DATA_DIR": str(tmp_path / "data"), "ORCH_KAFKA_PORT": str(port)}
    launcher = [sys.executable, "-m", "local.localkafka"]
    try:
        up = subprocess.run([*launcher, "up"], env=env, capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
        yield env, tmp_path / "data", port
    finally:
        subprocess.run([*launcher, "down"], env=env, capture_output=True)


async def test_the_local_broker_lets_in_only_whoever_reads_the_data_dir(
    own_broker: tuple[dict[str, str], Path, int],
) -> None:
    env, data, port = own_broker
    bootstrap = f"127.0.0.1:{port}"
    creds = json.loads((data / "kafka" / "client.json").read_text())
    assert (data / "kafka" / "client.json").stat().st_mode & 0o077 == 0
    assert (data / "kafka" / "server.properties").stat().st_mode & 0o077 == 0
    scram = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512"}
    user = {"sasl_plain_username": creds["username"]}
    assert await _answers(bootstrap, **kafka_auth(data))
    # Another local user, who can reach the port but not read the data dir:
    assert not await _answers(bootstrap)  # no credentials
    assert not await _answers(f"127.0.0.1:{port + 1}")  # the controller's port
    assert not await _answers(bootstrap, **scram, **user, sasl_plain_password="guess")
    assert not await _answers(bootstrap, **scram, sasl_plain_username="broker",
                              sasl_plain_password=creds["password"])  # fmt: skip
    plain = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}
    # The clients' password is no PLAIN login (PLAIN would send it to whoever took the port).
    assert not await _answers(bootstrap, **plain, **user, sasl_plain_password=creds["password"])
    # No password on a command line, where any local user can read it.
    pid = (data / "kafka" / "broker.pid").read_text().strip()
    argv = await asyncio.to_thread(Path(f"/proc/{pid}/cmdline").read_bytes)
    assert b"kafka.Kafka" in argv
    assert creds["password"].encode() not in argv
    assert b"password" not in argv.lower()

    # Credentials lost (or a data dir from before the broker asked for any): the next start
    # gives the clients a new password and the old one stops working.
    (data / "kafka" / "client.json").unlink()
    up = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "local.localkafka", "up"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert up.returncode == 0, up.stderr
    renewed = json.loads((data / "kafka" / "client.json").read_text())
    assert renewed["password"] != creds["password"]
    assert await _answers(bootstrap, **kafka_auth(data))
    assert not await _answers(bootstrap, **scram, **user, sasl_plain_password=creds["password"])
    # The same with the broker stopped (a data dir formatted before logins, started anew).
    launcher = [sys.executable, "-m", "local.localkafka"]
    down = await asyncio.to_thread(
        subprocess.run, [*launcher, "down"], env=env, capture_output=True
    )
    assert down.returncode == 0
    (data / "kafka" / "client.json").unlink()
    up = await asyncio.to_thread(
        subprocess.run, [*launcher, "up"], env=env, capture_output=True, text=True
    )
    assert up.returncode == 0, up.stderr
    third = json.loads((data / "kafka" / "client.json").read_text())
    assert third["password"] not in (creds["password"], renewed["password"])
    assert await _answers(bootstrap, **kafka_auth(data))
    assert not (data / "kafka" / "client.pending.json").exists()
    assert not [
        p.name
        for p in (data / "kafka").iterdir()
        if "args" in p.name or p.suffix == ".properties" and p.name != "server.properties"
    ]
