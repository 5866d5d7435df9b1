"""The SQL surface over the event log: the sink's loopback query server.

The sink serves queries on 127.0.0.1 (port and token in a file next to the data),
whichever engine it writes to: the embedded one, which only the sink's process can
open, or the server of ``CLICKHOUSE_URL`` (read with ``CLICKHOUSE_READ_URL``'s
credentials when set). Its client is :mod:`streams.sql`. Every statement goes through
:mod:`services.analytics.sqlguard`: it must be one read of the event log's tables, and
it runs within the limits of ``ORCH_SQL_*`` on a ``readonly=1`` session.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from services.analytics.sqlguard import GuardedQueries
from services.analytics.store import ClickHouseStore
from streams.errors import QueryRefused, StoreError
from streams.procs import process_start
from streams.sql import FORMATS, query_server_file

__all__ = ["QueryServer"]

log = logging.getLogger(__name__)

_ROWS_FORMAT = "JSONCompact"
_MAX_BODY = 1024 * 1024
_CLIENT_TIMEOUT_S = 10.0
# Connections served at once; more are answered 503 and closed. Each holds a thread, and
# 500 that trickled a header byte every half second once held 502 threads of the sink.
_MAX_CONNECTIONS = 32
_DIGITS = re.compile(r"[0-9]+")


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class QueryServer:
    """Serves the SQL surface of the store over loopback HTTP, one thread per request.

    ``POST /query`` with ``{"sql": ..., "format": "table|json|csv|tsv|rows"}`` and
    ``Authorization: Bearer <token>`` answers 200 with the rendered result, or 400
    with ``{"error": <the guard's or ClickHouse's message>}`` (and ``"refused": true``
    when the guard refused the statement). The body is read only when its
    ``Content-Length`` is one whole number up to 1 MiB: 411 without one, 400 for
    any other, 413 when larger. A connection that sends nothing for ``client_timeout``
    seconds is closed, and so is one whose request (headers and body) has not all come
    within three times that; at most ``max_connections`` are served at once (503 past it).
    """

    def __init__(
        self,
        store: ClickHouseStore,
        *,
        info_file: Path | None = None,
        client_timeout: float = _CLIENT_TIMEOUT_S,
        max_connections: int = _MAX_CONNECTIONS,
    ) -> None:
        self._store = store
        base = store.path.parent if store.path is not None else None
        self.info_file = info_file or query_server_file(base)
        self._token = secrets.token_urlsafe(24)
        surface = GuardedQueries(store)
        handler = _handler(surface, self._token, client_timeout)
        self._httpd = _BoundedServer(("127.0.0.1", 0), handler, max_connections)
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
        # Only the owner may read the token: it is the key to the event log. A file left
        # at the temporary name (a crash, or someone else) would keep its own mode: made
        # afresh here, or not at all.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            pid = os.getpid()
            json.dump(
                {"url": self.url, "token": self._token, "pid": pid, "started": process_start(pid)},
                fh,
            )
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


def _handler(
    surface: GuardedQueries, token: str, client_timeout: float
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "orchestrator-analytics"
        # Every read and write of the connection; a client that stops sending (before its
        # token is even checked) frees its thread then, not never.
        timeout = client_timeout

        def setup(self) -> None:
            super().setup()
            # The timeout above bounds each read; a client trickling a byte at a time
            # never trips it, so the whole request has a deadline too.
            self._deadline = threading.Timer(3 * client_timeout, self._cut_off)
            self._deadline.daemon = True
            self._deadline.start()

        def _cut_off(self) -> None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def finish(self) -> None:
            self._deadline.cancel()
            super().finish()

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
            lengths = self.headers.get_all("Content-Length") or []
            if not lengths:
                self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
                return
            # rfile.read(-1) would read until the client hangs up, however long that is.
            if len(lengths) > 1 or not _DIGITS.fullmatch(lengths[0].strip()):
                error = f"Content-Length must be one whole number of bytes, not {lengths!r}"
                self._reply(HTTPStatus.BAD_REQUEST, {"error": error})
                return
            length = int(lengths[0])
            if length > _MAX_BODY:
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "query too large"})
                return
            try:
                raw = self.rfile.read(length)
                self._deadline.cancel()  # all of it is in: the query has limits of its own
                request = json.loads(raw)
                sql, fmt = str(request["sql"]), str(request.get("format", "table"))
            except (ValueError, KeyError, TypeError, RecursionError):
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
