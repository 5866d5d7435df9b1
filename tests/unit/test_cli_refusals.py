"""A refusal the CLI prints says "refused" once, and all of its reason.

The CLI put "refused: " before a reason that may say so itself (the guards' reasons start
with "refused: "), which printed "refused: refused: ...".
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from services.cli import main as cli
from services.cli import workflows
from streams import events as ev
from streams.client import OrchestratorClient
from streams.errors import FeedbackRefused, NotOperator, PromotionRefused, QueryRefused, Refused
from tests.samples import sample_event

runner = CliRunner()

# The instruction guard's words (streams/guard.py), as a service might pass them on.
SAID = "refused: changes the agent's role or overrides its prompt"
PLAIN = "user 'u1' does not own run 'run-1'; only its owner may"


def invoke(*args: str) -> Any:
    return runner.invoke(cli.app, list(args), env={"COLUMNS": "300"})


def error_of(result: Any, *, as_json: bool) -> str:
    if as_json:
        return str(json.loads(result.stdout)["error"])
    assert result.stderr.startswith("error: "), result.stderr
    return str(result.stderr.removeprefix("error: ").rstrip("\n"))


def refusing(monkeypatch: pytest.MonkeyPatch, name: str, refusal: Refused) -> None:
    async def start(self: OrchestratorClient) -> None:
        return None

    async def refuse(self: OrchestratorClient, *args: Any, **kwargs: Any) -> Any:
        raise refusal

    monkeypatch.setattr(OrchestratorClient, "start", start)
    monkeypatch.setattr(OrchestratorClient, name, refuse)


IMPROVE = {
    "feedback": ["improve", "run-1", "be better", "--user", "u1"],
    "approve": ["improve", "approve", "imp-1", "--user", "op"],
    "promote": ["improve", "promote", "imp-1", "--user", "op"],
}


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        ("feedback", FeedbackRefused(SAID)),
        ("approve", NotOperator(SAID)),
        ("promote", PromotionRefused("Refused: " + PLAIN)),
    ],
)
def test_improve_says_refused_once_for_a_reason_that_says_it(
    monkeypatch: pytest.MonkeyPatch, command: str, refusal: Refused, as_json: bool
) -> None:
    refusing(monkeypatch, command, refusal)
    result = invoke(*IMPROVE[command], *(["--json"] if as_json else []))
    assert result.exit_code == 1, result.output
    assert error_of(result, as_json=as_json) == str(refusal)  # the reason, whole, once
    if as_json:
        assert json.loads(result.stdout)["error_type"] == type(refusal).__name__


@pytest.mark.parametrize("as_json", [False, True])
def test_improve_still_says_refused_before_a_reason_that_does_not(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    refusing(monkeypatch, "feedback", FeedbackRefused(PLAIN))
    result = invoke(*IMPROVE["feedback"], *(["--json"] if as_json else []))
    assert result.exit_code == 1
    assert error_of(result, as_json=as_json) == f"refused: {PLAIN}"


def rolled_back_with(monkeypatch: pytest.MonkeyPatch, reason: str) -> None:
    asked = sample_event(ev.RollbackRequested, workflow_id="code", to_version=1)
    letter = sample_event(ev.DeadLetter, reason=reason, error_type="NotOperator")

    async def rollback(*args: Any) -> tuple[ev.Event, ev.Event]:
        return asked, letter

    monkeypatch.setattr(workflows, "require_kafka", lambda *a, **k: None)
    monkeypatch.setattr(workflows, "_rollback", rollback)


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(("reason", "shown"), [(SAID, SAID), (PLAIN, f"refused: {PLAIN}")])
def test_rollback_says_refused_once(
    monkeypatch: pytest.MonkeyPatch, reason: str, shown: str, as_json: bool
) -> None:
    rolled_back_with(monkeypatch, reason)
    result = invoke("rollback", "code", "--to", "1", "--as", "op", *(["--json"] * as_json))
    assert result.exit_code == 1, result.output
    assert error_of(result, as_json=as_json) == shown
    if as_json:
        assert json.loads(result.stdout)["error_type"] == "NotOperator"


def test_sql_prints_the_guards_refusal_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SQL guard's reasons start with "refused:" (services/analytics/sqlguard.py).
    refusal = "refused: a SETTINGS clause; the surface's limits and readonly cannot be changed"

    def refuse(sql: str, fmt: str) -> str:
        raise QueryRefused(refusal)

    monkeypatch.setattr("services.cli.analytics.query_sql", refuse)
    result = invoke("sql", "SELECT 1 SETTINGS readonly = 0")
    assert result.exit_code == 1
    assert error_of(result, as_json=False) == refusal
