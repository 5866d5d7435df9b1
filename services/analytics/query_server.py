"""The SQL surface over the event log: the sink's loopback query server and the CLI's client.

With the embedded engine only the sink process can open the data directory, so
the sink serves queries on 127.0.0.1 (port and token in a file next to the
data) and :func:`query_sql` goes there. With ``CLICKHOUSE_URL`` (or
``CLICKHOUSE_READ_URL``) set, the client talks to that server itself. Either
way every statement goes through :mod:`services.analytics.sqlguard`: it must be
one read of the event log's tables, and it runs within the limits of
``ORCH_SQL_*`` on a ``readonly=1`` session.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from services.analytics.sqlguard import GuardedQueries
from services.analytics.store import ClickHouseStore, QueryResult
from streams.config import data_root
from streams.errors import QueryRefused, StoreError

__all__ = [
    "FORMATS",
    "QueryServer",
    "RemoteQueries",
    "query_rows",
    "query_server_file",
    "query_source",
    "query_sql",
]

log = logging.getLogger(__name__)

# What `orchestrator sql --format` offers, as ClickHouse output formats.
FORMATS = {
    "table": "PrettyCompactMonoBlock",
    "json": "JSON",
    "csv": "CSVWithNames",
    "tsv": "TSVWithNames",
}
_ROWS_FORMAT = "JSONCompact"
_MAX_BODY = 1024 * 1024


def query_server_file(base: Path | None = None) -> Path:
    """Where the running sink says how to reach its query server."""
    return (base or data_root()) / "clickhouse-query.json"


class QueryServer:
    """Serves the SQL surface of the store over loopback HTTP, one thread per request.

    ``POST /query`` with ``{"sql": ..., "format": "table|json|csv|tsv|rows"}`` and
    ``Authorization: Bearer <token>`` answers 200 with the rendered result, or 400
    with ``{"error": <the guard's or ClickHouse's message>}`` (and ``"refused": true``
    when the guard refused the statement).
    """

    def __init__(self, store: ClickHouseStore, *, info_file: Path | None = None) -> None:
        self._store = store
        base = store.path.parent if store.path is not None else None
        self.info_file = info_file or query_server_file(base)
        self._token = secrets.token_urlsafe(24)
        surface = GuardedQueries(store)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(surface, self._token))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="analytics-query-server", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> QueryServer:
        self._thread.start()
        self.info_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.info_file.with_suffix(".tmp")
        # Only the owner may read the token: it is the key to the event log.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"url": self.url, "token": self._token, "pid": os.getpid()}, fh)
        os.replace(tmp, self.info_file)
        log.info("analytics: read-only SQL on %s (%s)", self.url, self.info_file)
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        try:
            info = json.loads(self.info_file.read_text(encoding="utf-8"))
            if info.get("token") == self._token:  # a newer sink may have replaced it
                self.info_file.unlink()
        except (OSError, ValueError):
            pass


def _handler(surface: GuardedQueries, token: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "orchestrator-analytics"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("query server: " + format, *args)

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's naming
            if self.path != "/query":
                self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /query"})
                return
            sent = self.headers.get("Authorization", "")
            if not secrets.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                self._reply(HTTPStatus.UNAUTHORIZED, {"error": "bad or missing token"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "query too large"})
                return
            try:
                request = json.loads(self.rfile.read(length))
                sql, fmt = str(request["sql"]), str(request.get("format", "table"))
            except (ValueError, KeyError, TypeError):
                expected = 'expected {"sql": ..., "format": ...}'
                self._reply(HTTPStatus.BAD_REQUEST, {"error": expected})
                return
            clickhouse_format = _ROWS_FORMAT if fmt == "rows" else FORMATS.get(fmt)
            if clickhouse_format is None:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"unknown format {fmt!r}"})
                return
            try:
                text = surface.text(sql, clickhouse_format)
            except QueryRefused as err:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(err), "refused": True})
                return
            except StoreError as err:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(err)})
                return
            body = text.encode("utf-8")
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _reply(self, status: HTTPStatus, payload: dict[str, str | bool]) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class RemoteQueries:
    """A :class:`~services.analytics.store.SqlSource` answered by the sink's query server."""

    def __init__(self, *, info_file: Path | None = None, timeout: float = 60.0) -> None:
        self.info_file = info_file or query_server_file()
        self.timeout = timeout

    def _endpoint(self) -> tuple[str, str]:
        try:
            info = json.loads(self.info_file.read_text(encoding="utf-8"))
            return str(info["url"]), str(info["token"])
        except FileNotFoundError:
            raise StoreError(
                f"the analytics sink is not running (no {self.info_file}); start the platform"
                " with `make run` or the service with `python -m services.analytics`, or set"
                " CLICKHOUSE_URL if the platform writes to a ClickHouse server"
            ) from None
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"cannot read {self.info_file}: {exc}") from exc

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


def query_source(*, timeout: float = 60.0) -> GuardedQueries | RemoteQueries:
    """Where reads go: the server of ``CLICKHOUSE_READ_URL`` (else ``CLICKHOUSE_URL``)
    through the guard, or the running sink's query server (which guards them itself).

    Pass it to :func:`services.analytics.metrics.compute_metrics`; ``close()`` it after.
    """
    url = os.environ.get("CLICKHOUSE_READ_URL") or os.environ.get("CLICKHOUSE_URL")
    if url:
        return GuardedQueries(ClickHouseStore(url=url), owns_store=True)
    return RemoteQueries(timeout=timeout)


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
    source = query_source(timeout=timeout)
    try:
        if isinstance(source, GuardedQueries):
            return source.text(sql, FORMATS[fmt])
        return source.text(sql, fmt)
    finally:
        source.close()


def query_rows(sql: str, *, timeout: float = 60.0) -> QueryResult:
    """Run one read of the event log (through the guard) and return its columns and rows."""
    source = query_source(timeout=timeout)
    try:
        return source.query(sql)
    finally:
        source.close()
