"""The platform's settings as users set them: environment variables, errors naming them.

The mechanism's rules (blank = default, bounds, nan/inf refused) are tested on a class of
its own in test_settings.py; these tests hold the real classes to them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from services.budget.state import BudgetDefaults
from streams.config import (
    BROKER_VARIABLES,
    BrokerAuthMissing,
    BrokerSettings,
    BudgetSettings,
    DataDirUnsafe,
    ProcessSettings,
    bootstrap_servers,
    broker_env,
    kafka_auth,
    kafka_client_args,
    private_files,
)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_BUDGET_MAX_AGENTS", "12")
    assert BudgetSettings.from_env().max_agents == 12
    assert BudgetSettings.read("max_agents") == 12
    monkeypatch.setenv("ORCH_BUDGET_MAX_AGENTS", " ")
    assert BudgetSettings.from_env().max_agents == 100


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"ORCH_BUDGET_MAX_AGENTS": "abc"},
            "ORCH_BUDGET_MAX_AGENTS must be a whole number >= 0, got 'abc'",
        ),
        (
            {"ORCH_BUDGET_MAX_DAILY_COST": "nan"},
            "ORCH_BUDGET_MAX_DAILY_COST must be a finite number between 0 and 1000000000.0,"
            " got 'nan'",
        ),
        (
            {"ORCH_BUDGET_TICK_SECONDS": "0"},
            "ORCH_BUDGET_TICK_SECONDS must be a finite number >= 0.05, got '0'",
        ),
    ],
)
def test_a_bad_budget_setting_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        BudgetSettings.from_env(env)
    assert str(err.value) == message


def test_broker_and_process_settings() -> None:
    with pytest.raises(ValueError) as err:
        BrokerSettings.from_env({"ORCH_KAFKA_PORT": "70000"})
    assert (
        str(err.value) == "ORCH_KAFKA_PORT must be a whole number between 1 and 65535, got '70000'"
    )
    assert BrokerSettings.from_env({"ORCH_KAFKA_PORT": "9500"}).bootstrap == "127.0.0.1:9500"
    assert BrokerSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "k:1"}).bootstrap == "k:1"
    assert ProcessSettings.from_env({"ORCH_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    with pytest.raises(ValueError, match="ORCH_LOG_LEVEL must be DEBUG, INFO"):
        ProcessSettings.from_env({"ORCH_LOG_LEVEL": "loud"})


def test_an_external_cluster_needs_no_valid_local_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:1")
    monkeypatch.setenv("ORCH_KAFKA_PORT", "not-a-port")
    assert bootstrap_servers() == "k:1"


def test_budget_defaults_name_the_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_BUDGET_MAX_AGENTS", "abc")
    with pytest.raises(ValueError, match="ORCH_BUDGET_MAX_AGENTS") as err:
        BudgetDefaults.from_env()
    assert "'abc'" in str(err.value)


def test_budget_defaults_unchanged_for_valid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAX_AGENTS", "MAX_CONCURRENT", "MAX_DAILY_COST", "LEASE_SECONDS"):
        monkeypatch.delenv(f"ORCH_BUDGET_{name}", raising=False)
    monkeypatch.setenv("ORCH_BUDGET_MAX_QUEUE", "0")
    monkeypatch.setenv("ORCH_BUDGET_TASK_RESERVE_USD", "0.01")
    assert BudgetDefaults.from_env() == BudgetDefaults(max_queue=0, task_reserve_usd=0.01)


def test_what_the_platform_writes_is_its_users_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The data dir (the whole event log, logs, snapshots) was 755/644: any local user could
    # copy the embedded ClickHouse and read every tenant's requests.
    root = tmp_path / "data"
    root.mkdir(mode=0o755)
    monkeypatch.setenv("ORCH_DATA_DIR", str(root))
    before = os.umask(0o022)
    try:
        private_files()
        made = root / "events.log"
        made.write_text("x")
        (root / "sub").mkdir()
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE(made.stat().st_mode) == 0o600
        assert stat.S_IMODE((root / "sub").stat().st_mode) == 0o700
    finally:
        os.umask(before)


def test_a_data_dir_of_another_user_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Another user's (say, world-writable in /tmp) data dir was used as it was: pid files,
    # logs and the broker's files followed the links that user planted, and `down`
    # signalled the pids its pid files named.
    root = tmp_path / "data"
    root.mkdir()
    root.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(root)
    theirs = os.getuid() + 1
    monkeypatch.setattr(os, "getuid", lambda: theirs)
    before = os.umask(0o022)
    try:
        for where in (root, link):
            monkeypatch.setenv("ORCH_DATA_DIR", str(where))
            with pytest.raises(DataDirUnsafe, match="belongs to another user"):
                private_files()
        assert stat.S_IMODE(root.stat().st_mode) == 0o777  # left alone
        monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "not-yet"))
        private_files()  # made later, under the umask
    finally:
        os.umask(before)


def test_the_cli_and_a_service_refuse_another_users_data_dir(tmp_path: Path) -> None:
    import subprocess
    import sys

    from streams.config import ROOT

    root = tmp_path / "data"
    root.mkdir()
    env = {**os.environ, "ORCH_DATA_DIR": str(root), "ORCH_TEST_UID": str(os.getuid() + 1)}
    fake_uid = "import os; os.getuid = lambda: int(os.environ['ORCH_TEST_UID']); "
    cli = subprocess.run(
        [sys.executable, "-c", fake_uid + "from services.cli.main import app; app(['status'])"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 1 and "belongs to another user" in cli.stderr
    broker_status = "import sys; from local.localkafka import main; sys.exit(main(['status']))"
    broker = subprocess.run(
        [sys.executable, "-c", fake_uid + broker_status],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert broker.returncode == 1 and "belongs to another user" in broker.stderr


def _clear_broker_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BROKER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_the_local_broker_is_reached_with_its_data_dirs_credentials_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clear_broker_vars(monkeypatch)
    monkeypatch.delenv("ORCH_KAFKA_PORT", raising=False)
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    # Variables meant for an external cluster do not replace the local broker's credentials.
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    with pytest.raises(BrokerAuthMissing, match=r"no credentials for the local broker.*up"):
        kafka_auth()
    (tmp_path / "kafka").mkdir()
    creds = {"mechanism": "SCRAM-SHA-512", "username": "orchestrator", "password": "s3cret"}
    (tmp_path / "kafka" / "client.json").write_text(json.dumps(creds))
    assert kafka_client_args() == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "orchestrator",
        "sasl_plain_password": "s3cret",
    }
    # A child given another data dir is sent to this broker with these credentials.
    env = broker_env()
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path / "elsewhere"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert kafka_auth()["sasl_plain_password"] == "s3cret"
    assert env["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    # A named data dir's broker is reached with that data dir's login, whatever the variables.
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "another")
    assert kafka_auth(tmp_path)["sasl_plain_password"] == "s3cret"
    (tmp_path / "kafka" / "client.json").write_text("{not json")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    with pytest.raises(BrokerAuthMissing, match="unreadable credentials"):
        kafka_auth()  # ...but a corrupt file is refused, never read as "no password"


def test_an_external_clusters_credentials_come_from_the_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_broker_vars(monkeypatch)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:1")
    assert kafka_auth() == {"security_protocol": "PLAINTEXT"}
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    with pytest.raises(BrokerAuthMissing, match="KAFKA_SASL_PASSWORD"):
        kafka_auth()
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "pw")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "scram-sha-256")
    assert kafka_auth() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
    }
    for name, value, message in (
        ("KAFKA_SECURITY_PROTOCOL", "TLS", "PLAINTEXT, SASL_PLAINTEXT, SSL or SASL_SSL"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT; rm -rf", "PLAINTEXT, SASL_PLAINTEXT"),
        ("KAFKA_SASL_MECHANISM", "GSSAPI", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=message):
            kafka_auth()
        monkeypatch.delenv(name)
