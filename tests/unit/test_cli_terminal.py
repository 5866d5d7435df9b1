"""Stored text reaches the operator's terminal shown, never obeyed.

A chat message, an answer or a label may hold escape sequences (retitle the window,
clear the screen), a one-character CSI, a carriage return that overwrites the line, or
bidirectional overrides that make text read as something else. Every human-facing output
of the CLI must show them as escapes; JSON must still read back the exact value.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from services.analytics.store import ClickHouseStore
from services.cli import admin, common
from services.cli import analytics as cli_sql
from services.cli import main as cli
from streams import events as ev
from streams.client import Answer
from streams.errors import RunRejected
from streams.sql import FORMATS
from tests.samples import sample_event
from tests.unit.test_analytics_store import encoded
from tests.unit.test_cli import _fake_client

ATTACK = (
    "\u001b]0;pwned\u0007\u001b[2J"  # retitle the window, clear the screen
    " \u009b31m red"  # C1 CSI: a one-character escape sequence
    " \u202eevil\u2066 isolate\u2069"  # bidirectional override and isolate
    " \r over \x7f\x00 \x08 tab\there\nline2"
)
# What no output may carry raw: all of the above but tab and newline.
OBEYED = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J \\x9b31m red \\u202eevil\\u2066 isolate\\u2069"
# What rich prints (everything but `sql`): it drops BEL, BS and CR itself.
SHOWN_BY_RICH = SHOWN.replace("\\x07", "")

runner = CliRunner()


def invoke(*args: str) -> Any:
    return runner.invoke(cli.app, list(args), env={"COLUMNS": "300"})


def assert_shown(text: str) -> None:
    assert OBEYED.search(text) is None, repr(text)


# -- orchestrator sql: ClickHouse's own rendering of a stored message ------------------------

QUERY = (
    "SELECT JSONExtractString(payload, 'message') AS message FROM events_final"
    " WHERE event_type = 'request_received'"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseStore]:
    store = ClickHouseStore(path=tmp_path_factory.mktemp("terminal") / "clickhouse")
    store.apply_schema()
    assert store.insert([encoded(sample_event(ev.RequestReceived, message=ATTACK))]) == []
    yield store
    store.close()


@pytest.fixture
def sql_out(store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch) -> Any:
    def rendered(sql: str, fmt: str) -> str:
        return store.query_text(sql, FORMATS[fmt])

    monkeypatch.setattr(cli_sql, "query_sql", rendered)

    def run(fmt: str) -> str:
        result = invoke("sql", QUERY, "--format", fmt)
        assert result.exit_code == 0, result.output
        return str(result.stdout)

    return run


@pytest.mark.parametrize("fmt", ["table", "tsv"])
def test_sql_shows_control_characters_as_escapes(sql_out: Any, fmt: str) -> None:
    text = sql_out(fmt)
    assert_shown(text)
    assert SHOWN in text


def test_sql_csv_shows_them_and_stays_csv(sql_out: Any) -> None:
    text = sql_out("csv")
    assert_shown(text)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["message"] and len(rows) == 2
    assert rows[1][0].startswith(SHOWN)
    assert rows[1][0].endswith(" \\x0d over \\x7f\\x00 \\x08 tab\there\nline2")


def test_sql_json_reads_back_the_exact_value(sql_out: Any) -> None:
    text = sql_out("json")
    assert_shown(text)
    assert json.loads(text)["data"] == [{"message": ATTACK}]


# -- commands that print events read from Kafka ------------------------------------------------


@pytest.fixture(autouse=True)
def no_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setattr(admin, "require_kafka", lambda settings, as_json: None)


ASK = ("ask", "hello", "--goal", "g1", "--user", "u1")


def test_ask_shows_an_answers_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_client(monkeypatch, Answer("run-1", "a1", "general", ATTACK, 0.001, 5.0, "llm"))
    result = invoke(*ASK)
    assert result.exit_code == 0, result.output
    assert_shown(result.stdout)
    assert SHOWN_BY_RICH in result.stdout
    as_json = invoke(*ASK, "--json")
    assert_shown(as_json.stdout)
    assert json.loads(as_json.stdout)["text"] == ATTACK


def test_a_failure_quoting_stored_text_is_shown_too(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_client(monkeypatch, RunRejected("run-1", "invalid", ATTACK))
    result = invoke(*ASK)
    assert result.exit_code == 1
    assert_shown(result.output)
    assert SHOWN_BY_RICH in result.output
    as_json = invoke(*ASK, "--json")
    assert_shown(as_json.stdout)
    assert ATTACK in json.loads(as_json.stdout)["error"]


def test_keys_list_shows_a_labels_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    issued = sample_event(ev.ApiKeyIssued, label=ATTACK)

    async def read(settings: Any, topics: Any) -> list[ev.Event]:
        return [issued]

    monkeypatch.setattr("streams.keys.read_topics_to_end", read)  # what `keys list` reads
    result = invoke("keys", "list")
    assert result.exit_code == 0, result.output
    assert_shown(result.stdout)
    assert SHOWN_BY_RICH[:24] in result.stdout
    as_json = invoke("keys", "list", "--json")
    assert_shown(as_json.stdout)
    assert json.loads(as_json.stdout)[0]["label"] == ATTACK


def test_the_clis_own_styling_still_reaches_a_terminal() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="standard", width=300)
    console.push_render_hook(common._ShowControls())
    console.print(Text("degraded", style="bold yellow"), Text(ATTACK))
    printed = buffer.getvalue()
    assert "\x1b[1;33mdegraded" in printed  # rich's own sequence, for its own style
    assert "\x1b]0;pwned" not in printed and SHOWN_BY_RICH in printed
