"""Snapshots on the real broker: a restart folds only the tail and reaches the state of a
full fold; a corrupt, partial, foreign or stale snapshot falls back with a warning."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import pickle
import sys
import time
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.router.policy import LearnedPolicy
from services.router.service import KNOWLEDGE_TOPICS, SNAPSHOT_VERSION, Router
from streams import snapshots as snapshots_module
from streams.events import Event, FeedbackReceived
from streams.kafka import EventProducer, KafkaSettings
from streams.snapshots import SnapshotStore, Snapshotter, _pack, encode_state
from streams.topics import create_state_topics, snapshot_topic
from streams.views import TopicView
from tests.unit.test_snapshot_fold import _router as _any_router
from tests.unit.test_snapshot_fold import history


def _router() -> Router:
    """A router whose learning does not depend on the order its outcomes are met in. The
    policy's change detector sums surprises in sequence, and a fold on the broker reads
    topics side by side, so two folds meet outcomes in different orders; with it on, a
    snapshot plus the tail equals a full fold only up to those sums (the fold in one fixed
    order is exact with it on: tests/unit/test_snapshot_fold.py)."""
    router = _any_router()
    assert isinstance(router.policy.template, LearnedPolicy)
    router.policy.template.change_threshold = 0.0  # every goal's policy is made from it
    return router


def _canonical(value: Any) -> Any:
    """Order-free form: topics are read side by side, so insertion orders differ by run."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, default=str))
    return value


async def _fold(
    settings: KafkaSettings, router: Router, snapshots: Snapshotter | None
) -> TopicView:
    view = TopicView(
        settings,
        KNOWLEDGE_TOPICS,
        router.learn,
        source="test",
        resume=snapshots.resume if snapshots is not None else None,
    )
    await view.start()
    await asyncio.wait_for(view.ready.wait(), 60)
    return view


def _snapshotter(settings: KafkaSettings, router: Router, **kw: Any) -> Snapshotter:
    return Snapshotter(
        SnapshotStore(settings, "router", **kw), SNAPSHOT_VERSION, router.dump, router.restore
    )


def _knowledge(events: list[Event]) -> list[Event]:
    """The router's events of ``events``, less the one whose fold depends on the order topics
    are read in (so two full folds may differ too): a user's feedback read before the run's
    outcome is lost. (A retirement read before its agent's spawn is kept since 2026-12-06.)"""
    return [
        e for e in events if e.topic in KNOWLEDGE_TOPICS and not isinstance(e, FeedbackReceived)
    ]


async def test_restart_folds_only_the_tail_and_reaches_the_full_fold(settings: KafkaSettings):
    events = _knowledge(history(seed=7, runs=400, unique=True))
    half = len(events) // 2
    async with EventProducer(settings) as producer:
        await producer.send_many(events[:half])
        first = _router()
        # Small chunks: the snapshot spans many records.
        snapshots = _snapshotter(settings, first, chunk_bytes=4096)
        view = await _fold(settings, first, snapshots)
        assert snapshots.restored is None and view.folded == half
        await snapshots.save(view)
        await view.stop()
        await snapshots.stop()
        await producer.send_many(events[half:])

    resumed = _router()
    snapshots = _snapshotter(settings, resumed)
    view = await _fold(settings, resumed, snapshots)
    await view.stop()
    assert snapshots.restored is not None
    assert view.folded == len(events) - half  # the tail, not the history

    full = _router()
    view = await _fold(settings, full, None)
    await view.stop()
    assert _canonical(resumed.dump()) == _canonical(full.dump())


async def _write(
    settings: KafkaSettings, records: list[tuple[str, bytes]], age_s: float = 0.0
) -> list[int]:
    """Records on the router's snapshot topic, stamped ``age_s`` in the past."""
    producer = AIOKafkaProducer(**settings.client_args())
    await producer.start()
    stamp = int((time.time() - age_s) * 1000)
    try:
        topic = settings.topic(snapshot_topic("router"))
        return [
            (
                await producer.send_and_wait(topic, value, key=key.encode(), timestamp_ms=stamp)
            ).offset
            for key, value in records
        ]
    finally:
        await producer.stop()


