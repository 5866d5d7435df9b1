"""docker-compose.yml's broker, run here without Docker: its logins hold on a real broker.

The kafka service's environment, as Compose renders it, goes through the image's own setup
(``kafka.docker.KafkaDockerWrapper setup``, in the Kafka 4.1.1 jar the local broker runs:
it writes server.properties from the KAFKA_* variables and formats the storage with
CLUSTER_ID, as the image's start script has it do), with the ports, the log dir and the
hosts moved to this machine. Then the broker starts from those properties, and the
compose file's clients, the healthcheck and strangers try it. The broker is this module's
own (free ports on 127.0.0.1, a temporary data dir), stopped and removed at the end."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from local import localkafka
from streams.config import BROKER_VARIABLES, kafka_client_args
from streams.topics import CATALOG
from tests.integration.test_kafka_tls import _free_ports
from tests.unit.test_compose import REQUIRED, rendered
from tests.unit.test_compose_broker import PASSWORD, server_properties

pytestmark = pytest.mark.broker

_LOG4J = f"-Dlog4j2.configurationFile={localkafka.INFRA / 'log4j2.properties'}"
_ENDPOINT = re.compile(r"([A-Za-z0-9_]+)://([^,:]*):(\d+)")


@dataclass
class ComposeBroker:
    services: dict[str, dict[str, str]]  # each service's environment, moved here
    kafka_env: dict[str, str]  # the kafka container's environment, moved here
    healthcheck: str
    internal: str  # the address the other containers use (kafka:9092), here
    external: str  # the one published to the host (localhost:9092), here
    controller: str
    user: str  # the services' login
    password: str
    java: str
    libs: Path
    root: Path


def _moved(value: str, ports: Mapping[str, int], moves: Mapping[str, str]) -> str:
    """``value`` with each listener on 127.0.0.1 at its port here, and each address of the
    container (``kafka:9092``, ``localhost:9092``) at the one here."""
    value = _ENDPOINT.sub(lambda m: f"{m[1]}://127.0.0.1:{ports[m[1]]}", value)
    for there, here in moves.items():
        value = re.sub(rf"(?<![\w.-]){re.escape(there)}(?!\d)", here, value)
    return value


def _on_this_machine(
    compose: dict[str, Any], ports: dict[str, int], logs: Path
) -> tuple[dict[str, str], dict[str, dict[str, str]], str]:
    kafka = compose["services"]["kafka"]
    env: dict[str, str] = dict(kafka["environment"])
    # Where each address a container uses leads: a port of the broker's container, by its
    # name (the other containers, the controller's voter entry) or from inside it (the
    # healthcheck). The listeners themselves are moved by name.
    port_of = {
        int(port): ports[name] for name, _, port in _ENDPOINT.findall(env["KAFKA_LISTENERS"])
    }
    moves = {f"localhost:{there}": f"127.0.0.1:{here}" for there, here in port_of.items()}
    moves |= {
        f"{kafka['hostname']}:{there}": f"127.0.0.1:{here}" for there, here in port_of.items()
    }
    local = {k: _moved(v, ports, moves) for k, v in env.items()}
    local["KAFKA_LOG_DIRS"] = str(logs)
    services = {
        name: {k: _moved(v, ports, moves) for k, v in service["environment"].items()}
        for name, service in compose["services"].items()
        if "KAFKA_BOOTSTRAP_SERVERS" in (service.get("environment") or {})
    }
    shell = kafka["healthcheck"]["test"][1].replace("$$", "$")  # as the container's shell sees it
    return local, services, _moved(shell, ports, moves)


def _java(java: str, libs: Path, *args: str, env: Mapping[str, str], **run: Any) -> Any:
    return subprocess.run(
        [java, "-cp", f"{libs}/*", _LOG4J, *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        **run,
    )


def _start(root: Path, java: str, libs: Path) -> tuple[subprocess.Popen[bytes], ComposeBroker]:
    """The image's setup, then the broker, once it answers the services' login. A port found
    free may be taken before the broker binds it: then again, on other ports."""
    compose = rendered()
    names = [
        m[0]
        for m in _ENDPOINT.findall(compose["services"]["kafka"]["environment"]["KAFKA_LISTENERS"])
    ]
    for attempt in range(5):
        run = root / f"run{attempt}"
        # The broker's files where the local launcher keeps its own (ORCH_DATA_DIR=run), so
        # that its start and stop serve this broker too.
        (run / "kafka").mkdir(parents=True)
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        env, services, healthcheck = _on_this_machine(compose, ports, run / "logs")
        (run / "defaults").mkdir()  # the image's bundled files: none is needed
        (run / "mounted").mkdir()
        setup = _java(
            java, libs, "kafka.docker.KafkaDockerWrapper", "setup",
            "--default-configs-dir", str(run / "defaults"),
            "--mounted-configs-dir", str(run / "mounted"),
            "--final-configs-dir", str(run / "kafka"),
            env=env, timeout=120,
        )  # fmt: skip
        assert setup.returncode == 0, setup.stdout + setup.stderr
        props = run / "kafka" / "server.properties"
        # The rule the unit tests read the file by is the image's.
        written = {line for line in props.read_text().splitlines() if line.strip()}
        assert written == {f"{k}={v}" for k, v in server_properties(env).items()}
        # The listener the host reaches through the published port: advertised as localhost.
        advertised = compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        published = [name for name, host, _ in _ENDPOINT.findall(advertised) if host == "localhost"]
        broker = ComposeBroker(
            services, env, healthcheck,
            internal=services["router"]["KAFKA_BOOTSTRAP_SERVERS"],
            external=f"127.0.0.1:{ports[published[0]]}",
            controller=f"127.0.0.1:{ports[env['KAFKA_CONTROLLER_LISTENER_NAMES']]}",
            user=services["router"].get("KAFKA_SASL_USERNAME", "orchestrator"),
            password=REQUIRED[PASSWORD],
            java=java, libs=libs, root=run,
        )  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ORCH_DATA_DIR", str(run))
            proc = localkafka._spawn(java, libs, props)  # the local broker's command line
        ready = False
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if _answers_as(broker, "router"):
                    ready = True
                    break
                time.sleep(0.3)
        finally:
            if not ready:  # stopped whatever went wrong, an interrupt too
                _stop(run, proc)
        if ready:
            return proc, broker
        text = (run / "kafka" / "broker.log").read_text(errors="replace")
        if "Address already in use" not in text:
            pytest.fail(f"the compose broker did not answer the router's login:\n{text[-4000:]}")
    pytest.fail("the compose broker found a port of its taken five times")


def _stop(run: Path, proc: subprocess.Popen[bytes]) -> None:
    """The local launcher's stop of the broker of data dir ``run`` (SIGTERM, SIGKILL after
    30 s), then its exit status collected."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCH_DATA_DIR", str(run))
        localkafka._stop_pid(proc.pid, 30.0)
    proc.wait()


