"""Typed settings from environment variables, and errors that name the variable."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.budget.state import BudgetDefaults
from streams.config import env_float, env_int, env_str


@pytest.mark.parametrize("environ", [{}, {"X": ""}, {"X": "  "}])
def test_unset_or_blank_gives_the_default(environ: dict[str, str]) -> None:
    assert env_int("X", 7, environ=environ) == 7
    assert env_int("X", None, environ=environ) is None
    assert env_float("X", 0.5, environ=environ) == 0.5
    assert env_str("X", "dflt", environ) == "dflt"


def test_values_parse() -> None:
    assert env_int("X", 7, environ={"X": " 42 "}) == 42
    assert env_int("X", 7, environ={"X": "-3"}) == -3
    assert env_int("X", None, environ={"X": "5"}) == 5
    assert env_float("X", 0.5, environ={"X": "2.5"}) == 2.5
    assert env_float("X", 0.5, environ={"X": "1e3"}) == 1000.0
    assert env_str("X", "dflt", {"X": " value "}) == "value"


def test_bounds_are_inclusive() -> None:
    assert env_int("X", 7, minimum=0, maximum=10, environ={"X": "0"}) == 0
    assert env_int("X", 7, minimum=0, maximum=10, environ={"X": "10"}) == 10
    assert env_float("X", 0.5, minimum=0, maximum=1, environ={"X": "1"}) == 1.0


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_TEST_SETTING", "12")
    assert env_int("ORCH_TEST_SETTING", 1) == 12
    assert env_float("ORCH_TEST_SETTING", 1.0) == 12.0
    monkeypatch.delenv("ORCH_TEST_SETTING")
    assert env_int("ORCH_TEST_SETTING", 1) == 1


@pytest.mark.parametrize("text", ["abc", "1.5", "1e3"])
def test_not_a_whole_number_names_the_variable(text: str) -> None:
    with pytest.raises(ValueError) as err:
        env_int("ORCH_SOME_COUNT", 1, minimum=1, environ={"ORCH_SOME_COUNT": text})
    assert str(err.value) == f"ORCH_SOME_COUNT must be a whole number >= 1, got {text!r}"


@pytest.mark.parametrize("text", ["soon", "nan", "inf", "-inf"])
def test_not_a_finite_number_names_the_variable(text: str) -> None:
    with pytest.raises(ValueError) as err:
        env_float("ORCH_SOME_SECONDS", 1.0, environ={"ORCH_SOME_SECONDS": text})
    assert str(err.value) == f"ORCH_SOME_SECONDS must be a finite number, got {text!r}"


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (
            lambda env: env_int("ORCH_SOME_PORT", 1, minimum=0, maximum=65535, environ=env),
            "ORCH_SOME_PORT must be a whole number between 0 and 65535, got '70000'",
        ),
        (
            lambda env: env_float("ORCH_SOME_COST", 1.0, minimum=0, environ=env),
            "ORCH_SOME_COST must be a finite number >= 0, got '-0.5'",
        ),
        (
            lambda env: env_float("ORCH_SOME_SHARE", 0.5, maximum=1, environ=env),
            "ORCH_SOME_SHARE must be a finite number <= 1, got '1.5'",
        ),
    ],
)
def test_out_of_range_names_the_variable_and_the_range(
    read: Callable[[dict[str, str]], float], message: str
) -> None:
    env = {"ORCH_SOME_PORT": "70000", "ORCH_SOME_COST": "-0.5", "ORCH_SOME_SHARE": "1.5"}
    with pytest.raises(ValueError) as err:
        read(env)
    assert str(err.value) == message


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
