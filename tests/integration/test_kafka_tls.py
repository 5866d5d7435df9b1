"""A cluster of one's own behind TLS: `KAFKA_SECURITY_PROTOCOL=SSL` (a client certificate as
the login) and `SASL_SSL` (SCRAM inside TLS), against a real broker with both listeners.

The certificates are made here with the `openssl` command (a certificate authority, the
broker's for 127.0.0.1, a client's, and another authority nobody trusts)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local import localkafka
from streams.config import BROKER_VARIABLES, BrokerAuthMissing, broker_env, kafka_auth
from streams.events import TaskRequested
from streams.faust_app import create_app, event_topic, start_app
from streams.kafka import EventConsumer, EventProducer, KafkaSettings
from streams.topics import create_topics, delete_prefixed_topics

pytestmark = pytest.mark.broker

_STORE_PASSWORD = "store-pw"
_USER, _PASSWORD = "tls-user", "tls-user-pw"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _authority(cwd: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip


def _signed(cwd: Path, name: str, ca: str, san: str | None) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd,
    )  # fmt: skip
    extra: list[str] = []
    if san:
        (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra, cwd=cwd,
    )  # fmt: skip


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_broker(
    root: Path, certs: Path, java: str, classpath: str
) -> tuple[subprocess.Popen[bytes], list[int], Path]:
    """The broker on three free ports, once it says it started. A port found free is
    closed before the broker binds it, and another process may take it meanwhile: the
    broker then exits, and is started again on other ports."""
    log4j = f"-Dlog4j2.configurationFile={localkafka.INFRA / 'log4j2.properties'}"
    scram = f"SCRAM-SHA-512=[name={_USER},password={_PASSWORD}]"
    for attempt in range(5):
        run = root / f"run{attempt}"
        run.mkdir()
        ports = _free_ports(3)
        ssl_port, sasl_port, controller = ports
        props = run / "server.properties"
        props.write_text(
            _PROPERTIES.format(
                ssl=ssl_port,
                sasl_ssl=sasl_port,
                controller=controller,
                certs=certs,
                password=_STORE_PASSWORD,
                logs=run / "logs",
            )
        )
        done = subprocess.run(
            [java, "-cp", classpath, log4j, "kafka.tools.StorageTool", "format", "-t",
             "tls-test-cluster-0001", "-c", str(props), "--add-scram", scram],
            capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        log_path = run / "broker.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [java, "-Xmx384m", "-cp", classpath, log4j, "kafka.Kafka", str(props)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if "Kafka Server started" in log_path.read_text(errors="replace"):
                return proc, ports, log_path
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"the TLS broker did not start:\n{log_path.read_text()[-3000:]}")
        if "Address already in use" not in log_path.read_text(errors="replace"):
            pytest.fail(f"the TLS broker exited:\n{log_path.read_text()[-3000:]}")
    pytest.fail("the TLS broker found a port of its taken five times")


_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller}
controller.listener.names=CONTROLLER
listeners=SSL://127.0.0.1:{ssl},SASL_SSL://127.0.0.1:{sasl_ssl},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=SSL://127.0.0.1:{ssl},SASL_SSL://127.0.0.1:{sasl_ssl}
inter.broker.listener.name=SSL
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
ssl.keystore.type=PKCS12
ssl.keystore.location={certs}/broker.p12
ssl.keystore.password={password}
ssl.key.password={password}
ssl.truststore.type=PEM
ssl.truststore.location={certs}/ca.pem
listener.name.ssl.ssl.client.auth=required
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required;
log.dirs={logs}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.partitions=4
"""


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    assert shutil.which("openssl"), "the TLS tests make their certificates with openssl"
    java = shutil.which("java")
    assert java, "java is needed for the broker"
    root = tmp_path_factory.mktemp("tls")
    certs = root / "certs"
    certs.mkdir()
    _authority(certs, "ca")
    _authority(certs, "stranger-ca")
    _signed(certs, "broker", "ca", "IP:127.0.0.1")
    _signed(certs, "client", "ca", None)
    _openssl(
        "pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-out", "broker.p12",
        "-passout", f"pass:{_STORE_PASSWORD}", cwd=certs,
    )  # fmt: skip
    libs = localkafka._ensure_jars()
    proc, (ssl_port, sasl_port, _), log_path = _start_broker(root, certs, java, f"{libs}/*")
    try:
        yield {
            "certs": certs,
            "ssl": f"127.0.0.1:{ssl_port}",
            "sasl_ssl": f"127.0.0.1:{sasl_port}",
            "proc": proc,
            "log": log_path,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _env(monkeypatch: pytest.MonkeyPatch, **values: str | Path) -> None:
    for name in BROKER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))


async def _answers(bootstrap: str, wait_s: float = 10.0) -> bool:
    """Whether the cluster answers this process's login (the variables set)."""
    return await asyncio.to_thread(localkafka.kafka_answers, bootstrap, wait_s)


