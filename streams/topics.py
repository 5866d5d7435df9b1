"""The topic catalog: every topic, its key, partitions, retention and event model, in one table.

``python -m streams.topics create`` creates them all (idempotent);
``python -m streams.topics list`` prints the table.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from streams import events as ev
from streams.config import BrokerSettings, kafka_client_args

__all__ = [
    "CATALOG",
    "PARTITIONS",
    "STATE_TOPICS",
    "TopicSpec",
    "create_compacted_topics",
    "create_state_topics",
    "create_topics",
    "delete_prefixed_topics",
    "snapshot_topic",
    "spec_for",
    "topic_names",
]

_DAY_MS = 24 * 3600 * 1000
# Every topic, and every Faust table built on them, has this many partitions.
PARTITIONS: int = BrokerSettings.read("partitions")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    model: type[ev.Event]
    partitions: int = PARTITIONS
    retention_ms: int = 7 * _DAY_MS
    compact: bool = False

    @property
    def key(self) -> str:
        return self.model.key_field

    def config(self) -> dict[str, str]:
        if self.compact:
            return {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}


_FOREVER = -1
# Knowledge every instance rebuilds from the log (registry, versions, automations)
# never expires; the request path keeps a week.
CATALOG: tuple[TopicSpec, ...] = (
    TopicSpec("request_received", ev.RequestReceived),
    TopicSpec("route_decided", ev.RouteDecided, retention_ms=30 * _DAY_MS),
    TopicSpec("spawn_requested", ev.SpawnRequested),
    TopicSpec("spawn_approved", ev.SpawnApproved),
    TopicSpec("spawn_denied", ev.SpawnDenied),
    TopicSpec("agent_spawned", ev.AgentSpawned, compact=True),
    TopicSpec("task_requested", ev.TaskRequested),
    TopicSpec("task_admitted", ev.TaskAdmitted),
    TopicSpec("workflow_started", ev.WorkflowStarted),
    TopicSpec("llm_call_completed", ev.LlmCallCompleted),
    TopicSpec("workflow_completed", ev.WorkflowCompleted, retention_ms=30 * _DAY_MS),
    TopicSpec("workflow_failed", ev.WorkflowFailed, retention_ms=30 * _DAY_MS),
    TopicSpec("agent_loaded", ev.AgentLoaded),
    TopicSpec("agent_evicted", ev.AgentEvicted),
    TopicSpec("agent_retired", ev.AgentRetired, compact=True),
    TopicSpec("goal_agents_changed", ev.GoalAgentsChanged),
    TopicSpec("budget_exceeded", ev.BudgetExceeded),
    TopicSpec("budget_update_requested", ev.BudgetUpdateRequested, retention_ms=_FOREVER),
    TopicSpec("feedback_received", ev.FeedbackReceived, retention_ms=_FOREVER),
    TopicSpec("workflow_assessed", ev.WorkflowAssessed, retention_ms=30 * _DAY_MS),
    TopicSpec("pattern_discovered", ev.PatternDiscovered, retention_ms=_FOREVER),
    TopicSpec("automation_created", ev.AutomationCreated, retention_ms=_FOREVER),
    TopicSpec("improvement_available", ev.ImprovementAvailable, retention_ms=_FOREVER),
    TopicSpec("improvement_applied", ev.ImprovementApplied, retention_ms=_FOREVER),
    TopicSpec("improvement_rolled_back", ev.ImprovementRolledBack, retention_ms=_FOREVER),
    TopicSpec("workflow_version_saved", ev.WorkflowVersionSaved, retention_ms=_FOREVER),
    TopicSpec("rollback_requested", ev.RollbackRequested, retention_ms=_FOREVER),
    TopicSpec("api_key_issued", ev.ApiKeyIssued, compact=True),
    TopicSpec("api_key_revoked", ev.ApiKeyRevoked, compact=True),
    TopicSpec("feedback_decided", ev.FeedbackDecided, retention_ms=30 * _DAY_MS),
    TopicSpec("promotion_requested", ev.PromotionRequested, retention_ms=_FOREVER),
    TopicSpec("promotion_decided", ev.PromotionDecided, retention_ms=_FOREVER),
    TopicSpec("spend_requested", ev.SpendRequested),
    TopicSpec("spend_decided", ev.SpendDecided),
    TopicSpec("admission_granted", ev.AdmissionGranted, retention_ms=_DAY_MS),
    TopicSpec("admission_returned", ev.AdmissionReturned, retention_ms=_DAY_MS),
    TopicSpec("budget_ticked", ev.BudgetTicked, retention_ms=_DAY_MS),
    TopicSpec("budget_reported", ev.BudgetReported, compact=True),
    TopicSpec("dead_letter", ev.DeadLetter, retention_ms=30 * _DAY_MS),
)

_BY_NAME = {t.name: t for t in CATALOG}

# A service's own folded state, not events (streams/snapshots.py): one partition, compacted,
# read only by the service that writes it, so neither the sink nor the schemas know them.
# Small segments let compaction drop superseded snapshots soon.
STATE_TOPICS: tuple[str, ...] = ("router_snapshots", "improvement_snapshots")
_STATE_CONFIG = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": "0",
    "segment.bytes": str(64 * 1024 * 1024),
    "segment.ms": str(3600 * 1000),
    "delete.retention.ms": str(3600 * 1000),
}


def snapshot_topic(service: str) -> str:
    """The snapshot topic of ``service`` (one of :data:`STATE_TOPICS`)."""
    name = f"{service}_snapshots"
    if name not in STATE_TOPICS:
        raise ValueError(f"{service!r} has no snapshot topic; add it to STATE_TOPICS")
    return name


def spec_for(topic: str) -> TopicSpec:
    return _BY_NAME[topic]


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a record keyed ``key`` (murmur2).

    Whoever owns that partition of a topic keyed this way owns the key: the loader decides
    which agents it retires this way, the improvement service which commands it answers.
    """
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, got {partitions}")
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def topic_names(prefix: str = "") -> list[str]:
    return [prefix + t.name for t in CATALOG]


