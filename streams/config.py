"""The project root, and the settings more than one part of the platform reads.

Broker, processes, operators, budget limits and the launcher are declared here with the
one settings mechanism (:mod:`streams.settings`); the LLM's in :mod:`streams.llm`, each
service's own in its package. ``python -m services.settings --write`` puts them all in
docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from pathlib import Path
from typing import Any, ClassVar

from pydantic import field_validator

from streams.settings import EnvSettings, setting
from streams.workflows import MAX_PROMPT_CHARS

__all__ = [
    "BROKER_VARIABLES",
    "BrokerAuthMissing",
    "BrokerSettings",
    "BudgetSettings",
    "DEFAULT_KAFKA_PORT",
    "DataDirUnsafe",
    "JudgeSettings",
    "LauncherSettings",
    "OperatorSettings",
    "ProcessSettings",
    "ROOT",
    "bootstrap_servers",
    "broker_env",
    "data_root",
    "kafka_auth",
    "kafka_client_args",
    "kafka_port",
    "local_credentials_path",
]

ROOT = Path(__file__).resolve().parent.parent
"""The project's checkout (where ``.local/`` lives unless ``ORCH_DATA_DIR`` says otherwise)."""
DEFAULT_KAFKA_PORT = 9092
SECURITY_PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SSL", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class BrokerSettings(EnvSettings):
    title: ClassVar[str] = "Kafka and the local broker"

    external: str | None = setting(
        "KAFKA_BOOTSTRAP_SERVERS",
        None,
        "Comma-separated `host:port` list of an existing cluster. When set, no local broker is "
        "started and `orchestrator down` leaves the broker alone.",
        read_by="every service, CLI, SDK, `local.localkafka`, `streams.topics`",
        shown="`127.0.0.1:` + `ORCH_KAFKA_PORT`",
    )
    port: int = setting(
        "ORCH_KAFKA_PORT",
        DEFAULT_KAFKA_PORT,
        "Port of the local broker, 1-65535; its KRaft controller takes the next port.",
        read_by="as above, when `KAFKA_BOOTSTRAP_SERVERS` is unset",
        ge=1,
        le=65535,
    )
    security_protocol: str = setting(
        "KAFKA_SECURITY_PROTOCOL",
        "",
        "How to reach the cluster `KAFKA_BOOTSTRAP_SERVERS` names: `PLAINTEXT`, "
        "`SASL_PLAINTEXT`, `SSL` (TLS; with `KAFKA_SSL_CERTFILE`, a client certificate is "
        "the login) or `SASL_SSL` (a SASL login inside TLS, what managed clusters ask for). "
        "Empty means `SASL_PLAINTEXT` when `KAFKA_SASL_USERNAME` is set, else `PLAINTEXT`. "
        "TLS always checks the broker's certificate and name. Read with `KAFKA_BOOTSTRAP_SERVERS` "
        "only: the local broker asks for the SCRAM-SHA-512 login `local.localkafka` keeps in "
        "`<ORCH_DATA_DIR>/kafka/client.json` (`orchestrator kafka-env` prints it as these "
        "variables, for a program of one's own).",
        read_by="every service, CLI, SDK, `local.localkafka`, `streams.topics`",
    )
    sasl_mechanism: str = setting(
        "KAFKA_SASL_MECHANISM",
        "SCRAM-SHA-512",
        "`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (case ignored), with `SASL_*`. "
        "SCRAM never sends the password and checks that the broker knows it too; `PLAIN` "
        "sends it as it is to whoever answers on the address.",
        read_by="as above",
    )
    sasl_username: str | None = setting(
        "KAFKA_SASL_USERNAME",
        None,
        "The user this process authenticates as on `KAFKA_BOOTSTRAP_SERVERS`.",
        read_by="as above",
    )
    sasl_password: str | None = setting(
        "KAFKA_SASL_PASSWORD",
        None,
        "Its password. Required with `KAFKA_SASL_USERNAME`.",
        read_by="as above",
        shown="unset",
    )
    ssl_cafile: Path | None = setting(
        "KAFKA_SSL_CAFILE",
        None,
        "With `SSL`/`SASL_SSL`: a PEM file of the certificate authorities the broker's "
        "certificate must chain to. Unset: the system's trusted authorities.",
        read_by="as above",
        shown="unset",
    )
    ssl_certfile: Path | None = setting(
        "KAFKA_SSL_CERTFILE",
        None,
        "With `SSL`/`SASL_SSL`: this process's certificate (PEM, its chain after it), for a "
        "broker that asks clients for one. Needs `KAFKA_SSL_KEYFILE`.",
        read_by="as above",
        shown="unset",
    )
    ssl_keyfile: Path | None = setting(
        "KAFKA_SSL_KEYFILE",
        None,
        "The private key of `KAFKA_SSL_CERTFILE` (PEM).",
        read_by="as above",
        shown="unset",
    )
    ssl_key_password: str | None = setting(
        "KAFKA_SSL_KEY_PASSWORD",
        None,
        "The password of `KAFKA_SSL_KEYFILE`, when it is encrypted.",
        read_by="as above",
        shown="unset",
    )
    kafka_libs: Path | None = setting(
        "ORCH_KAFKA_LIBS",
        None,
        "Where Maven puts the broker jars on first start. Not under `ORCH_DATA_DIR`: one "
        "download serves every data dir.",
        read_by="`local.localkafka`",
        shown="`<project>/.local/kafka/libs`",
    )
    prefix: str = setting(
        "ORCH_TOPIC_PREFIX",
        "",
        "Prefix of every topic and consumer group name (e.g. `tenant1.`), to isolate tenants "
        "or runs. Used as given, blanks included.",
        read_by="every service, CLI, SDK, `streams.topics`",
        blank="keep",
    )
    partitions: int = setting(
        "ORCH_TOPIC_PARTITIONS",
        4,
        "Partitions of each topic when it is created; >= 1. The budget and spawner tables use "
        "it too, and the loader works out which agents it owns from it, so give every process "
        "the value the topics were created with.",
        read_by="topic creation (`orchestrator up`, `make up`), loader, spawner",
        ge=1,
    )
    fetch_max_wait_ms: int = setting(
        "ORCH_FETCH_MAX_WAIT_MS",
        500,
        "How long the broker may hold a consumer's fetch that finds no data (aiokafka "
        "`fetch_max_wait_ms`); >= 0. The broker answers a held fetch as soon as a record "
        "comes, so this sets how often an idle consumer polls, not how late it reads "
        "(`python -m bench.fetch_wait`).",
        read_by="router, loader, improvement, analytics, SDK",
        ge=0,
    )
    background_fetch_max_wait_ms: int = setting(
        "ORCH_BACKGROUND_FETCH_MAX_WAIT_MS",
        500,
        "The same for consumers off the answer's path (the analytics sink, the improvement "
        "service's view of the log): how long the broker may hold their fetch while it "
        "gathers `ORCH_BACKGROUND_FETCH_MIN_BYTES`; >= 0. What they read arrives up to this "
        "much later, in fewer, larger fetches.",
        read_by="improvement, analytics",
        ge=0,
    )
    background_fetch_min_bytes: int = setting(
        "ORCH_BACKGROUND_FETCH_MIN_BYTES",
        65536,
        "Bytes the broker gathers for those consumers before it answers their fetch (or "
        "the wait above ends); >= 1. 1 answers at every event, as the answer's path does.",
        read_by="improvement, analytics",
        ge=1,
    )

    commit_interval_ms: int = setting(
        "ORCH_COMMIT_INTERVAL_MS",
        2000,
        "How often a consumer on the answer's path commits the offsets of what it finished "
        "(the router's and loader's consumers; the budget's Faust consumer uses the larger of "
        "this and 500 ms); >= 10. A clean stop or a partition moving commits at once; a "
        "crash replays what finished since the last commit, which every handler tolerates. "
        "Each commit is a record the broker appends (`python -m bench.latency` counts them).",
        read_by="router, loader, budget, improvement",
        ge=10,
    )

    @field_validator("security_protocol")
    @classmethod
    def _protocol(cls, value: str) -> str:
        chosen = value.strip().upper()
        if chosen and chosen not in SECURITY_PROTOCOLS:
            raise ValueError(
                "KAFKA_SECURITY_PROTOCOL must be PLAINTEXT, SASL_PLAINTEXT, SSL or SASL_SSL,"
                f" got {value!r}"
            )
        return chosen

    @field_validator("sasl_mechanism")
    @classmethod
    def _mechanism(cls, value: str) -> str:
        chosen = value.strip().upper() or "SCRAM-SHA-512"
        if chosen not in SASL_MECHANISMS:
            raise ValueError(
                f"KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, got {value!r}"
            )
        return chosen

    @property
    def bootstrap(self) -> str:
        """``KAFKA_BOOTSTRAP_SERVERS`` when set, else the local broker on 127.0.0.1."""
        return self.external or f"127.0.0.1:{self.port}"

    @property
    def libs(self) -> Path:
        # Jars are the same for every data dir; fetch them once per checkout.
        return self.kafka_libs or ROOT / ".local" / "kafka" / "libs"


