"""Snapshots of a view's folded state, so a restart folds only the tail of the log.

A service that folds topics into state (the router's knowledge, the improvement service's
view) saves that state now and then to its own compacted snapshot topic, with the offset of
every partition it covers. At start :class:`Snapshotter` restores the newest complete
snapshot and starts the :class:`~streams.views.TopicView` at those offsets: a restart costs
the snapshot's size plus the tail, not the whole history. A snapshot of an older state
version is read when the service gives the way from it to its own (``upgrades``). It folds
everything instead, with a warning, when a snapshot is of another state version, a chunk
is missing or corrupt, or the topics no longer hold the records right after it
(retention); with none, quietly.

On the topic (one partition, compacted): the state, cut into chunks of at most
``CHUNK_BYTES`` (the broker takes 1 MB a record by default), then a manifest (JSON) naming
the chunks' offsets and their SHA-256, the state version and the offsets covered. The state
is plain values (lists, tuples, dicts, sets, strings, numbers, dates and datetimes) as a
zlib-compressed pickle, read by an unpickler that refuses every other class, so a snapshot
can build nothing but those values, as inert as JSON; it is 5-10 times faster than JSON
both ways on our states (tuples and datetimes need no conversion in the service's loop).
Keys are unique per snapshot; once its manifest is written, the writer tombstones older
snapshots, so compaction keeps about one: the first save after a start reads the topic's
keys and tombstones every other snapshot all of whose records precede the new one's (what
a writer killed mid-way left, and the snapshot before its last), later saves the writer's
own previous one. Any instance may write: all fold the same records, and a reader takes
the newest usable snapshot; a manifest of another shape, a state too large to inflate
(``MAX_STATE_BYTES``) or one that does not decode or restore is skipped for the one before
it. Only the service's own principal should be allowed to write its snapshot topic, as for
its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import pickle
import time
import uuid
import zlib
from collections.abc import AsyncGenerator, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streams.config import data_root
from streams.kafka import KafkaSettings
from streams.procs import process_start, still_running
from streams.topics import create_state_topics, snapshot_topic
from streams.views import Bounds, TopicView

__all__ = ["CHUNK_BYTES", "MAX_STATE_BYTES", "Snapshot", "SnapshotStore", "Snapshotter"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 1024
_MAGIC = b"OSN1"
_LOOK_BACK = 256  # records read back from the end per step when looking for a manifest
# A state larger than this, compressed or not, is not read: a few chunks of zeros would
# inflate to gigabytes (the largest states we write are ~11 MB compressed).
MAX_STATE_BYTES = 1 << 30
_SWEEP_S = 60.0  # at most this long reading the topic's keys (then the next save tries)
# Chunks with no manifest this long after their last record: a writer killed mid-way left
# them (a save takes seconds), not one still writing.
_ABANDONED_S = 600.0


class SnapshotUnusable(Exception):
    """A snapshot found on the topic that cannot be restored (the message says why)."""


@dataclass(frozen=True)
class Snapshot:
    """A restored snapshot: the state as saved and the offsets (next to read) it covers."""

    snapshot_id: str
    version: int  # the state version it was saved as
    offsets: dict[TopicPartition, int]
    state: Any
    size: int  # compressed bytes on the topic


def _pack(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _MAGIC + len(head).to_bytes(4, "big") + head + body


def _unpack(value: bytes) -> tuple[dict[str, Any], bytes]:
    if value[:4] != _MAGIC:
        raise SnapshotUnusable("not a snapshot record")
    size = int.from_bytes(value[4:8], "big")
    header = json.loads(value[8 : 8 + size])
    if not isinstance(header, dict):
        raise SnapshotUnusable("a snapshot record's header is not an object")
    return header, value[8 + size :]


_PLAIN_CLASSES = {("datetime", n) for n in ("date", "datetime", "timedelta", "timezone")}


class _PlainUnpickler(pickle.Unpickler):
    """Builds containers, numbers, strings, dates and datetimes; any other class is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a snapshot may not hold {module}.{name}")


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Without the cycle collector: building or copying millions of small objects would run
    it over the whole heap again and again (a restore took 2-3 times as long)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def encode_state(state: Any) -> bytes:
    """A state of plain values as snapshot bytes."""
    return zlib.compress(pickle.dumps(state, protocol=5), 1)


