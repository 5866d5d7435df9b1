"""The analytics sink on the real broker and the real ClickHouse engine (chdb).

chdb lets one process own one data directory, so the sink runs here the way it
runs in production: as ``python -m services.analytics`` subprocesses, each with
its own data directory, queried through their read-only query servers. The
in-process tests use one engine path for the whole module (a process cannot
switch paths while a client is open) and one database per test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from local.platform import Instance, Launcher
from services.analytics.sink import SinkConfig, SinkStats, run_sink
from services.analytics.store import (
    DDL_DIR,
    ClickHouseStore,
    EncodedEvent,
    MemoryEventStore,
    ddl_statements,
)
from services.cli.dashboard import compute_metrics
from streams import events as ev
from streams.clock import SystemClock
from streams.codec import MAGIC, default_codec
from streams.errors import QueryRefused, StoreError
from streams.kafka import EventProducer, KafkaSettings
from streams.runtime import ServiceContext, group_id
from streams.sql import RemoteQueries, query_rows, query_server_file, query_sql
from streams.topics import CATALOG, create_topics, delete_prefixed_topics
from tests.infra import ContainerInfra, infra_mode
from tests.samples import sample_event
from tests.unit.test_analytics_store import ANCIENT, EventStoreContract, encoded, mixed

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
TYPED = ("goal_id", "agent_id", "specialty", "cost_usd", "latency_ms", "score", "quality")


# -- helpers ------------------------------------------------------------------------


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except StoreError as err:
            last = err
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class SinkProcess:
    """``python -m services.analytics`` against a topic prefix, with its own data directory,
    started by the platform launcher (its share of the environment, ``analytics.log``)."""

    def __init__(self, settings: KafkaSettings, data_dir: Path, **env: str) -> None:
        self.settings = settings
        self.data_dir = data_dir
        # The embedded engine in data_dir, whatever CLICKHOUSE_URL this process has.
        environ = {k: v for k, v in os.environ.items() if k != "CLICKHOUSE_URL"}
        self.launcher = Launcher(
            data_dir,
            environ=environ,
            settings=settings,
            data_dir=data_dir,
            env=env,
            stop_timeout=20.0,
        )
        self.instance: Instance | None = None
        self.queries = RemoteQueries(info_file=query_server_file(data_dir), timeout=30)

    @property
    def env(self) -> dict[str, str]:
        """The environment the sink's share is cut from: what a CLI beside it runs with."""
        return self.launcher.environ

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.instance.proc if self.instance is not None else None

    def start(self) -> SinkProcess:
        if self.instance is None:
            self.instance = self.launcher.start("analytics")
        else:
            self.launcher.restart(self.instance)
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            assert proc.poll() is None, f"sink exited early:\n{self.logs()}"
            if not self.queries.info_file.exists():
                return False
            info = json.loads(self.queries.info_file.read_text())
            return bool(info["pid"] == proc.pid and self.scalar("SELECT 1") == 1)

        wait_until(ready, 60, "the sink's query server")
        return self

    def scalar(self, sql: str) -> Any:
        return self.queries.query(sql).rows[0][0]

    def kill(self) -> None:
        self.launcher.kill("analytics")

    def stop(self) -> None:
        if self.instance is not None and self.instance.alive:
            self.launcher.stop(self.instance)

    def logs(self) -> str:
        return self.launcher.logs("analytics")


class Offsets:
    """How far the sink's consumer group has committed, against the end of every catalog topic."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.admin = AIOKafkaAdminClient(**settings.client_args())
        self.consumer = AIOKafkaConsumer(**settings.client_args())
        self.parts = [
            TopicPartition(settings.topic(spec.name), p)
            for spec in CATALOG
            for p in range(spec.partitions)
        ]

    async def __aenter__(self) -> Offsets:
        await self.admin.start()
        await self.consumer.start()
        # Assigned (and paused: it only asks for end offsets), the consumer learns where the
        # partitions are at once; unassigned, its first end_offsets took about 4 s.
        self.consumer.assign(self.parts)
        self.consumer.pause(*self.parts)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def lag(self) -> int:
        """Messages not yet committed by the sink's group (so not yet stored)."""
        group = group_id(self.settings, "analytics")
        committed = await self.admin.list_consumer_group_offsets(group)
        end = await self.consumer.end_offsets(self.parts)
        return sum(end[tp] - (committed[tp].offset if tp in committed else 0) for tp in self.parts)

    async def wait_caught_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (remaining := await self.lag()) > 0:
            assert time.monotonic() < deadline, f"sink still {remaining} messages behind"
            await asyncio.sleep(0.1)


async def lag(settings: KafkaSettings) -> int:
    async with Offsets(settings) as offsets:
        return await offsets.lag()


