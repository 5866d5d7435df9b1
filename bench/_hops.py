"""Where an answer's time goes: each hop of a run, from its events' record timestamps.

Every event of a run is produced by the service that did that step, and Kafka stamps
the record when it is produced (CreateTime). The time between two consecutive steps
of one run is therefore the next service's hop: the broker's delivery, the wait for
its fetch, and its own work. Read after a load step, from the bench's own topics.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer

from streams.codec import DecodeError, default_codec
from streams.kafka import KafkaSettings

__all__ = ["STEPS", "fold", "hop_summary", "read_hops", "render_hops"]

# The answer's path, in order, and who takes each hop to the next step.
STEPS: tuple[tuple[str, str], ...] = (
    ("request_received", "gateway"),
    ("route_decided", "router"),
    ("task_requested", "router"),
    ("task_admitted", "budget"),
    ("workflow_started", "loader"),
    ("llm_call_completed", "loader: the LLM call"),
    ("workflow_completed", "loader"),
)


def hop_summary(
    runs: Mapping[str, Mapping[str, int]], since_ms: int, until_ms: int
) -> list[dict[str, float | str | int]]:
    """Per hop, the median and 90th percentile over the runs received in the window that
    have every step (a run answered by a cache or failed is left out)."""
    names = [s for s, _ in STEPS]
    full = [
        r
        for r in runs.values()
        if all(s in r for s in names) and since_ms <= r[names[0]] < until_ms
    ]
    out: list[dict[str, float | str | int]] = []
    if not full:
        return out
    for (before, _), (after, who) in zip(STEPS, STEPS[1:], strict=False):
        spans = sorted(r[after] - r[before] for r in full)
        out.append(
            {
                "hop": f"{before} -> {after}",
                "by": who,
                "runs": len(spans),
                "p50_ms": statistics.median(spans),
                "p90_ms": spans[min(len(spans) - 1, int(0.9 * len(spans)))],
            }
        )
    return out


def fold(records: Iterable[tuple[str, str, int]], into: dict[str, dict[str, int]]) -> None:
    """(event type, run id, timestamp ms) into run -> step -> first timestamp."""
    wanted = {s for s, _ in STEPS}
    for kind, run, ts in records:
        if kind in wanted:
            into.setdefault(run, {}).setdefault(kind, ts)


async def read_hops(
    settings: KafkaSettings, since_ms: int, until_ms: int
) -> list[dict[str, float | str | int]]:
    """Read the steps' topics to their current end and summarize the window's runs."""
    codec = default_codec()
    consumer = AIOKafkaConsumer(
        *(settings.topic(s) for s, _ in STEPS),
        **settings.client_args(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    runs: dict[str, dict[str, int]] = {}
    await consumer.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=2000, max_records=5000)
            if not batch:
                break
            records: list[tuple[str, str, int]] = []
            for recs in batch.values():
                for r in recs:
                    try:
                        event = codec.decode(r.value or b"")
                    except DecodeError:
                        continue
                    if event.run_id:
                        records.append((event.event_type, event.run_id, r.timestamp))
            fold(records, runs)
    finally:
        await consumer.stop()
    return hop_summary(runs, since_ms, until_ms)


def render_hops(rows: Sequence[Mapping[str, float | str | int]]) -> list[str]:
    if not rows:
        return []
    lines = [f"platform hops at c=1 (record timestamps, {rows[0]['runs']} runs):"]
    for row in rows:
        lines.append(
            f"  {row['hop']:<42} {row['by']:<22} p50 {row['p50_ms']:6.1f} ms"
            f"  p90 {row['p90_ms']:6.1f} ms"
        )
    return lines
