"""The analytics store seam: the event log behind one interface, on ClickHouse or in memory."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from services.analytics import _ingest
from services.analytics.settings import AnalyticsSettings, QueryLimits
from streams.codec import EventCodec, default_codec
from streams.config import ROOT, data_root
from streams.errors import DecodeError, StoreError
from streams.events import Event
from streams.sql import QueryResult, SqlSource, quote_string

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

__all__ = [
    "DDL_DIR",
    "TABLE",
    "ClickHouseStore",
    "EncodedEvent",
    "EventStore",
    "MemoryEventStore",
    "QueryLimits",
    "QueryResult",
    "Rejection",
    "SqlSource",
    "StoreUnavailable",
    "clickhouse_path",
    "ddl_statements",
    "open_store",
]

DDL_DIR = ROOT / "infra" / "clickhouse"
TABLE = "events"
# Where a table made with an earlier sorting key waits while its rows move to a new one.
_SET_ASIDE = f"{TABLE}_before_key_change"

# ClickHouse error codes that blame the rows, not the store: parse and conversion
# failures, a violated constraint, a corrupt Avro body. Anything else (server down,
# disk full, too many parts, a missing table) is retried, never dead-lettered.
_ROW_ERRORS = frozenset(
    {6, 26, 27, 32, 33, 38, 41, 53, 69, 70, 72, 117, 131, 321, 349, 407, 469, 748}
)
_AVRO_EXCEPTION = 748
# A refused part this small is inserted row by row rather than halved again.
_ONE_BY_ONE = 8
# An answer is read from ClickHouse this many bytes at a time (and, on Linux, its pipe
# holds as much); how long the pipe may stay open once the query that wrote it is over.
_ANSWER_CHUNK = 1024 * 1024
_PIPE_GRACE_S = 5.0
T = TypeVar("T")


class StoreUnavailable(StoreError):
    """The store takes no writes now (down, disk full, locked); the same insert may work later."""


_URL_HINT = " (percent-encode '#', '/', '?' and '@' in the user name and password)"


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """One event as it travels on Kafka: single-object Avro with its topic's current writer schema.

    ``partition``, ``offset`` and ``key`` say where it came from, for dead-lettering.
    """

    topic: str
    value: bytes
    partition: int = -1
    offset: int = -1
    key: bytes | None = None


@dataclass(frozen=True)
class Rejection:
    """A row the table refused, and ClickHouse's reason."""

    row: EncodedEvent
    reason: str


class EventStore(SqlSource, Protocol):
    """Where the sink writes the event log.

    ``insert`` is idempotent by event_id (a row inserted twice is seen once by
    queries); it returns the rows the table refused, with the reason, and raises
    :class:`StoreUnavailable` when nothing could be written and a retry may work.
    """

    def apply_schema(self) -> None: ...

    def insert(self, rows: Sequence[EncodedEvent]) -> list[Rejection]: ...

    def count(self) -> int:
        """Events stored, each event_id once."""
        ...

    def close(self) -> None: ...


def clickhouse_path() -> Path:
    """Where the embedded engine keeps its data: ``<ORCH_DATA_DIR or .local>/clickhouse``."""
    return data_root() / "clickhouse"


def open_store() -> ClickHouseStore:
    """``CLICKHOUSE_URL`` set: that server; else the embedded engine at :func:`clickhouse_path`."""
    url = AnalyticsSettings.read("clickhouse_url")
    return ClickHouseStore(url=url) if url else ClickHouseStore(path=clickhouse_path())


def ddl_statements(directory: Path = DDL_DIR) -> list[str]:
    """The statements of ``NNN_*.sql`` in file order; each ends with ``;`` at the end of a line."""
    statements: list[str] = []
    for path in sorted(directory.glob("*.sql")):
        chunk: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            chunk.append(line)
            if line.rstrip().endswith(";"):
                statements.extend(_statement(chunk))
                chunk = []
        statements.extend(_statement(chunk))
    return statements