class ProcessSettings(EnvSettings):
    title: ClassVar[str] = "Processes"

    log_level: str = setting(
        "ORCH_LOG_LEVEL",
        "INFO",
        "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`, case ignored. Empty means the "
        "default; an unknown value stops the service with an error naming the variable. "
        "`orchestrator bench learning` runs its services at `WARNING` unless this is set.",
        read_by="every service",
    )
    data_dir: Path = setting(
        "ORCH_DATA_DIR",
        ROOT / ".local",
        "Where local data lives: broker data (`kafka/`), Faust table stores (`faust/`), "
        "embedded ClickHouse (`clickhouse/`), service logs (`logs/`), pid and port files "
        "(`run/`). One supervisor runs per data dir.",
        read_by="budget, spawner, improvement, analytics, CLI, `local.localkafka`",
        shown="`<project>/.local`",
    )
    stop_grace_s: float = setting(
        "ORCH_STOP_GRACE_SECONDS",
        30.0,
        "After SIGTERM or SIGINT, a service whose clean stop takes longer than this exits "
        "anyway, with status 1 (what it had not committed is replayed by the next owner); "
        ">= 0. Under `orchestrator up`, the supervisor's `--stop-timeout` (15 s) kills it "
        "sooner.",
        read_by="every service",
        ge=0,
    )
    clock_file: str | None = setting(
        "ORCH_CLOCK_FILE",
        None,
        "Test only: a file holding a number of seconds added to the service's clock, read "
        "again whenever it changes (a missing file counts as 0), so tests move time in other "
        "processes. Its content is not checked at start.",
        read_by="every service",
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(
                f"ORCH_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level!r}"
            )
        return level


def data_root() -> Path:
    """Where the platform keeps local data: ``ORCH_DATA_DIR`` or ``<project>/.local``."""
    path: Path = ProcessSettings.read("data_dir")
    return path


def private_files() -> None:
    """What this process writes is its user's alone: umask 077, and the data dir 0700.

    The data dir holds the whole event log (every tenant's requests and answers), the
    logs and the snapshots; made 755/644 under the usual umask, any local user could copy
    the embedded ClickHouse and read it, whatever the SQL surface's token guards."""
    os.umask(0o077)
    root = data_root()
    try:
        found = root.stat()  # through a symlink: the directory written to is what counts
    except FileNotFoundError:
        return  # made later, under the umask: 0700
    except OSError as exc:
        raise DataDirUnsafe(f"{root}: {exc.strerror or exc}") from None
    if found.st_uid != os.getuid():
        # Another user's directory: pid files, logs and the broker's files written there
        # follow whatever links that user plants, and `down` would signal the pids they name.
        raise DataDirUnsafe(
            f"{root} belongs to another user (uid {found.st_uid}); set ORCH_DATA_DIR to a"
            " directory of your own"
        )
    with contextlib.suppress(OSError):
        root.chmod(0o700)


class DataDirUnsafe(RuntimeError):
    """The data dir is not this user's alone: the platform will not write there."""


def kafka_port() -> int:
    """The local broker's port: ``ORCH_KAFKA_PORT`` (default 9092)."""
    port: int = BrokerSettings.read("port")
    return port


def bootstrap_servers() -> str:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set, else the local broker on 127.0.0.1."""
    external: str | None = BrokerSettings.read("external")
    return external or f"127.0.0.1:{kafka_port()}"


BROKER_VARIABLES = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "KAFKA_SSL_CERTFILE",
    "KAFKA_SSL_KEYFILE",
    "KAFKA_SSL_KEY_PASSWORD",
)
"""The variables that say which cluster a process uses and how it logs in."""


class BrokerAuthMissing(RuntimeError):
    """No credentials to reach the broker with: the local one was never started here, or
    ``KAFKA_SASL_USERNAME`` came without its password."""


def local_credentials_path(data_dir: Path | None = None) -> Path:
    """Where the local broker's launcher keeps the clients' SCRAM credentials (0600)."""
    return (data_dir or data_root()) / "kafka" / "client.json"


def kafka_auth(data_dir: Path | None = None) -> dict[str, Any]:
    """aiokafka's keyword arguments that authenticate this process to the broker.

    The local broker asks every client for the SCRAM credentials its launcher wrote in the
    data dir (so another local user, who cannot read that 0700 directory, cannot read or
    write the topics; and a process that took the port while the broker was down cannot
    pass for it: SCRAM checks that the broker knows the password, never sending it).
    ``KAFKA_BOOTSTRAP_SERVERS`` is reached as ``KAFKA_SECURITY_PROTOCOL`` and
    ``KAFKA_SASL_*`` say. With ``data_dir``, the local broker of that data dir."""
    broker = BrokerSettings.from_env()
    if broker.external and data_dir is None:
        return _external_auth(broker)
    path = local_credentials_path(data_dir)
    try:
        found = json.loads(path.read_text())
        return _sasl(str(found["mechanism"]), str(found["username"]), str(found["password"]))
    except FileNotFoundError:
        raise BrokerAuthMissing(
            f"no credentials for the local broker in {path}: start it first (`orchestrator"
            " up` or `python -m local.localkafka up`)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = f"unreadable credentials for the local broker in {path}: {exc}"
        raise BrokerAuthMissing(why) from None


def _external_auth(broker: BrokerSettings) -> dict[str, Any]:
    protocol = broker.security_protocol or (
        "SASL_PLAINTEXT" if broker.sasl_username else "PLAINTEXT"
    )
    out: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        if not broker.sasl_username or broker.sasl_password is None:
            raise BrokerAuthMissing(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and"
                " KAFKA_SASL_PASSWORD"
            )
        out |= _sasl(broker.sasl_mechanism, broker.sasl_username, broker.sasl_password)
        out["security_protocol"] = protocol
    if protocol.endswith("SSL"):
        out["ssl_context"] = _tls_context(broker)
    return out


def _tls_context(broker: BrokerSettings) -> ssl.SSLContext:
    """TLS that checks the broker's certificate and name; a client certificate if given."""
    if (broker.ssl_certfile is None) != (broker.ssl_keyfile is None):
        raise BrokerAuthMissing("KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE go together")
    try:
        context = ssl.create_default_context(
            cafile=str(broker.ssl_cafile) if broker.ssl_cafile else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if broker.ssl_certfile is not None and broker.ssl_keyfile is not None:
            context.load_cert_chain(
                str(broker.ssl_certfile), str(broker.ssl_keyfile), broker.ssl_key_password
            )
    except (OSError, ssl.SSLError) as exc:
        # The message names the file, never the key's password.
        raise BrokerAuthMissing(f"the TLS files of KAFKA_SSL_* cannot be used: {exc}") from None
    return context


def _sasl(mechanism: str, username: str, password: str) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": username,
        "sasl_plain_password": password,
    }


def broker_env(bootstrap: str | None = None, data_dir: Path | None = None) -> dict[str, str]:
    """The variables that send a child process to this process's broker, as this process
    authenticates to it (a child given another data dir would not find the local broker's
    credentials in it); with ``data_dir``, to the local broker of that data dir."""
    auth = kafka_auth(data_dir)
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap or bootstrap_servers(),
        "KAFKA_SECURITY_PROTOCOL": auth["security_protocol"],
    }
    if "sasl_mechanism" in auth:
        env["KAFKA_SASL_MECHANISM"] = auth["sasl_mechanism"]
        env["KAFKA_SASL_USERNAME"] = auth["sasl_plain_username"]
        env["KAFKA_SASL_PASSWORD"] = auth["sasl_plain_password"]
    if "ssl_context" in auth:
        # The files, as this process was given them (a context cannot travel).
        for name in _TLS_VARS:
            if os.environ.get(name):
                env[name] = os.environ[name]
    return env


