"""How many records a load step put on the broker, per topic.

The broker's CPU follows the records it is asked to append and hand out, so the count
per answer, topic by topic, says which events, table writes and offset commits an answer
costs. Counted from end offsets before and after a step: the bench's own topics (events,
the Faust tables' changelogs, the services' snapshot topics: all carry the bench's
prefix) and the broker's ``__consumer_offsets``, whose records between the two counts
are read and filed under the committing group and topic (the bench's groups only).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.config import kafka_client_args

__all__ = ["OFFSETS_TOPIC", "Ends", "commits_by_group", "per_answer", "record_counts"]

OFFSETS_TOPIC = "__consumer_offsets"


@dataclass(frozen=True)
class Ends:
    """End offsets of every partition of the bench's topics and of the offsets topic."""

    prefix: str
    parts: dict[TopicPartition, int]

    def by_topic(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tp, end in self.parts.items():
            name = tp.topic.removeprefix(self.prefix)
            out[name] = out.get(name, 0) + end
        return out


def _consumer(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **kafka_client_args(bootstrap), exclude_internal_topics=False, enable_auto_commit=False
    )


async def record_counts(bootstrap: str, prefix: str) -> Ends:
    """Each partition's end offset (records ever appended)."""
    consumer = _consumer(bootstrap)
    await consumer.start()
    try:
        # The consumer keeps no metadata of topics it does not read: ask for all of it.
        cluster = await consumer._client.fetch_all_metadata()
        topics = [
            t
            for t in cluster.topics(exclude_internal_topics=False)
            if t.startswith(prefix) or t == OFFSETS_TOPIC
        ]
        parts = [TopicPartition(t, p) for t in topics for p in cluster.partitions_for_topic(t)]
        ends = await consumer.end_offsets(parts) if parts else {}
    finally:
        await consumer.stop()
    return Ends(prefix, dict(ends))


def _commit_key(key: bytes) -> tuple[str, str] | None:
    """(group, topic) of an offset commit's key; None for group metadata records."""
    (version,) = struct.unpack_from(">h", key, 0)
    if version > 1:
        return None
    (n,) = struct.unpack_from(">h", key, 2)
    group = key[4 : 4 + n].decode()
    (m,) = struct.unpack_from(">h", key, 4 + n)
    return group, key[6 + n : 6 + n + m].decode()


async def commits_by_group(bootstrap: str, before: Ends, after: Ends) -> Counter[str]:
    """Offset commit records appended between two counts, by "group: topic", bench's only."""
    wanted = {
        tp: (before.parts.get(tp, 0), end)
        for tp, end in after.parts.items()
        if tp.topic == OFFSETS_TOPIC and end > before.parts.get(tp, 0)
    }
    out: Counter[str] = Counter()
    if not wanted:
        return out
    consumer = _consumer(bootstrap)
    await consumer.start()
    try:
        consumer.assign(list(wanted))
        for tp, (start, _) in wanted.items():
            consumer.seek(tp, start)
        left = set(wanted)
        while left:
            batch = await consumer.getmany(*left, timeout_ms=2000, max_records=5000)
            if not batch:
                break
            for tp, records in batch.items():
                for r in records:
                    if r.offset >= wanted[tp][1]:
                        left.discard(tp)
                        break
                    key = _commit_key(r.key or b"\x00\x02")
                    if key and key[0].startswith(before.prefix):
                        group, topic = key
                        name = group.removeprefix(before.prefix).removeprefix("orchestrator.")
                        out[f"{name}: {topic.removeprefix(before.prefix)}"] += 1
                if await consumer.position(tp) >= wanted[tp][1]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    return out


def per_answer(
    before: Mapping[str, int], after: Mapping[str, int], answers: int
) -> dict[str, float]:
    """Records appended per answer between two counts, topics that got none left out."""
    if answers <= 0:
        return {}
    grown = {t: after[t] - before.get(t, 0) for t in after}
    return {t: n / answers for t, n in sorted(grown.items(), key=lambda kv: -kv[1]) if n > 0}
