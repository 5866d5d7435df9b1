"""The analytics query server's client: the one SQL surface over the event log.

The analytics sink serves read-only SQL on loopback (``POST /query`` with
``{"sql": ..., "format": "table|json|csv|tsv|rows"}`` and ``Authorization: Bearer
<token>``; the URL and token are in ``<data>/clickhouse-query.json``). It answers 200
with ClickHouse's rendering of the result, or 400 with ``{"error": ...}`` (and
``"refused": true`` when its guard refused the statement). This module is that
protocol's client, for the CLI and any other reader; the guard and the engine stay
in the sink.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from streams.config import data_root
from streams.errors import QueryRefused, StoreError
from streams.procs import still_running

__all__ = [
    "FORMATS",
    "QueryResult",
    "RemoteQueries",
    "SqlSource",
    "query_rows",
    "query_server_file",
    "query_sql",
    "quote_string",
]

# What `orchestrator sql --format` offers, as ClickHouse output formats.
FORMATS = {
    "table": "PrettyCompactMonoBlock",
    "json": "JSON",
    "csv": "CSVWithNames",
    "tsv": "TSVWithNames",
}


class QueryResult(NamedTuple):
    columns: list[str]
    rows: list[tuple[Any, ...]]


class SqlSource(Protocol):
    """Anything that answers SQL over the event log: a store, or the sink's query server."""

    def query(self, sql: str, *, readonly: bool = True) -> QueryResult:
        """Run one statement; ``readonly`` makes ClickHouse refuse anything but reads."""
        ...


def quote_string(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def query_server_file(base: Path | None = None) -> Path:
    """Where the running sink says how to reach its query server."""
    return (base or data_root()) / "clickhouse-query.json"


class RemoteQueries:
    """A :class:`SqlSource` answered by the sink's query server."""

    def __init__(self, *, info_file: Path | None = None, timeout: float = 60.0) -> None:
        self.info_file = info_file or query_server_file()
        self.timeout = timeout

    def _endpoint(self) -> tuple[str, str]:
        try:
            info = json.loads(self.info_file.read_text(encoding="utf-8"))
            url, token = str(info["url"]), str(info["token"])
            pid, started = info.get("pid"), info.get("started")
        except FileNotFoundError:
            raise StoreError(
                f"the analytics sink is not running (no {self.info_file}); start the platform"
                " with `make run` or the service with `python -m services.analytics`"
            ) from None
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"cannot read {self.info_file}: {exc}") from exc
        if isinstance(pid, int) and not still_running(pid, str(started or "")):
            # Left by a sink killed before it could remove it: whoever holds its port now
            # would get the token and the query, and its answer would be printed as ours.
            raise StoreError(
                f"the analytics sink that wrote {self.info_file} (pid {pid}) is gone; start"
                " the platform with `make run` or the service with `python -m services.analytics`"
            )
        return url, token

    def text(self, sql: str, fmt: str) -> str:
        """The result rendered by ClickHouse: ``fmt`` is a key of :data:`FORMATS` or ``rows``."""
        url, token = self._endpoint()
        request = urllib.request.Request(
            url + "/query",
            data=json.dumps({"sql": sql, "format": fmt}).encode("utf-8"),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return bytes(response.read()).decode("utf-8")
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", errors="replace")
            try:
                answer = json.loads(detail)
                message, refused = str(answer["error"]), answer.get("refused") is True
            except (ValueError, KeyError, TypeError, AttributeError):
                message, refused = detail or str(err), False
            raise (QueryRefused if refused else StoreError)(message) from None
        except (urllib.error.URLError, OSError) as err:
            raise StoreError(
                f"no analytics query server answers at {url} ({err}); is the analytics"
                f" service running? ({self.info_file} may be left from a stopped sink)"
            ) from None

    def query(self, sql: str, *, readonly: bool = True) -> QueryResult:
        if not readonly:
            raise StoreError("the query server only runs read-only queries")
        return _parse_rows(self.text(sql, "rows"))

    def close(self) -> None:
        """Nothing to release: each query is one HTTP request."""


def _parse_rows(text: str) -> QueryResult:
    data = json.loads(text)
    columns = [str(m["name"]) for m in data.get("meta", [])]
    return QueryResult(columns, [tuple(row) for row in data.get("data", [])])


def query_sql(sql: str, fmt: str = "table", *, timeout: float = 60.0) -> str:
    """Run one read of the event log and return ClickHouse's rendering of the result.

    ``fmt``: ``table`` (PrettyCompact), ``json`` (ClickHouse JSON: meta, data,
    rows, statistics), ``csv`` or ``tsv`` (with a header row). Raises
    :class:`~streams.errors.QueryRefused` naming what the guard refused, or
    :class:`~streams.errors.StoreError` with ClickHouse's own message (a syntax
    error, a limit reached, ...).
    """
    if fmt not in FORMATS:
        raise StoreError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return RemoteQueries(timeout=timeout).text(sql, fmt)


def query_rows(sql: str, *, timeout: float = 60.0) -> QueryResult:
    """Run one read of the event log (through the guard) and return its columns and rows."""
    return RemoteQueries(timeout=timeout).query(sql)
