"""Each service process gets only its share of the environment (local/environment.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from local.environment import GRANTS, SERVICE_GRANTS, grants_of, service_env
from local.platform import FAKE_LLM, SERVICE_ORDER

ROOT = Path(__file__).resolve().parents[2]

PARENT = {
    "PATH": "/usr/bin",
    "HOME": "/home/u",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
    "TMPDIR": "/tmp",
    "VIRTUAL_ENV": "/venv",
    "PYTHONPATH": "/app",
    "PYTHONUNBUFFERED": "1",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "ORCH_DATA_DIR": "/data",
    "ORCH_TOPIC_PREFIX": "t.",
    "ORCH_ROUTER_POLICY": "static",
    "OPENAI_API_KEY": "sk-live-0123456789abcdef",
    "OPENAI_BASE_URL": "https://llm.example/v1",
    "ORCH_LLM_MODEL": "gpt-4o",
    "ORCH_LLM_PRICES": "{}",
    "ORCH_JUDGE_MODEL": "gpt-4o-mini",
    "ORCH_JUDGE_SAMPLE": "0.2",
    "ORCH_JUDGE_RULE": "uncertain",
    "CLICKHOUSE_URL": "http://user:pw@ch:8123/db",
    "CLICKHOUSE_PASSWORD": "pw",
    "SLACK_SIGNING_SECRET": "slack-secret",
    "SLACK_BOT_TOKEN": "xoxb-1",
    "ORCH_SLACK_USERS": "U1=alice",
    "HTTPS_PROXY": "http://proxy:3128",
    # Never anyone's: other tools' credentials and unrelated settings.
    "AWS_SECRET_ACCESS_KEY": "aws",
    "GITHUB_TOKEN": "ghp",
    "DATABASE_URL": "postgres://x",
    "EDITOR": "vi",
}
COMMON = {
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "KAFKA_BOOTSTRAP_SERVERS",
    "ORCH_DATA_DIR",
    "ORCH_TOPIC_PREFIX",
    "ORCH_ROUTER_POLICY",
    # Not secrets: the router decides which runs the judge grades, the improvement judges.
    "ORCH_JUDGE_SAMPLE",
    "ORCH_JUDGE_RULE",
}
LLM = {"OPENAI_API_KEY", "OPENAI_BASE_URL", "ORCH_LLM_MODEL", "ORCH_LLM_PRICES", "ORCH_JUDGE_MODEL"}
CLICKHOUSE = {"CLICKHOUSE_URL", "CLICKHOUSE_PASSWORD"}
SLACK = {"SLACK_SIGNING_SECRET", "SLACK_BOT_TOKEN", "ORCH_SLACK_USERS"}
PROXY = {"HTTPS_PROXY"}

EXPECTED = {
    "analytics": COMMON | CLICKHOUSE | PROXY,
    "budget": COMMON | {"ORCH_LLM_PRICES", "ORCH_LLM_MODEL"},
    "spawner": COMMON | LLM | PROXY,
    "loader": COMMON | LLM | PROXY,
    "router": COMMON | {"ORCH_LLM_PRICES", "ORCH_LLM_MODEL"},
    "improvement": COMMON | LLM | SLACK | PROXY,
    "gateway": COMMON,
    FAKE_LLM: COMMON,
    "some_new_service": COMMON,
}


@pytest.mark.parametrize("service", sorted(EXPECTED))
def test_each_service_gets_exactly_its_share(service: str) -> None:
    env = service_env(service, PARENT)
    assert set(env) == EXPECTED[service]
    assert all(env[name] == PARENT[name] for name in env)


def test_the_analytics_sink_never_sees_the_llm_key() -> None:
    env = service_env("analytics", PARENT)
    assert not [name for name in env if name.startswith("OPENAI_")]
    assert "sk-live-0123456789abcdef" not in env.values()


def test_the_default_source_is_this_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-os-environ-123")
    monkeypatch.setenv("ORCH_TOPIC_PREFIX", "p.")
    assert service_env("loader")["OPENAI_API_KEY"] == "sk-from-os-environ-123"
    assert "OPENAI_API_KEY" not in service_env("analytics")
    assert service_env("analytics")["ORCH_TOPIC_PREFIX"] == "p."


def test_every_process_the_supervisor_starts_has_a_row() -> None:
    assert set(SERVICE_GRANTS) == {*SERVICE_ORDER, FAKE_LLM, "kafka"}
    assert all(grants <= set(GRANTS) for grants in SERVICE_GRANTS.values())


def test_the_local_broker_and_maven_get_their_own_settings_and_no_secret() -> None:
    # The broker outlives the CLI that starts it; it was given the whole environment.
    environ = {
        "PATH": "/usr/bin",
        "JAVA_HOME": "/opt/jdk",
        "KAFKA_HEAP_OPTS": "-Xmx1g",
        "MAVEN_OPTS": "-Xmx512m",
        "HTTPS_PROXY": "http://proxy:3128",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
        "OPENAI_API_KEY": "sk-test",
        "SLACK_SIGNING_SECRET": "s",
        "CLICKHOUSE_URL": "http://u:p@h/db",
    }
    env = service_env("kafka", environ)
    assert set(env) == {
        "PATH",
        "JAVA_HOME",
        "KAFKA_HEAP_OPTS",
        "MAVEN_OPTS",
        "HTTPS_PROXY",
        "KAFKA_BOOTSTRAP_SERVERS",
    }
    # Granting the JVM's settings takes nothing common from the others.
    assert "KAFKA_BOOTSTRAP_SERVERS" in service_env("router", environ)


def _source(service: str) -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "services" / service).rglob("*.py")))


@pytest.mark.parametrize("service", SERVICE_ORDER)
def test_the_table_matches_what_each_service_reads(service: str) -> None:
    # A service that builds an LLM client, reads ClickHouse or Slack settings gets the
    # grant; one that does not, does not. A new reader fails here until the table says so.
    code = _source(service)
    reads = {
        "llm": "create_llm(" in code,
        "clickhouse": "CLICKHOUSE_" in code,
        "slack": "SLACK_" in code,
        # Prices and models without the endpoint: a service that holds a call's worst
        # case, or chooses a model.
        "prices": "LLMSettings" in code and "create_llm(" not in code,
        # Every platform service is a Kafka client.
        "kafka-login": True,
    }
    assert {grant for grant, used in reads.items() if used} == grants_of(service)


def test_the_brokers_passwords_reach_the_services_alone() -> None:
    environ = {
        "PATH": "/usr/bin",
        "KAFKA_BOOTSTRAP_SERVERS": "k:9093",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SASL_PASSWORD": "s3cret",
        "KAFKA_SSL_CAFILE": "/etc/ca.pem",
        "KAFKA_SSL_KEY_PASSWORD": "k3y",
    }
    for service in SERVICE_ORDER:
        env = service_env(service, environ)
        assert env["KAFKA_SASL_PASSWORD"] == "s3cret", service
        assert env["KAFKA_SSL_KEY_PASSWORD"] == "k3y", service
        assert env["KAFKA_SSL_CAFILE"] == "/etc/ca.pem", service
    # A service of one's own (ORCH_SERVICES_PACKAGE) is a Kafka client too.
    assert service_env("my-own-service", environ)["KAFKA_SASL_PASSWORD"] == "s3cret"
    assert grants_of("my-own-service") == {"kafka-login"}
    for other in ("kafka", "fake-llm"):
        env = service_env(other, environ)
        assert "KAFKA_SASL_PASSWORD" not in env and "KAFKA_SSL_KEY_PASSWORD" not in env, other
        assert env["KAFKA_SASL_USERNAME"] == "svc"