def _statement(lines: list[str]) -> list[str]:
    # Leading comments document the file, not the statement; drop them.
    while lines and (not lines[0].strip() or lines[0].strip().startswith("--")):
        lines = lines[1:]
    if not lines:
        return []
    return ["\n".join(lines).strip().rstrip(";").strip()]


def _clean(sql: str) -> str:
    # The client appends its own FORMAT clause; a trailing ';' would end the statement before it.
    return sql.strip().rstrip(";").rstrip()


class _RowsRefused(Exception):
    def __init__(self, reason: str, code: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class MemoryEventStore:
    """The event log in a dict, for tests of whatever writes to a store.

    Deduplicates by event_id like the real table. ``reject`` refuses rows the way a
    table constraint would; ``available = False`` makes every insert fail with
    :class:`StoreUnavailable` until it is set back. It runs no SQL.
    """

    def __init__(
        self,
        *,
        codec: EventCodec | None = None,
        reject: Callable[[Event], str | None] | None = None,
    ) -> None:
        self._codec = codec or default_codec()
        self._reject = reject
        self._events: dict[str, Event] = {}
        self._lock = threading.Lock()
        self.available = True
        self.failed_attempts = 0
        self.inserted_rows = 0
        self.schema_applied = 0
        self.closed = False

    def apply_schema(self) -> None:
        self.schema_applied += 1

    def insert(self, rows: Sequence[EncodedEvent]) -> list[Rejection]:
        with self._lock:
            if not self.available:
                self.failed_attempts += 1
                raise StoreUnavailable("in-memory store made unavailable")
            rejected: list[Rejection] = []
            for row in rows:
                try:
                    event = self._codec.decode(row.value, topic=row.topic)
                except DecodeError as err:
                    rejected.append(Rejection(row, err.reason))
                    continue
                reason = self._reject(event) if self._reject else None
                if reason is not None:
                    rejected.append(Rejection(row, reason))
                    continue
                self._events.setdefault(event.event_id, event)
                self.inserted_rows += 1
            return rejected

    def query(self, sql: str, *, readonly: bool = True) -> QueryResult:
        raise StoreError("the in-memory store runs no SQL; use ClickHouseStore for queries")

    def count(self) -> int:
        with self._lock:
            return len(self._events)

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events.values())

    def close(self) -> None:
        self.closed = True