_TLS_VARS = (
    "KAFKA_SSL_CAFILE",
    "KAFKA_SSL_CERTFILE",
    "KAFKA_SSL_KEYFILE",
    "KAFKA_SSL_KEY_PASSWORD",
)


def kafka_client_args(bootstrap: str | None = None) -> dict[str, Any]:
    """``bootstrap_servers`` and the authentication of an aiokafka client of the broker."""
    return {"bootstrap_servers": bootstrap or bootstrap_servers(), **kafka_auth()}


class OperatorSettings(EnvSettings):
    title: ClassVar[str] = "Operators"

    operators: str = setting(
        "ORCH_OPERATORS",
        "operator",
        "Comma-separated users trusted as operators without a key (budget changes, rollbacks, "
        "approving an improvement for every goal). `operator` is the local CLI's identity; on a "
        "shared cluster set it empty and give operators keys (`orchestrator keys create --role "
        "operator`). Set but empty means none. The CLI and SDK read it too, to refuse before "
        "sending what the services would refuse (`budget set` by someone else, a user key "
        "named like an operator): give them the value the services have.",
        read_by="improvement, budget, CLI, SDK",
        blank="keep",
    )
    operator_user: str = setting(
        "ORCH_OPERATOR_USER",
        "operator",
        "The user the CLI's `budget set`, `rollback`, `improve approve`, `improve promote` "
        "and the SDK's `set_budget` send as, unless told otherwise (`--as`, `--user`, "
        "`user_id=`).",
        read_by="CLI, SDK",
    )


