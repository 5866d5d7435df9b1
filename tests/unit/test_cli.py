"""The `orchestrator` CLI on the paths that never reach Kafka: bad input, exit codes, output."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from local.platform import SERVICE_ORDER
from services.cli import main as cli
from services.cli.admin import keys_table
from services.cli.supervisor import restart_delay
from streams.client import Answer, OrchestratorClient
from streams.errors import BudgetExceededError, RunTimeout
from streams.events import MAX_MESSAGE_BYTES
from streams.keys import KeyRegistry, mint_key

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_kafka(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any attempt to connect fails the test: these paths must not reach the broker."""
    calls: list[str] = []

    async def refuse(self: OrchestratorClient) -> None:
        calls.append("start")
        raise AssertionError("the CLI connected to Kafka")

    monkeypatch.setattr(OrchestratorClient, "start", refuse)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    return calls


def invoke(*args: str) -> Any:
    # Wide enough that no message is wrapped inside the usage-error box.
    return runner.invoke(cli.app, list(args), env={"COLUMNS": "300"})


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["", "--goal", "g1", "--user", "u1"], "message is empty"),
        (["   ", "--goal", "g1", "--user", "u1"], "message is empty"),
        (["x" * (MAX_MESSAGE_BYTES + 1), "--goal", "g1", "--user", "u1"], "the limit is 32768"),
        (["hi", "--goal", "bad goal", "--user", "u1"], "goal_id: invalid identifier"),
        (["hi", "--goal", "g1", "--user", "-u"], "user_id: invalid identifier"),
        (["hi", "--goal", "g1", "--user", "u1", "--context", "novalue"], "key=value"),
        (["hi", "--goal", "g1", "--user", "u1", "--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_ask_refuses_bad_input_before_connecting(
    args: list[str], expected: str, no_kafka: list[str]
) -> None:
    result = invoke("ask", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert no_kafka == []


def test_ask_without_goal_is_a_usage_error() -> None:
    result = invoke("ask", "hi", "--user", "u1")
    assert result.exit_code == 2
    assert "--goal" in result.output


def test_ask_json_error_is_json_only() -> None:
    result = invoke("ask", "", "--goal", "g1", "--user", "u1", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": "invalid request: message: message is empty"}


def _fake_client(monkeypatch: pytest.MonkeyPatch, outcome: Answer | Exception) -> None:
    async def start(self: OrchestratorClient) -> None:
        return None

    async def ask(self: OrchestratorClient, message: str, **kwargs: Any) -> Answer:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(OrchestratorClient, "start", start)
    monkeypatch.setattr(OrchestratorClient, "ask", ask)


def _answer(tier: str) -> Answer:
    return Answer("run-1", "code_0123abcd", "code", "use sorted()", 0.0012, 42.0, tier)


def test_ask_prints_answer_and_flags_a_degraded_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_client(monkeypatch, _answer("keyword"))
    result = invoke("ask", "sort a list", "--goal", "g1", "--user", "u1")
    assert result.exit_code == 0, result.output
    assert "use sorted()" in result.stdout
    assert "code_0123abcd" in result.stdout
    assert "degraded: answered by the keyword tier" in result.stdout


def test_ask_llm_answer_is_not_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_client(monkeypatch, _answer("llm"))
    result = invoke("ask", "sort a list", "--goal", "g1", "--user", "u1")
    assert result.exit_code == 0
    assert "degraded" not in result.stdout


def test_ask_json_is_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_client(monkeypatch, _answer("llm"))
    result = invoke("ask", "sort a list", "--goal", "g1", "--user", "u1", "--json")
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    assert body["text"] == "use sorted()"
    assert body["degradation_tier"] == "llm"
    assert body["cost_usd"] == pytest.approx(0.0012)


def test_ask_budget_failure_names_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    error = BudgetExceededError("run-1", "budget_exceeded", "3 of 3 agents", "max_agents")
    _fake_client(monkeypatch, error)
    result = invoke("ask", "hi", "--goal", "g1", "--user", "u1")
    assert result.exit_code == 1
    assert "budget exceeded: max_agents — 3 of 3 agents" in result.output


def test_ask_budget_failure_json(monkeypatch: pytest.MonkeyPatch) -> None:
    error = BudgetExceededError("run-1", "budget_exceeded", "spent", "max_daily_cost")
    _fake_client(monkeypatch, error)
    result = invoke("ask", "hi", "--goal", "g1", "--user", "u1", "--json")
    assert result.exit_code == 1
    body = json.loads(result.stdout)
    assert body["limit"] == "max_daily_cost"
    assert body["reason"] == "budget_exceeded"


def test_ask_timeout_exits_3(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_client(monkeypatch, RunTimeout("run-1", 2.0))
    result = invoke("ask", "hi", "--goal", "g1", "--user", "u1", "--timeout", "2")
    assert result.exit_code == 3
    assert "no answer within 2s" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["g1"], "nothing to set"),
        (["g1", "--max-agents", "-1"], "--max-agents must be a finite number >= 0"),
        (["g1", "--max-daily-cost", "-0.5"], "--max-daily-cost must be a finite number >= 0"),
        (["g1", "--max-daily-cost", "inf"], "--max-daily-cost must be a finite number >= 0"),
        (["g1", "--cost-weight", "-2"], "--cost-weight must be a finite number >= 0"),
        (["g1", "--cost-weight", "nan"], "--cost-weight must be a finite number >= 0"),
        (["g1", "--cost-weight", "1e12"], "invalid budget"),
        (["bad goal", "--max-agents", "3"], "invalid identifier"),
        (["g1", "--max-tokens", "3"], "No such option"),
        (["g1", "--max-agents", "three"], "Invalid value for '--max-agents'"),
    ],
)
def test_budget_set_refuses_bad_input(args: list[str], expected: str, no_kafka: list[str]) -> None:
    result = invoke("budget", "set", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert no_kafka == []


def test_budget_show_refuses_a_malformed_goal() -> None:
    result = invoke("budget", "show", "no spaces allowed", "--json")
    assert result.exit_code == 2
    assert "invalid identifier" in json.loads(result.stdout)["error"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run-1", "better", "--user", "u1", "--score", "6"], "less than or equal to 5"),
        (["run-1", "", "--user", "u1"], "give feedback text or a --score"),
        (["run-1", "better", "--user", "not valid"], "invalid identifier"),
    ],
)
def test_improve_refuses_bad_input(args: list[str], expected: str, no_kafka: list[str]) -> None:
    result = invoke("improve", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert no_kafka == []


def test_service_unknown_lists_the_valid_ones() -> None:
    result = invoke("service", "nosuch")
    assert result.exit_code == 2
    assert "unknown service 'nosuch'" in result.output
    assert "valid:" in result.output


@pytest.mark.parametrize("name", ["analytics", "gateway", "router", "loader"])
def test_service_starts_with_only_the_environment_its_service_may_see(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It handed every service the whole environment: the sink (whose SQL engine can read
    # its process's environment) and the gateway got the LLM key and Slack's secrets.
    secrets = {"OPENAI_API_KEY": "sk-test", "SLACK_BOT_TOKEN": "xoxb-1", "CLICKHOUSE_URL": "x"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    started: list[dict[str, str]] = []
    monkeypatch.setattr(
        "services.cli.platform.os.execve", lambda path, argv, env: started.append(env)
    )
    result = invoke("service", name)
    assert result.exit_code == 0, result.output
    (env,) = started
    assert ("OPENAI_API_KEY" in env) == (name == "loader")
    assert "SLACK_BOT_TOKEN" not in env
    assert ("CLICKHOUSE_URL" in env) == (name == "analytics")
    assert env.get("PATH") == os.environ.get("PATH")


def test_up_only_unknown_service_is_refused_before_starting_anything() -> None:
    result = invoke("up", "--only", "nosuch")
    assert result.exit_code == 2
    assert "unknown service 'nosuch'" in result.output


def test_sql_refuses_an_unknown_format() -> None:
    result = invoke("sql", "SELECT 1", "--format", "xml")
    assert result.exit_code == 2
    assert "--format must be one of table, json, csv" in result.output


def test_sql_without_a_running_sink_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CLICKHOUSE_URL", raising=False)
    result = invoke("sql", "SELECT 1")
    assert result.exit_code == 1
    assert "the analytics sink is not running" in result.output


@pytest.mark.parametrize("as_json", [False, True])
def test_metrics_refuses_a_bad_duration(as_json: bool) -> None:
    result = invoke("metrics", "--since", "yesterday", *(["--json"] if as_json else []))
    assert result.exit_code == 2
    assert "invalid duration 'yesterday'" in result.output


def test_restart_backoff_doubles_up_to_a_cap() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(20) == 30.0


def test_service_order_is_the_documented_one() -> None:
    assert SERVICE_ORDER == (
        "analytics",
        "budget",
        "spawner",
        "loader",
        "router",
        "improvement",
        "gateway",
    )


def test_kafka_env_gives_another_program_the_brokers_login(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ORCH_KAFKA_PORT", raising=False)
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    missing = invoke("kafka-env")
    assert missing.exit_code == 1
    assert "no credentials for the local broker" in missing.output
    (tmp_path / "kafka").mkdir()
    creds = {"mechanism": "SCRAM-SHA-512", "username": "orchestrator", "password": "a'b $c"}
    (tmp_path / "kafka" / "client.json").write_text(json.dumps(creds))
    shown = invoke("kafka-env")
    assert shown.exit_code == 0, shown.output
    # Quoted for the shell: a password is never run as a command.
    assert "export KAFKA_SASL_PASSWORD='a'\"'\"'b $c'" in shown.output.splitlines()
    as_json = json.loads(invoke("kafka-env", "--json").output)
    assert as_json == {
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "orchestrator",
        "KAFKA_SASL_PASSWORD": "a'b $c",
    }


def test_keys_list_never_cuts_a_key_id_on_a_narrow_terminal():
    """``keys revoke`` takes the id: an 80-column table that cut it short left no way to
    read it but ``--json``."""
    keys = KeyRegistry()
    _, issued = mint_key(
        "a-goal-with-a-rather-long-name",
        "a-user-with-a-rather-long-name",
        "user",
        source="t",
        label="the key of the nightly batch job, rotated every month",
    )
    keys.apply(issued)
    for width in (80, 60):
        buffer = io.StringIO()
        Console(file=buffer, width=width, color_system=None).print(keys_table(keys.listing()))
        assert issued.key_id in buffer.getvalue(), buffer.getvalue()