class ClickHouseStore:
    """The event log in ClickHouse through clickhouse-connect: embedded chdb or a server.

    ``path`` opens the embedded engine (one process owns a data directory);
    ``url`` (``http://user:pass@host:8123/db``) connects to a server. Writes go
    through one client; the platform's own reads through another whose session
    has ``readonly=1``. The SQL surface (``services.analytics.sqlguard``, the
    only caller of ``query_limited`` and ``text_limited``) has two more, whose
    sessions set ``limits`` and then ``readonly=1``: one parses, one runs.
    """

    def __init__(
        self,
        *,
        path: str | Path | None = None,
        url: str | None = None,
        database: str | None = None,
        codec: EventCodec | None = None,
        ddl_dir: Path = DDL_DIR,
        limits: QueryLimits | None = None,
    ) -> None:
        if (path is None) == (url is None):
            raise ValueError("give exactly one of path (embedded chdb) or url (ClickHouse server)")
        self.path = Path(path) if path is not None else None
        self.url = url
        self.database = database
        self._codec = codec or default_codec()
        self._ddl_dir = ddl_dir
        self._lock = threading.Lock()
        self._writer: Client | None = None
        self._reader: Client | None = None
        self._limited: dict[bool, Client] = {}  # parsing? -> its client
        self._limited_locks = {True: threading.Lock(), False: threading.Lock()}
        self.limits = limits or AnalyticsSettings.from_env().query_limits()
        self._columns: list[_ingest.Column] | None = None
        self._structures: dict[str, str] = {}
        self._tmp: Path | None = None
        self._closed = False

    @property
    def embedded(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        """Where the data is, without credentials."""
        if self.path is not None:
            return f"embedded ClickHouse (chdb) at {self.path}"
        parts = urlsplit(self.url or "")
        try:
            port = parts.port or 8123
        except ValueError:
            # An unescaped '#', '/' or '?' in the password ends the host early, and the
            # error names what follows (the password's start): never repeated here.
            return f"ClickHouse at a {parts.scheme or 'URL'} URL that does not parse{_URL_HINT}"
        return f"ClickHouse at {parts.scheme}://{parts.hostname}:{port}{parts.path}"

    # -- clients ----------------------------------------------------------------
    def _client(self, *, readonly: bool) -> Client:
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            if readonly:
                # Reading alone (the CLI) opens no writing session at all.
                if self._reader is None:
                    self._reader = self._connect(settings={"readonly": 1}, database=self.database)
                return self._reader
            if self._writer is None:
                self._writer = self._connect(settings={}, database=None)
                if self.database:
                    self._writer.command(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
                    self._writer.database = self.database
            return self._writer

    def _connect(self, *, settings: dict[str, Any], database: str | None) -> Client:
        import clickhouse_connect

        # Settings are applied in order: ``readonly`` last, or it would refuse the others.
        kwargs: dict[str, Any] = {"settings": settings}
        if database:
            kwargs["database"] = database
        try:
            if self.path is not None:
                self.path.mkdir(parents=True, exist_ok=True)
                path = str(self.path)
                return clickhouse_connect.get_client(interface="chdb", path=path, **kwargs)
            return clickhouse_connect.get_client(dsn=self.url, **kwargs)
        except ValueError:
            # The driver's parse error may quote part of the URL, its password included.
            raise StoreUnavailable(f"cannot open {self.describe()}{_URL_HINT}") from None
        except Exception as exc:
            raise StoreUnavailable(f"cannot open {self.describe()}: {exc}") from exc

    # -- schema -----------------------------------------------------------------
    def apply_schema(self) -> None:
        """Create the table and views (idempotent) and learn the table's typed columns.

        A table made with an earlier sorting key is renamed to :data:`_SET_ASIDE` and its
        rows are copied into the new table; the set-aside table is dropped only after its
        rows are in. Every start finishes a move that an earlier start began and did not
        finish (killed after the rename, or during the copy): copying again is harmless,
        since the new key deduplicates by event and every read goes through ``FINAL``.
        """
        from clickhouse_connect.driver.exceptions import DatabaseError

        writer = self._client(readonly=False)
        try:
            self._set_aside_old_table(writer)
        except DatabaseError as exc:
            raise StoreError(f"cannot set aside {TABLE!r} made with an earlier key: {exc}") from exc
        for statement in ddl_statements(self._ddl_dir):
            try:
                writer.command(statement)
            except DatabaseError as exc:
                raise StoreError(f"schema statement failed: {exc}\n{statement}") from exc
        self._columns = self._load_columns(writer)
        try:
            self._finish_move(writer)
        except DatabaseError as exc:
            raise StoreError(f"cannot copy {_SET_ASIDE!r} into {TABLE!r}: {exc}") from exc

    def _set_aside_old_table(self, client: Client) -> None:
        """Rename an event table made with an earlier sorting key; its rows move after DDL.

        The key decides what deduplicates, so a table whose key still holds
        occurred_at would count a re-created event twice.
        """
        key = _sorting_key(client, TABLE)
        if key is None or key.replace(" ", "") == "event_type,event_key":
            return
        if _sorting_key(client, _SET_ASIDE) is not None:
            # A move was cut short and an earlier release then made `events` again: the
            # set-aside rows go into it before the name is taken for its own rows.
            self._finish_move(client)
        client.command(f"RENAME TABLE {TABLE} TO {_SET_ASIDE}")

    def _finish_move(self, client: Client) -> None:
        # Copy first, drop last: a kill in between leaves the set-aside table for the next
        # start to copy again, and the table's key folds the second copy into the first.
        if _sorting_key(client, _SET_ASIDE) is None:
            return
        ours = _copyable_columns(client, TABLE)
        theirs = set(_copyable_columns(client, _SET_ASIDE))
        names = ", ".join(f"`{name}`" for name in ours if name in theirs)
        client.command(f"INSERT INTO {TABLE} ({names}) SELECT {names} FROM {_SET_ASIDE}")
        client.command(f"DROP TABLE {_SET_ASIDE}")

    def _load_columns(self, client: Client) -> list[_ingest.Column]:
        result = client.query(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase()"
            f" AND table = '{TABLE}' AND default_kind = '' ORDER BY position"
        )
        columns = [_ingest.Column(str(n), str(t)) for n, t in result.result_rows]
        if not columns:
            raise StoreError(f"table {TABLE!r} does not exist; apply_schema() first")
        return [c for c in columns if c.name != "payload"]

    def _structure(self, topic: str) -> str:
        if topic not in self._structures:
            fields = _ingest.structure(self._codec.schema_for(topic))
            self._structures[topic] = ", ".join(f"{c.name} {c.type}" for c in fields)
        return self._structures[topic]

    # -- writes -----------------------------------------------------------------
    def insert(self, rows: Sequence[EncodedEvent]) -> list[Rejection]:
        """Insert in one statement; a refused batch is sorted out in a few more.

        First the rows whose Avro body the Python codec cannot read either are refused
        (one pass, no insert) and the rest is inserted once; only if that is refused too
        are bad rows looked for by halving, and parts of :data:`_ONE_BY_ONE` rows or
        fewer go in one row at a time.
        """
        if not rows or (first := self._refused(rows)) is None:
            return []
        rejected: list[Rejection] = []
        readable: list[EncodedEvent] = []
        for row in rows:
            try:
                # Avro only, not the model's checks: a row the table takes is stored
                # whatever batch it comes in, so its fate never depends on its neighbours.
                self._codec.decode_record(row.value, topic=row.topic)
            except DecodeError as err:
                rejected.append(Rejection(row, err.reason))
            else:
                readable.append(row)
        if rejected:
            rejected.extend(self._insert_or_isolate(readable))
        else:
            rejected = self._isolate(readable, first)
        order = {id(row): i for i, row in enumerate(rows)}
        return sorted(rejected, key=lambda r: order[id(r.row)])

    def _refused(self, rows: Sequence[EncodedEvent]) -> _RowsRefused | None:
        """Insert ``rows``; the table's refusal of them, or None when they went in."""
        try:
            self._insert(rows)
        except _RowsRefused as refused:
            return refused
        return None

    def _insert_or_isolate(self, rows: Sequence[EncodedEvent]) -> list[Rejection]:
        if not rows or (refused := self._refused(rows)) is None:
            return []
        return self._isolate(rows, refused)

    def _isolate(self, rows: Sequence[EncodedEvent], refused: _RowsRefused) -> list[Rejection]:
        """The rows of a refused part that the table refuses, each with its own reason."""
        if len(rows) == 1:
            canonical = self._canonical(rows[0], refused)
            if canonical is None:
                return [Rejection(rows[0], refused.reason)]
            # The codec reads it but ClickHouse does not: written as the codec writes it
            # (a boolean byte 2, an overlong varint: each once stalled the sink for good).
            again = self._refused([canonical])
            if again is not None:
                raise StoreUnavailable(
                    f"ClickHouse cannot read an event the codec writes ({canonical.topic}):"
                    f" {again.reason}"
                )
            return []
        if len(rows) <= _ONE_BY_ONE:
            out: list[Rejection] = []
            for row in rows:
                out.extend(self._insert_or_isolate([row]))
            return out
        mid = len(rows) // 2
        return self._insert_or_isolate(rows[:mid]) + self._insert_or_isolate(rows[mid:])

    def _canonical(self, row: EncodedEvent, refused: _RowsRefused) -> EncodedEvent | None:
        """``row`` as the codec writes it, when ClickHouse refused its Avro and the codec
        reads it; None when the row itself is at fault (it is dead-lettered)."""
        if refused.code != _AVRO_EXCEPTION:
            return None
        try:
            event = self._codec.decode(row.value, topic=row.topic)
        except DecodeError:
            return None
        return dataclasses.replace(row, value=self._codec.encode(event))

    def _insert(self, rows: Sequence[EncodedEvent]) -> None:
        from clickhouse_connect.driver.exceptions import DatabaseError

        writer = self._client(readonly=False)
        if self._columns is None:
            self._columns = self._load_columns(writer)
        by_topic: dict[str, list[bytes]] = {}
        for row in rows:
            by_topic.setdefault(row.topic, []).append(row.value[_ingest.HEADER_LEN :])
        try:
            with self._sources(by_topic) as (selects, external):
                sql = _ingest.insert_statement(TABLE, self._columns, selects)
                writer.command(sql, external_data=external)
        except DatabaseError as exc:
            if exc.code in _ROW_ERRORS:
                raise _RowsRefused(str(exc), exc.code) from exc
            raise StoreUnavailable(str(exc)) from exc
        except OSError as exc:  # the container files could not be written (disk full)
            raise StoreUnavailable(f"cannot stage a batch: {exc}") from exc

    def _sources(self, by_topic: dict[str, list[bytes]]) -> _Sources:
        assert self._columns is not None
        return _Sources(self, by_topic, self._columns)

    def _tmpdir(self) -> Path:
        # Beside the data, one directory per process: a sink killed mid-insert leaves
        # its batch files behind, and the next one to start removes them.
        if self._tmp is None:
            assert self.path is not None
            base = self.path.parent / f"{self.path.name}-ingest"
            base.mkdir(parents=True, exist_ok=True)
            for old in base.iterdir():
                pid = old.name.split("-", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(old, ignore_errors=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
        self._tmp.mkdir(parents=True, exist_ok=True)  # a cleaner may have removed it
        return self._tmp

    # -- reads ------------------------------------------------------------------
    def query(self, sql: str, *, readonly: bool = True) -> QueryResult:
        from clickhouse_connect.driver.exceptions import DatabaseError

        client = self._client(readonly=readonly)
        try:
            result = client.query(_clean(sql))
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc
        return QueryResult(list(result.column_names), [tuple(r) for r in result.result_rows])

    def query_text(self, sql: str, clickhouse_format: str) -> str:
        """A read-only query rendered by ClickHouse in one of its output formats."""
        from clickhouse_connect.driver.exceptions import DatabaseError

        client = self._client(readonly=True)
        try:
            data = client.raw_query(_clean(sql), fmt=clickhouse_format)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc
        return data.decode("utf-8", errors="replace")

    # -- the SQL surface's sessions ------------------------------------------------
    def _limited_client(self, parsing: bool) -> Client:
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            client = self._limited.get(parsing)
            if client is None:
                client = self._connect(settings=self.limits.settings(), database=self.database)
                self._limited[parsing] = client
            return client

    def _limited_call(self, parsing: bool, call: Callable[[Client], T]) -> T:
        # One query at a time per session (chdb would serialise them anyway), so a
        # failed session is closed with nobody else waiting on it.
        with self._limited_locks[parsing]:
            client = self._limited_client(parsing)
            try:
                return call(client)
            except Exception as exc:
                # After a query fails mid-result, chdb hands the rest of that result to the
                # next query on the same connection: a failed session is never used again.
                with self._lock:
                    self._limited.pop(parsing, None)
                client.close()
                raise StoreError(str(exc)) from exc

    def query_limited(
        self, sql: str, parameters: Mapping[str, str] | None = None, *, parsing: bool = False
    ) -> QueryResult:
        """A read on a limited session (``limits``, then ``readonly=1``); ``sql`` is not checked.

        ``parsing`` picks the session the guard parses on, apart from the one queries run on.
        """

        def run(client: Client) -> QueryResult:
            result = client.query(_clean(sql), parameters=dict(parameters or {}))
            return QueryResult(list(result.column_names), [tuple(r) for r in result.result_rows])

        return self._limited_call(parsing, run)

    def text_limited(
        self, sql: str, clickhouse_format: str | None, *, parsing: bool = False
    ) -> str:
        """:meth:`query_limited` rendered by ClickHouse; ``None``: its default, TabSeparated.

        An answer is read while ClickHouse renders it, block by block, and kept only while
        it is within ``limits.max_result_bytes``: a larger one is refused
        (``ORCH_SQL_MAX_RESULT_MB``) without being held whole anywhere. ClickHouse's own
        ``max_result_bytes`` counts blocks as they are in memory, where one constant
        string counts once however many rows render it.
        """
        if parsing:
            # The parser's dump of a checked statement: its size follows the statement's.
            def parse(client: Client) -> str:
                data = client.raw_query(_clean(sql), fmt=clickhouse_format)
                return data.decode("utf-8", errors="replace")

            return self._limited_call(True, parse)
        limit = self.limits.max_result_bytes
        fmt = clickhouse_format or "TabSeparated"

        def run(client: Client) -> str:
            if self.embedded:
                answer = _render_into_pipe(client, _clean(sql), fmt, limit)
            else:
                # A server renders into the HTTP response as it goes; past the limit the
                # response is closed unread, and the server cancels the query.
                with client.raw_stream(_clean(sql), fmt=fmt) as stream:
                    answer = _Answer.read(cast("IO[bytes]", stream), limit)
            if answer.size > limit:
                raise StoreError(answer.refusal())
            return answer.text()

        return self._limited_call(False, run)

    def count(self) -> int:
        result = self.query(f"SELECT count() FROM {TABLE} FINAL")
        return int(result.rows[0][0])

    def execute(self, statement: str) -> None:
        """Run one statement with write access: maintenance, backfills, benchmarks."""
        from clickhouse_connect.driver.exceptions import DatabaseError

        try:
            self._client(readonly=False).command(_clean(statement))
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = [c for c in (self._reader, self._writer) if c is not None]
            clients.extend(self._limited.values())
            self._reader = self._writer = None
            self._limited = {}
        for client in clients:
            client.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Answer:
    """An answer as ClickHouse renders it: kept while within ``limit`` bytes, then only counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.whole = True  # False: reading stopped past the limit, so ``size`` is a floor
        self._parts: list[bytes] = []

    @classmethod
    def read(cls, stream: IO[bytes], limit: int) -> _Answer:
        """Read ``stream`` to its end, or to just past ``limit``."""
        answer = cls(limit)
        while chunk := stream.read(_ANSWER_CHUNK):
            answer.add(chunk)
            if answer.size > limit:
                answer.whole = False
                break
        return answer

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= self.limit:
            self._parts.append(chunk)
        else:
            self._parts.clear()

    def text(self) -> str:
        data = b"".join(self._parts)
        self._parts = []
        return data.decode("utf-8", errors="replace")

    def refusal(self) -> str:
        size = f"{self.size:,} bytes" if self.whole else "larger"
        return (
            f"the result is {size}, over the {self.limit:,} a result may have"
            " (ORCH_SQL_MAX_RESULT_MB) (TOO_MANY_ROWS_OR_BYTES)"
        )


def _render_into_pipe(client: Client, sql: str, clickhouse_format: str, limit: int) -> _Answer:
    """Run ``sql`` on the embedded engine with its answer written into a pipe read here.

    chdb keeps a query's whole rendering in one buffer and copies it again before Python
    sees its size; written ``INTO OUTFILE``, the answer leaves the engine block by block,
    as clickhouse-client's would, in the same format (one JSON document, one table).
    The reader reads to the end, so the engine is never left writing into a full pipe,
    and keeps no more than ``limit`` bytes.
    """
    read_fd, write_fd = os.pipe()
    answer = _Answer(limit)
    failed: list[BaseException] = []

    def drain() -> None:
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as pipe:
                while chunk := pipe.read(_ANSWER_CHUNK):
                    answer.add(chunk)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            failed.append(exc)

    reader = threading.Thread(target=drain, name="sql-answer", daemon=True)
    reader.start()
    try:
        if (grow := getattr(fcntl, "F_SETPIPE_SZ", None)) is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_fd, grow, _ANSWER_CHUNK)
        # The statement is the guard's, which has no INTO OUTFILE, FORMAT or SETTINGS.
        target = quote_string(f"/dev/fd/{write_fd}")
        stray = client.raw_query(
            f"{sql}\nINTO OUTFILE {target} TRUNCATE FORMAT {clickhouse_format}"
        )
    finally:
        os.close(write_fd)  # the engine has closed its own end: the reader sees the end
        reader.join(_PIPE_GRACE_S)
    if reader.is_alive():
        raise StoreError("ClickHouse left the answer's pipe open after the query")
    if failed:
        raise StoreError(f"cannot read the answer: {failed[0]}")
    if stray:
        raise StoreError("ClickHouse answered outside the answer's pipe")
    return answer


def _sorting_key(client: Client, table: str) -> str | None:
    """The table's sorting key in the current database, or None when there is no such table."""
    found = client.query(
        "SELECT sorting_key FROM system.tables WHERE database = currentDatabase()"
        " AND name = {table:String}",
        parameters={"table": table},
    ).result_rows
    return str(found[0][0]) if found else None


def _copyable_columns(client: Client, table: str) -> list[str]:
    """The columns an ``INSERT ... SELECT`` carries over: stored values, not computed ones."""
    result = client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase()"
        " AND table = {table:String} AND default_kind IN ('', 'DEFAULT') ORDER BY position",
        parameters={"table": table},
    )
    return [str(row[0]) for row in result.result_rows]


class _Sources:
    """The per-type SELECTs of one insert and their Avro data: chdb files or external tables."""

    def __init__(
        self,
        store: ClickHouseStore,
        by_topic: dict[str, list[bytes]],
        columns: list[_ingest.Column],
    ) -> None:
        self._store = store
        self._by_topic = by_topic
        self._columns = columns
        self._files: list[Path] = []

    def __enter__(self) -> tuple[list[str], Any]:
        from clickhouse_connect.driver.external import ExternalData

        store = self._store
        selects: list[str] = []
        external: ExternalData | None = None
        for topic, bodies in self._by_topic.items():
            schema = store._codec.schema_for(topic)  # noqa: SLF001
            data = _ingest.avro_container(schema, bodies)
            structure = store._structure(topic)  # noqa: SLF001
            if store.embedded:
                # chdb reads local files; a server gets the same bytes as external tables.
                fd, name = tempfile.mkstemp(suffix=f".{topic}.avro", dir=store._tmpdir())  # noqa: SLF001
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                self._files.append(Path(name))
                source = (
                    f"file({_ingest.quote_string(name)}, 'Avro', {_ingest.quote_string(structure)})"
                )
            else:
                external = external or ExternalData()
                source = f"in_{topic}"
                external.add_file(
                    file_name=f"{source}.avro", data=data, fmt="Avro", structure=structure
                )
            event_type = store._codec.event_type_for(topic)  # noqa: SLF001
            selects.append(_ingest.select_for(schema, self._columns, source, event_type))
        return selects, external

    def __exit__(self, *exc: object) -> None:
        for path in self._files:
            path.unlink(missing_ok=True)