def decode_state(blob: bytes) -> Any:
    """What :func:`encode_state` wrote; ``UnpicklingError`` for anything else,
    ``SnapshotUnusable`` for a state over :data:`MAX_STATE_BYTES`."""
    limit = MAX_STATE_BYTES
    inflate = zlib.decompressobj()
    raw = inflate.decompress(blob, limit + 1)
    if len(raw) > limit:
        raise SnapshotUnusable(f"the state inflates past {limit} bytes")
    if not inflate.eof:
        raise SnapshotUnusable("the state is truncated")
    with _no_gc():
        return _PlainUnpickler(io.BytesIO(raw)).load()


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_partition(value: object) -> bool:
    return _is_count(value) or (
        isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10
    )


def _check_manifest(manifest: dict[str, Any]) -> None:
    """Raise ``SnapshotUnusable`` unless ``manifest`` has the shape
    :meth:`SnapshotStore.save` writes: a later release's or a hand-written one may not."""
    chunks, offsets = manifest.get("chunks"), manifest.get("offsets")
    if not isinstance(manifest.get("id"), str):
        raise SnapshotUnusable("the manifest has no id")
    if type(manifest.get("version")) is not int:
        raise SnapshotUnusable("the manifest has no state version")
    if not isinstance(manifest.get("sha256"), str):
        raise SnapshotUnusable("the manifest has no checksum")
    if not (
        isinstance(chunks, list) and all(map(_is_count, chunks)) and len(set(chunks)) == len(chunks)
    ):
        raise SnapshotUnusable("the manifest's chunks are not offsets")
    if not (
        isinstance(offsets, dict)
        and all(
            isinstance(topic, str)
            and isinstance(by_partition, dict)
            and all(_is_partition(p) and _is_count(o) for p, o in by_partition.items())
            for topic, by_partition in offsets.items()
        )
    ):
        raise SnapshotUnusable("the manifest's offsets are not offsets by topic and partition")


def _snapshot_of(key: str) -> str:
    """The snapshot a record's key belongs to (``manifest:<id>``, ``<id>:<chunk>``)."""
    if key.startswith("manifest:"):
        return key.removeprefix("manifest:")
    return key.rpartition(":")[0] or key


def _stale_keys(
    last: Mapping[str, tuple[int, bool, int]],
    before: int,
    keep: Collection[str],
    now_ms: int,
    newer: Collection[str] = (),
) -> list[str]:
    """Of ``last`` (each key's latest record below a manifest just written: its offset,
    whether it holds a value, its timestamp in ms), the keys to tombstone: those holding a
    value, not of the snapshot written (``keep``), of a snapshot with no value at or after
    ``before`` (the written snapshot's first record). Another instance's snapshot with a
    record past that is left: it may be one being written now, newer than ours; so are the
    chunks of a snapshot with no manifest yet whose last record is less than
    :data:`_ABANDONED_S` old (one being written whose chunks all came before ours), which
    only a writer killed mid-way leaves for longer. Two writers never tombstone each other:
    each would need all of the other's records to come before its own first. Nor is a
    snapshot of a newer state version (``newer``, by id) dropped: during a rolling upgrade
    an instance of the older release saving its own once deleted the new release's, whose
    next start then folded what retention had left of the log."""
    newest: dict[str, int] = {}
    latest_ms: dict[str, int] = {}
    manifests = {
        _snapshot_of(k) for k, (_, held, _) in last.items() if held and k.startswith("manifest:")
    }
    for key, (offset, held, stamp) in last.items():
        if held:
            snapshot = _snapshot_of(key)
            newest[snapshot] = max(newest.get(snapshot, offset), offset)
            latest_ms[snapshot] = max(latest_ms.get(snapshot, stamp), stamp)
    abandoned_before = now_ms - int(_ABANDONED_S * 1000)
    return [
        key
        for key, (_, held, _) in last.items()
        if held
        and key not in keep
        and (snapshot := _snapshot_of(key)) not in newer
        and newest[snapshot] < before
        and (snapshot in manifests or latest_ms[snapshot] < abandoned_before)
    ]


