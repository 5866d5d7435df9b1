"""Active agent instances: built lazily from the registry, at most N per loader, LRU eviction.

No I/O here: the pool returns what happened (loaded, evicted, retired) and the
service turns that into events. Time comes from the clock passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime

from streams.admission import context_messages
from streams.registry import AgentRecord

__all__ = ["AgentInstance", "AgentPool", "PoolChange"]


@dataclass
class AgentInstance:
    """A loaded agent: its config plus what it needs at run time."""

    record: AgentRecord
    loaded_at: datetime
    last_used: datetime
    calls: int = 0

    def messages(
        self, message: str, context: dict[str, str], system_prompt: str | None = None
    ) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": system_prompt or self.record.system_prompt},
            *context_messages(context),
            {"role": "user", "content": message},
        ]


@dataclass
class PoolChange:
    loaded: AgentInstance | None = None
    evicted: list[AgentInstance] = field(default_factory=list)


class AgentPool:
    """An LRU of agent instances keyed by agent_id."""

    def __init__(self, capacity: int = 50) -> None:
        if capacity < 1:
            raise ValueError("loader capacity must be at least 1")
        self.capacity = capacity
        self._active: OrderedDict[str, AgentInstance] = OrderedDict()
        self.last_used: dict[str, datetime] = {}

    def __len__(self) -> int:
        return len(self._active)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._active

    def active_ids(self) -> list[str]:
        """Least recently used first."""
        return list(self._active)

    def acquire(self, record: AgentRecord, now: datetime) -> tuple[AgentInstance, PoolChange]:
        change = PoolChange()
        inst = self._active.get(record.agent_id)
        if inst is not None and inst.record.version < record.version:
            inst.record = record  # a newer config (an improvement) takes effect on next use
        if inst is None:
            inst = AgentInstance(record, loaded_at=now, last_used=now)
            self._active[record.agent_id] = inst
            change.loaded = inst
            while len(self._active) > self.capacity:
                _, old = self._active.popitem(last=False)
                change.evicted.append(old)
        self._active.move_to_end(record.agent_id)
        inst.last_used = now
        inst.calls += 1
        self.last_used[record.agent_id] = now
        return inst, change

    def drop(self, agent_id: str) -> AgentInstance | None:
        return self._active.pop(agent_id, None)

    def idle(
        self, records: list[AgentRecord], now: datetime, idle_seconds: float
    ) -> list[tuple[AgentRecord, float]]:
        """Agents not used (or, if never used, not spawned) for ``idle_seconds``.

        A spawn stamped ahead of ``now`` counts as idle for as long as it is ahead: one
        stamped in year 8999 (a valid event) was never idle, so it held a place under its
        goal's max_agents for good.
        """
        out = []
        for record in records:
            since = self.last_used.get(record.agent_id, record.spawned_at)
            idle = abs((now - since).total_seconds())
            if idle >= idle_seconds:
                out.append((record, idle))
        return out
