"""Sink ingestion at rest and while a heavy query runs again and again through the SQL surface.

    .venv/bin/python -m bench.sql_guard                       # 300k events per phase
    .venv/bin/python -m bench.sql_guard --events 1000000 --heavy-seconds 30

Each phase drains the same events from its own topic namespace into its own database
of one embedded engine, in this process, as the sink process does: "at rest" nothing
else runs; "heavy query" a thread sends a query the guard allows (a self cross join
of the event log, ``--preload`` synthetic rows deep from the start) through
``GuardedQueries`` over and over, each run ended by the limits (``ORCH_SQL_*``, with
``max_execution_time`` = ``--heavy-seconds`` so that it repeats within a phase). One
phase runs it with ``max_threads`` = the CPU count, to show what the one-thread limit
buys. A warm-up drain runs first and is not reported; ``--rounds`` rounds of the three
phases follow, each phase's database dropped after it, and the medians per kind are
compared. The rate counts from the sink's first read to its last insert.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sink import drain_with_sink, make_events, produce, say  # noqa: E402
from local.localkafka import ensure_broker  # noqa: E402
from services.analytics.settings import AnalyticsSettings  # noqa: E402
from services.analytics.sink import SinkConfig  # noqa: E402
from services.analytics.sqlguard import GuardedQueries  # noqa: E402
from services.analytics.store import ClickHouseStore, QueryLimits  # noqa: E402
from streams import events as ev  # noqa: E402
from streams.errors import QueryRefused, StoreError  # noqa: E402
from streams.kafka import KafkaSettings  # noqa: E402
from streams.topics import create_topics  # noqa: E402

HEAVY = "SELECT count() FROM events AS a, events AS b WHERE a.event_id < b.event_id"


class Hammer:
    """Runs ``HEAVY`` through the guard until stopped; counts how each run ended."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.surface = GuardedQueries(store)
        self.outcomes: Counter[str] = Counter()
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heavy-query", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                self.surface.query(HEAVY)
                outcome = "answered"
            except QueryRefused as err:
                raise SystemExit(f"the heavy query was {err}") from err
            except StoreError as err:
                text = str(err)
                outcome = text[text.rfind("(") + 1 : text.rfind(")")] if "(" in text else text
            self.outcomes[outcome] += 1
            self.seconds.append(time.perf_counter() - start)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def phase(
    name: str,
    bootstrap: str,
    path: Path,
    events: list[ev.Event],
    preload: int,
    config: SinkConfig,
    limits: QueryLimits | None,
) -> tuple[str, float, str]:
    settings = KafkaSettings(bootstrap, f"benchsg{uuid.uuid4().hex[:6]}.")
    await create_topics(bootstrap, prefix=settings.prefix)
    say(f"-- {name}: producing {len(events):,} events (topics {settings.prefix}*)")
    await produce(settings, events)
    store = ClickHouseStore(
        path=path, database=f"bench_sg_{uuid.uuid4().hex[:6]}", limits=limits or QueryLimits()
    )
    await asyncio.to_thread(store.apply_schema)
    await asyncio.to_thread(
        store.execute,
        "INSERT INTO events (event_id, event_type, occurred_at, source, payload)"
        " SELECT toString(generateUUIDv4(number)), 'synthetic', now64(3), 'bench', ''"
        f" FROM numbers({preload})",
    )
    say(f"-- {name}: sink draining ({preload:,} rows already in the table)")
    try:
        n = len(events)
        if limits is None:
            sustained, _, _, stored = await drain_with_sink(settings, path, n, config, store)
            detail = "nothing else running"
        else:
            with Hammer(store) as hammer:
                sustained, _, _, stored = await drain_with_sink(settings, path, n, config, store)
            ends = ", ".join(f"{k} {v}" for k, v in hammer.outcomes.most_common())
            runs = sum(hammer.outcomes.values())
            detail = f"heavy query ran {runs}x ({ends}), longest {max(hammer.seconds):.1f} s"
    finally:
        # Nothing of this phase may keep the engine busy (merges) in the next one.
        await asyncio.to_thread(store.execute, f"DROP DATABASE {store.database}")
        await asyncio.to_thread(store.close)
    if stored != len(events) + preload:
        raise SystemExit(f"{name}: {stored:,} rows stored, expected {len(events) + preload:,}")
    return name, sustained, detail


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=300_000, help="events per phase")
    parser.add_argument(
        "--preload", type=int, default=100_000, help="rows in the table before each phase"
    )
    parser.add_argument(
        "--heavy-seconds", type=float, default=5.0, help="max_execution_time of the heavy query"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three phases")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the data here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sqlguard-")) if args.data_dir is None else None
    base = args.data_dir or tmp
    assert base is not None
    try:
        run = _run(args.events, args.preload, args.heavy_seconds, args.rounds, base / "clickhouse")
        return asyncio.run(run)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


async def _run(n: int, preload: int, heavy_seconds: float, rounds: int, path: Path) -> int:
    cpus = os.cpu_count() or 1
    limits = replace(AnalyticsSettings.from_env().query_limits(), max_seconds=heavy_seconds)
    say(f"== sink ingestion vs the SQL surface: {n:,} events per phase; engine at {path}")
    say(f"   {cpus} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    say(f"   limits: {limits}")
    say(f"   heavy query: {HEAVY}")
    bootstrap = await asyncio.to_thread(ensure_broker)
    config = SinkConfig()
    say("-- building events")
    events = make_events(n)
    await phase("warm-up", bootstrap, path, events[: n // 5], preload, config, None)
    kinds: list[tuple[str, QueryLimits | None]] = [
        ("at rest", None),
        ("heavy query", limits),
        (f"heavy query, max_threads {cpus}", replace(limits, max_threads=cpus)),
    ]
    results = []
    for round_ in range(rounds):
        for kind, kind_limits in kinds:
            name = f"{kind} (round {round_ + 1})"
            results.append(await phase(name, bootstrap, path, events, preload, config, kind_limits))
    rest = statistics.median(rate for name, rate, _ in results if name.startswith("at rest"))
    say("")
    say(f"{'sink ingestion (Kafka -> ClickHouse, sustained)':<48}{'events/s':>10}{'vs rest':>9}")
    for name, rate, detail in results:
        say(f"  {name:<46}{rate:>10,.0f}{rate / rest:>8.0%}  {detail}")
    say("")
    say("  median per kind, vs the median at rest:")
    for kind, _ in kinds:
        rate = statistics.median(r for name, r, _ in results if name.startswith(f"{kind} (round"))
        say(f"  {kind:<46}{rate:>10,.0f}{rate / rest:>8.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