async def test_corrupt_and_partial_snapshots_fall_back(
    settings: KafkaSettings, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="streams.snapshots")
    store = SnapshotStore(settings, "router")
    tp = TopicPartition(settings.topic(KNOWLEDGE_TOPICS[0]), 0)
    good = encode_state({"n": 1})
    await store.save(good, {tp: 0}, version=1)
    await store.stop()
    # A newer snapshot whose chunk was damaged, then one whose chunk never landed.
    blob = encode_state({"n": 2})
    [chunk] = await _write(settings, [("c:0", _pack({"id": "c", "i": 0}, blob[:-3] + b"xyz"))])
    manifest = {
        "id": "c",
        "version": 1,
        "chunks": [chunk],
        "sha256": hashlib.sha256(blob).hexdigest(),
        "offsets": {},
    }
    partial = {**manifest, "id": "p", "chunks": [chunk + 100]}
    await _write(settings, [("manifest:c", _pack(manifest)), ("manifest:p", _pack(partial))])

    found = await SnapshotStore(settings, "router").latest(version=1)
    assert found is not None and found.state == {"n": 1}  # the newest usable one
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "chunks missing" in warned and "checksum mismatch" in warned

    caplog.clear()
    assert await SnapshotStore(settings, "router").latest(version=2) is None
    assert "state version 1, not 2" in caplog.text
    # ... unless the reader is given the way from version 1 (Snapshotter's upgrades).
    older = await SnapshotStore(settings, "router").latest(version=2, older=(1,))
    assert older is not None and older.version == 1 and older.state == {"n": 1}


async def _restarted_in_full(settings: KafkaSettings, records: int) -> Router:
    """A router started with snapshots on, which folded all ``records`` from the start."""
    router = _router()
    snapshots = _snapshotter(settings, router)
    view = await _fold(settings, router, snapshots)
    await view.stop()
    assert snapshots.restored is None and view.folded == records
    return router


async def test_a_snapshot_that_cannot_be_used_means_a_full_fold(
    settings: KafkaSettings, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="streams.snapshots")
    events = _knowledge(history(seed=8, runs=60, unique=True))
    async with EventProducer(settings) as producer:
        await producer.send_many(events)
    store = SnapshotStore(settings, "router")
    tp = TopicPartition(settings.topic(KNOWLEDGE_TOPICS[0]), 0)
    # Offsets past what the topic holds (a topic recreated, or records deleted).
    await store.save(encode_state(_router().dump()), {tp: 10_000}, SNAPSHOT_VERSION)
    await _restarted_in_full(settings, len(events))
    assert "folding the whole log" in caplog.text

    # A snapshot of the right version whose state does not restore.
    caplog.clear()
    await store.save(encode_state({"policy": "learned"}), {}, SNAPSHOT_VERSION)
    await store.stop()
    router = await _restarted_in_full(settings, len(events))
    assert "does not restore" in caplog.text
    full = _router()
    for e in events:
        full.learn(e)
    assert _canonical(router.dump()) == _canonical(full.dump())


