"""Shares of a bounded table: how many entries each group (goal, API key) holds, in O(1).

The improvement service's tables are shared by every goal; a table that evicts its oldest
entry lets one goal's flood push every other goal out. Each such table evicts instead
within the goal that overflows its own quota, and at the table's overall cap from the goal
that holds the most (:meth:`Tally.largest`), so a goal holding less than the largest is
never evicted by another's traffic. The HTTP endpoint's in-flight bound is the same idea
for requests: :class:`Slots`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

__all__ = ["KeyShareFull", "Slots", "SlotsFull", "Tally"]

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

    @contextmanager
    def taken(self, key: str) -> Iterator[None]:
        """One slot for ``key`` while the block runs; raises :class:`SlotsFull` or
        :class:`KeyShareFull` (before taking anything) when there is none for it."""
        if self.in_use >= self.limit:
            raise SlotsFull(f"{self.in_use} in use")
        held = self.held.get(key, 0)
        if held >= self.per_key:
            raise KeyShareFull(held)
        self.in_use += 1
        self.held[key] = held + 1
        try:
            yield
        finally:
            self.in_use -= 1
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]
