"""Which environment variables each service process gets: the table, and the builder.

A service process starts with only what it needs, so a secret reaches only the
services that use it. The analytics sink in particular must never see the LLM
key: its query surface runs SQL, and a query engine that can read files can read
its own process's environment.

Every process gets :data:`COMMON`. A variable that one of the :data:`GRANTS`
names is *restricted*: only the services :data:`SERVICE_GRANTS` lists for that
grant get it, even when it also looks common (``ORCH_LLM_MODEL`` is an ``ORCH_``
setting, but only the services that call the LLM read it). A process not in the
table (a test's stand-in, a new service nobody listed yet) gets the common part
only. Everything else in the parent's environment is left out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "COMMON",
    "GRANTS",
    "SERVICE_GRANTS",
    "Vars",
    "grants_of",
    "service_env",
]


@dataclass(frozen=True)
class Vars:
    """A set of variables: exact names and name prefixes."""

    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.names or name.startswith(self.prefixes))


COMMON = Vars(
    names=frozenset(
        {
            # The process itself: where programs and home are, who runs it, its locale.
            "PATH",
            "HOME",
            "USER",
            "LOGNAME",
            "LANG",
            "LANGUAGE",
            "TZ",
            "TMPDIR",
            "VIRTUAL_ENV",
            # TLS trust: which CAs to accept is not a secret.
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            # The broker every service talks to (local/localkafka.py reads it), and how
            # they authenticate to it: every service needs the broker's credentials.
            "KAFKA_BOOTSTRAP_SERVERS",
            "KAFKA_SECURITY_PROTOCOL",
            "KAFKA_SASL_MECHANISM",
            "KAFKA_SASL_USERNAME",
            "KAFKA_SSL_CAFILE",
            "KAFKA_SSL_CERTFILE",
            "KAFKA_SSL_KEYFILE",
        }
    ),
    # LC_* locale, PYTHON* interpreter settings, ORCH_* platform settings.
    prefixes=("LC_", "PYTHON", "ORCH_"),
)

_PROXIES = frozenset(
    {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"}
    | {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
)

GRANTS: Mapping[str, Vars] = {
    # The broker's passwords: every service logs in (a service of one's own too); the
    # broker itself and the fake LLM do not.
    "kafka-login": Vars(names=frozenset({"KAFKA_SASL_PASSWORD", "KAFKA_SSL_KEY_PASSWORD"})),
    # The LLM endpoint and its key, the model settings, and the HTTP proxies to reach it.
    # The judge's sample and rule are common: the router decides which runs are judged.
    "llm": Vars(names=_PROXIES | {"ORCH_JUDGE_MODEL"}, prefixes=("OPENAI_", "ORCH_LLM_")),
    # What an LLM call may cost and which models agents may use, without the endpoint or
    # its key: the budget holds a call's worst case (its max_tokens and prompt at the
    # dearest price) before it runs; the router chooses a model with the specialty.
    "prices": Vars(
        names=frozenset(
            {
                "ORCH_LLM_PRICES",
                "ORCH_LLM_MODELS",
                "ORCH_LLM_MODEL",
                "ORCH_LLM_MAX_TOKENS",
                "ORCH_LLM_TIMEOUT",
            }
        )
    ),
    # The ClickHouse server (CLICKHOUSE_URL carries its password) and the client's settings.
    "clickhouse": Vars(names=_PROXIES, prefixes=("CLICKHOUSE_",)),
    # Slack's signing secret and bot token, and who may use /improve.
    "slack": Vars(prefixes=("SLACK_", "ORCH_SLACK_")),
    # The JVM's and Maven's own settings, and the proxies Maven reaches Central through.
    "jvm": Vars(
        names=_PROXIES
        | {
            "KAFKA_HEAP_OPTS",
            "KAFKA_OPTS",
            "KAFKA_JVM_PERFORMANCE_OPTS",
            "KAFKA_LOG4J_OPTS",
            "M2_HOME",
            "MAVEN_HOME",
        },
        prefixes=("JAVA_", "_JAVA_", "JDK_", "MAVEN_"),
    ),
}

SERVICE_GRANTS: Mapping[str, frozenset[str]] = {
    "analytics": frozenset({"clickhouse", "kafka-login"}),
    "budget": frozenset({"prices", "kafka-login"}),  # worst-case holds; never the LLM key
    "spawner": frozenset({"llm", "kafka-login"}),  # writes a new agent's prompt
    "loader": frozenset({"llm", "kafka-login"}),  # answers
    "router": frozenset({"prices", "kafka-login"}),  # chooses a model with the specialty
    "improvement": frozenset({"llm", "slack", "kafka-login"}),  # judge, rewrites; /improve
    "gateway": frozenset({"kafka-login"}),  # HTTP before the SDK: no LLM key, no ClickHouse
    "fake-llm": frozenset(),
    # The local broker, its storage tool and the Maven fetch of its jars: none of the
    # platform's secrets (the broker outlives the CLI that started it).
    "kafka": frozenset({"jvm"}),
}
"""The table: which grants each service process gets on top of :data:`COMMON`."""


def grants_of(service: str) -> frozenset[str]:
    """The grants of ``service``; for a process the table does not list (a service of
    one's own under `ORCH_SERVICES_PACKAGE`), the broker's login alone."""
    return SERVICE_GRANTS.get(service, frozenset({"kafka-login"}))


def service_env(service: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of ``environ`` (default: this process's) that ``service`` may see."""
    source = os.environ if environ is None else environ
    allowed = [GRANTS[g] for g in sorted(grants_of(service))]
    out: dict[str, str] = {}
    for name, value in source.items():
        if any(name in vars_ for vars_ in allowed):
            out[name] = value
        elif name in COMMON and not any(name in vars_ for vars_ in GRANTS.values()):
            out[name] = value
    return out
