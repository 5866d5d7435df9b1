"""Shares of what the platform bounds: table entries per goal, requests in flight per key.

A table of runs, answers or patterns with one cap for all goals lets one tenant's flood
push every other tenant's entries out (invariant 6: tenants stay apart). Such a table
evicts instead within the goal that goes over its own cap, and at the table's overall cap
from the goal holding the most, so a goal holding less than the largest never loses an
entry to another's traffic. :class:`PerGoal` is such a table, on the count of entries and
optionally on their weight (bytes); :class:`Tally` keeps the counts, and the goal holding
the most, for tables that order and evict their entries themselves.

An HTTP server's in-flight bound is the same idea for requests: :class:`Slots`, at most
so many at once and one API key at most its share of them.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

__all__ = ["KeyShareFull", "Largest", "PerGoal", "Slots", "SlotsFull", "Tally"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
G = TypeVar("G", bound=Hashable)


class Tally(Generic[G]):
    """Entries per group, and the group holding the most, each in O(1)."""

    def __init__(self) -> None:
        self._counts: dict[G, int] = {}
        self._by_count: dict[int, dict[G, None]] = {}  # count -> groups holding that many
        self._top = 0
        self.total = 0

    def __len__(self) -> int:
        """How many groups hold at least one entry."""
        return len(self._counts)

    def count(self, group: G) -> int:
        return self._counts.get(group, 0)

    def add(self, group: G) -> None:
        count = self._counts.get(group, 0)
        self._move(group, count, count + 1)

    def remove(self, group: G) -> None:
        self._move(group, self._counts[group], self._counts[group] - 1)

    def largest(self) -> G:
        """A group holding the most entries (of those, the first to reach that many)."""
        return next(iter(self._by_count[self._top]))

    def _move(self, group: G, old: int, new: int) -> None:
        if old:
            bucket = self._by_count[old]
            del bucket[group]
            if not bucket:
                del self._by_count[old]
        if new:
            self._by_count.setdefault(new, {})[group] = None
            self._counts[group] = new
        else:
            del self._counts[group]
        self.total += new - old
        if new > self._top:
            self._top = new
        elif old == self._top and old not in self._by_count:
            # The one group at the top went down by one: it is still the largest.
            self._top = new


class Largest:
    """The goal with the largest value (of those, the least by name but the one just put
    for), in O(log goals) per change.

    :class:`PerGoal` counts with it as well as weighs: a weight moves by any amount, which
    :class:`Tally` cannot follow, and a tie on the count goes to the least name, not (as
    in a :class:`Tally`) to the goal that reached the count first.

    A lazy max-heap: each goal has an entry at least its value (its ceiling); a value
    above its ceiling pushes a new entry, a fall pushes nothing, and the top is checked
    (and pushed again at its value) when asked for.
    """

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self._ceiling: dict[str, int] = {}  # goal -> its largest entry in the heap
        self._heap: list[tuple[int, str]] = []

    def set(self, goal: str, value: int) -> None:
        if value <= 0:
            self.values.pop(goal, None)
            return
        self.values[goal] = value
        if value > self._ceiling.get(goal, 0):
            self._push(goal, value)
            if len(self._heap) > 2 * len(self.values) + 64:
                self._heap = [(-v, g) for g, v in self.values.items()]
                self._ceiling = dict(self.values)
                heapq.heapify(self._heap)

    def top(self, avoid: str | None = None) -> str | None:
        """The goal with the largest value; of several, the least by name other than
        ``avoid`` (the goal an entry was just put for: a full table of goals holding one
        entry each must not push out the entry just put)."""
        best = self._valid_top()
        if best is None or best != avoid:
            return best
        value, held = self.values[best], []
        try:
            while self._heap:  # the rest of the tie, in name order (stale entries skipped)
                entry = heapq.heappop(self._heap)
                held.append(entry)
                if -entry[0] < value:
                    break
                if entry[1] != avoid and self.values.get(entry[1]) == value:
                    return entry[1]
            return best
        finally:
            for entry in held:
                heapq.heappush(self._heap, entry)

    def _valid_top(self) -> str | None:
        while self._heap:
            value, goal = self._heap[0]
            current = self.values.get(goal, 0)
            if -value == current:
                return goal
            heapq.heappop(self._heap)
            if self._ceiling.get(goal) == -value:  # its largest entry: replace it
                del self._ceiling[goal]
                if current > 0:
                    self._push(goal, current)
        return None

    def _push(self, goal: str, value: int) -> None:
        heapq.heappush(self._heap, (-value, goal))
        self._ceiling[goal] = value


class PerGoal(Generic[K, V]):
    """``(goal, key) -> value``, oldest first within each goal, under per-goal and total caps.

    ``per_goal`` and ``total`` bound the number of entries; ``per_goal_weight`` and
    ``total_weight`` (when set) the sum of the weights :meth:`put` is given. An entry whose
    weight alone is over a weight cap is not kept. :meth:`put` returns what it pushed out.
    """

    def __init__(
        self,
        per_goal: int,
        total: int,
        *,
        per_goal_weight: int | None = None,
        total_weight: int | None = None,
    ) -> None:
        self.per_goal, self.total = max(1, per_goal), max(1, total)
        self.per_goal_weight, self.total_weight = per_goal_weight, total_weight
        self._goals: dict[str, OrderedDict[K, tuple[V, int]]] = {}
        self._counts = Largest()
        self._weights = Largest()
        self._count = 0
        self._weight = 0
        self._weighed = per_goal_weight is not None or total_weight is not None

    def __len__(self) -> int:
        return self._count

    @property
    def weight(self) -> int:
        return self._weight

    def count_of(self, goal: str) -> int:
        return len(self._goals.get(goal, ()))

    def get(self, goal: str, key: K) -> V | None:
        entries = self._goals.get(goal)
        found = entries.get(key) if entries is not None else None
        return found[0] if found is not None else None

    def items(self) -> Iterator[tuple[str, K, V]]:
        """Every entry, goal by goal, oldest first."""
        for goal, entries in self._goals.items():
            for key, (value, _) in entries.items():
                yield goal, key, value

    def keys_of(self, goal: str) -> list[K]:
        return list(self._goals.get(goal, ()))

    def pop(self, goal: str, key: K) -> V | None:
        entries = self._goals.get(goal)
        if entries is None or key not in entries:
            return None
        value, weight = entries.pop(key)
        self._forget(goal, entries, weight)
        return value

    def put(self, goal: str, key: K, value: V, weight: int = 1) -> list[tuple[str, K, V]]:
        """Keep ``value`` as the goal's newest entry; returns the entries pushed out (the
        new one itself when its weight alone is over a cap)."""
        self.pop(goal, key)
        if self._weighed and weight > min(
            self.per_goal_weight or weight, self.total_weight or weight
        ):
            return [(goal, key, value)]
        entries = self._goals.setdefault(goal, OrderedDict())
        entries[key] = (value, weight)
        self._count += 1
        self._weight += weight
        self._counts.set(goal, len(entries))
        if self._weighed:
            self._weights.set(goal, self._weights.values.get(goal, 0) + weight)
        out: list[tuple[str, K, V]] = []
        while len(entries) > self.per_goal or (
            self.per_goal_weight is not None
            and self._weights.values.get(goal, 0) > self.per_goal_weight
        ):
            out.append(self._pop_oldest(goal))
        while self._count > self.total:
            out.append(self._pop_oldest(self._counts.top(avoid=goal)))
        while self.total_weight is not None and self._weight > self.total_weight:
            out.append(self._pop_oldest(self._weights.top(avoid=goal)))
        return out

    def _pop_oldest(self, goal: str | None) -> tuple[str, K, V]:
        assert goal is not None  # the table is over a cap, so some goal holds entries
        entries = self._goals[goal]
        key, (value, weight) = entries.popitem(last=False)
        self._forget(goal, entries, weight)
        return goal, key, value

    def _forget(self, goal: str, entries: OrderedDict[K, tuple[V, int]], weight: int) -> None:
        self._count -= 1
        self._weight -= weight
        self._counts.set(goal, len(entries))
        if self._weighed:
            self._weights.set(goal, self._weights.values.get(goal, 0) - weight)
        if not entries:
            del self._goals[goal]


class SlotsFull(Exception):
    """Every slot is taken."""


class KeyShareFull(Exception):
    """The key holds its share of the slots already."""

    def __init__(self, held: int) -> None:
        super().__init__(f"{held} held")
        self.held = held


class Slots:
    """At most ``limit`` things at once, and at most ``per_key`` of them for one key."""

    def __init__(self, limit: int, per_key: int) -> None:
        self.limit = max(1, limit)
        self.per_key = max(1, min(per_key, self.limit))
        self.in_use = 0
        self.held: dict[str, int] = {}  # key -> slots it holds; no entry at zero

    def take(self, key: str) -> None:
        """One slot for ``key``, until :meth:`give`; raises :class:`SlotsFull` or
        :class:`KeyShareFull` (taking nothing) when there is none for it."""
        if self.in_use >= self.limit:
            raise SlotsFull(f"{self.in_use} in use")
        held = self.held.get(key, 0)
        if held >= self.per_key:
            raise KeyShareFull(held)
        self.in_use += 1
        self.held[key] = held + 1

    def give(self, key: str) -> None:
        """Give back a slot ``key`` took."""
        self.in_use -= 1
        left = self.held[key] - 1
        if left:
            self.held[key] = left
        else:
            del self.held[key]

    @contextmanager
    def taken(self, key: str) -> Iterator[None]:
        """One slot for ``key`` while the block runs (:meth:`take`, then :meth:`give`)."""
        self.take(key)
        try:
            yield
        finally:
            self.give(key)
