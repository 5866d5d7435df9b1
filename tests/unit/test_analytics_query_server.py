"""The sink's loopback query server refuses a body it cannot bound before reading it.

A real server on 127.0.0.1 over the embedded engine, spoken to through raw sockets so
that the headers are exactly what an attacker would send.
"""

from __future__ import annotations

import json
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.analytics.query_server import QueryServer
from services.analytics.store import ClickHouseStore
from streams.errors import StoreError
from streams.sql import RemoteQueries


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryServer]:
    base = tmp_path_factory.mktemp("query-server")
    store = ClickHouseStore(path=base / "clickhouse")
    store.apply_schema()
    server = QueryServer(store, info_file=base / "clickhouse-query.json").start()
    yield server
    server.close()
    store.close()


def _token(server: QueryServer) -> str:
    return str(json.loads(server.info_file.read_text(encoding="utf-8"))["token"])


def _exchange(server: QueryServer, head: str, body: bytes = b"") -> tuple[int, dict[str, str]]:
    """Sends ``head`` and ``body`` and keeps the connection open; the status and JSON answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        # Not shutting down our side: a server that reads to the end of the stream would
        # wait for us forever, and recv() would time out here instead of answering.
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def _head(server: QueryServer, *lines: str) -> str:
    return "".join(
        f"{line}\r\n"
        for line in (
            "POST /query HTTP/1.1",
            "Host: 127.0.0.1",
            f"Authorization: Bearer {_token(server)}",
            *lines,
        )
    )


BODY = json.dumps({"sql": "SELECT 1", "format": "csv"}).encode()


@pytest.mark.parametrize(
    "length", ["-1", "-99999", "lots", "1e3", "0x10", "+5", "", " ", "²"], ids=repr
)
def test_a_length_that_is_not_a_whole_number_is_refused_unread(
    server: QueryServer, length: str
) -> None:
    status, answer = _exchange(server, _head(server, f"Content-Length: {length}"), BODY)
    assert status == 400
    assert "Content-Length must be one whole number of bytes" in answer["error"]


def test_two_lengths_are_refused(server: QueryServer) -> None:
    head = _head(server, f"Content-Length: {len(BODY)}", "Content-Length: -1")
    status, answer = _exchange(server, head, BODY)
    assert status == 400
    assert "Content-Length" in answer["error"]


def test_a_missing_length_is_411(server: QueryServer) -> None:
    status, answer = _exchange(server, _head(server, "Transfer-Encoding: chunked"), b"0\r\n\r\n")
    assert status == 411
    assert answer == {"error": "Content-Length required"}


def test_an_oversized_length_is_refused_unread(server: QueryServer) -> None:
    status, answer = _exchange(server, _head(server, "Content-Length: 1048577"), BODY)
    assert status == 413
    assert answer == {"error": "query too large"}


def test_a_well_formed_query_still_answers(server: QueryServer) -> None:
    remote = RemoteQueries(info_file=server.info_file, timeout=10)
    assert remote.text("SELECT 7 AS n", "csv") == '"n"\n7\n'
    status, answer = _exchange(server, _head(server, "Content-Length: 2"), b"{}")
    assert status == 400
    assert answer == {"error": 'expected {"sql": ..., "format": ...}'}


def test_a_deeply_nested_body_is_400(server: QueryServer) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    status, answer = _exchange(server, _head(server, f"Content-Length: {len(body)}"), body)
    assert status == 400 and "expected" in answer["error"]
    test_a_well_formed_query_still_answers(server)


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickling"])
def test_a_client_that_stops_or_trickles_is_cut_off_and_holds_no_thread(
    server: QueryServer, tmp_path: Path, trickle: bool
) -> None:
    # Silent: the 0.5 s read timeout closes it. Trickling a byte every 0.2 s never trips
    # that timeout: the whole request's deadline (three times it) ends the connection.
    # Without that deadline it is never cut: 10 s is that "never", with room for a loaded
    # machine to be slow by seconds.
    quick = QueryServer(server._store, info_file=tmp_path / "q.json", client_timeout=0.5).start()
    try:
        host, port = quick.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nX-a: ")  # no token, never done
            started, closed = time.monotonic(), False
            sock.settimeout(0.2)
            while not closed and time.monotonic() - started < 10.0:
                try:
                    if trickle:
                        sock.sendall(b"a")
                    closed = sock.recv(1024) == b""  # closed by the server, nothing answered
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
            assert closed
    finally:
        quick.close()


def test_connections_past_the_cap_are_refused_and_the_server_still_answers(
    server: QueryServer, tmp_path: Path
) -> None:
    capped = QueryServer(server._store, info_file=tmp_path / "c.json", max_connections=3).start()
    host, port = capped.url.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"POST /query HTTP/1.1\r\n")  # and nothing more
        time.sleep(0.2)
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            assert extra.recv(1024).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    try:
        # The held connections' threads end and give their places back: polled, as a
        # thread may be slow to see its connection closed on a loaded machine.
        assert _answered_within(capped, 10.0) == '"n"\n1\n'
    finally:
        capped.close()


def _answered_within(server: QueryServer, seconds: float) -> str:
    """The answer to ``SELECT 1``, asked again while the server refuses it (503) for up
    to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return RemoteQueries(info_file=server.info_file).text("SELECT 1 AS n", "csv")
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_token_file_is_the_owners_alone_even_over_a_file_left_behind(
    server: QueryServer, tmp_path: Path
) -> None:
    info = tmp_path / "clickhouse-query.json"
    left = info.with_suffix(".tmp")
    left.write_text("{}")
    left.chmod(0o644)  # a file someone else could read, left at the temporary name
    other = QueryServer(server._store, info_file=info).start()
    try:
        assert stat.S_IMODE(info.stat().st_mode) == 0o600
        assert not left.exists()
    finally:
        other.close()


def test_a_file_left_by_a_killed_sink_sends_nothing_to_whoever_holds_its_port(
    server: QueryServer, tmp_path: Path
) -> None:
    # A sink killed with SIGKILL leaves its file: `orchestrator sql` sent the token and the
    # query to whoever took the port next and printed its answer as the event log's.
    import json
    import os
    import subprocess
    import sys

    from streams.errors import StoreError
    from streams.procs import process_start

    info = json.loads(server.info_file.read_text())
    assert info["started"] == process_start(os.getpid())  # who wrote it, recorded
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    left = tmp_path / "left.json"
    left.write_text(json.dumps({**info, "pid": int(gone.stdout), "started": "1:0"}))
    with pytest.raises(StoreError, match="is gone"):
        RemoteQueries(info_file=left).text("SELECT 1 AS n", "csv")
    # The live one's file still works.
    assert RemoteQueries(info_file=server.info_file).text("SELECT 1 AS n", "csv") == '"n"\n1\n'
