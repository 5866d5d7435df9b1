"""The settings mechanism: typed variables, errors naming them, the page listing them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import pytest

from services.settings import CATALOG, DOC
from streams.errors import InvalidSetting
from streams.settings import EnvSettings, rewrite_doc, setting

ROOT = Path(__file__).resolve().parents[2]


class _Example(EnvSettings):
    title: ClassVar[str] = "Example"

    count: int = setting("ORCH_X_COUNT", 7, "A count.", read_by="tests", ge=1)
    port: int = setting("ORCH_X_PORT", 80, "A port.", read_by="tests", ge=0, le=65535)
    share: float = setting("ORCH_X_SHARE", 0.5, "A share.", read_by="tests", gt=0, le=1)
    cost: float = setting("ORCH_X_COST", 1.0, "A cost.", read_by="tests", ge=0)
    seed: int | None = setting("ORCH_X_SEED", None, "A seed.", read_by="tests")
    name: str = setting("ORCH_X_NAME", "dflt", "A name.", read_by="tests")
    prefix: str = setting("ORCH_X_PREFIX", "", "A prefix.", read_by="tests", blank="keep")


@pytest.mark.parametrize("environ", [{}, {"ORCH_X_COUNT": "", "ORCH_X_NAME": "  "}])
def test_unset_or_blank_gives_the_default(environ: dict[str, str]) -> None:
    assert _Example.from_env(environ) == _Example()
    assert _Example.from_env(environ).seed is None


def test_values_parse_without_surrounding_blanks() -> None:
    got = _Example.from_env(
        {"ORCH_X_COUNT": " 42 ", "ORCH_X_COST": "1e3", "ORCH_X_NAME": " v ", "ORCH_X_SEED": "-3"}
    )
    assert (got.count, got.cost, got.name, got.seed) == (42, 1000.0, "v", -3)


def test_a_kept_blank_is_taken_as_given() -> None:
    assert _Example.from_env({"ORCH_X_PREFIX": " "}).prefix == " "


def test_keyword_arguments_read_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_X_COUNT", "12")
    assert _Example(port=1).count == 7
    assert _Example.from_env().count == 12
    assert _Example.read("count") == 12
    assert _Example.from_env(count=3).count == 3


def test_read_checks_only_its_own_variable() -> None:
    assert _Example.read("count", {"ORCH_X_COUNT": "2", "ORCH_X_PORT": "bad"}) == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ORCH_X_COUNT": "abc"}, "ORCH_X_COUNT must be a whole number >= 1, got 'abc'"),
        ({"ORCH_X_COUNT": "1.5"}, "ORCH_X_COUNT must be a whole number >= 1, got '1.5'"),
        ({"ORCH_X_COUNT": "0"}, "ORCH_X_COUNT must be a whole number >= 1, got '0'"),
        (
            {"ORCH_X_PORT": "70000"},
            "ORCH_X_PORT must be a whole number between 0 and 65535, got '70000'",
        ),
        ({"ORCH_X_COST": "-0.5"}, "ORCH_X_COST must be a finite number >= 0, got '-0.5'"),
        ({"ORCH_X_COST": "nan"}, "ORCH_X_COST must be a finite number >= 0, got 'nan'"),
        ({"ORCH_X_COST": "inf"}, "ORCH_X_COST must be a finite number >= 0, got 'inf'"),
        ({"ORCH_X_SHARE": "0"}, "ORCH_X_SHARE must be a finite number > 0 and <= 1, got '0'"),
        ({"ORCH_X_SEED": "soon"}, "ORCH_X_SEED must be a whole number, got 'soon'"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_takes(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidSetting) as err:
        _Example.from_env(env)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)


def test_every_bad_variable_is_named() -> None:
    with pytest.raises(ValueError) as err:
        _Example.from_env({"ORCH_X_COUNT": "x", "ORCH_X_PORT": "y"})
    assert "ORCH_X_COUNT" in str(err.value) and "ORCH_X_PORT" in str(err.value)


# -- the one source ----------------------------------------------------------------------


def test_the_committed_page_is_the_generated_one() -> None:
    # Fails when a settings class changed and `python -m services.settings --write` was not run.
    text = DOC.read_text()
    assert rewrite_doc(text, CATALOG) == text


def test_each_variable_is_declared_once() -> None:
    names = [env for cls in CATALOG for env in cls.env_names()]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


_VARIABLE = re.compile(
    r"[\"'`]((?:ORCH|OPENAI|CLICKHOUSE|SLACK)_[A-Z0-9_]*[A-Z0-9]|KAFKA_BOOTSTRAP_SERVERS)[\"'`]"
)
# Variables the platform's code names that are no setting of it: test-only switches.
_NOT_SETTINGS = {"ORCH_TEST_INFRA"}


def test_every_variable_the_code_names_is_declared() -> None:
    declared = {env for cls in CATALOG for env in cls.env_names()}
    named: dict[str, str] = {}
    for package in ("streams", "services", "local"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in _VARIABLE.findall(path.read_text()):
                named.setdefault(name, str(path.relative_to(ROOT)))
    undeclared = {n: where for n, where in named.items() if n not in declared | _NOT_SETTINGS}
    assert undeclared == {}


# -- each owner's settings ---------------------------------------------------------------


def test_router_settings() -> None:
    from services.router.scoring import Weights
    from services.router.settings import RouterSettings

    got = RouterSettings.from_env(
        {
            "ORCH_ROUTER_POLICY": " Static ",
            "ORCH_ROUTER_ARMS": "math, ,code",
            "ORCH_ROUTER_SEED": "4",
        }
    )
    assert (got.policy, got.arms, got.seed) == ("static", ("math", "code"), 4)
    weights = RouterSettings.from_env({"ORCH_ROUTER_WEIGHTS": '{"cost_efficiency": 1}'}).weights
    assert weights == Weights(cost_efficiency=1.0)
    for env, message in [
        ({"ORCH_ROUTER_POLICY": "smart"}, "ORCH_ROUTER_POLICY must be learned or static"),
        ({"ORCH_ROUTER_WEIGHTS": "{"}, "ORCH_ROUTER_WEIGHTS is not valid JSON"),
        ({"ORCH_ROUTER_WEIGHTS": '{"luck": 1}'}, "unknown criteria"),
        ({"ORCH_ROUTER_WEIGHTS": '{"cost_efficiency": "x"}'}, "must be a number"),
        ({"ORCH_ROUTER_EPSILON": "-1"}, "ORCH_ROUTER_EPSILON must be a finite number >= 0"),
        ({"ORCH_ROUTER_PROMOTE_GOALS": "2"}, "ORCH_ROUTER_PROMOTE_GOALS must be 0 .* at least 3"),
        ({"ORCH_ROUTER_PROMOTE_GOALS": "-1"}, "ORCH_ROUTER_PROMOTE_GOALS"),
    ]:
        with pytest.raises(ValueError, match=message):
            RouterSettings.from_env(env)


def test_gateway_settings() -> None:
    from datetime import timedelta

    from services.gateway.settings import GatewaySettings

    got = GatewaySettings.from_env(
        {"ORCH_GATEWAY_RUN_LOOKBACK_HOURS": "2", "ORCH_GATEWAY_MAX_MESSAGES": "3"}
    )
    assert got.run_lookback == timedelta(hours=2) and got.limits.max_messages == 3
    with pytest.raises(ValueError) as err:
        GatewaySettings.from_env({"ORCH_GATEWAY_DRAIN_SECONDS": "9"})
    assert str(err.value) == (
        "ORCH_GATEWAY_DRAIN_SECONDS must be a finite number between 0.0 and 8.0, got '9'"
    )


def test_analytics_settings() -> None:
    from services.analytics.settings import AnalyticsSettings

    sink = AnalyticsSettings.from_env({"ORCH_SINK_BATCH_ROWS": "200000"}).sink_config()
    assert (sink.batch_rows, sink.max_batch_rows) == (200_000, 200_000)
    both = {"CLICKHOUSE_URL": "http://w@h/db", "CLICKHOUSE_READ_URL": "http://r@h/db"}
    assert AnalyticsSettings.from_env(both).read_url == "http://r@h/db"
    assert AnalyticsSettings.from_env({"CLICKHOUSE_URL": "http://w@h/db"}).read_url == (
        "http://w@h/db"
    )
    with pytest.raises(ValueError) as err:
        AnalyticsSettings.from_env({"ORCH_SINK_BATCH_ROWS": "10", "ORCH_SINK_MAX_BATCH_ROWS": "5"})
    assert (
        str(err.value) == "ORCH_SINK_BATCH_ROWS (10) must be at most ORCH_SINK_MAX_BATCH_ROWS (5)"
    )
    with pytest.raises(ValueError, match="ORCH_SINK_BATCH_MS must be a finite number > 0"):
        AnalyticsSettings.from_env({"ORCH_SINK_BATCH_MS": "0"})


@pytest.mark.parametrize(
    ("text", "port"), [("8000", 8000), ("0", 0), (" OFF ", None), ("none", None), ("", None)]
)
def test_the_feedback_port_may_be_off(text: str, port: int | None) -> None:
    from services.improvement.settings import ImprovementSettings

    assert ImprovementSettings.from_env({"ORCH_IMPROVE_PORT": text}).http_port == port
    assert ImprovementSettings.from_env({}).http_port == 8787


def test_improvement_settings() -> None:
    from services.improvement.patterns import PatternSettings
    from services.improvement.settings import ImprovementSettings
    from services.improvement.versions import CanaryPolicy

    with pytest.raises(ValueError, match="ORCH_IMPROVE_PORT must be 0-65535 or 'off', got 'x'"):
        ImprovementSettings.from_env({"ORCH_IMPROVE_PORT": "x"})
    got = ImprovementSettings.from_env({"ORCH_SLACK_USERS": "U1=alice, junk ,U2 = bob"})
    assert got.slack_user_map == {"U1": "alice", "U2": "bob"}
    assert ImprovementSettings.from_env({"ORCH_IMPROVE_HOST": ""}).http_host == ""
    assert PatternSettings.from_env({"ORCH_AUTOMATION_KINDS": ""}).kinds == ()
    with pytest.raises(ValueError, match="ORCH_CANARY_MIN_RUNS must be a whole number >= 2"):
        CanaryPolicy.from_env({"ORCH_CANARY_MIN_RUNS": "1"})
    with pytest.raises(ValueError, match="ORCH_CANARY_SHARE must be a finite number > 0 and <= 1"):
        CanaryPolicy.from_env({"ORCH_CANARY_SHARE": "0"})


@pytest.mark.parametrize(
    ("text", "degrade"), [("0", False), ("1", True), ("no", True), (" ", True)]
)
def test_only_0_turns_degraded_answers_off(text: str, degrade: bool) -> None:
    from services.loader.settings import LoaderSettings

    assert LoaderSettings.from_env({"ORCH_DEGRADED_ANSWERS": text}).degraded_answers is degrade