async def create_topics(
    bootstrap: str, *, prefix: str = "", specs: tuple[TopicSpec, ...] = CATALOG
) -> list[str]:
    """Create every topic that does not exist yet; returns the names created."""
    return await _ensure(
        bootstrap,
        [
            NewTopic(
                name=prefix + s.name,
                num_partitions=s.partitions,
                replication_factor=1,
                topic_configs=s.config(),
            )
            for s in specs
        ],
    )


async def create_state_topics(bootstrap: str, *, prefix: str = "") -> list[str]:
    """Create the snapshot topics that do not exist yet; returns the names created."""
    return await _ensure(
        bootstrap,
        [
            NewTopic(
                name=prefix + name,
                num_partitions=1,
                replication_factor=1,
                topic_configs=_STATE_CONFIG,
            )
            for name in STATE_TOPICS
        ],
    )


async def delete_prefixed_topics(bootstrap: str, prefix: str) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (a test's or a bench's own
    namespace, Faust changelogs included); returns the names deleted.

    Each partition keeps files open on the broker: namespaces left behind add up to
    the broker's open-file limit, and it stops.
    """
    if not prefix:
        raise ValueError("refusing to delete every topic: give a non-empty prefix")
    admin = AIOKafkaAdminClient(**kafka_client_args(bootstrap), request_timeout_ms=30000)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


async def create_compacted_topics(bootstrap: str, partitions: dict[str, int]) -> list[str]:
    """Create compacted topics (full names -> partitions), e.g. a Faust table's changelog.

    A Faust app that creates its own changelog while starting can cache the new
    topic with no partitions yet and then refuse every table write; creating the
    topic first, and waiting for its leaders, leaves nothing to race.
    """
    return await _ensure(
        bootstrap,
        [
            NewTopic(
                name=name,
                num_partitions=n,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"},
            )
            for name, n in partitions.items()
        ],
    )


async def _ensure(bootstrap: str, topics: list[NewTopic]) -> list[str]:
    admin = AIOKafkaAdminClient(**kafka_client_args(bootstrap), request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in topics if t.name not in existing]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # another process won the race; the topics exist, which is all we need
        # Topics another process created a moment ago may still lack leaders, too.
        await _wait_for_leaders(admin, [t.name for t in topics])
        return [t.name for t in wanted]
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    """New topics answer "not leader" for a moment; clients should not see that."""
    for _ in range(100):
        described = await admin.describe_topics(names)
        if all(
            t.get("error_code", 0) == 0
            and t.get("partitions")
            and all(p.get("leader", -1) >= 0 for p in t["partitions"])
            for t in described
        ):
            return
        await asyncio.sleep(0.05)


def _main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "create"
    if cmd == "list":
        for s in CATALOG:
            policy = "compact" if s.compact else f"retention {s.retention_ms} ms"
            print(f"{s.name:26} key={s.key:14} partitions={s.partitions} {policy}")
        return 0
    if cmd == "create":
        broker = BrokerSettings.from_env()
        created = asyncio.run(create_topics(broker.bootstrap, prefix=broker.prefix))
        print(f"topics: {len(created)} created, {len(CATALOG) - len(created)} already there")
        state = asyncio.run(create_state_topics(broker.bootstrap, prefix=broker.prefix))
        print(f"snapshot topics: {len(state)} created")
        return 0
    print("usage: python -m streams.topics [create|list]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
