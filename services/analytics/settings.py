"""The analytics service's settings: the ClickHouse server, the sink's batching, the SQL limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import model_validator

from streams.settings import EnvSettings, setting

__all__ = ["AnalyticsSettings", "QueryLimits", "SinkConfig"]

_MB = 1024 * 1024
# Rows in a block of the SQL surface's queries (ClickHouse's default is 65,409).
_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class SinkConfig:
    """Batching and retry policy.

    A batch is written once it holds ``batch_rows`` rows or ``max_batch_bytes`` bytes,
    or its oldest row is ``batch_wait`` seconds old. One insert runs at a time; while
    it runs (or is retried), rows keep arriving into the next batch up to
    ``max_batch_rows`` rows and ``max_batch_bytes`` bytes, so under a backlog each
    insert grows and its fixed cost is paid less often. At either bound the sink
    pauses its partitions: memory stays bounded by two batches of at most
    ``max_batch_bytes`` each (a record larger than that is a batch of its own) and
    one fetch.
    """

    batch_rows: int = 5000
    batch_wait: float = 0.2
    max_batch_rows: int = 100_000
    max_batch_bytes: int = 64 * _MB
    backoff_initial: float = 0.1
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.batch_rows <= self.max_batch_rows:
            raise ValueError("need 1 <= batch_rows <= max_batch_rows")
        if self.max_batch_bytes < 1:
            raise ValueError("max_batch_bytes must be at least 1")
        if self.batch_wait <= 0 or self.backoff_initial <= 0 or self.backoff_max <= 0:
            raise ValueError("batch_wait and backoff times must be positive")


@dataclass(frozen=True)
class QueryLimits:
    """ClickHouse limits on every query of the surface; each raises when passed.

    ``ORCH_SQL_*`` set them (:class:`~services.analytics.settings.AnalyticsSettings`).
    """

    max_seconds: float = 30.0
    max_memory_bytes: int = 1024 * _MB
    max_rows_to_read: int = 500_000_000
    max_bytes_to_read: int = 50 * 1024 * _MB
    max_result_rows: int = 1_000_000
    max_result_bytes: int = 100 * _MB
    max_threads: int = 1

    def settings(self) -> dict[str, Any]:
        """The session settings, ``readonly=1`` last: once it is set nothing can change them."""
        return {
            "max_execution_time": self.max_seconds,
            "timeout_overflow_mode": "throw",
            "max_memory_usage": self.max_memory_bytes,
            "max_rows_to_read": self.max_rows_to_read,
            "max_bytes_to_read": self.max_bytes_to_read,
            "read_overflow_mode": "throw",
            "max_result_rows": self.max_result_rows,
            "max_result_bytes": self.max_result_bytes,
            "result_overflow_mode": "throw",
            # The result limits are checked between blocks, and one block may hold any
            # number of rows (SELECT arrayJoin(range(3000000)) came back whole): the
            # query stops one row past the limit, and the check above then throws.
            "limit": self.max_result_rows + 1,
            # An answer leaves the engine a block at a time, and a block of rows that
            # functions build (one constant string, repeated) renders far larger than it
            # counts: 8,192 rows a block rather than 65,409 bound what one block renders.
            "max_block_size": _BLOCK_ROWS,
            "max_threads": self.max_threads,
            # Days and times in UTC, as the budget's days are, whatever the host's zone:
            # today() means the same day everywhere, and the host's zone is not shown.
            "session_timezone": "UTC",
            # The engine's stack and symbols: addressToSymbol is refused by name, but
            # arrayReduce('flameGraph', ...) called the same by a string.
            "allow_introspection_functions": 0,
            "readonly": 1,
        }


_LIMITS = QueryLimits()
_SINK = SinkConfig()


class AnalyticsSettings(EnvSettings):
    title: ClassVar[str] = "Analytics sink and ClickHouse"

    clickhouse_url: str | None = setting(
        "CLICKHOUSE_URL",
        None,
        "A ClickHouse server, `http://user:pass@host:8123/db`: the sink writes there. Unset, "
        "the sink uses the embedded engine (chdb) in `<ORCH_DATA_DIR>/clickhouse`. Either way "
        "the CLI asks the running sink's query server.",
        read_by="analytics",
    )
    batch_rows: int = setting(
        "ORCH_SINK_BATCH_ROWS",
        _SINK.batch_rows,
        "Rows that fill a batch; >= 1 and at most `ORCH_SINK_MAX_BATCH_ROWS`.",
        read_by="analytics",
        ge=1,
    )
    batch_ms: float = setting(
        "ORCH_SINK_BATCH_MS",
        _SINK.batch_wait * 1000,
        "Age in ms of a batch's oldest row at which the batch is written anyway; more than 0.",
        read_by="analytics",
        gt=0,
    )
    max_batch_rows: int | None = setting(
        "ORCH_SINK_MAX_BATCH_ROWS",
        None,
        "Largest batch while an insert runs; past it the sink pauses its partitions, which "
        "bounds memory to about two batches. >= 1.",
        read_by="analytics",
        shown="`max(100_000, ORCH_SINK_BATCH_ROWS)`",
        ge=1,
    )
    max_batch_bytes: int = setting(
        "ORCH_SINK_MAX_BATCH_BYTES",
        _SINK.max_batch_bytes,
        "Largest batch in bytes of records, idle or while an insert runs or is retried: a "
        "batch that reaches it is written at once, or the sink pauses its partitions until "
        "the running insert ends. A record larger than it is written alone. >= 1.",
        read_by="analytics",
        shown="`67108864` (64 MiB)",
        ge=1,
    )
    backoff_max_ms: float = setting(
        "ORCH_SINK_BACKOFF_MAX_MS",
        _SINK.backoff_max * 1000,
        "Longest wait between retries of a failed insert (the wait starts at 100 ms and "
        "doubles); more than 0.",
        read_by="analytics",
        gt=0,
    )
    clickhouse_read_url: str | None = setting(
        "CLICKHOUSE_READ_URL",
        None,
        "What the sink's query server (`orchestrator sql` and `metrics`) reads with, when it "
        "should use other credentials than the sink's writing ones (a read-only user, below). "
        "Ignored without `CLICKHOUSE_URL`.",
        read_by="analytics (query server)",
        shown="unset: `CLICKHOUSE_URL`",
    )
    sql_max_seconds: float = setting(
        "ORCH_SQL_MAX_SECONDS",
        _LIMITS.max_seconds,
        "`max_execution_time` of each query of the SQL surface (`orchestrator sql`, "
        "`orchestrator metrics`); more than 0.",
        read_by="analytics (query server)",
        gt=0,
    )
    sql_max_memory_mb: int = setting(
        "ORCH_SQL_MAX_MEMORY_MB",
        _LIMITS.max_memory_bytes // _MB,
        "`max_memory_usage` of each query, in MiB; >= 1.",
        read_by="as above",
        ge=1,
    )
    sql_max_read_rows: int = setting(
        "ORCH_SQL_MAX_READ_ROWS",
        _LIMITS.max_rows_to_read,
        "`max_rows_to_read`: rows a query may read from tables; >= 1.",
        read_by="as above",
        ge=1,
    )
    sql_max_read_mb: int = setting(
        "ORCH_SQL_MAX_READ_MB",
        _LIMITS.max_bytes_to_read // _MB,
        "`max_bytes_to_read`, in MiB; >= 1.",
        read_by="as above",
        ge=1,
    )
    sql_max_result_rows: int = setting(
        "ORCH_SQL_MAX_RESULT_ROWS",
        _LIMITS.max_result_rows,
        "`max_result_rows`: rows a result may have (past it the query fails, it is not cut); >= 1.",
        read_by="as above",
        ge=1,
    )
    sql_max_result_mb: int = setting(
        "ORCH_SQL_MAX_RESULT_MB",
        _LIMITS.max_result_bytes // _MB,
        "`max_result_bytes`, in MiB (ClickHouse checks it between blocks; a rendered answer, "
        "as `orchestrator sql` and the query server give, is held to it whole); >= 1.",
        read_by="as above",
        ge=1,
    )
    sql_max_threads: int = setting(
        "ORCH_SQL_MAX_THREADS",
        _LIMITS.max_threads,
        "`max_threads` of each query: one leaves the other core to ingestion on a 2-core "
        "machine (`bench/sql_guard.py`); >= 1.",
        read_by="as above",
        ge=1,
    )

    @model_validator(mode="after")
    def _batch_fits(self) -> Self:
        if self.max_batch_rows is not None and self.batch_rows > self.max_batch_rows:
            raise ValueError(
                f"ORCH_SINK_BATCH_ROWS ({self.batch_rows}) must be at most "
                f"ORCH_SINK_MAX_BATCH_ROWS ({self.max_batch_rows})"
            )
        return self

    @property
    def read_url(self) -> str | None:
        """Where the SQL surface reads: ``CLICKHOUSE_READ_URL``, else ``CLICKHOUSE_URL``."""
        return self.clickhouse_read_url or self.clickhouse_url

    def sink_config(self) -> SinkConfig:
        return SinkConfig(
            batch_rows=self.batch_rows,
            batch_wait=self.batch_ms / 1000,
            max_batch_rows=self.max_batch_rows or max(_SINK.max_batch_rows, self.batch_rows),
            max_batch_bytes=self.max_batch_bytes,
            backoff_max=self.backoff_max_ms / 1000,
        )

    def query_limits(self) -> QueryLimits:
        return QueryLimits(
            max_seconds=self.sql_max_seconds,
            max_memory_bytes=self.sql_max_memory_mb * _MB,
            max_rows_to_read=self.sql_max_read_rows,
            max_bytes_to_read=self.sql_max_read_mb * _MB,
            max_result_rows=self.sql_max_result_rows,
            max_result_bytes=self.sql_max_result_mb * _MB,
            max_threads=self.sql_max_threads,
        )