async def _ready(broker: dict[str, Any], listener: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    while not await _answers(broker[listener], wait_s=5.0):
        assert broker["proc"].poll() is None, broker["log"].read_text()[-3000:]
        assert loop.time() < deadline, "the TLS broker never answered"
        await asyncio.sleep(0.5)


async def _round_trip(settings: KafkaSettings) -> None:
    """An event sent and read back through the platform's producer and consumer."""
    await create_topics(settings.bootstrap, prefix=settings.prefix)
    try:
        task = TaskRequested(
            source="tls-test",
            run_id=f"run-{uuid.uuid4().hex[:8]}",
            goal_id="g1",
            agent_id="a1",
            specialty="general",
            message="over TLS",
        )
        async with EventProducer(settings) as producer:
            await producer.send(task)
        consumer = EventConsumer(settings, ["task_requested"], group_id=settings.prefix + "tls")
        await consumer.start()
        try:
            async with asyncio.timeout(30):
                async for delivery in consumer:
                    assert delivery.event.run_id == task.run_id
                    break
        finally:
            await consumer.stop()
    finally:
        await delete_prefixed_topics(settings.bootstrap, settings.prefix)


async def test_a_client_certificate_is_the_login_on_an_ssl_listener(
    tls_broker: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tls_broker["certs"]
    _env(
        monkeypatch,
        KAFKA_BOOTSTRAP_SERVERS=tls_broker["ssl"],
        KAFKA_SECURITY_PROTOCOL="SSL",
        KAFKA_SSL_CAFILE=certs / "ca.pem",
        KAFKA_SSL_CERTFILE=certs / "client.pem",
        KAFKA_SSL_KEYFILE=certs / "client.key",
    )
    await _ready(tls_broker, "ssl")
    await _round_trip(KafkaSettings(tls_broker["ssl"], f"tls{uuid.uuid4().hex[:6]}."))
    # A child process is sent to the same cluster with the same files, from any directory.
    env = broker_env()
    assert env["KAFKA_SECURITY_PROTOCOL"] == "SSL"
    assert env["KAFKA_SSL_CERTFILE"] == str((certs / "client.pem").resolve())

    # Without the client certificate: refused.
    monkeypatch.delenv("KAFKA_SSL_CERTFILE")
    monkeypatch.delenv("KAFKA_SSL_KEYFILE")
    assert not await _answers(tls_broker["ssl"], wait_s=8)
    # A broker whose certificate chains to an authority not trusted here: never talked to.
    _env(
        monkeypatch,
        KAFKA_BOOTSTRAP_SERVERS=tls_broker["ssl"],
        KAFKA_SECURITY_PROTOCOL="SSL",
        KAFKA_SSL_CAFILE=certs / "stranger-ca.pem",
        KAFKA_SSL_CERTFILE=certs / "client.pem",
        KAFKA_SSL_KEYFILE=certs / "client.key",
    )
    assert not await _answers(tls_broker["ssl"], wait_s=8)
    # Nor under a name its certificate does not hold (the certificate says 127.0.0.1).
    port = tls_broker["ssl"].rpartition(":")[2]
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(certs / "ca.pem"))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"localhost:{port}")
    assert not await _answers(f"localhost:{port}", wait_s=8)
    # Half a client certificate, or a file that is not one: said at once, naming the variable.
    monkeypatch.delenv("KAFKA_SSL_KEYFILE")
    with pytest.raises(BrokerAuthMissing, match="KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE"):
        kafka_auth()
    monkeypatch.setenv("KAFKA_SSL_KEYFILE", str(certs / "ca.pem"))
    with pytest.raises(BrokerAuthMissing, match="TLS files of KAFKA_SSL_"):
        kafka_auth()


async def test_scram_inside_tls_reaches_the_cluster_and_faust_uses_it_too(
    tls_broker: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tls_broker["certs"]
    _env(
        monkeypatch,
        KAFKA_BOOTSTRAP_SERVERS=tls_broker["sasl_ssl"],
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME=_USER,
        KAFKA_SASL_PASSWORD=_PASSWORD,
        KAFKA_SSL_CAFILE=certs / "ca.pem",
    )
    await _ready(tls_broker, "sasl_ssl")
    await _round_trip(KafkaSettings(tls_broker["sasl_ssl"], f"tls{uuid.uuid4().hex[:6]}."))

    # A Faust app (the budget's and spawner's kind) on the same login. Topics of its own:
    # the round trip's are being deleted, and a name being deleted counts as taken until
    # it is gone (created again then, it vanished under the app: "not found in metadata").
    settings = KafkaSettings(tls_broker["sasl_ssl"], f"tls{uuid.uuid4().hex[:6]}.")
    await create_topics(settings.bootstrap, prefix=settings.prefix)
    app = create_app(f"tls-{uuid.uuid4().hex[:6]}", settings)
    seen: asyncio.Queue[str] = asyncio.Queue()

    @app.agent(event_topic(app, "task_requested", settings, source="tls-test"))
    async def read(stream: Any) -> None:
        async for event in stream:
            await seen.put(event.run_id)

    try:
        await start_app(app, settings)
        task = TaskRequested(
            source="tls-test", run_id="run-faust", goal_id="g1", agent_id="a1",
            specialty="general", message="faust over TLS",
        )  # fmt: skip
        async with EventProducer(settings) as producer:
            await producer.send(task)
        assert await asyncio.wait_for(seen.get(), 60) == "run-faust"
    finally:
        await app.stop()
        await delete_prefixed_topics(settings.bootstrap, settings.prefix)

    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "a guess")
    assert not await _answers(tls_broker["sasl_ssl"], wait_s=8)