class JudgeSettings(EnvSettings):
    """Which answers the platform's judge grades: the router decides with its decision
    (it knows what it has learned), the improvement service judges what it decided."""

    title: ClassVar[str] = "The judge's sample"

    sample: float = setting(
        "ORCH_JUDGE_SAMPLE",
        0.2,
        "Share of answers the judge grades, 0-1 (1: every one, 0: none; the default 0.2 kept "
        "92-102% of the oracle's reward on every world measured, with the judge at 1-4% of the "
        'money: docs/performance.md, "The same worlds with the judge aimed"). The router gives '
        "each decision a probability of being judged (`ORCH_JUDGE_RULE`) and logs it on "
        "`route_decided` (`judge_probability`); the run is judged when a number drawn from its "
        "run id falls under it, so a redelivery or another instance decides the same (a run "
        "with no logged probability is drawn at the share). A run outside it costs no judge "
        "call: its `workflow_assessed` says method `unjudged` (the heuristic's quality), and "
        "the router learns it from its user's feedback (score 1-5 as (score - 1) / 4) or not "
        "at all. A simulated world's truth is used whatever the share.",
        read_by="router, improvement",
        ge=0.0,
        le=1.0,
    )
    rule: str = setting(
        "ORCH_JUDGE_RULE",
        "uncertain",
        "How the router spreads the judge's share over the answers: `uncertain` (more where "
        "the goal's learned policy knows the chosen arm little on the request's words, and "
        "on explorations; each router instance keeps the share of each goal's answers it "
        "judged at or under `ORCH_JUDGE_SAMPLE`, so one goal's traffic never spends another's) "
        "or `uniform` (each at the share). Set but empty means the "
        'default. Measured in docs/performance.md, "Judging where the policy is unsure".',
        read_by="router",
    )

    @field_validator("rule")
    @classmethod
    def _rule(cls, value: str) -> str:
        chosen = value.strip().lower() or "uncertain"
        if chosen not in ("uniform", "uncertain"):
            raise ValueError(f"ORCH_JUDGE_RULE must be uniform or uncertain, got {value!r}")
        return chosen


