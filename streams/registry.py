"""The agent registry view every instance builds from ``agent_spawned`` and ``agent_retired``.

The spawner owns the registry; everyone else (router, loader, CLI) folds the
registry's events into this view, read outside any consumer group.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.codec import default_codec
from streams.errors import DecodeError
from streams.events import AgentRetired, AgentSpawned, Event
from streams.kafka import KafkaSettings

__all__ = ["AgentRecord", "RegistryView", "read_topics_to_end"]

REGISTRY_TOPICS = (AgentSpawned.topic, AgentRetired.topic)


@dataclass
class AgentRecord:
    """An agent's configuration as the registry holds it."""

    agent_id: str
    goal_id: str
    specialty: str
    system_prompt: str
    temperature: float
    tools: list[str]
    model: str
    prompt_source: str
    version: int
    spawned_at: datetime
    retired: bool = False

    @classmethod
    def from_event(cls, e: AgentSpawned) -> AgentRecord:
        return cls(
            agent_id=e.agent_id,
            goal_id=e.goal_id or "",
            specialty=e.specialty,
            system_prompt=e.system_prompt,
            temperature=e.temperature,
            tools=list(e.tools),
            model=e.model,
            prompt_source=e.prompt_source,
            version=e.version,
            spawned_at=e.occurred_at,
        )


_FIELDS = fields(AgentRecord)
_RETIRED_FIRST = 10_000  # retirements kept for agents not read yet, the oldest forgotten


@dataclass
class RegistryView:
    """Agents by id, and by goal: a request's choice looks at its goal's agents only, so it
    costs the same with ten goals as with ten thousand (a scan of every agent ever spawned
    took 25 ms a request at 50,000)."""

    agents: dict[str, AgentRecord] = field(default_factory=dict)
    _by_goal: dict[str, dict[str, AgentRecord]] = field(default_factory=dict, repr=False)
    # Agents retired before their spawn was read (two topics read side by side, and the
    # spawner sends both at once for an agent announced too late): applied when it comes.
    _retired_first: OrderedDict[str, None] = field(default_factory=OrderedDict, repr=False)

    def _index(self, record: AgentRecord) -> None:
        self.agents[record.agent_id] = record
        self._by_goal.setdefault(record.goal_id, {})[record.agent_id] = record

    def apply(self, event: Event) -> AgentRecord | None:
        """Fold one registry event in; returns the record it touched."""
        if isinstance(event, AgentSpawned):
            known = self.agents.get(event.agent_id)
            if known is not None and known.version > event.version:
                return known  # an older config arriving late never overrides a newer one
            record = AgentRecord.from_event(event)
            if known is not None:
                record.retired = known.retired
                if known.goal_id != record.goal_id:  # a later config of another goal wins
                    self._by_goal.get(known.goal_id, {}).pop(known.agent_id, None)
            elif event.agent_id in self._retired_first:
                del self._retired_first[event.agent_id]
                record.retired = True
            self._index(record)
            return record
        if isinstance(event, AgentRetired):
            found = self.agents.get(event.agent_id)
            if found is not None:
                found.retired = True
            else:
                self._retired_first[event.agent_id] = None
                while len(self._retired_first) > _RETIRED_FIRST:
                    self._retired_first.popitem(last=False)
            return found
        return None

    def _of(self, goal_id: str | None) -> Iterable[AgentRecord]:
        return self.agents.values() if goal_id is None else self._by_goal.get(goal_id, {}).values()

    def live(self, goal_id: str | None = None, specialty: str | None = None) -> list[AgentRecord]:
        return [
            a
            for a in self._of(goal_id)
            if not a.retired and (specialty is None or a.specialty == specialty)
        ]

    def retired(self, goal_id: str, specialty: str) -> list[AgentRecord]:
        """Retired agents of a goal and specialty: configs whose instances were unloaded.

        Retirement frees the loader's memory, not the agent: a request that finds
        no live agent of its specialty revives one of these (the loader rebuilds
        it from the registry) instead of spawning, so the goal's agent count
        (``max_agents``) and the agent's improvements stay as they were.
        """
        return [a for a in self._of(goal_id) if a.retired and a.specialty == specialty]

    def get(self, agent_id: str) -> AgentRecord | None:
        return self.agents.get(agent_id)

    def dump(self) -> list[list[Any]]:
        """Every record as plain values, copied (for a snapshot)."""
        return [
            [list(v) if isinstance(v, list) else v for v in (getattr(a, f.name) for f in _FIELDS)]
            for a in self.agents.values()
        ]

    def restore(self, rows: list[list[Any]], retired_first: Iterable[str] = ()) -> None:
        """Replace every record with those of a :meth:`dump` (and :meth:`retired_first`)."""
        self.agents, self._by_goal = {}, {}
        for row in rows:
            self._index(AgentRecord(*row))
        self._retired_first = OrderedDict.fromkeys(str(a) for a in retired_first)

    def retired_first(self) -> list[str]:
        """Agents whose retirement was read before their spawn (for a snapshot)."""
        return list(self._retired_first)

    @classmethod
    async def load(cls, settings: KafkaSettings) -> RegistryView:
        view = cls()
        for event in await read_topics_to_end(settings, REGISTRY_TOPICS):
            view.apply(event)
        return view


async def read_topics_to_end(
    settings: KafkaSettings, topics: Iterable[str], *, timeout: float = 30.0
) -> list[Event]:
    """Every decodable event now in ``topics``, read from the beginning, outside any group."""
    codec = default_codec()
    consumer = AIOKafkaConsumer(
        **settings.client_args(), enable_auto_commit=False, fetch_max_wait_ms=50
    )
    await consumer.start()
    out: list[Event] = []
    try:
        parts: list[TopicPartition] = []
        for name in topics:
            physical = settings.topic(name)
            found = consumer.partitions_for_topic(physical)
            if not found:
                await consumer._client.force_metadata_update()  # noqa: SLF001
                found = consumer.partitions_for_topic(physical) or set()
            parts.extend(TopicPartition(physical, p) for p in sorted(found))
        if not parts:
            return out
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        remaining = {tp for tp in parts if ends[tp] > 0}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while remaining and loop.time() < deadline:
            batch = await consumer.getmany(*remaining, timeout_ms=200)
            for tp, records in batch.items():
                for r in records:
                    try:
                        out.append(codec.decode(r.value, topic=settings.logical(tp.topic)))
                    except DecodeError:
                        continue  # the owning service dead-letters it; a view skips it
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()