def _answers_as(broker: ComposeBroker, service: str, wait_s: float = 5.0) -> bool:
    """Whether the broker answers a client with ``service``'s variables."""
    env = broker.services[service]
    with pytest.MonkeyPatch.context() as patch:
        for name in BROKER_VARIABLES:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        args = kafka_client_args(env["KAFKA_BOOTSTRAP_SERVERS"])
    return localkafka.kafka_answers(args.pop("bootstrap_servers"), wait_s, args)


@pytest.fixture(scope="module")
def compose_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeBroker]:
    java = shutil.which("java")
    assert java, "java runs the broker (CI has it: `make` fetches the jars)"
    libs = localkafka._ensure_jars()
    root = tmp_path_factory.mktemp("compose-broker")
    root.chmod(0o700)  # the properties hold the password
    started: tuple[subprocess.Popen[bytes], ComposeBroker] | None = None
    try:
        started = _start(root, java, libs)
        yield started[1]
    finally:
        if started is not None:
            _stop(started[1].root, started[0])
        shutil.rmtree(root, ignore_errors=True)


async def _answers(bootstrap: str, auth: dict[str, Any]) -> bool:
    return await asyncio.to_thread(localkafka.kafka_answers, bootstrap, 6.0, auth)


def _plain(username: str, password: str) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": username,
        "sasl_plain_password": password,
    }


