"""A view: topics read outside any consumer group, folded into state the reader owns.

Services keep views of what other services publish (the agent registry, API keys, ended
runs, learned knowledge). Each one has the same needs, met here once:

- read every partition from the start, or from ``since`` (a time: older records are
  skipped by offset lookup, not read), or from offsets ``resume`` gives per partition
  (a snapshot's, see :mod:`streams.snapshots`);
- fold each event into ``apply``; an event ``apply`` fails on is logged and skipped, so one
  odd record cannot stop the view;
- ``ready`` is set once what was on the topics when the view started has been folded, so a
  service never serves from a partial view;
- :meth:`TopicView.sync` waits until what is on the topics *now* has been folded (a key
  created a moment before its first use), :meth:`TopicView.wait_for` until a condition on
  the folded state holds. Both wake when the view advances, not on a sleep loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from aiokafka import TopicPartition

from streams.events import Event
from streams.kafka import AsyncLifecycle, EventConsumer, KafkaSettings

__all__ = ["Bounds", "TopicView"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# Each partition's first and next offset on the broker when the view starts.
Bounds = Mapping[TopicPartition, tuple[int, int]]


class TopicView(AsyncLifecycle):
    """``topics`` folded into ``apply`` for as long as the view runs."""

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Iterable[str],
        apply: Callable[[Event], None],
        *,
        source: str,
        since: Callable[[], datetime] | None = None,
        resume: Callable[[Bounds], Awaitable[Mapping[TopicPartition, int]]] | None = None,
        poll_ms: int = 500,
        **consumer_options: Any,
    ) -> None:
        self.settings = settings
        self.topics = tuple(topics)
        self._apply = apply
        self._since = since
        self._resume = resume
        self._poll_ms = poll_ms
        self.consumer = EventConsumer(
            settings, self.topics, group_id=None, source=source, **consumer_options
        )
        self.ready = asyncio.Event()
        self._applied: dict[TopicPartition, int] = {}
        self._started_at: dict[TopicPartition, int] = {}
        self.folded = 0  # records read since start, decodable or not
        self._busy = False
        self._advanced = asyncio.Event()  # pulsed after every poll
        self._changed = asyncio.Event()  # pulsed after a poll that folded records
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def start(self) -> None:
        await self.consumer.start()
        raw = self.consumer.raw
        parts = list(raw.assignment())
        ends = await raw.end_offsets(parts)
        if self._since is not None:
            since_ms = int(self._since().timestamp() * 1000)
            found = await raw.offsets_for_times(dict.fromkeys(parts, since_ms))
            for tp in parts:
                at = found.get(tp)
                raw.seek(tp, at.offset if at is not None else ends[tp])
        else:
            firsts = await raw.beginning_offsets(parts)
            self._started_at = dict(firsts)
            if self._resume is not None:
                offsets = await self._resume({tp: (firsts[tp], ends[tp]) for tp in parts})
                for tp, offset in offsets.items():
                    if tp in ends:
                        raw.seek(tp, offset)
                        self._started_at[tp] = offset
        self._task = asyncio.create_task(self._run(ends), name=f"view-{self.topics[0]}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def wait(self) -> None:
        """Until the view stops (it runs forever unless reading fails): for a task group."""
        assert self._task is not None, "start() first"
        await self._task

    # -- folding --------------------------------------------------------------
    async def _run(self, start_ends: dict[TopicPartition, int]) -> None:
        raw = self.consumer.raw
        try:
            while True:
                if not self.ready.is_set() and await self._reached(start_ends):
                    self.ready.set()
                fetched = await raw.getmany(timeout_ms=self._poll_ms, max_records=1000)
                self._busy = True
                try:
                    for tp, records in fetched.items():
                        for record in records:
                            # An undecodable record is dead-lettered by decode() and still
                            # counts as read: sync() never waits for what it cannot fold.
                            delivery = await self.consumer.decode(record)
                            if delivery is not None:
                                try:
                                    self._apply(delivery.event)
                                except Exception:
                                    log.exception("view failed on %s@%s", tp, record.offset)
                            self._applied[tp] = record.offset + 1
                            self.folded += 1
                finally:
                    self._busy = False
                self._pulse(changed=bool(fetched))
        except BaseException as exc:
            self._failure = exc
            self._pulse(changed=True)
            raise

    def _pulse(self, *, changed: bool) -> None:
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()
        if changed:
            news, self._changed = self._changed, asyncio.Event()
            news.set()

    def positions(self) -> dict[TopicPartition, int]:
        """Per partition, the offset of the next record to fold: what the state holds is
        exactly the records below it (``apply`` runs between awaits, so this pairs with the
        state at any moment the caller holds the loop)."""
        out = dict.fromkeys(self.consumer.raw.assignment(), 0)
        out.update(self._started_at)
        out.update(self._applied)
        return out

    async def _reached(self, ends: dict[TopicPartition, int]) -> bool:
        raw = self.consumer.raw
        for tp, end in ends.items():
            # The position also passes offsets that hold no record (compaction, markers).
            if self._applied.get(tp, 0) < end and (self._busy or await raw.position(tp) < end):
                return False
        return True

    # -- waiting ----------------------------------------------------------------
    async def _until(self, done: Callable[[], object], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            advanced = self._advanced  # taken before the check: no wake-up is missed
            if await _maybe_await(done()):
                return True
            if self._failure is not None:
                raise RuntimeError(f"the view of {self.topics} stopped") from self._failure
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(advanced.wait(), left)

    async def sync(self, topics: Iterable[str] | None = None, timeout: float = 10.0) -> bool:
        """Wait until every record now on ``topics`` (default: all of the view's) is folded;
        False when ``timeout`` passed first."""
        raw = self.consumer.raw
        wanted = {self.settings.topic(t) for t in (topics or self.topics)}
        ends = await raw.end_offsets([tp for tp in raw.assignment() if tp.topic in wanted])
        return await self._until(lambda: self._reached(ends), timeout)

    async def wait_for(self, value: Callable[[], T | None], timeout: float) -> T | None:
        """``value()`` once it is not None (checked each time the view advances), or None
        after ``timeout``."""
        found: list[T] = []

        def check() -> bool:
            got = value()
            if got is not None:
                found.append(got)
            return got is not None

        await self._until(check, timeout)
        return found[0] if found else None

    async def changed(self, timeout: float) -> bool:
        """Wait until the view folds new records; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        except TimeoutError:
            return False


async def _maybe_await(value: object) -> bool:
    if asyncio.iscoroutine(value):
        return bool(await value)
    return bool(value)
