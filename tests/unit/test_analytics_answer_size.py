"""The SQL surface holds an answer to ``ORCH_SQL_MAX_RESULT_MB`` while ClickHouse renders it.

ClickHouse's ``max_result_bytes`` counts blocks as they are in memory, where one constant
string repeated over a block's rows counts once: such answers rendered far past the
limit, and the sink held each several times over (chdb's buffer, its copy, Python's
copy) before refusing it: 3.2 GB for a 1 GB answer under a 1 GB memory limit.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from services.analytics.sqlguard import GuardedQueries
from services.analytics.store import ClickHouseStore, QueryLimits
from streams.config import ROOT
from streams.errors import StoreError
from streams.sql import FORMATS

ROWS = 20_000
LIMITS = QueryLimits(max_result_rows=ROWS, max_result_bytes=1_000_000)
TOO_LARGE = (
    r"over the 1,000,000 a result may have \(ORCH_SQL_MAX_RESULT_MB\) \(TOO_MANY_ROWS_OR_BYTES\)"
)


def _fill(store: ClickHouseStore, rows: int) -> None:
    store.execute(
        "INSERT INTO events (event_id, event_type, occurred_at, source, payload)"
        " SELECT toString(number), 'synthetic', toDateTime64('2026-11-01 00:00:00', 3, 'UTC')"
        f" + number, 'bench', '' FROM numbers({rows})"
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseStore]:
    store = ClickHouseStore(path=tmp_path_factory.mktemp("answers") / "clickhouse", limits=LIMITS)
    store.apply_schema()
    _fill(store, ROWS)
    yield store
    store.close()


@pytest.fixture(scope="module")
def surface(store: ClickHouseStore) -> GuardedQueries:
    return GuardedQueries(store)


# -- what the sink holds -------------------------------------------------------------------

_MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from services.analytics.sqlguard import GuardedQueries
from services.analytics.store import ClickHouseStore, QueryLimits
from tests.unit.test_analytics_answer_size import _fill

store = ClickHouseStore(
    path=Path(sys.argv[1]), limits=QueryLimits(max_result_bytes=8 * 1024 * 1024)
)
store.apply_schema()
_fill(store, 200_000)
surface = GuardedQueries(store)
surface.text("SELECT count() FROM events", "JSON")  # the engine and the pipe, warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    surface.text("SELECT repeat('x', 2000) AS s FROM events", "JSON")
    refusal = None
except Exception as exc:
    refusal = str(exc)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"grew": grew, "refusal": refusal}))
"""


def test_an_answer_far_over_the_limit_is_refused_without_the_sink_holding_it(
    tmp_path: Path,
) -> None:
    # 200,000 rows of one constant 2,000-byte string render to 400 MB of JSON, 50 times
    # the 8 MiB limit, under the default 1 GiB memory limit. The process of its own
    # measures its peak resident memory: before the answer was read as it was rendered,
    # it grew by 2.4 GB here; since, by about 90 MB (the engine's blocks of 8,192 rows).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKHOUSE_")}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path / "clickhouse")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["refusal"] is not None
    assert re.search(
        r"the result is 4\d\d,\d{3},\d{3} bytes, over the 8,388,608 a result may have"
        r" \(ORCH_SQL_MAX_RESULT_MB\) \(TOO_MANY_ROWS_OR_BYTES\)",
        seen["refusal"],
    ), seen["refusal"]
    assert seen["grew"] < 256 * 1024 * 1024, f"grew by {seen['grew']:,} bytes"


# -- what the answer is -------------------------------------------------------------------

ANSWERS = [
    "SELECT event_id, occurred_at, toNullable(NULL) AS n, 'é\"\\t,' AS s"
    " FROM events ORDER BY occurred_at LIMIT 9000",  # more than one block of 8,192 rows
    "SELECT count() AS n, min(occurred_at) AS first FROM events",
    "SELECT 1 AS a WHERE 0",
    "DESCRIBE TABLE events_final",
    "SELECT 1 AS a UNION ALL SELECT 2",
]