async def wait_caught_up(settings: KafkaSettings, timeout: float = 30) -> None:
    async with Offsets(settings) as offsets:
        await offsets.wait_caught_up(timeout)


async def produce(settings: KafkaSettings, events: list[ev.Event]) -> None:
    async with EventProducer(settings) as producer:
        await producer.send_many(events)


def from_payload(cls: type[ev.Event], payload: str) -> ev.Event:
    data = json.loads(payload)
    for name, field in cls.model_fields.items():  # bytes travel as base64 in JSON
        if "bytes" in str(field.annotation) and data.get(name) is not None:
            data[name] = base64.b64decode(data[name])
    return cls.model_validate(data)


@pytest.fixture(scope="module")
def shared(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    """One sink for the tests that tag their events and never look at global numbers."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    asyncio.run(create_topics(kafka_bootstrap, prefix=prefix))
    sink = SinkProcess(KafkaSettings(kafka_bootstrap, prefix), tmp_path_factory.mktemp("shared"))
    sink.start()
    yield sink
    sink.stop()
    asyncio.run(delete_prefixed_topics(kafka_bootstrap, prefix))


# -- the sink process: rows, redelivery, refusals, read-only SQL ------------------------


async def test_n_events_give_n_rows_and_again_still_n(shared: SinkProcess) -> None:
    tag = f"src-{uuid.uuid4().hex[:8]}"
    events = [sample_event(cls, source=tag) for cls in ev.ALL_EVENTS for _ in range(4)]
    n = len(events)
    await produce(shared.settings, events)

    count = f"SELECT count() FROM events FINAL WHERE source = '{tag}'"
    wait_until(lambda: shared.scalar(count) == n, 30, f"{n} rows")

    # Every type lands with its typed columns filled and the whole event in payload.
    cols = ", ".join(TYPED)
    found = shared.queries.query(
        f"SELECT event_id, {cols}, payload FROM events FINAL WHERE source = '{tag}'"
    )
    rows = {r[0]: r for r in found.rows}
    for event in events:
        row = rows[event.event_id]
        assert from_payload(type(event), row[-1]) == event
        for i, col in enumerate(TYPED, start=1):
            expected = getattr(event, col, None)
            if col in ("goal_id", "agent_id", "specialty") and expected is None:
                expected = ""
            assert row[i] == expected, (event.topic, col)

    await produce(shared.settings, events)  # the same events, delivered again
    await wait_caught_up(shared.settings)
    assert shared.scalar(count) == n
    assert shared.scalar(f"SELECT uniqExact(event_id) FROM events WHERE source = '{tag}'") == n
    assert shared.scalar(f"SELECT count() FROM events_final WHERE source = '{tag}'") == n


async def test_a_row_the_table_refuses_goes_to_dead_letter(shared: SinkProcess) -> None:
    tag = f"src-{uuid.uuid4().hex[:8]}"
    good = [sample_event(ev.WorkflowCompleted, source=tag) for _ in range(30)]
    bad = sample_event(ev.WorkflowCompleted, source=tag, occurred_at=ANCIENT)
    await produce(shared.settings, [*good[:15], bad, *good[15:]])

    dead = (
        "SELECT reason, JSONExtractString(payload, 'payload') FROM events FINAL"
        " WHERE event_type = 'dead_letter'"
        " AND JSONExtractString(payload, 'error_type') = 'RowRejected'"
    )

    def refused() -> list[tuple[Any, ...]]:
        return [
            r
            for r in shared.queries.query(dead).rows
            if default_codec().decode(base64.b64decode(r[1])).event_id == bad.event_id
        ]

    rows = wait_until(refused, 30, "the refused row in dead_letter")
    assert "VIOLATED_CONSTRAINT" in rows[0][0]
    assert "occurred_at_in_range" in rows[0][0]
    await wait_caught_up(shared.settings)
    assert shared.scalar(f"SELECT count() FROM events FINAL WHERE source = '{tag}'") == 30


async def test_undecodable_bytes_are_dead_lettered_and_passed(shared: SinkProcess) -> None:
    garbage = b"not avro " + uuid.uuid4().hex.encode()
    async with EventProducer(shared.settings) as producer:
        await producer.send_raw("workflow_completed", garbage)
    sql = (
        "SELECT reason FROM events FINAL WHERE event_type = 'dead_letter'"
        " AND JSONExtractString(payload, 'original_topic') = 'workflow_completed'"
        f" AND JSONExtractString(payload, 'payload') = '{base64.b64encode(garbage).decode()}'"
    )
    reason = wait_until(lambda: shared.queries.query(sql).rows, 30, "the dead letter")[0][0]
    assert "single-object" in reason
    await wait_caught_up(shared.settings)


def test_sql_path_refuses_all_but_reads_of_the_event_log(
    shared: SinkProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_DATA_DIR", str(shared.data_dir))
    monkeypatch.delenv("CLICKHOUSE_URL", raising=False)
    monkeypatch.delenv("CLICKHOUSE_READ_URL", raising=False)
    before = shared.scalar("SELECT count() FROM events")

    for statement, named in (
        ("INSERT INTO events (event_id, event_type, occurred_at) VALUES ('x', 'y', now64(3))",
         "INSERT statement"),
        ("CREATE TABLE hacked (a Int8) ENGINE = Memory", "CREATE statement"),
        ("DROP TABLE events", "DROP statement"),
        ("ALTER TABLE events DELETE WHERE 1", "ALTER statement"),
        ("SELECT 1 SETTINGS readonly = 0", "SETTINGS clause"),
        ("SELECT file('/proc/self/environ')", "function file()"),
        ("SELECT * FROM system.processes", "system table system.processes"),
        ("SELECT 1; SELECT 2", "more than one statement"),
    ):  # fmt: skip
        for fmt in ("table", "csv"):
            with pytest.raises(QueryRefused) as refused:
                query_sql(statement, fmt)
            assert str(refused.value).startswith("refused: "), statement
            assert named in str(refused.value), statement
        with pytest.raises(QueryRefused, match=re.escape(named)):
            query_rows(statement)
    with pytest.raises(StoreError, match=r"Code: 62\. DB::Exception: Syntax error"):
        query_sql("SELEC 1")

    assert shared.scalar("SELECT count() FROM events") >= before
    assert query_sql("SELECT 41 + 1 AS answer;", "csv") == '"answer"\n42\n'
    assert json.loads(query_sql("SELECT 42 AS answer", "json"))["data"] == [{"answer": 42}]
    assert "answer" in query_sql("SELECT 42 AS answer") and "42" in query_sql("SELECT 42 AS answer")
    assert query_rows("SELECT 1 AS a, 'x' AS b") == (["a", "b"], [(1, "x")])


def test_sql_without_a_running_sink_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CLICKHOUSE_URL", raising=False)
    with pytest.raises(StoreError, match="analytics sink is not running"):
        query_sql("SELECT 1")


def test_cli_sql_prints_the_refusal_and_fails(shared: SinkProcess) -> None:
    env = {**shared.env, "COLUMNS": "300"}
    cli = [sys.executable, "-m", "services.cli.main", "sql"]
    done = subprocess.run(
        [*cli, "SELECT FiLe('/etc/passwd')"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "error: refused: function FiLe() reaches outside the event log" in done.stderr
    assert "root:" not in done.stdout + done.stderr
    done = subprocess.run(
        [*cli, "SELECT 42 AS answer", "--format", "csv"], cwd=ROOT, env=env, capture_output=True
    )
    assert (done.returncode, done.stdout) == (0, b'"answer"\n42\n')


async def test_a_heavy_query_is_limited_while_ingestion_completes(
    settings: KafkaSettings, tmp_path: Path
) -> None:
    sink = SinkProcess(settings, tmp_path, ORCH_SQL_MAX_SECONDS="1", ORCH_SQL_MAX_MEMORY_MB="256")
    sink.start()
    try:
        tag = f"src-{uuid.uuid4().hex[:8]}"
        first = [sample_event(ev.LlmCallCompleted, source=tag) for _ in range(3000)]
        later = [sample_event(ev.WorkflowCompleted, source=tag) for _ in range(20_000)]
        count = f"SELECT count() FROM events FINAL WHERE source = '{tag}'"
        await produce(settings, first)
        await asyncio.to_thread(wait_until, lambda: sink.scalar(count) == len(first), 60, "rows")

        # Allowed by the guard (the event log only), but 3000^3 rows of join: the limit ends it.
        heavy = "SELECT count() FROM events AS a, events AS b, events AS c"
        outcomes: list[str] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    outcomes.append(f"answered {sink.queries.query(heavy).rows}")
                except StoreError as err:
                    outcomes.append(str(err))

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        try:
            await asyncio.to_thread(wait_until, lambda: outcomes, 60, "a heavy query's end")
            # From here on a heavy query is always running while the sink ingests.
            await produce(settings, later)
            total = len(first) + len(later)
            await asyncio.to_thread(wait_until, lambda: sink.scalar(count) == total, 120, "rows")
            assert thread.is_alive()
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 60)
        assert outcomes and all("(TIMEOUT_EXCEEDED)" in o for o in outcomes), outcomes[:3]
        await wait_caught_up(settings)
        assert sink.scalar(count) == total
        assert sink.proc is not None and sink.proc.poll() is None
    finally:
        sink.stop()


# -- metrics against a hand-computed expectation ---------------------------------------

# A month ago at noon: the other tests' events (stamped now) fall after every window.
NOW = (datetime.now(UTC) - timedelta(days=30)).replace(hour=12, minute=0, second=0, microsecond=0)


def known_sequence() -> list[ev.Event]:
    def at(**delta: float) -> dict[str, Any]:
        return {"source": "test", "occurred_at": NOW - timedelta(**delta)}

    def spawned(agent: str, **delta: float) -> ev.Event:
        return ev.AgentSpawned(
            **at(**delta), agent_id=agent, specialty="math", system_prompt="p", temperature=0.2
        )

    def llm(goal: str, cost: float, **delta: float) -> ev.Event:
        return ev.LlmCallCompleted(**at(**delta), goal_id=goal, model="m", cost_usd=cost)

    def done(spec: str, latency: float, tier: str, **delta: float) -> ev.Event:
        return ev.WorkflowCompleted(
            **at(**delta),
            goal_id="g1",
            run_id=str(uuid.uuid4()),
            specialty=spec,
            text="answer",
            latency_ms=latency,
            degradation_tier=tier,  # type: ignore[arg-type]
        )

    def feedback(score: int | None, **delta: float) -> ev.Event:
        return ev.FeedbackReceived(**at(**delta), run_id="r", user_id="u1", score=score)

    return [
        spawned("a1", hours=2),
        spawned("a2", days=1, hours=1),
        spawned("a3", minutes=30),
        spawned("a4", hours=-1),  # after NOW: outside every window
        ev.AgentLoaded(**at(hours=1), agent_id="a2", specialty="math"),
        ev.AgentRetired(**at(minutes=10), agent_id="a1", specialty="math"),
        ev.PatternDiscovered(**at(hours=3), signature="sig-A", specialty="math", occurrences=3),
        ev.PatternDiscovered(**at(hours=2), signature="sig-A", specialty="math", occurrences=4),
        ev.PatternDiscovered(**at(days=5), signature="sig-B", specialty="code", occurrences=3),
        ev.AutomationCreated(
            **at(hours=1), automation_id="x1", signature="sig-A", kind="direct_route", specialty="m"
        ),
        ev.AutomationCreated(
            **at(days=3), automation_id="x2", signature="sig-B", kind="direct_route", specialty="c"
        ),
        feedback(5, hours=1),
        feedback(4, hours=2),
        feedback(2, days=2),
        feedback(3, hours=5),
        feedback(None, hours=1),
        llm("g1", 0.10, hours=1),
        llm("g2", 0.05, hours=2),
        llm("g1", 0.20, days=1),
        llm("g2", 0.30, days=3),
        done("math", 100, "llm", hours=1),
        done("math", 200, "llm", hours=2),
        done("math", 300, "keyword", days=2),
        done("code", 400, "llm", hours=3),
        done("code", 1000, "static_fallback", hours=4),
        ev.WorkflowFailed(
            **at(hours=1), goal_id="g1", run_id="r9", reason="timeout", detail="d", specialty="math"
        ),
    ]


async def test_metrics_equal_a_hand_computed_expectation(shared: SinkProcess) -> None:
    events = known_sequence()
    # One completed run delivered twice must still count once.
    await produce(shared.settings, [*events, events[20]])
    await wait_caught_up(shared.settings)
    window = f"occurred_at < '{NOW:%Y-%m-%d %H:%M:%S}'"
    assert shared.scalar(f"SELECT count() FROM events FINAL WHERE {window}") == len(events) - 1

    metrics = compute_metrics(shared.queries, now=NOW, since=timedelta(days=30))
    day = [(NOW - timedelta(days=d)).date().isoformat() for d in range(6, -1, -1)]
    assert metrics == {
        "window": {"since": (NOW - timedelta(days=30)).isoformat(), "until": NOW.isoformat()},
        "agents_spawned_today": 2,  # a1, a3 (a2 was yesterday, a4 is after now)
        "active_agents": 2,  # a2 (loaded), a3; a1 retired
        "patterns_discovered": 2,  # sig-A twice counts once
        "automations_created": 2,
        "user_feedback_items": 5,
        "cost_today_usd": pytest.approx(0.15),
        "cost_trend": [
            {"day": day[0], "cost_usd": 0.0},
            {"day": day[1], "cost_usd": 0.0},
            {"day": day[2], "cost_usd": 0.0},
            {"day": day[3], "cost_usd": pytest.approx(0.30)},
            {"day": day[4], "cost_usd": 0.0},
            {"day": day[5], "cost_usd": pytest.approx(0.20)},
            {"day": day[6], "cost_usd": pytest.approx(0.15)},
        ],
        "cost_change_vs_yesterday_pct": pytest.approx(-25.0),
        "response_time_ms": {"answers": 5, "avg": pytest.approx(400.0), "p95": 1000.0},
        "user_satisfaction": {"scored": 4, "satisfied": 2, "share": 0.5},
        "success_rate_by_specialty": [
            {"specialty": "code", "completed": 2, "failed": 0, "success_rate": 1.0},
            {"specialty": "math", "completed": 3, "failed": 1, "success_rate": 0.75},
        ],
        "spend_by_goal": [
            {"goal_id": "g2", "spend_usd": pytest.approx(0.35), "llm_calls": 2},
            {"goal_id": "g1", "spend_usd": pytest.approx(0.30), "llm_calls": 2},
        ],
        "answers_by_tier": {"llm": 3, "keyword": 1, "static_fallback": 1},
    }

    last_day = compute_metrics(shared.queries, now=NOW, since=timedelta(hours=24))
    assert last_day["patterns_discovered"] == 1
    assert last_day["automations_created"] == 1
    assert last_day["user_feedback_items"] == 4
    assert last_day["response_time_ms"]["answers"] == 4
    assert last_day["user_satisfaction"] == {"scored": 3, "satisfied": 2, "share": 2 / 3}
    assert last_day["answers_by_tier"] == {"llm": 3, "static_fallback": 1}


# -- kill -9 mid-stream ----------------------------------------------------------------


async def test_sink_killed_mid_batch_loses_and_doubles_nothing(
    settings: KafkaSettings, tmp_path: Path
) -> None:
    n = 3000
    events = [
        ev.WorkflowCompleted(
            source="test",
            goal_id=f"g{i % 7}",
            run_id=f"run-{i}",
            specialty="s",
            text="t",
            latency_ms=float(i),
        )
        for i in range(n)
    ]
    await produce(settings, events)
    # Small batches: many inserts, so the kill lands while one is being built or written.
    env = {
        "ORCH_SINK_BATCH_ROWS": "100",
        "ORCH_SINK_MAX_BATCH_ROWS": "200",
        "ORCH_SINK_BATCH_MS": "20",
    }
    sink = SinkProcess(settings, tmp_path, **env).start()
    try:
        stored = wait_until(
            lambda: (c := sink.scalar("SELECT count() FROM events")) >= 500 and c, 30, "progress"
        )
        sink.kill()
        assert stored < n, "the sink finished before it could be killed"
        assert await lag(settings) > 0

        sink.start()  # rejoins the group once the killed member's session times out
        total = "SELECT count() FROM events FINAL"
        # The restart waits out the killed member's 10 s session first: room for a slow machine.
        wait_until(lambda: sink.scalar(total) == n, 90, f"{n} rows after the restart")
        await wait_caught_up(settings)
        assert sink.scalar(total) == n
        assert sink.scalar("SELECT uniqExact(event_id) FROM events") == n
        assert sink.scalar("SELECT sum(latency_ms) FROM events FINAL") == sum(range(n))
    finally:
        sink.stop()


# -- the sink loop in process, with the in-memory store --------------------------------


async def test_store_outage_pauses_consumption_then_catches_up(settings: KafkaSettings) -> None:
    store = MemoryEventStore()
    store.available = False
    config = SinkConfig(batch_rows=100, batch_wait=0.05, max_batch_rows=300, backoff_max=0.2)
    stats = SinkStats()
    events = [sample_event(ev.LlmCallCompleted, source="test") for _ in range(2000)]
    await produce(settings, events)
    stop = asyncio.Event()
    async with EventProducer(settings) as producer:
        ctx = ServiceContext("analytics", settings, SystemClock(), producer)
        task = asyncio.create_task(run_sink(ctx, stop, store, config=config, stats=stats))
        try:
            deadline = time.monotonic() + 30
            while store.failed_attempts < 5:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            # Nothing is committed while nothing is stored, and reading stopped at two batches.
            assert store.count() == 0
            assert await lag(settings) == len(events)
            assert stats.paused
            consumed = stats.consumed
            assert consumed <= 2 * config.max_batch_rows + 100
            await asyncio.sleep(0.5)
            assert stats.consumed == consumed

            store.available = True
            deadline = time.monotonic() + 30
            while store.count() < len(events):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            await wait_caught_up(settings)
            assert store.count() == len(events)
            assert stats.retries >= 5
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)


class RecordingStore(MemoryEventStore):
    """The in-memory store, noting the rows and bytes of every insert that went in."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[int, int]] = []

    def insert(self, rows: Any) -> Any:
        rejected = super().insert(rows)
        self.batches.append((len(rows), sum(len(row.value) for row in rows)))
        return rejected


async def test_batches_are_bounded_in_bytes_also_while_an_insert_is_retried(
    settings: KafkaSettings,
) -> None:
    limit = 256 * 1024
    store = RecordingStore()
    store.available = False
    # Rows alone would let a whole fetch into one batch: 5,000 rows, 100,000 while inserting.
    config = SinkConfig(batch_wait=0.05, max_batch_bytes=limit, backoff_max=0.2)
    stats = SinkStats()
    events = [
        sample_event(ev.RequestReceived, source="test", message=f"{i} " + "x" * 30_000)
        for i in range(200)
    ]
    size = len(default_codec().encode(events[0]))
    await produce(settings, events)
    stop = asyncio.Event()
    async with EventProducer(settings) as producer:
        ctx = ServiceContext("analytics", settings, SystemClock(), producer)
        task = asyncio.create_task(run_sink(ctx, stop, store, config=config, stats=stats))
        try:
            deadline = time.monotonic() + 30
            while store.failed_attempts < 5:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            # Reading stopped at two batches of bytes: the one retried and the next.
            assert stats.paused
            assert stats.consumed * size <= 2 * limit
            consumed = stats.consumed
            await asyncio.sleep(0.5)
            assert stats.consumed == consumed

            store.available = True
            deadline = time.monotonic() + 30
            while store.count() < len(events):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            await wait_caught_up(settings)
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
    assert store.count() == len(events)
    assert sorted(e.event_id for e in store.events()) == sorted(e.event_id for e in events)
    assert all(0 < n_bytes <= limit for _, n_bytes in store.batches), store.batches
    assert 0 < stats.largest_batch_bytes <= limit
    assert len(store.batches) >= len(events) * size // limit


# -- the ClickHouse adapter in process: the contract, on the real engine ----------------


def earlier_key_ddl(tmp_path: Path) -> Path:
    """The DDL as the sink had it before deduplication ignored occurred_at."""
    old_ddl = tmp_path / "ddl"
    old_ddl.mkdir(exist_ok=True)
    for path in DDL_DIR.glob("*.sql"):
        text = path.read_text(encoding="utf-8").replace(
            "ENGINE = ReplacingMergeTree\nORDER BY (event_type, event_key);",
            "ENGINE = ReplacingMergeTree\nPARTITION BY toYYYYMM(occurred_at)\n"
            "ORDER BY (event_type, occurred_at, event_key);",
        )
        (old_ddl / path.name).write_text(text, encoding="utf-8")
    return old_ddl


def count_inserts(store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of each INSERT the store runs from now on."""
    sent: list[int] = []
    inner = store._insert  # noqa: SLF001

    def counting(rows: Any) -> None:
        sent.append(len(rows))
        inner(rows)

    monkeypatch.setattr(store, "_insert", counting)
    return sent


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("chdb") / "clickhouse"
    keeper = ClickHouseStore(path=path)  # keeps the engine up between tests
    keeper.query("SELECT 1")
    yield path
    keeper.close()


# The embedded engine always; a ClickHouse server too when the session has one
# (ORCH_TEST_INFRA=containers: tests/infra.py).
ENGINES = ["embedded", "server"] if infra_mode() == "containers" else ["embedded"]


class TestClickHouseStore(EventStoreContract):
    @pytest.fixture(params=ENGINES)
    def store(
        self, request: pytest.FixtureRequest, containers: ContainerInfra | None
    ) -> Iterator[ClickHouseStore]:
        if request.param == "server":
            assert containers is not None
            store = ClickHouseStore(url=containers.fresh_database())
        else:
            engine = request.getfixturevalue("engine")
            store = ClickHouseStore(path=engine, database=f"t_{uuid.uuid4().hex[:8]}")
        store.apply_schema()
        yield store
        store.close()

    def test_a_table_with_the_earlier_key_is_moved_with_its_rows(
        self, engine: Path, tmp_path: Path
    ) -> None:
        database = f"t_{uuid.uuid4().hex[:8]}"
        old = ClickHouseStore(path=engine, database=database, ddl_dir=earlier_key_ddl(tmp_path))
        old.apply_schema()
        events = mixed(12)
        old.insert([encoded(e) for e in events])
        old.close()
        store = ClickHouseStore(path=engine, database=database)
        try:
            store.apply_schema()
            key = store.query(
                "SELECT sorting_key FROM system.tables"
                " WHERE database = currentDatabase() AND name = 'events'"
            )
            assert key.rows == [("event_type, event_key",)]
            assert store.count() == 12
            later = events[0].model_copy(update={"occurred_at": datetime.now(UTC)})
            store.insert([encoded(later)])
            assert store.count() == 12
        finally:
            store.close()

    def test_rows_the_codec_cannot_read_cost_one_more_insert_not_a_bisection(
        self, store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        header = MAGIC + default_codec().fingerprint_for("workflow_completed")
        good = [encoded(e) for e in mixed(400)]
        bad = [EncodedEvent("workflow_completed", header + b"\xff" * 100, 0, i) for i in range(8)]
        rows = list(good)
        for i, row in enumerate(bad):
            rows.insert(25 + 50 * i, row)
        sent = count_inserts(store, monkeypatch)

        rejected = store.insert(rows)

        assert [r.row for r in rejected] == bad
        assert all("corrupt Avro body" in r.reason for r in rejected)
        assert sent == [408, 400]  # the batch, then its readable rows once
        assert store.count() == 400

    def test_rows_the_table_refuses_among_unreadable_ones_are_found_and_the_rest_kept(
        self, store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        header = MAGIC + default_codec().fingerprint_for("workflow_completed")
        good = [encoded(e) for e in mixed(200)]
        unreadable = EncodedEvent("workflow_completed", header + b"\xff" * 100, 0, 1)
        ancient = [encoded(sample_event(ev.WorkflowCompleted, occurred_at=ANCIENT)) for _ in "ab"]
        rows = [*good[:50], ancient[0], *good[50:120], unreadable, *good[120:190], ancient[1]]
        rows += good[190:]
        sent = count_inserts(store, monkeypatch)

        rejected = store.insert(rows)

        assert [r.row for r in rejected] == [ancient[0], unreadable, ancient[1]]
        assert "corrupt Avro body" in rejected[1].reason
        assert all("occurred_at_in_range" in rejected[i].reason for i in (0, 2))
        assert store.count() == 200
        # Halving down to 8 rows, then row by row: far fewer than one insert per row.
        assert len(sent) <= 40, sent

    def test_reads_refuse_writes_with_clickhouses_error(self, store: ClickHouseStore) -> None:
        store.insert([encoded(e) for e in [sample_event(ev.WorkflowCompleted)]])
        with pytest.raises(StoreError, match=r"Code: 164.*READONLY"):
            store.query("INSERT INTO events (event_id) VALUES ('x')")
        with pytest.raises(StoreError, match="READONLY"):
            store.query_text("DROP TABLE events", "CSV")
        assert store.count() == 1
        assert store.query_text("SELECT count() AS n FROM events FINAL", "CSVWithNames") == (
            '"n"\n1\n'
        )


# -- moving a table made with the earlier key, cut short at each step ----------------------

# What a kill leaves at each step of the move: the statements before it ran, none after.
# "mid-copy" writes part of the INSERT ... SELECT first, as a kill during it would.
MOVE_STEPS = {
    "after-rename": "RENAME TABLE events TO",
    "after-create": "CREATE TABLE IF NOT EXISTS events",
    "mid-copy": "INSERT INTO events (",
    "after-copy": "INSERT INTO events (",
}
OLD_EVENTS = 40
SET_ASIDE = "events_before_key_change"


class Killed(Exception):
    """Stands in for the SIGKILL in process: raised right where the kill would land."""


@pytest.fixture(params=ENGINES)
def reopen(
    request: pytest.FixtureRequest, containers: ContainerInfra | None
) -> Callable[..., ClickHouseStore]:
    """Opens a new store on one namespace of its own, the way a restarted sink would."""
    if request.param == "server":
        assert containers is not None
        url = containers.fresh_database()
        return lambda ddl_dir=DDL_DIR: ClickHouseStore(url=url, ddl_dir=ddl_dir)
    engine = request.getfixturevalue("engine")
    database = f"t_{uuid.uuid4().hex[:8]}"
    return lambda ddl_dir=DDL_DIR: ClickHouseStore(path=engine, database=database, ddl_dir=ddl_dir)


def kill_during_move(store: ClickHouseStore, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = store._client(readonly=False)
    real = writer.command

    def command(sql: str, *args: Any, **kwargs: Any) -> Any:
        if step == "mid-copy" and sql.startswith(MOVE_STEPS[step]):
            real(f"{sql} LIMIT {OLD_EVENTS // 2}", *args, **kwargs)
            raise Killed(step)
        out = real(sql, *args, **kwargs)
        if sql.startswith(MOVE_STEPS[step]):
            raise Killed(step)
        return out

    monkeypatch.setattr(writer, "command", command)


def with_old_events(reopen: Callable[..., ClickHouseStore], tmp_path: Path) -> list[ev.Event]:
    old = reopen(ddl_dir=earlier_key_ddl(tmp_path))
    try:
        old.apply_schema()
        events = mixed(OLD_EVENTS)
        assert old.insert([encoded(e) for e in events]) == []
        return events
    finally:
        old.close()


def assert_each_event_once(store: ClickHouseStore, events: list[ev.Event]) -> None:
    ids = sorted(e.event_id for e in events)
    assert store.count() == len(events)
    assert sorted(r[0] for r in store.query("SELECT event_id FROM events FINAL").rows) == ids
    # The SQL surface's views read the same table.
    assert sorted(r[0] for r in store.query("SELECT event_id FROM events_final").rows) == ids
    window = "since = '2000-01-01 00:00:00', until = '2199-01-01 00:00:00'"
    done = store.query(
        f"SELECT events FROM metric_event_count(event_type = 'workflow_completed', {window})"
    )
    assert done.rows == [(sum(isinstance(e, ev.WorkflowCompleted) for e in events),)]
    tables = store.query(
        "SELECT name, sorting_key FROM system.tables WHERE database = currentDatabase()"
        " AND engine LIKE '%MergeTree'"
    )
    assert tables.rows == [("events", "event_type, event_key")]


@pytest.mark.parametrize("step", list(MOVE_STEPS))
def test_a_move_cut_short_is_finished_by_the_next_start(
    reopen: Callable[..., ClickHouseStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    events = with_old_events(reopen, tmp_path)
    moving = reopen()
    kill_during_move(moving, step, monkeypatch)
    with pytest.raises(Killed):
        moving.apply_schema()
    moving.close()

    restarted = reopen()
    try:
        restarted.apply_schema()
        assert_each_event_once(restarted, events)
        restarted.apply_schema()
        assert_each_event_once(restarted, events)
    finally:
        restarted.close()


def test_rows_set_aside_survive_an_earlier_release_started_in_between(
    reopen: Callable[..., ClickHouseStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = with_old_events(reopen, tmp_path)
    moving = reopen()
    kill_during_move(moving, "after-rename", monkeypatch)
    with pytest.raises(Killed):
        moving.apply_schema()
    moving.close()
    # A rollback: the earlier release makes `events` with its own key again and writes to it.
    earlier = reopen(ddl_dir=earlier_key_ddl(tmp_path))
    try:
        for statement in ddl_statements(earlier_key_ddl(tmp_path)):
            earlier.execute(statement)
        newer = mixed(10)
        assert earlier.insert([encoded(e) for e in newer]) == []
    finally:
        earlier.close()

    restarted = reopen()
    try:
        restarted.apply_schema()
        assert_each_event_once(restarted, events + newer)
    finally:
        restarted.close()


_KILLED_CHILD = """
import os, signal, sys
from services.analytics.store import ClickHouseStore
from tests.integration.test_analytics_sink import MOVE_STEPS, OLD_EVENTS, earlier_key_ddl
from tests.unit.test_analytics_store import encoded, mixed
from pathlib import Path

data, tmp, step = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
old = ClickHouseStore(path=data, ddl_dir=earlier_key_ddl(tmp))
old.apply_schema()
events = mixed(OLD_EVENTS)
old.insert([encoded(e) for e in events])
old.close()
(tmp / "ids").write_text("\\n".join(sorted(e.event_id for e in events)))
store = ClickHouseStore(path=data)
writer = store._client(readonly=False)
real = writer.command

def command(sql, *args, **kwargs):
    if step == "mid-copy" and sql.startswith(MOVE_STEPS[step]):
        real(f"{sql} LIMIT {OLD_EVENTS // 2}", *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(sql, *args, **kwargs)
    if sql.startswith(MOVE_STEPS[step]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out

writer.command = command
store.apply_schema()
"""

_RESTARTED_CHILD = """
import json, sys
from services.analytics.store import ClickHouseStore

store = ClickHouseStore(path=sys.argv[1])
store.apply_schema()
print(json.dumps({
    "count": store.count(),
    "ids": sorted(r[0] for r in store.query("SELECT event_id FROM events_final").rows),
    "tables": [r[0] for r in store.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()"
        " AND engine LIKE '%MergeTree'").rows],
}))
store.close()
"""


def test_a_sink_killed_mid_copy_loses_no_event_after_a_restart(tmp_path: Path) -> None:
    # The SIGKILL itself, in a process of its own (chdb lets a process open one path).
    data = str(tmp_path / "clickhouse")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, data, str(tmp_path), "mid-copy"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    restarted = subprocess.run(
        [sys.executable, "-c", _RESTARTED_CHILD, data],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=True,
    )
    found = json.loads(restarted.stdout)
    ids = (tmp_path / "ids").read_text().split("\n")
    assert found == {"count": OLD_EVENTS, "ids": ids, "tables": ["events"]}
