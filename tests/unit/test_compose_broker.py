"""docker-compose.yml's broker asks every connection for a login, and every client has one.

The apache/kafka image writes its server.properties from the container's KAFKA_* variables
(``kafka.docker.KafkaDockerWrapper`` in the broker's own jar, run by the image's start
script): strip ``KAFKA_``, lower-case, ``_`` becomes ``.``, ``__`` ``_`` and ``___`` ``-``;
the JVM's variables are left out. :func:`server_properties` is that rule, so what the
broker runs with is read here as properties, not as variable names.
tests/integration/test_compose_broker.py checks the rule against the wrapper itself and
runs a broker with the result."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import pytest

from streams.config import kafka_auth
from tests.unit.test_compose import COMPOSE_FILE, REQUIRED, compose_config, rendered

PASSWORD = "KAFKA_SASL_PASSWORD"
LOGIN = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", PASSWORD)

# Constants.ExcludeServerPropsEnv of the wrapper: what the JVM reads, not the broker.
_JVM_VARIABLES = frozenset(
    {
        "KAFKA_VERSION",
        "KAFKA_HEAP_OPTS",
        "KAFKA_LOG4J_OPTS",
        "KAFKA_OPTS",
        "KAFKA_JMX_OPTS",
        "KAFKA_JVM_PERFORMANCE_OPTS",
        "KAFKA_GC_LOG_OPTS",
        "KAFKA_LOG4J_ROOT_LOGLEVEL",
        "KAFKA_LOG4J_LOGGERS",
        "KAFKA_TOOLS_LOG4J_LOGLEVEL",
        "KAFKA_JMX_HOSTNAME",
    }
)


def server_properties(env: Mapping[str, str]) -> dict[str, str]:
    """The broker's properties the image makes of a container's environment."""
    out: dict[str, str] = {}
    for key, value in env.items():
        if key.startswith("KAFKA_") and key not in _JVM_VARIABLES:
            # In this order, as the wrapper does (its replace drops every "KAFKA_").
            name = key.replace("KAFKA_", "").lower().replace("_", ".")
            out[name.replace("...", "-").replace("..", "_")] = value
    return out


def listeners(properties: Mapping[str, str]) -> dict[str, str]:
    """Each listener's name and its security protocol."""
    names = [spec.split("://")[0] for spec in properties["listeners"].split(",")]
    protocols = dict(p.split(":") for p in properties["listener.security.protocol.map"].split(","))
    return {name: protocols.get(name, name) for name in names}


def broker() -> dict[str, str]:
    return server_properties(rendered()["services"]["kafka"]["environment"])


def clients() -> dict[str, dict[str, str]]:
    """Every service that reaches the broker, and its environment."""
    services = rendered()["services"]
    return {
        name: service["environment"]
        for name, service in services.items()
        if "KAFKA_BOOTSTRAP_SERVERS" in (service.get("environment") or {})
    }


def test_the_rule_is_the_images() -> None:
    # The examples of the image's docker/examples/README.md, and the JVM's variables.
    env = {"KAFKA_ABC_DEF": "1", "KAFKA_ABC___DEF": "2", "KAFKA_ABC__DEF": "3"}
    got = server_properties({**env, "KAFKA_HEAP_OPTS": "-Xmx1g", "CLUSTER_ID": "x"})
    assert got == {"abc.def": "1", "abc-def": "2", "abc_def": "3"}


def test_every_listener_asks_for_a_sasl_login() -> None:
    properties = broker()
    found = listeners(properties)
    assert set(found) == {"INTERNAL", "EXTERNAL", "CONTROLLER"}
    for name, protocol in found.items():
        assert protocol.startswith("SASL_"), f"listener {name} is {protocol}"
        # The image's start script asks for KAFKA_OPTS when an advertised name holds "SASL_".
        assert "SASL_" not in name
        jaas = properties[f"listener.name.{name.lower()}.plain.sasl.jaas.config"]
        assert jaas.startswith("org.apache.kafka.common.security.plain.PlainLoginModule ")
        assert f'password="{REQUIRED[PASSWORD]}"' in jaas
    assert properties["sasl.enabled.mechanisms"] == "PLAIN"
    assert properties["sasl.mechanism.inter.broker.protocol"] == "PLAIN"
    assert properties["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert listeners(properties)[properties["inter.broker.listener.name"]] == "SASL_PLAINTEXT"
    assert "listener.name.internal.scram-sha-512.sasl.jaas.config" not in properties


def test_every_client_of_the_broker_logs_in_as_a_user_it_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    properties = broker()
    found = clients()
    assert {"topics", "router", "budget", "spawner", "loader", "improvement", "analytics"} <= set(
        found
    )
    for name, env in found.items():
        missing = [v for v in LOGIN if not env.get(v)]
        assert not missing, f"{name} has no {missing}"
        # Nothing of the broker's but its address and the login.
        assert {k for k in env if k.startswith("KAFKA_")} == {"KAFKA_BOOTSTRAP_SERVERS", *LOGIN}
        assert env[PASSWORD] == REQUIRED[PASSWORD]
        accepted = f'user_{env["KAFKA_SASL_USERNAME"]}="{env[PASSWORD]}"'
        for listener in listeners(properties):
            assert (
                accepted in properties[f"listener.name.{listener.lower()}.plain.sasl.jaas.config"]
            )
        # As the service reads them (streams.config.kafka_auth).
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        auth = kafka_auth()
        assert auth["security_protocol"] == "SASL_PLAINTEXT", name
        assert auth["sasl_mechanism"] == properties["sasl.enabled.mechanisms"], name
        assert auth["sasl_plain_password"] == REQUIRED[PASSWORD], name


@pytest.mark.parametrize("value", [None, ""])
def test_the_broker_password_has_no_default(value: str | None) -> None:
    text = COMPOSE_FILE.read_text()
    uses = re.findall(r"\$\{KAFKA_SASL_PASSWORD([^}]*)\}", text)
    assert uses and all(use.startswith(":?") for use in uses), uses
    env = {k: v for k, v in REQUIRED.items() if k != PASSWORD}
    if value is not None:
        env[PASSWORD] = value
    done = compose_config(COMPOSE_FILE, env=env)
    assert done.returncode != 0
    assert "required variable KAFKA_SASL_PASSWORD is missing a value" in done.stderr
    assert "set KAFKA_SASL_PASSWORD" in done.stderr


def test_the_healthcheck_logs_in_without_the_password_written_in_it() -> None:
    kafka = rendered()["services"]["kafka"]
    test = json.dumps(kafka["healthcheck"]["test"])
    assert REQUIRED[PASSWORD] not in test
    assert "--command-config" in test
    # The container's variable, read by its shell ($$ in the file, $$ again as rendered).
    assert "$$KAFKA_LISTENER_NAME_INTERNAL_PLAIN_SASL_JAAS_CONFIG" in test