def _newer(key: str, value: bytes, version: int) -> bool:
    """Whether the record is a manifest of a state version newer than ``version`` (one that
    cannot be read says nothing of its version: it is not kept for it)."""
    if not key.startswith("manifest:"):
        return False
    try:
        found = _unpack(value)[0].get("version")
    except (SnapshotUnusable, ValueError):
        return False
    return isinstance(found, int) and found > version


def _mark(marker: Path) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        marker.write_text(f"{pid}\n{process_start(pid)}\n")
    except OSError:  # nowhere to mark: restored all the same, unguarded
        log.warning("cannot mark a restore at %s", marker, exc_info=True)


def _killed_restoring(marker: Path) -> bool:
    """Whether ``marker`` (a restore's: the process id and its start time) was left by a
    process that is gone: that process died decoding or restoring the snapshot. Our own
    pid in it is another process's (we have marked nothing yet): in a container every
    start is pid 1."""
    try:
        pid_line, started, *_ = [*marker.read_text().split("\n"), "", ""]
        pid = int(pid_line.strip() or "0")
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # there, and unreadable: not one a live restore is writing
    return pid == os.getpid() or not still_running(pid, started.strip())


class SnapshotStore:
    """The snapshot topic of one service: write a snapshot, find the newest complete one.

    A snapshot being decoded and restored is marked by a file in ``marker_dir`` (default
    ``<ORCH_DATA_DIR>/run/snapshots``) holding the process id, removed once it is done
    with. A start that finds a snapshot's mark left by a process that is gone skips that
    snapshot: a state whose decoding takes all memory (a pickle of a few MB can build
    gigabytes of objects) or a restore that kills the process once killed every start
    the same way."""

    def __init__(
        self,
        settings: KafkaSettings,
        service: str,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        marker_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.topic = settings.topic(snapshot_topic(service))
        self.chunk_bytes = chunk_bytes
        self.marker_dir = marker_dir
        self._producer: AIOKafkaProducer | None = None
        self._previous: list[str] = []  # keys of the snapshot this store wrote last
        self._swept = False  # the topic read for what earlier writers left, since start
        self._created = False

    async def _ensure_topic(self) -> None:
        if not self._created:
            await create_state_topics(self.settings.bootstrap, prefix=self.settings.prefix)
            self._created = True

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def save(self, blob: bytes, offsets: Mapping[TopicPartition, int], version: int) -> str:
        """Write ``blob`` (an encoded state) as the newest snapshot; returns its id."""
        await self._ensure_topic()
        if self._producer is None:
            self._producer = AIOKafkaProducer(
                **self.settings.client_args(), acks="all", linger_ms=5
            )
            await self._producer.start()
        producer = self._producer
        snapshot_id = uuid.uuid4().hex
        chunks = [blob[i : i + self.chunk_bytes] for i in range(0, len(blob), self.chunk_bytes)]
        keys = [f"{snapshot_id}:{i}" for i in range(len(chunks))]
        futures = [
            await producer.send(
                self.topic, _pack({"id": snapshot_id, "i": i}, chunk), key=keys[i].encode()
            )
            for i, chunk in enumerate(chunks)
        ]
        placed = [(await f).offset for f in futures]
        by_topic: dict[str, dict[str, int]] = {}
        for tp, offset in offsets.items():
            by_topic.setdefault(self.settings.logical(tp.topic), {})[str(tp.partition)] = offset
        manifest = {
            "id": snapshot_id,
            "service": self.service,
            "version": version,
            "chunks": placed,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "offsets": by_topic,
            "saved_at_ms": int(time.time() * 1000),
        }
        key = f"manifest:{snapshot_id}"
        written = await producer.send_and_wait(self.topic, _pack(manifest), key=key.encode())
        # The new one is complete: older snapshots may go (compaction drops them).
        try:
            stale = self._previous
            if not self._swept:
                first = min(placed, default=written.offset)
                stale = await asyncio.wait_for(
                    self._stale(first, written.offset, keep={*keys, key}, version=version),
                    _SWEEP_S,
                )
            for old_key in stale:
                await producer.send(self.topic, None, key=old_key.encode())
            await producer.flush()
            self._swept = True
        except Exception:
            # Saved all the same; the next save reads the topic again for what to drop.
            log.warning("%s: older snapshots not dropped", self.service, exc_info=True)
            self._swept = False
        self._previous = [*keys, key]
        return snapshot_id

    async def _reader(self) -> tuple[AIOKafkaConsumer, TopicPartition]:
        """A started consumer assigned the topic's one partition (the caller stops it)."""
        consumer = AIOKafkaConsumer(
            **self.settings.client_args(),
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=4 * self.chunk_bytes,
        )
        await consumer.start()
        tp = TopicPartition(self.topic, 0)
        consumer.assign([tp])
        return consumer, tp

    async def _stale(
        self, first: int, manifest: int, keep: Collection[str], *, version: int
    ) -> list[str]:
        """Keys to tombstone once the snapshot whose records (``keep``) run from offset
        ``first`` to its manifest at ``manifest`` is written (:func:`_stale_keys`): one
        pass over the topic below the manifest, keeping keys only (and which manifests
        are of a state version newer than ``version``)."""
        consumer, tp = await self._reader()
        try:
            consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
            last: dict[str, tuple[int, bool, int]] = {}
            newer: set[str] = set()
            while await consumer.position(tp) < manifest:
                batch = await consumer.getmany(tp, timeout_ms=500)
                for record in batch.get(tp, []):
                    if record.offset < manifest and record.key is not None:
                        key = record.key.decode(errors="replace")
                        last[key] = (record.offset, record.value is not None, record.timestamp)
                        if record.value is not None and _newer(key, record.value, version):
                            newer.add(_snapshot_of(key))
            return _stale_keys(last, first, keep, int(time.time() * 1000), newer)
        finally:
            await consumer.stop()

    async def latest(self, version: int, older: Collection[int] = ()) -> Snapshot | None:
        """The newest usable snapshot of ``version`` or one of the ``older`` versions; None
        when there is none (a warning names each newer one that could not be used)."""
        async with contextlib.aclosing(self.snapshots(version, older)) as found:
            async for snapshot in found:
                return snapshot
        return None

    async def snapshots(
        self, version: int, older: Collection[int] = ()
    ) -> AsyncGenerator[Snapshot, None]:
        """The complete snapshots of ``version`` or one of the ``older`` versions, newest
        first, decoded; a warning names each one skipped and why (partial, corrupt, of
        another version or shape, too large, not decodable)."""
        await self._ensure_topic()
        consumer, tp = await self._reader()
        try:
            first = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
            stop = end
            while stop > first:
                start = max(first, stop - _LOOK_BACK)
                manifests = [
                    (offset, header)
                    for offset, header, _ in await _read(consumer, tp, start, stop)
                    if "chunks" in header
                ]
                for offset, manifest in reversed(manifests):
                    marker = self._marker(manifest.get("id"))
                    if _killed_restoring(marker):
                        log.warning(
                            "%s: snapshot %s at offset %d: a process restoring it died"
                            " (out of memory?); trying an older one",
                            self.service,
                            manifest.get("id"),
                            offset,
                        )
                        marker.unlink(missing_ok=True)
                        continue
                    _mark(marker)
                    try:
                        snapshot = await self._restore(
                            consumer, tp, offset, manifest, version, older
                        )
                    except KafkaError:
                        marker.unlink(missing_ok=True)
                        raise  # the broker's, not the snapshot's
                    except Exception as exc:
                        marker.unlink(missing_ok=True)
                        # Whatever the record holds, an older snapshot or the log will do.
                        log.warning(
                            "%s: snapshot %s at offset %d unusable (%s: %s); trying an older one",
                            self.service,
                            manifest.get("id"),
                            offset,
                            type(exc).__name__,
                            exc,
                        )
                        continue
                    try:
                        yield snapshot  # the caller restores it before it asks for more
                    finally:
                        marker.unlink(missing_ok=True)
                stop = start
        finally:
            await consumer.stop()

    def _marker(self, snapshot_id: object) -> Path:
        """The file marking a restore of ``snapshot_id`` (named from a hash: the id is the
        record's, whatever it holds)."""
        folder = self.marker_dir or data_root() / "run" / "snapshots"
        name = hashlib.sha256(f"{self.topic}\0{snapshot_id}".encode()).hexdigest()[:32]
        return folder / f"{name}.restoring"

    async def _restore(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        at: int,
        manifest: dict[str, Any],
        version: int,
        older: Collection[int] = (),
    ) -> Snapshot:
        _check_manifest(manifest)
        saved_as = manifest["version"]
        if saved_as != version and saved_as not in older:
            raise SnapshotUnusable(f"state version {saved_as}, not {version}")
        placed: list[int] = manifest["chunks"]
        wanted = {offset: i for i, offset in enumerate(placed)}
        parts: dict[int, bytes] = {}
        size = 0
        if placed:
            for offset, header, body in await _read(consumer, tp, min(placed), at):
                i = wanted.get(offset)
                if i is not None and header.get("id") == manifest["id"] and header.get("i") == i:
                    parts[i] = body
                    size += len(body)
                    if size > MAX_STATE_BYTES:
                        raise SnapshotUnusable(f"chunks of more than {MAX_STATE_BYTES} bytes")
        if len(parts) != len(placed):
            raise SnapshotUnusable(f"{len(placed) - len(parts)} of {len(placed)} chunks missing")
        blob = b"".join(parts[i] for i in range(len(placed)))
        if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
            raise SnapshotUnusable("checksum mismatch")
        state = await asyncio.to_thread(decode_state, blob)
        offsets = {
            TopicPartition(self.settings.topic(topic), int(p)): offset
            for topic, by_partition in manifest["offsets"].items()
            for p, offset in by_partition.items()
        }
        return Snapshot(manifest["id"], saved_as, offsets, state, len(blob))


async def _read(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, stop: int
) -> list[tuple[int, dict[str, Any], bytes]]:
    """Snapshot records in [start, stop): (offset, header, body); tombstones and records that
    are not snapshots are skipped."""
    out: list[tuple[int, dict[str, Any], bytes]] = []
    consumer.seek(tp, start)
    while await consumer.position(tp) < stop:
        batch = await consumer.getmany(tp, timeout_ms=500)
        for record in batch.get(tp, []):
            if record.offset >= stop:
                return out
            if record.value is None:
                continue
            try:
                header, body = _unpack(record.value)
            except Exception:  # not JSON, JSON nested past the recursion limit, ...
                log.warning("%s: record %d is not a snapshot record", tp.topic, record.offset)
                continue
            out.append((record.offset, header, body))
    return out


class Snapshotter:
    """Restores a view's state from the newest snapshot at start and saves new ones as the
    view folds: after ``every_events`` records, or ``every_s`` seconds if it folded any.

    ``dump`` returns the state as plain values (see the module's docstring) and must copy
    what the fold may change (the encoding runs in a thread while the view goes on
    folding; immutable values such as tuples and datetimes may be shared); ``restore``
    replaces the state with a dumped one and raises, changing nothing, on one it cannot read
    (the snapshot before it is tried next).
    Bump ``version`` whenever what ``dump`` writes or what the fold does changes; an older
    version in ``upgrades`` is still read, its state turned into the current version's by
    the function given for it (which raises like ``restore`` on one it cannot turn).
    """

    def __init__(
        self,
        store: SnapshotStore,
        version: int,
        dump: Callable[[], Any],
        restore: Callable[[Any], None],
        *,
        every_events: int = 20_000,
        every_s: float = 60.0,
        upgrades: Mapping[int, Callable[[Any], Any]] | None = None,
    ) -> None:
        self.store = store
        self.version = version
        self.upgrades = dict(upgrades or {})
        self._dump = dump
        self._restore = restore
        self.every_events = every_events
        self.every_s = every_s
        self.restored: Snapshot | None = None
        self.saved = 0
        self.dump_s = 0.0

    async def resume(self, bounds: Bounds) -> dict[TopicPartition, int]:
        """For ``TopicView(resume=...)``: where to start each partition (empty: everywhere
        from the beginning, the state untouched). A snapshot that does not upgrade or
        restore is skipped for the one before it."""
        service = self.store.service
        found = self.store.snapshots(self.version, older=tuple(self.upgrades))
        async with contextlib.aclosing(found):
            async for snapshot in found:
                outside = self._outside(snapshot, bounds)
                if outside is not None:
                    # Retention or a recreated topic: an older snapshot fits no better.
                    log.warning("%s: %s; folding the whole log", service, outside)
                    return {}
                try:
                    with _no_gc():
                        state = snapshot.state
                        if snapshot.version != self.version:
                            state = self.upgrades[snapshot.version](state)
                        self._restore(state)
                except Exception as exc:
                    # The restore changed nothing (its contract): the next one starts clean.
                    log.warning(
                        "%s: snapshot %s does not restore (%s: %s); trying an older one",
                        service,
                        snapshot.snapshot_id,
                        type(exc).__name__,
                        exc,
                    )
                    continue
                self.restored = snapshot
                log.info(
                    "%s: restored snapshot %s (%d bytes, state version %d); folding the tail",
                    service,
                    snapshot.snapshot_id,
                    snapshot.size,
                    snapshot.version,
                )
                # Partitions the snapshot does not name (a topic added since) are read whole.
                return {tp: snapshot.offsets.get(tp, first) for tp, (first, _) in bounds.items()}
        log.info("%s: no usable snapshot; folding the whole log", service)
        return {}

    @staticmethod
    def _outside(snapshot: Snapshot, bounds: Bounds) -> str | None:
        """Why ``snapshot`` does not fit the topics as they are now, or None."""
        for tp, (first, end) in bounds.items():
            covered = snapshot.offsets.get(tp)
            if covered is not None and not first <= covered <= end:
                return (
                    f"snapshot {snapshot.snapshot_id} covers {tp} up to {covered},"
                    f" but the topic holds {first}..{end}"
                )
        return None

    async def save(self, view: TopicView) -> str:
        """Snapshot the state now, with the offsets it covers."""
        started = time.perf_counter()
        with _no_gc():
            state, offsets = self._dump(), view.positions()  # together: no fold in between
        self.dump_s = time.perf_counter() - started  # the loop is held that long
        blob = await asyncio.to_thread(encode_state, state)
        snapshot_id = await self.store.save(blob, offsets, self.version)
        self.saved += 1
        log.info(
            "%s: saved snapshot %s (%d bytes; the state taken in %.0f ms)",
            self.store.service,
            snapshot_id,
            len(blob),
            self.dump_s * 1000,
        )
        return snapshot_id

    async def run(self, view: TopicView) -> None:
        """Save snapshots for as long as the view runs."""
        await view.ready.wait()
        loop = asyncio.get_running_loop()
        last_folded, last_at = 0, loop.time()
        while True:
            await view.changed(min(self.every_s, 5.0))
            folded, now = view.folded, loop.time()
            due = folded - last_folded >= self.every_events or (
                folded > last_folded and now - last_at >= self.every_s
            )
            if not due:
                continue
            try:
                await self.save(view)
                last_folded, last_at = folded, now
            except Exception:
                log.warning(
                    "%s: snapshot not saved; retrying later", self.store.service, exc_info=True
                )
                last_at = now

    async def stop(self) -> None:
        await self.store.stop()
