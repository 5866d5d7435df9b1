"""Router restart: how fast a router rebuilds its learned state from the event log.

    .venv/bin/python bench/router_catchup.py                 # 20,000 requests' worth
    .venv/bin/python bench/router_catchup.py --requests 100000

The router keeps no checkpoint: at start it folds its knowledge topics (decisions,
answers, assessments, registry, automations, feedback) from the beginning before it
serves. This writes a known log of N requests into a fresh topic namespace, then
times a real router's catch-up through the broker. Baselines measured in the same
run, on the same events: decoding alone, and decoding plus the router's fold
(``Router.learn``) with no Kafka, i.e. what the catch-up would cost if reading
from the broker were free.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import resource
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from local.localkafka import ensure_broker  # noqa: E402
from services.router.policy import features_of  # noqa: E402
from services.router.service import KNOWLEDGE_TOPICS, Router  # noqa: E402
from streams import events as ev  # noqa: E402
from streams.clock import SystemClock  # noqa: E402
from streams.codec import default_codec  # noqa: E402
from streams.kafka import EventProducer, KafkaSettings  # noqa: E402
from streams.signatures import exact_key, signature_of  # noqa: E402
from streams.topics import create_topics  # noqa: E402
from streams.views import TopicView  # noqa: E402

SPECIALTIES = ["customer_support", "code", "research", "writing", "math"]
WORDS = "invoice refund login python error proof essay travel budget contract loop vector".split()


def say(text: str) -> None:
    print(text, flush=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_log(requests: int, seed: int = 0) -> list[ev.Event]:
    """A plausible knowledge log: per request a decision, an answer and its assessment."""
    rng = random.Random(seed)
    out: list[ev.Event] = []
    agents = {}
    for s in SPECIALTIES:
        agent_id = f"{s}_{uuid.UUID(int=rng.getrandbits(128)).hex[:8]}"
        agents[s] = agent_id
        out.append(
            ev.AgentSpawned(
                source="bench",
                goal_id="g1",
                agent_id=agent_id,
                specialty=s,
                system_prompt=f"You are a {s} specialist.",
                temperature=0.3,
                model="gpt-4o-mini",
            )
        )
    for i in range(requests):
        message = " ".join(rng.sample(WORDS, 4)) + f" case {rng.randint(0, 500)}"
        specialty = rng.choice(SPECIALTIES)
        run_id = f"run-{i}"
        features = features_of(message)
        out.append(
            ev.RouteDecided(
                source="router",
                run_id=run_id,
                goal_id="g1",
                user_id="u1",
                specialty=specialty,
                agent_id=agents[specialty],
                action="reuse",
                scores={f"specialty:{s}": rng.random() for s in SPECIALTIES},
                policy="learned",
                policy_version=i + 1,
                probability=0.9,
                features=features.as_list(),
                request_key=exact_key(message, specialty),
                signature=signature_of(message, specialty),
            )
        )
        out.append(
            ev.WorkflowCompleted(
                source="loader",
                run_id=run_id,
                goal_id="g1",
                user_id="u1",
                agent_id=agents[specialty],
                specialty=specialty,
                text="An answer of a few words, as a model would give it. " * 3,
                cost_usd=0.0002,
                latency_ms=40.0,
                degradation_tier="llm",
            )
        )
        out.append(
            ev.WorkflowAssessed(
                source="improvement",
                run_id=run_id,
                goal_id="g1",
                agent_id=agents[specialty],
                specialty=specialty,
                quality=rng.random(),
            )
        )
    return out


def _fresh_router() -> Router:
    ctx = SimpleNamespace(producer=None, clock=SystemClock())
    return Router(ctx)  # type: ignore[arg-type]


def baselines(events: list[ev.Event]) -> tuple[float, float]:
    """Events/s for decoding alone, and for decoding plus the router's fold."""
    codec = default_codec()
    encoded = [(e.topic, codec.encode(e)) for e in events]
    started = time.perf_counter()
    decoded = [codec.decode(raw, topic=topic) for topic, raw in encoded]
    decode_rate = len(encoded) / (time.perf_counter() - started)
    router = _fresh_router()
    started = time.perf_counter()
    for topic, raw in encoded:
        router.learn(codec.decode(raw, topic=topic))
    fold_rate = len(encoded) / (time.perf_counter() - started)
    del decoded
    return decode_rate, fold_rate


async def through_kafka(settings: KafkaSettings, expected: int) -> tuple[float, int, Router]:
    router = _fresh_router()
    count = 0

    def learn(event: ev.Event) -> None:
        nonlocal count
        count += 1
        router.learn(event)
        if count % 20_000 == 0:
            say(f"  folded {count:,} of {expected:,}")

    view = TopicView(settings, KNOWLEDGE_TOPICS, learn, source="bench")
    started = time.perf_counter()
    await view.start()
    try:
        await asyncio.wait_for(view.ready.wait(), 3600)
        elapsed = time.perf_counter() - started
    finally:
        await view.stop()
    return elapsed, count, router


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args(argv)
    # New topics answer "not leader" for a moment; the producer retries and says so.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)

    bootstrap = ensure_broker()
    settings = KafkaSettings(bootstrap, f"catchup{uuid.uuid4().hex[:6]}.")
    await create_topics(bootstrap, prefix=settings.prefix)
    events = make_log(args.requests)
    say(f"log: {args.requests:,} requests, {len(events):,} knowledge events")
    started = time.perf_counter()
    async with EventProducer(settings) as producer:
        for i in range(0, len(events), 5_000):
            await producer.send_many(events[i : i + 5_000])
            say(f"  produced {min(i + 5_000, len(events)):,}")
    say(f"produced in {time.perf_counter() - started:.1f} s")

    decode_rate, fold_rate = baselines(events)
    rss_before = _rss_mb()
    elapsed, count, router = await through_kafka(settings, len(events))
    rate = count / elapsed
    per_request_ms = elapsed / args.requests * 1000.0
    say("")
    say(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    say(f"{'what':42} {'events/s':>10} {'s per 1M requests':>18}")
    per_million = 1_000_000 * len(events) / args.requests
    for what, r in (
        ("decode only (baseline, no Kafka)", decode_rate),
        ("decode + router fold (baseline, no Kafka)", fold_rate),
        ("router catch-up through the broker", rate),
    ):
        say(f"{what:42} {r:>10,.0f} {per_million / r:>18,.0f}")
    say(
        f"catch-up: {count:,} events in {elapsed:.2f} s ({per_request_ms:.3f} ms per request);"
        f" policy updates {router.policy.version('g1') - 1:,}; peak RSS of this process (the"
        f" generated log included) {rss_before:.0f} -> {_rss_mb():.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
