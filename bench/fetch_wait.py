"""How late a consumer reads, and how often it polls, against aiokafka's ``fetch_max_wait_ms``.

    python -m bench.fetch_wait                     # 20, 100, 500 and 1000 ms, two rounds
    python -m bench.fetch_wait --waits 100,500 --records 300

One consumer of six fresh 4-partition topics (the shape of the services' consumers),
with ``fetch_min_bytes`` 1 as on the answer's path. A producer sends one record at a
random moment 5-120 ms after the previous one, to a random partition; the record carries
its send time, and the consumer takes the difference when it gets it (delivery latency).
Then the same consumer sits idle and the bench counts its fetch requests a second (from
aiokafka's fetch loop) and the CPU this process used meanwhile. The rounds interleave the
settings so a drift of the machine hits each alike. Needs the broker (``make up``) or
``KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# Runs as `python bench/fetch_wait.py` too, not only with -m.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from streams.config import kafka_client_args
from streams.kafka import KafkaSettings  # noqa: E402


def _count_fetches(consumer: AIOKafkaConsumer) -> list[int]:
    """A counter of the fetch requests ``consumer`` sends from now on."""
    fetcher = consumer._fetcher
    sent = [0]
    original = fetcher._proc_fetch_request

    async def counted(*args: Any, **kwargs: Any) -> Any:
        sent[0] += 1
        return await original(*args, **kwargs)

    fetcher._proc_fetch_request = counted
    return sent


async def trial(
    bootstrap: str, topics: list[str], wait_ms: int, records: int, idle_s: float
) -> dict[str, float]:
    consumer = AIOKafkaConsumer(
        **kafka_client_args(bootstrap),
        fetch_max_wait_ms=wait_ms,
        fetch_min_bytes=1,
        auto_offset_reset="latest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(**kafka_client_args(bootstrap), linger_ms=0, acks="all")
    await consumer.start()
    await producer.start()
    try:
        parts = [TopicPartition(t, p) for t in topics for p in range(4)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)
        latencies: list[float] = []

        async def read() -> None:
            while len(latencies) < records:
                batch = await consumer.getmany(timeout_ms=1000)
                now = time.time()
                for recs in batch.values():
                    latencies.extend(1000 * (now - float(r.value or b"0")) for r in recs)

        reader = asyncio.create_task(read())
        for _ in range(records):
            await asyncio.sleep(random.uniform(0.005, 0.12))
            topic, partition = random.choice(topics), random.randrange(4)
            await producer.send_and_wait(topic, str(time.time()).encode(), partition=partition)
        await asyncio.wait_for(reader, 30)
        sent = _count_fetches(consumer)
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(idle_s)
        wall = time.monotonic() - wall0
        latencies.sort()
        return {
            "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "idle_fetches_per_s": sent[0] / wall,
            "idle_cpu_percent": 100 * (time.process_time() - cpu0) / wall,
        }
    finally:
        await producer.stop()
        await consumer.stop()


async def run(args: argparse.Namespace) -> dict[int, list[dict[str, float]]]:
    bootstrap = KafkaSettings.from_env().bootstrap
    prefix = f"bench-fetch-wait-{uuid.uuid4().hex[:6]}"
    topics = [f"{prefix}-{i}" for i in range(6)]
    admin = AIOKafkaAdminClient(**kafka_client_args(bootstrap))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 4, 1) for t in topics])
        await asyncio.sleep(2.0)  # leaders elected before the first trial
        out: dict[int, list[dict[str, float]]] = {w: [] for w in args.waits}
        for round_ in range(args.rounds):
            for wait in args.waits:
                row = await trial(bootstrap, topics, wait, args.records, args.idle_seconds)
                out[wait].append(row)
                print(
                    f"round {round_ + 1}, fetch_max_wait_ms {wait:5d}: delivery p50 "
                    f"{row['p50_ms']:6.2f} ms, p99 {row['p99_ms']:7.2f} ms; idle "
                    f"{row['idle_fetches_per_s']:5.1f} fetches/s, "
                    f"{row['idle_cpu_percent']:4.1f}% of a core",
                    file=sys.stderr,
                    flush=True,
                )
        return out
    finally:
        await admin.delete_topics(topics)
        await admin.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--waits",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[20, 100, 500, 1000],
        help="fetch_max_wait_ms values, comma separated",
    )
    parser.add_argument("--records", type=int, default=150, help="records per trial")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    print(f"{'fetch_max_wait_ms':>17s} {'p50 ms':>7s} {'p99 ms':>7s} {'idle fetch/s':>12s}")
    for wait, rows in out.items():
        print(
            f"{wait:17d} {statistics.median(r['p50_ms'] for r in rows):7.2f} "
            f"{statistics.median(r['p99_ms'] for r in rows):7.2f} "
            f"{statistics.median(r['idle_fetches_per_s'] for r in rows):12.1f}"
        )


if __name__ == "__main__":
    main()