class BudgetSettings(EnvSettings):
    """The budget's limits; here because the improvement service reads the daily cap too."""

    title: ClassVar[str] = "Budget defaults"

    max_agents: int = setting(
        "ORCH_BUDGET_MAX_AGENTS",
        100,
        "Agents a goal may have; a spawn past it is denied. >= 0 (0 denies every spawn).",
        read_by="budget",
        ge=0,
    )
    max_concurrent: int = setting(
        "ORCH_BUDGET_MAX_CONCURRENT",
        10,
        "Tasks of a goal running at once; more wait in the goal's queue. >= 0 (0 fails every "
        "task).",
        read_by="budget",
        ge=0,
    )
    max_daily_cost: float = setting(
        "ORCH_BUDGET_MAX_DAILY_COST",
        10.0,
        "USD a goal may spend on LLM calls per UTC day (of the budget's clock), held amounts "
        "included: a hard cap. A task whose worst case does not fit beside today's spend "
        "fails; one that does not fit beside the running tasks' holds waits for them to "
        "settle. 0 to 1e9.",
        read_by="budget, improvement (its own calls stay within it)",
        ge=0,
        le=1e9,
    )
    task_reserve_usd: float = setting(
        "ORCH_BUDGET_TASK_RESERVE_USD",
        0.002,
        "Least USD held for each admitted task or approved spawn until its real cost is known; "
        'the hold is the call\'s worst case when that is more (see "Daily cost is reserved" '
        "in docs/architecture.md). >= 0.",
        read_by="budget",
        ge=0,
    )
    system_prompt_tokens: int = setting(
        "ORCH_BUDGET_SYSTEM_PROMPT_TOKENS",
        4 * MAX_PROMPT_CHARS,
        "Prompt tokens a task's hold allows for the system prompt (the loader cuts it to 6000 "
        "characters; 4 UTF-8 bytes each, a token per byte at most). Lower it only if you know "
        "your prompts' tokens: a prompt larger than this can make a call cost more than its "
        "hold. >= 0.",
        read_by="budget",
        ge=0,
    )
    max_queue: int = setting(
        "ORCH_BUDGET_MAX_QUEUE",
        1000,
        "Tasks a goal may have waiting for a concurrency slot; one more fails with "
        "`budget_exceeded` (limit `max_concurrent`). >= 0.",
        read_by="budget",
        ge=0,
    )
    lease_seconds: float = setting(
        "ORCH_BUDGET_LEASE_SECONDS",
        600.0,
        "For a task without a deadline, how long past its admission it keeps its slot without "
        "finishing (a task with one keeps it until its deadline plus `ORCH_LLM_TIMEOUT` plus "
        "30 s); also how long after that an ended task's hold waits for its cost. Measured on "
        "the earlier of the budget's clock and the goal's event time. >= 0.",
        read_by="budget",
        ge=0,
    )
    tick_seconds: float = setting(
        "ORCH_BUDGET_TICK_SECONDS",
        1.0,
        "Seconds between the budget's ticks of each goal with tasks queued or running, holds "
        "waiting for a cost or unused admission tokens (so a task waiting past its deadline "
        "ends, a lapsed lease frees its slot and a call nobody reported is counted); >= 0.05.",
        read_by="budget",
        ge=0.05,
    )
    admission_tokens: int = setting(
        "ORCH_ADMISSION_TOKENS",
        0,
        "Admission tokens a router instance keeps per busy goal (0, the default: the budget "
        "decides every task). A token is a `max_concurrent` slot and a worst case of money the "
        "budget sets aside for one router instance; the router admits a task with one and tells "
        "the budget, so the answer does not wait for the budget's decision. Tokens are granted "
        "only from free slots and money, never while the goal has tasks queued "
        '(docs/architecture.md, "Admission tokens"). 0-64.',
        read_by="router (asks), budget (grants)",
        ge=0,
        le=64,
    )
    admission_token_seconds: float = setting(
        "ORCH_ADMISSION_TOKEN_SECONDS",
        5.0,
        "How long a router may use an admission token after its grant; a task admitted with "
        "one starts by then or not at all, and the token's slot comes back `ORCH_LLM_TIMEOUT` "
        "plus 30 s later if it was never used nor given back. > 0. The router holds a "
        "token to no more than this after its grant, whatever the grant's stamp says.",
        read_by="budget, router",
        gt=0,
    )
    admission_token_bytes: int = setting(
        "ORCH_ADMISSION_TOKEN_BYTES",
        8192,
        "The request size (message and context, UTF-8 bytes) an admission token's money "
        "covers: each token holds the worst case of a request this large; a larger request "
        "goes to the budget. >= 0.",
        read_by="budget",
        ge=0,
    )
    report_seconds: float = setting(
        "ORCH_BUDGET_REPORT_SECONDS",
        2.0,
        "Seconds between the budget's reports of the goals whose record changed "
        "(`budget_reported`, what `orchestrator budget show` prints): at most one per goal "
        "per interval, off the request path; a limit change is reported at once. >= 0.05.",
        read_by="budget",
        ge=0.05,
    )


class LauncherSettings(EnvSettings):
    """What the process launcher (``local.platform``) reads; declared here, beside the rest."""

    title: ClassVar[str] = "Launcher"

    fake_llm_port: int = setting(
        "ORCH_FAKE_LLM_PORT",
        0,
        "Port of the fake OpenAI-compatible server, 0-65535; 0 picks a free port when `up` "
        "starts, kept when the fake is restarted.",
        read_by="CLI `up --fake-llm`",
        ge=0,
        le=65535,
    )
    services_package: str = setting(
        "ORCH_SERVICES_PACKAGE",
        "services",
        "Test only: the package whose sub-packages are the services, so tests can bring their own.",
        read_by="CLI (`up`, `status`, `service`, `bench learning`)",
    )