@pytest.mark.parametrize("clickhouse_format", [*FORMATS.values(), "JSONCompact"])
def test_every_format_answers_as_clickhouse_renders_it(
    store: ClickHouseStore, surface: GuardedQueries, clickhouse_format: str
) -> None:
    # The same statement on a session with the same settings, rendered into chdb's buffer
    # the way answers were before: one document, one table, the same statistics.
    assert store.path is not None
    plain = clickhouse_connect.get_client(
        interface="chdb", path=str(store.path), settings=LIMITS.settings()
    )
    try:
        for sql in ANSWERS:
            expected = plain.raw_query(surface.check(sql), fmt=clickhouse_format).decode()
            got = surface.text(sql, clickhouse_format)
            assert _timeless(got) == _timeless(expected), sql
    finally:
        plain.close()


def _timeless(answer: str) -> str:
    return re.sub(r'"elapsed": [0-9.e-]+', '"elapsed": 0', answer)


def test_an_answer_of_the_limit_comes_whole_and_one_row_more_is_refused(
    surface: GuardedQueries,
) -> None:
    # Rows of 99 bytes and a newline: 10,000 of them are exactly the 1,000,000 allowed.
    sql = "SELECT repeat('x', 99) FROM events LIMIT {}"
    answer = surface.text(sql.format(10_000), "TabSeparated")
    assert len(answer) == 1_000_000
    assert answer == ("x" * 99 + "\n") * 10_000
    with pytest.raises(StoreError, match=r"the result is 1,000,100 bytes, " + TOO_LARGE):
        surface.text(sql.format(10_001), "TabSeparated")
    assert surface.text("SELECT 7 AS n", "CSVWithNames") == '"n"\n7\n'


def test_an_answer_cut_off_by_a_limit_leaves_nothing_behind(surface: GuardedQueries) -> None:
    # The engine throws after writing part of the answer (rows past max_result_rows):
    # nothing of it is returned, and the next answer is whole and its own.
    with pytest.raises(StoreError, match=r"\(TOO_MANY_ROWS_OR_BYTES\)"):
        surface.text("SELECT arrayJoin(range(300000)) AS n", "CSVWithNames")
    assert surface.text("SELECT 7 AS n", "CSVWithNames") == '"n"\n7\n'


# -- a ClickHouse server's answer ----------------------------------------------------------


class _Stream(io.BytesIO):
    """An HTTP response body: how far it was read when it was closed."""

    read_when_closed = -1

    def close(self) -> None:
        if not self.closed:
            self.read_when_closed = self.tell()
        super().close()


class _ServerClient:
    """The part of a clickhouse-connect HTTP client that ``text_limited`` uses."""

    def __init__(self, size: int) -> None:
        self.stream = _Stream(b"x" * size)

    def raw_stream(self, sql: str, fmt: str | None = None, **_: Any) -> _Stream:
        return self.stream

    def close(self) -> None:
        pass


def _server_store(client: _ServerClient) -> ClickHouseStore:
    store = ClickHouseStore(url="http://reader@127.0.0.1:1/default", limits=LIMITS)
    store._limited[False] = client  # type: ignore[assignment]  # noqa: SLF001
    return store


def test_a_servers_answer_over_the_limit_is_not_read_past_it() -> None:
    client = _ServerClient(50_000_000)
    with pytest.raises(StoreError, match=r"the result is larger, " + TOO_LARGE):
        _server_store(client).text_limited("SELECT 1", "CSV")
    # Read in pieces of at most 1 MiB, not one piece past the limit, then closed.
    assert client.stream.closed
    assert 1_000_000 < client.stream.read_when_closed <= 1_000_000 + 1024 * 1024


def test_a_servers_answer_within_the_limit_comes_whole() -> None:
    assert (
        _server_store(_ServerClient(1_000_000)).text_limited("SELECT 1", "CSV") == "x" * 1_000_000
    )