class _Overflow:
    """Pickles as a timedelta the unpickler may build, too large to build (OverflowError)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (timedelta, (10**10,))


def _manifest(**over: Any) -> dict[str, Any]:
    good = {"id": "odd", "version": SNAPSHOT_VERSION, "chunks": [], "sha256": "", "offsets": {}}
    return {**good, **over}


# One odd record newest on the topic (a later release's manifest, a hand-written tool's, a
# writer with produce rights): (the state its one chunk holds, or None for no chunk; the
# manifest; what the warning says). A state is given a chunk and the right checksum.
_ODD: dict[str, tuple[bytes | None, dict[str, Any] | bytes, str]] = {
    "chunks-a-number": (None, _manifest(chunks=5), "chunks are not offsets"),
    "chunks-objects": (None, _manifest(chunks=[{"offset": 0}]), "chunks are not offsets"),
    "chunks-strings": (None, _manifest(chunks=["0"]), "chunks are not offsets"),
    "chunks-negative": (None, _manifest(chunks=[-1]), "chunks are not offsets"),
    "no-id": (None, {k: v for k, v in _manifest().items() if k != "id"}, "has no id"),
    "no-checksum": (None, _manifest(sha256=None), "has no checksum"),
    "version-a-string": (None, _manifest(version=str(SNAPSHOT_VERSION)), "no state version"),
    "offsets-a-list": (encode_state({}), _manifest(offsets=[]), "offsets are not"),
    "offsets-of-lists": (encode_state({}), _manifest(offsets={"t": {"0": [1]}}), "offsets are"),
    "offsets-partition-a-word": (encode_state({}), _manifest(offsets={"t": {"p": 1}}), "offsets"),
    "header-nested-deep": (None, b"[" * 100_000 + b"]" * 100_000, "not a snapshot record"),
    "state-overflows": (zlib.compress(pickle.dumps(_Overflow())), _manifest(), "OverflowError"),
    "state-does-not-restore": (encode_state({"policy": "learned"}), _manifest(), "not restore"),
}


async def _write_odd(settings: KafkaSettings, state: bytes | None, manifest: Any) -> None:
    if isinstance(manifest, bytes):  # a header that is not a manifest's
        head = manifest
        await _write(settings, [("manifest:odd", b"OSN1" + len(head).to_bytes(4, "big") + head)])
        return
    if state is not None:
        [chunk] = await _write(settings, [("odd:0", _pack({"id": "odd", "i": 0}, state))])
        manifest = {**manifest, "chunks": [chunk], "sha256": hashlib.sha256(state).hexdigest()}
    await _write(settings, [("manifest:odd", _pack(manifest))])


async def _saved_then_tail(settings: KafkaSettings, seed: int) -> tuple[str, int]:
    """Half a history folded and snapshotted, the rest written after: (snapshot id, tail)."""
    events = _knowledge(history(seed=seed, runs=40, unique=True))
    half = len(events) // 2
    async with EventProducer(settings) as producer:
        await producer.send_many(events[:half])
        first = _router()
        snapshots = _snapshotter(settings, first)
        view = await _fold(settings, first, snapshots)
        saved = await snapshots.save(view)
        await view.stop()
        await snapshots.stop()
        await producer.send_many(events[half:])
    return saved, len(events) - half


@pytest.mark.parametrize("case", list(_ODD))
async def test_an_odd_newest_snapshot_is_skipped_for_the_one_before(
    settings: KafkaSettings, caplog: pytest.LogCaptureFixture, case: str
):
    caplog.set_level(logging.WARNING, logger="streams.snapshots")
    saved, tail = await _saved_then_tail(settings, seed=9)
    state, manifest, warning = _ODD[case]
    await _write_odd(settings, state, manifest)

    router = _router()
    snapshots = _snapshotter(settings, router)
    view = await _fold(settings, router, snapshots)  # the router's start
    await view.stop()
    await snapshots.stop()
    assert snapshots.restored is not None and snapshots.restored.snapshot_id == saved
    assert view.folded == tail
    assert warning in caplog.text


async def test_a_snapshot_that_would_inflate_past_the_limit_is_skipped(
    settings: KafkaSettings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    caplog.set_level(logging.WARNING, logger="streams.snapshots")
    saved, tail = await _saved_then_tail(settings, seed=10)
    # A state the router would restore, holding 8 MB of zeros (a few KB on the topic).
    bomb = encode_state({**_router().dump(), "pad": bytes(8 << 20)})
    assert len(bomb) < 64 << 10
    await _write_odd(settings, bomb, _manifest())
    monkeypatch.setattr(snapshots_module, "MAX_STATE_BYTES", 1 << 20, raising=False)

    router = _router()
    snapshots = _snapshotter(settings, router)
    view = await _fold(settings, router, snapshots)
    await view.stop()
    await snapshots.stop()
    assert snapshots.restored is not None and snapshots.restored.snapshot_id == saved
    assert view.folded == tail
    assert "inflates past" in caplog.text


async def _live_keys(settings: KafkaSettings) -> set[str]:
    """Keys of the router's snapshot topic whose latest record is not a tombstone."""
    topic = settings.topic(snapshot_topic("router"))
    consumer = AIOKafkaConsumer(**settings.client_args(), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        latest: dict[str, bool] = {}
        while await consumer.position(tp) < end:
            for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                latest[record.key.decode()] = record.value is not None
        return {key for key, held in latest.items() if held}
    finally:
        await consumer.stop()


async def test_a_restart_drops_what_killed_writers_left(settings: KafkaSettings):
    saved, _ = await _saved_then_tail(settings, seed=11)  # S1, by an instance that stops
    blob = encode_state(_router().dump())
    # A writer killed between chunks, an hour ago: two of its three chunks, no manifest.
    dead = [(f"dead:{i}", _pack({"id": "dead", "i": i}, b"x")) for i in (0, 1)]
    await _write(settings, dead, age_s=3600)
    # Chunks of a snapshot another instance is writing now (no manifest yet): kept.
    await _write(settings, [("busy:0", _pack({"id": "busy", "i": 0}, b"x"))])
    # A writer killed after its manifest, before tombstoning S1 (an empty state, complete).
    [chunk] = await _write(settings, [("s2:0", _pack({"id": "s2", "i": 0}, blob))])
    s2 = _manifest(id="s2", chunks=[chunk], sha256=hashlib.sha256(blob).hexdigest())
    await _write(settings, [("manifest:s2", _pack(s2))])
    assert len(await _live_keys(settings)) > 2

    router = _router()
    snapshots = _snapshotter(settings, router, chunk_bytes=1024)
    view = await _fold(settings, router, snapshots)
    assert snapshots.restored is not None and snapshots.restored.snapshot_id == "s2"
    latest = await snapshots.save(view)
    await view.stop()
    await snapshots.stop()
    live = await _live_keys(settings)
    assert {key.removeprefix("manifest:").split(":")[0] for key in live} == {latest, "busy"}
    assert f"manifest:{latest}" in live and len(live) > 2  # its chunks and its manifest
    assert not any(saved in key for key in live)


async def test_an_older_release_saving_keeps_a_newer_releases_snapshot(settings: KafkaSettings):
    # A rolling upgrade: an instance of the new release saved a snapshot of a newer state
    # version; one of the old release, saving its own, once tombstoned it, and the new
    # release's next start folded what retention had left of the log.
    await create_state_topics(settings.bootstrap, prefix=settings.prefix)
    blob = b"a newer release's state"
    [chunk] = await _write(settings, [("new:0", _pack({"id": "new", "i": 0}, blob))], age_s=60)
    newer = _manifest(
        id="new",
        version=SNAPSHOT_VERSION + 1,
        chunks=[chunk],
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    await _write(settings, [("manifest:new", _pack(newer))], age_s=60)
    router = _router()
    snapshots = _snapshotter(settings, router)
    view = await _fold(settings, router, snapshots)
    assert snapshots.restored is None  # its own release cannot read it, and has none
    latest = await snapshots.save(view)
    await view.stop()
    await snapshots.stop()
    live = await _live_keys(settings)
    assert {"manifest:new", "new:0", f"manifest:{latest}"} <= live


async def test_a_snapshot_whose_restore_killed_the_process_is_skipped(
    settings: KafkaSettings, tmp_path: Path
):
    # A state whose decoding takes all memory (a few MB of pickle can build gigabytes of
    # objects) or a restore that kills the process: every start chose the same snapshot
    # and died the same way. The mark a restore leaves names it to the next start.
    saved, _ = await _saved_then_tail(settings, seed=12)
    marks = tmp_path / "marks"
    router = _router()
    snapshots = _snapshotter(settings, router, marker_dir=marks)
    view = await _fold(settings, router, snapshots)
    await view.stop()
    assert snapshots.restored is not None and snapshots.restored.snapshot_id == saved
    assert list(marks.glob("*.restoring")) == []  # a restore done leaves no mark
    # A start that died restoring it: its mark holds a process id that is gone.
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    marker = snapshots.store._marker(saved)  # noqa: SLF001
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(gone.pid))
    router = _router()
    snapshots = _snapshotter(settings, router, marker_dir=marks)
    view = await _fold(settings, router, snapshots)
    await view.stop()
    assert snapshots.restored is None  # the only snapshot skipped: the whole log folded
    assert not marker.exists()  # and only once: the next start may try it again
