"""Restart cost: time from process start to caught up and serving, with and without a snapshot.

    .venv/bin/python -m bench.restart                    # 10k, 100k and 1M past requests
    .venv/bin/python -m bench.restart --quick            # 10k and 50k
    .venv/bin/python -m bench.restart --requests 10000 100000 300000

For each history length N this writes N past requests' events (request, decision, answer,
assessment) into a fresh topic namespace with a bulk producer, then starts a fresh process
for the router's knowledge view and one for the improvement service's view, each built as
the service builds it (its Snapshotter and TopicView): first with no snapshot (the whole
log is folded; the process then saves a snapshot and says how big and how long), then
again with that snapshot (only the tail after it is folded). The time is measured by this
process from spawning the child to the child's "ready" line, imports included. A running
service saves a snapshot after every 20,000 folded records or 60 s, so a real restart folds
at most that tail on top of the second column.

Above ``--full-fold-up-to`` past requests (default 300,000) the whole-log fold through the
broker takes longer than the rest of the run put together, so it is not measured there:
this process folds each record into a router and an improvement service in memory as it
writes it (the same records, as models, no decoding) and saves their states as the
snapshots, covering the topics' end offsets, which is what a service that had folded the
log would have saved; the restart from them is measured as above.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import logging
import math
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastavro  # noqa: E402
from aiokafka import AIOKafkaProducer, TopicPartition  # noqa: E402

from local.localkafka import ensure_broker  # noqa: E402
from services.router.policy import features_of  # noqa: E402
from streams import events as ev  # noqa: E402
from streams.codec import MAGIC, default_codec  # noqa: E402
from streams.kafka import EventConsumer, KafkaSettings  # noqa: E402
from streams.signatures import exact_key, signature_of  # noqa: E402
from streams.topics import create_state_topics, create_topics, delete_prefixed_topics  # noqa: E402

SPECIALTIES = ["customer_support", "code", "research", "writing", "math"]
WORDS = "invoice refund login python error proof essay travel budget contract loop vector".split()
SERVICES = ("router", "improvement")


def say(text: str) -> None:
    print(text, flush=True)


class _History:
    """Past requests' encoded records, fast: each request is one of ``pool`` distinct
    (message, specialty) pairs (repeats make patterns, as real traffic does), and each of
    its events is a prepared record with its ids changed, written by fastavro directly
    (the codec's schemas and fingerprints, no model per event)."""

    def __init__(self, pool: int = 5_000, seed: int = 0) -> None:
        codec = default_codec()
        self.rng = random.Random(seed)
        self._schemas = {
            t: (fastavro.parse_schema(codec.schema_for(t)), codec.fingerprint_for(t))
            for t in (m.topic for m in (*_TYPES, ev.AgentSpawned))
        }
        self.agents = {s: f"{s}_agent" for s in SPECIALTIES}
        self.pool = [self._templates(i) for i in range(pool)]

    def _templates(self, i: int) -> list[tuple[str, str, dict[str, Any]]]:
        rng = self.rng
        message = " ".join(rng.sample(WORDS, 4)) + f" case {rng.randint(0, 500)}"
        specialty = rng.choice(SPECIALTIES)
        agent_id = self.agents[specialty]
        common = {"source": "bench", "run_id": "r", "goal_id": "g", "user_id": "u1"}
        events: list[ev.Event] = [
            ev.RequestReceived(**common, message=message),
            ev.RouteDecided(
                **common,
                specialty=specialty,
                agent_id=agent_id,
                action="reuse",
                policy="learned",
                probability=0.9,
                features=features_of(message).as_list(),
                request_key=exact_key(message, specialty),
                signature=signature_of(message, specialty),
            ),
            ev.WorkflowCompleted(
                **common,
                agent_id=agent_id,
                specialty=specialty,
                text="An answer of a few words, as a model would give it. " * 3,
                cost_usd=0.0002,
                latency_ms=40.0,
                degradation_tier="llm",
            ),
            ev.WorkflowAssessed(**common, agent_id=agent_id, specialty=specialty, quality=0.5),
        ]
        return [(e.topic, e.key_field, e.model_dump(mode="python")) for e in events]

    def encode(self, topic: str, record: dict[str, Any]) -> bytes:
        parsed, fingerprint = self._schemas[topic]
        buf = io.BytesIO()
        buf.write(MAGIC + fingerprint)
        fastavro.schemaless_writer(buf, parsed, record)
        return buf.getvalue()

    def agents_spawned(self) -> list[tuple[str, bytes, bytes, dict[str, Any]]]:
        out = []
        for specialty, agent_id in self.agents.items():
            spawned = ev.AgentSpawned(
                source="bench",
                goal_id="g1",
                agent_id=agent_id,
                specialty=specialty,
                system_prompt=f"You are a {specialty} specialist.",
                temperature=0.3,
            )
            record = spawned.model_dump(mode="python")
            value = self.encode(spawned.topic, record)
            out.append((spawned.topic, agent_id.encode(), value, record))
        return out

    def request(self, i: int) -> list[tuple[str, bytes, bytes, dict[str, Any]]]:
        """Request ``i``'s records: (topic, key, value, the record encoded)."""
        run_id, goal = f"run-{i}", f"g{i % 20}"
        out = []
        for topic, key_field, base in self.pool[self.rng.randrange(len(self.pool))]:
            record = {**base, "event_id": str(uuid.uuid4()), "run_id": run_id, "goal_id": goal}
            if topic == ev.WorkflowAssessed.topic:
                record["quality"] = self.rng.random()
            key = str(record[key_field]).encode()
            out.append((topic, key, self.encode(topic, record), record))
        return out


_TYPES = (ev.RequestReceived, ev.RouteDecided, ev.WorkflowCompleted, ev.WorkflowAssessed)
_MODELS: dict[str, type[ev.Event]] = {m.topic: m for m in (*_TYPES, ev.AgentSpawned)}
Fold = Callable[[ev.Event], None]


async def produce(settings: KafkaSettings, requests: int, fold: Fold | None = None) -> float:
    """Write ``requests`` past requests in bulk (batched, acks=1), each also handed to
    ``fold`` as a model; seconds taken."""
    history = _History()
    producer = AIOKafkaProducer(
        **settings.client_args(), linger_ms=20, max_batch_size=256 * 1024, acks=1
    )
    await producer.start()
    started = time.perf_counter()
    try:
        records = history.agents_spawned()
        for i in range(requests):
            records += history.request(i)
            if len(records) >= 40_000 or i == requests - 1:
                futures = [
                    await producer.send(settings.topic(topic), value, key=key)
                    for topic, key, value, _ in records
                ]
                if fold is not None:
                    for topic, _, _, record in records:
                        fold(_MODELS[topic].model_construct(**record))
                await asyncio.gather(*futures)
                records = []
            if (i + 1) % 100_000 == 0:
                say(f"  produced {i + 1:,} requests")
    finally:
        await producer.stop()
    return time.perf_counter() - started


# -- the child: one service's view, built as the service builds it ------------------------


async def child(service: str, bootstrap: str, prefix: str, use_snapshot: bool) -> None:
    from streams.clock import SystemClock
    from streams.snapshots import SnapshotStore, Snapshotter
    from streams.views import Bounds, TopicView

    settings = KafkaSettings(bootstrap, prefix)
    ctx = SimpleNamespace(producer=None, clock=SystemClock(), settings=settings)
    if service == "router":
        from services.router.service import KNOWLEDGE_TOPICS, Router, snapshotter

        router = Router(ctx)  # type: ignore[arg-type]
        snapshots = snapshotter(ctx, router)  # type: ignore[arg-type]
        topics, apply = KNOWLEDGE_TOPICS, router.learn
    else:
        from services.improvement.service import (
            SNAPSHOT_VERSION,
            VIEW_TOPICS,
            ImprovementConfig,
            ImprovementService,
        )

        svc = ImprovementService(ctx, ImprovementConfig(http_port=None), None)  # type: ignore[arg-type]
        store = SnapshotStore(settings, "improvement")
        snapshots = Snapshotter(store, SNAPSHOT_VERSION, svc.dump, svc.restore)
        topics, apply = VIEW_TOPICS, svc._view_event
    print(f"AT imported {time.time()}", flush=True)

    async def resume(bounds: Bounds) -> dict[TopicPartition, int]:
        offsets = await snapshots.resume(bounds)
        print(f"AT restored {time.time()}", flush=True)
        return offsets

    view = TopicView(
        settings, topics, apply, source="bench", resume=resume if use_snapshot else None
    )
    await view.start()
    await view.ready.wait()
    restored = snapshots.restored.size if snapshots.restored is not None else 0
    print(f"READY {view.folded} {restored}", flush=True)
    if not use_snapshot:
        started = time.perf_counter()
        await snapshots.save(view)
        print(f"SAVED {time.perf_counter() - started:.3f} {snapshots.dump_s:.3f}", flush=True)
    await view.stop()
    await snapshots.stop()


def run_child(service: str, settings: KafkaSettings, use_snapshot: bool) -> dict[str, float]:
    """Spawn the child and time it from spawn to its ready line."""
    argv = [sys.executable, "-m", "bench.restart", "--child", service, "--prefix", settings.prefix]
    if use_snapshot:
        argv.append("--use-snapshot")
    env = {**os.environ, **settings.env()}
    started, wall = time.perf_counter(), time.time()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
    )
    out: dict[str, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        word, *rest = line.split()
        if word == "READY":
            out["ready_s"] = time.perf_counter() - started
            out["folded"], out["snapshot_bytes"] = float(rest[0]), float(rest[1])
        elif word == "AT":
            out[f"{rest[0]}_s"] = float(rest[1]) - wall
        elif word == "SAVED":
            out["save_s"], out["dump_s"] = float(rest[0]), float(rest[1])
    if proc.wait() != 0 or "ready_s" not in out:
        raise RuntimeError(f"{service} child failed (exit {proc.returncode})")
    return out


async def _saved_in_memory(settings: KafkaSettings, requests: int) -> dict[str, dict[str, float]]:
    """Write the history while folding it in memory; save each service's state as its
    snapshot at the topics' end offsets. Per service: seconds to save, and the loop held."""
    from services.improvement.service import SNAPSHOT_VERSION as IMPROVEMENT_VERSION
    from services.improvement.service import VIEW_TOPICS, ImprovementConfig, ImprovementService
    from services.router.service import KNOWLEDGE_TOPICS, Router
    from services.router.service import SNAPSHOT_VERSION as ROUTER_VERSION
    from streams.clock import SystemClock
    from streams.snapshots import SnapshotStore, encode_state

    ctx = SimpleNamespace(producer=None, clock=SystemClock(), settings=settings)
    router = Router(ctx)  # type: ignore[arg-type]
    improvement = ImprovementService(ctx, ImprovementConfig(http_port=None), None)  # type: ignore[arg-type]

    def fold(event: ev.Event) -> None:
        if event.topic in KNOWLEDGE_TOPICS:
            router.learn(event)
        if event.topic in VIEW_TOPICS:
            improvement._view_event(event)

    gc.disable()  # the fold builds millions of small objects; none of them form cycles
    try:
        took = await produce(settings, requests, fold)
    finally:
        gc.enable()
    say(f"  produced and folded in memory in {took:.1f} s")
    out: dict[str, dict[str, float]] = {}
    for service, topics, dump, version in (
        ("router", KNOWLEDGE_TOPICS, router.dump, ROUTER_VERSION),
        ("improvement", VIEW_TOPICS, improvement.dump, IMPROVEMENT_VERSION),
    ):
        async with EventConsumer(settings, topics, group_id=None) as reader:
            ends = await reader.raw.end_offsets(list(reader.raw.assignment()))
        started = time.perf_counter()
        gc.disable()  # as Snapshotter.save takes the state
        try:
            state = dump()
        finally:
            gc.enable()
        held = time.perf_counter() - started
        blob = await asyncio.to_thread(encode_state, state)
        store = SnapshotStore(settings, service)
        await store.save(blob, ends, version)
        await store.stop()
        out[service] = {"save_s": time.perf_counter() - started, "dump_s": held}
    return out


async def measure(bootstrap: str, requests: int, full_fold_up_to: int) -> list[dict[str, object]]:
    settings = KafkaSettings(bootstrap, f"restart{uuid.uuid4().hex[:6]}.")
    await create_topics(bootstrap, prefix=settings.prefix)
    await create_state_topics(bootstrap, prefix=settings.prefix)
    rows: list[dict[str, object]] = []
    try:
        say(f"{requests:,} past requests ({requests * 4:,} events) into {settings.prefix}*")
        in_memory: dict[str, dict[str, float]] = {}
        if requests > full_fold_up_to:
            in_memory = await _saved_in_memory(settings, requests)
        else:
            took = await produce(settings, requests)
            say(f"  produced in {took:.1f} s")
        for service in SERVICES:
            if service in in_memory:
                full: dict[str, float] = {"ready_s": float("nan"), "folded": float("nan")}
                full.update(in_memory[service])
            else:
                full = await asyncio.to_thread(run_child, service, settings, False)
                say(
                    f"  {service}: full fold {full['ready_s']:.2f} s"
                    f" ({full['folded']:,.0f} records)"
                )
            snap = await asyncio.to_thread(run_child, service, settings, True)
            say(
                f"  {service}: from snapshot {snap['ready_s']:.2f} s"
                f" ({snap['folded']:,.0f} records after it)"
            )
            rows.append({"requests": requests, "service": service, "full": full, "snap": snap})
    finally:
        await delete_prefixed_topics(bootstrap, settings.prefix)
    return rows


def _or_dash(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def table(rows: list[dict[str, object]]) -> None:
    say("")
    say(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    say(
        "times from spawning the process to ready; 'imports' is the process start and"
        " imports, 'restore' reading and restoring the snapshot, 'tail' the fold after it;"
        " 'save s' writing a snapshot, of which the event loop is held while the state is taken"
    )
    head = (
        f"{'past requests':>13} {'service':12} {'no snapshot s':>13} {'records':>10}"
        f" {'with snapshot s':>15} {'imports':>7} {'restore':>7} {'tail':>7}"
        f" {'snapshot MB':>11} {'save s':>6} {'of it held':>10}"
    )
    say(head)
    for row in rows:
        full, snap = row["full"], row["snap"]
        assert isinstance(full, dict) and isinstance(snap, dict)
        imported, restored = snap.get("imported_s", 0.0), snap.get("restored_s", 0.0)
        say(
            f"{row['requests']:>13,} {row['service']!s:12} {_or_dash(full['ready_s'], '.2f'):>13}"
            f" {_or_dash(full['folded'], ',.0f'):>10} {snap['ready_s']:>15.2f} {imported:>7.2f}"
            f" {restored - imported:>7.2f} {snap['ready_s'] - restored:>7.2f}"
            f" {snap['snapshot_bytes'] / 1e6:>11.2f} {full.get('save_s', 0.0):>6.2f}"
            f" {full.get('dump_s', 0.0):>10.2f}"
        )


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="10k and 50k past requests")
    parser.add_argument(
        "--full-fold-up-to",
        type=int,
        default=300_000,
        help="above this many past requests the snapshot is folded in memory while writing,"
        " and the whole-log fold through the broker is not measured",
    )
    parser.add_argument("--child", choices=SERVICES, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--use-snapshot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if args.child:
        await child(
            args.child, os.environ["KAFKA_BOOTSTRAP_SERVERS"], args.prefix, args.use_snapshot
        )
        return 0
    bootstrap = ensure_broker()
    rows: list[dict[str, object]] = []
    for requests in [10_000, 50_000] if args.quick else args.requests:
        rows += await measure(bootstrap, requests, args.full_fold_up_to)
    table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
