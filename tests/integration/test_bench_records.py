"""bench._records against the real broker: records appended per topic, offset commits by
group, counted between two snapshots of the end offsets."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench._records import OFFSETS_TOPIC, commits_by_group, per_answer, record_counts
from streams.kafka import KafkaSettings


async def test_counts_records_and_commits_of_the_prefix_only(settings: KafkaSettings) -> None:
    topic = settings.topic("request_received")
    other = settings.topic("route_decided")
    before = await record_counts(settings.bootstrap, settings.prefix)
    assert before.by_topic()["request_received"] == 0

    producer = AIOKafkaProducer(**settings.client_args())
    await producer.start()
    try:
        for i in range(7):
            await producer.send_and_wait(topic, b"x", key=f"k{i}".encode())
        await producer.send_and_wait(other, b"y", key=b"k")
    finally:
        await producer.stop()

    # Three commits of the bench's group (one partition each), one of a foreign group.
    parts = [TopicPartition(topic, 0)]
    for group, commits in ((settings.prefix + "orchestrator.router", 3), ("elsewhere.g", 1)):
        consumer = AIOKafkaConsumer(
            **settings.client_args(), group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign(parts)
            for n in range(commits):
                await consumer.commit({parts[0]: n + 1})
        finally:
            await consumer.stop()

    after = await record_counts(settings.bootstrap, settings.prefix)
    grown = per_answer(before.by_topic(), after.by_topic(), answers=1)
    assert grown["request_received"] == 7
    assert grown["route_decided"] == 1
    assert grown[OFFSETS_TOPIC] >= 4  # every group's commits land in the offsets topic
    assert not any(t.startswith(settings.prefix) for t in grown)  # named without the prefix

    commits = await commits_by_group(settings.bootstrap, before, after)
    # The foreign group's commit is in the offsets topic but not the bench's.
    assert commits == {"router: request_received": 3}


def test_per_answer_divides_and_leaves_out_what_did_not_grow() -> None:
    assert per_answer({"a": 2, "b": 5}, {"a": 12, "b": 5, "c": 4}, answers=4) == {
        "a": 2.5,
        "c": 1.0,
    }
    assert per_answer({}, {"a": 3}, answers=0) == {}
