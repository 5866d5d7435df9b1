"""What `orchestrator status` reports: broker, instances and lag per service group, live agents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import (
    DescribeGroupsRequest_v0,
    DescribeGroupsRequest_v1,
    DescribeGroupsRequest_v2,
)
from aiokafka.protocol.api import Request

from local.localkafka import kafka_answers
from streams.kafka import KafkaSettings
from streams.registry import RegistryView
from streams.runtime import announced_urls, group_id
from streams.topics import CATALOG

__all__ = [
    "GroupStatus",
    "PlatformStatus",
    "ServiceStatus",
    "collect_status",
    "describe_groups",
    "wait_until_joined",
]

log = logging.getLogger(__name__)


_DescribeGroupsStruct = (
    DescribeGroupsRequest_v0 | DescribeGroupsRequest_v1 | DescribeGroupsRequest_v2
)


class _DescribeGroups(Request[_DescribeGroupsStruct]):  # type: ignore[misc]  # untyped base
    """DescribeGroups capped at v2.

    aiokafka 0.14 pairs DescribeGroups v3 with the v2 response schema, so against a
    broker that offers v3 (Kafka 4.x) the reply fails to decode; v2 has every field
    we read.
    """

    API_KEY = 15

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(self, request_struct_class: Any) -> Any:
        return request_struct_class(self._groups)


@dataclass(frozen=True)
class GroupStatus:
    """A consumer group as the broker sees it: its state, members and their partitions."""

    group: str
    state: str
    members: int
    assigned: frozenset[TopicPartition] = frozenset()


@dataclass
class ServiceStatus:
    name: str
    installed: bool
    group: str
    instances: int = 0
    lag: int | None = None
    topics: list[str] = field(default_factory=list)
    pid: int | None = None
    restarts: int = 0
    # Where an HTTP service (the gateway) serves; one URL per live instance.
    urls: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.instances:
            return "running"
        if self.pid is not None:
            return "starting"
        return "stopped" if self.installed else "not installed"


@dataclass
class PlatformStatus:
    bootstrap: str
    broker_answers: bool
    services: list[ServiceStatus] = field(default_factory=list)
    active_agents: int | None = None
    agents_by_specialty: dict[str, int] = field(default_factory=dict)
    supervisor_pid: int | None = None
    llm_url: str | None = None
    gateway_urls: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for svc, row in zip(self.services, out["services"], strict=True):
            row["state"] = svc.state
        return out


def _decode_assignment(raw: bytes) -> frozenset[TopicPartition]:
    if not raw:
        return frozenset()
    try:
        decoded = ConsumerProtocolMemberAssignment.decode(raw)
    except Exception:  # a custom assignor's bytes: members still count, partitions unknown
        return frozenset()
    return frozenset(decoded.partitions())


async def describe_groups(admin: AIOKafkaAdminClient, groups: Iterable[str]) -> list[GroupStatus]:
    """State, member count and assigned partitions of each group."""
    out: list[GroupStatus] = []
    for gid in groups:
        node = await admin.find_coordinator(gid)
        response = await admin._client.send(node, _DescribeGroups([gid]))  # noqa: SLF001
        for group in response.to_object()["groups"]:
            assigned: frozenset[TopicPartition] = frozenset()
            for member in group["members"]:
                assigned |= _decode_assignment(member["member_assignment"])
            out.append(GroupStatus(group["group"], group["state"], len(group["members"]), assigned))
    return out


async def _lag(
    admin: AIOKafkaAdminClient,
    consumer: AIOKafkaConsumer,
    group: GroupStatus,
    catalog_topics: set[str],
) -> tuple[int | None, list[str]]:
    committed = {
        tp: meta.offset
        for tp, meta in (await admin.list_consumer_group_offsets(group.group)).items()
        if tp.topic in catalog_topics
    }
    parts = set(committed) | {tp for tp in group.assigned if tp.topic in catalog_topics}
    if not parts:
        return None, []
    ends = await consumer.end_offsets(list(parts))
    # A partition assigned but never committed is read from its start (offset reset
    # "earliest"), so all of it is still to do.
    fresh = [tp for tp in parts if committed.get(tp, -1) < 0]
    starts = await consumer.beginning_offsets(fresh) if fresh else {}
    lag = 0
    for tp in parts:
        position = committed.get(tp, -1)
        if position < 0:
            position = starts[tp]
        lag += max(0, ends[tp] - position)
    return lag, sorted({tp.topic for tp in parts})


async def _fill_from_kafka(settings: KafkaSettings, status: PlatformStatus, timeout: float) -> None:
    catalog_topics = {settings.topic(spec.name) for spec in CATALOG}
    admin = AIOKafkaAdminClient(**settings.client_args(), request_timeout_ms=5000)
    consumer = AIOKafkaConsumer(**settings.client_args(), enable_auto_commit=False)
    async with asyncio.timeout(timeout):
        await admin.start()
        try:
            await consumer.start()
            groups = await describe_groups(admin, [s.group for s in status.services])
            by_group = {g.group: g for g in groups}
            for svc in status.services:
                group = by_group.get(svc.group)
                if group is None:
                    continue
                svc.instances = group.members
                svc.lag, svc.topics = await _lag(admin, consumer, group, catalog_topics)
            view = await RegistryView.load(settings)
            live = view.live()
            status.active_agents = len(live)
            status.agents_by_specialty = dict(Counter(a.specialty for a in live))
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await admin.close()


def collect_status(
    settings: KafkaSettings,
    services: Iterable[tuple[str, bool]],
    *,
    supervisor: dict[str, Any] | None = None,
    timeout: float = 15.0,
) -> PlatformStatus:
    """Status of ``services`` (name, installed) on the broker of ``settings``."""
    local = {c["name"]: c for c in (supervisor or {}).get("children", [])}
    status = PlatformStatus(
        bootstrap=settings.bootstrap,
        broker_answers=kafka_answers(settings.bootstrap, timeout=3.0),
        supervisor_pid=(supervisor or {}).get("pid"),
        llm_url=(supervisor or {}).get("llm_url"),
    )
    for name, installed in services:
        child = local.get(name, {})
        status.services.append(
            ServiceStatus(
                name=name,
                installed=installed,
                group=group_id(settings, name),
                pid=child.get("pid"),
                restarts=int(child.get("restarts", 0)),
            )
        )
    if status.broker_answers:
        asyncio.run(_fill_from_kafka(settings, status, timeout))
    _fill_http(status)
    return status


def _answers(url: str, timeout: float = 1.0) -> bool:
    """Whether the instance behind ``url`` (``http://host:port/v1``) says it is healthy."""
    health = url.rstrip("/").removesuffix("/v1") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:  # noqa: S310
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def _fill_http(status: PlatformStatus) -> None:
    # The gateway joins no consumer group: its instances are the URLs that answer.
    for svc in status.services:
        if svc.name != "gateway":
            continue
        svc.urls = [u for u in announced_urls(svc.name) if _answers(u)]
        svc.instances = len(svc.urls)
        status.gateway_urls = svc.urls


async def _await_members(settings: KafkaSettings, groups: list[str], timeout: float) -> list[str]:
    admin = AIOKafkaAdminClient(**settings.client_args(), request_timeout_ms=5000)
    await admin.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                members = {g.group: g.members for g in await describe_groups(admin, groups)}
            except KafkaError as exc:
                # A new broker has no group coordinator until its offsets topic exists.
                if not exc.retriable or loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.25)
                continue
            missing = [g for g in groups if not members.get(g)]
            if not missing or loop.time() >= deadline:
                return missing
            await asyncio.sleep(0.25)
    finally:
        await admin.close()


def wait_until_joined(
    settings: KafkaSettings, services: Iterable[str], timeout: float = 60.0
) -> list[str]:
    """Wait until every service has a member in its group; returns those that did not join."""
    by_group = {group_id(settings, name): name for name in services}
    missing = asyncio.run(_await_members(settings, list(by_group), timeout))
    return [by_group[g] for g in missing]
