"""Topic helpers that several services rely on to agree with Kafka."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from streams.topics import partition_for


def test_partition_for_agrees_with_the_producer_s_default_partitioner() -> None:
    # The owner of a key must be the consumer that gets the key's records.
    pick = DefaultPartitioner()
    for key in ("agent-1", "g1/general", "ünïcode", ""):
        for partitions in (1, 4, 7):
            all_ = list(range(partitions))
            assert partition_for(key, partitions) == pick(key.encode(), all_, all_)