async def test_the_services_log_in_create_the_topics_produce_and_consume(
    compose_broker: ComposeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The `topics` job, as its container runs it: its command, its environment alone.
    topics = compose_broker.services["topics"]
    job = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "streams.topics", "create"],
        env={"PATH": os.environ["PATH"], "ORCH_DATA_DIR": str(compose_broker.root), **topics},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    assert f"topics: {len(CATALOG)} created" in job.stdout

    # A service's client, with that service's variables (streams.config.kafka_client_args).
    for name in BROKER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in compose_broker.services["router"].items():
        monkeypatch.setenv(name, value)
    topic = CATALOG[0].name
    body = uuid.uuid4().bytes
    producer = AIOKafkaProducer(**kafka_client_args(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, body, key=b"compose")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        **kafka_client_args(),
        group_id=f"compose-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                if any(r.value == body for records in batch.values() for r in records):
                    break
    finally:
        await consumer.stop()


async def test_the_published_listener_takes_the_same_login(compose_broker: ComposeBroker) -> None:
    login = _plain(compose_broker.user, compose_broker.password)
    assert await _answers(compose_broker.external, login)


async def test_no_listener_lets_in_a_client_without_the_password(
    compose_broker: ComposeBroker,
) -> None:
    user, password = compose_broker.user, compose_broker.password
    tries = []
    for listener, address in (("internal", compose_broker.internal), ("published",
                              compose_broker.external)):  # fmt: skip
        tries += [
            (listener, "no login", _answers(address, {"security_protocol": "PLAINTEXT"})),
            (listener, "a wrong password", _answers(address, _plain(user, "guess"))),
            (listener, "another user", _answers(address, _plain("admin", password))),
        ]
    let_in = await asyncio.gather(*(attempt for _, _, attempt in tries))
    assert not [(listener, how) for (listener, how, _), ok in zip(tries, let_in, strict=True) if ok]


def _client_config(path: Path, user: str, login: str) -> Path:
    lines = ["request.timeout.ms=5000", "default.api.timeout.ms=10000"]
    if login == "none":
        lines.append("security.protocol=PLAINTEXT")
    else:
        jaas = "org.apache.kafka.common.security.plain.PlainLoginModule required"
        lines += [
            "security.protocol=SASL_PLAINTEXT",
            "sasl.mechanism=PLAIN",
            f'sasl.jaas.config={jaas} username="{user}" password="{login}";',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("login", ["none", "guess", "the password"])
def test_the_controller_listener_asks_for_the_login_too(
    compose_broker: ComposeBroker, login: str
) -> None:
    # Kafka's own admin client straight to the controller (--bootstrap-controller).
    password = compose_broker.password if login == "the password" else login
    path = compose_broker.root / f"controller-{uuid.uuid4().hex}.properties"
    config = _client_config(path, compose_broker.user, password)
    done = _java(
        compose_broker.java, compose_broker.libs, "kafka.admin.ConfigCommand",
        "--bootstrap-controller", compose_broker.controller,
        "--command-config", str(config),
        "--describe", "--entity-type", "brokers", "--entity-name", "1",
        env={}, timeout=120,
    )  # fmt: skip
    assert (done.returncode == 0) == (login == "the password"), done.stdout + done.stderr


@pytest.mark.parametrize("password", ["the container's", "another"])
def test_the_healthcheck_logs_in_with_the_containers_environment(
    compose_broker: ComposeBroker, password: str
) -> None:
    # The image's kafka-broker-api-versions.sh is in kafka-tools, which the broker's jars
    # lack: a stand-in of the same name gives the same two options (--bootstrap-server,
    # --command-config) to Kafka's ConfigCommand, whose admin client reads the file.
    run = compose_broker.root / f"health-{uuid.uuid4().hex}"
    (run / "bin").mkdir(parents=True)
    (run / "tmp").mkdir()
    tool = run / "bin" / "kafka-broker-api-versions.sh"
    tool.write_text(
        "#!/bin/sh\n"
        f'exec "{compose_broker.java}" -cp "{compose_broker.libs}/*" {_LOG4J}'
        ' kafka.admin.ConfigCommand "$@" --describe --entity-type brokers --entity-name 1\n'
    )
    tool.chmod(0o700)
    # The container's /tmp first: the directory here is under this machine's /tmp.
    command = compose_broker.healthcheck.replace("/tmp/", f"{run}/tmp/")
    command = command.replace("/opt/kafka/bin/", f"{run}/bin/")
    env = dict(compose_broker.kafka_env)
    if password == "another":
        env = {k: v.replace(REQUIRED[PASSWORD], "another") for k, v in env.items()}
    done = subprocess.run(
        ["/bin/sh", "-c", command],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode == 0) == (password == "the container's"), done.stderr
