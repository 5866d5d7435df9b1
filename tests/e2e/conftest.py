"""The whole platform as a user runs it: every service its own process, on the real broker.

One platform per test module (a fresh topic prefix and data dir), a fake
OpenAI-compatible server on loopback for the LLM, and a clock file that moves
the services' clock.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from local.fake_openai import FakeOpenAIServer
from services.cli.environment import service_env
from streams.client import OrchestratorClient
from streams.kafka import EventConsumer, KafkaSettings
from streams.topics import create_topics, delete_prefixed_topics

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("budget", "spawner", "loader", "router", "improvement")


class Platform:
    """Service processes plus the knobs tests turn (LLM behaviour, clock)."""

    def __init__(self, settings: KafkaSettings, data_dir: Path, llm: FakeOpenAIServer) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.llm = llm
        self.clock_file = data_dir / "clock-offset"
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap,
            "ORCH_TOPIC_PREFIX": settings.prefix,
            "ORCH_DATA_DIR": str(data_dir),
            "ORCH_LLM_BREAKER_COOLDOWN_SECONDS": "1",
            # Routing by keywords keeps these tests deterministic; learning has its own tests.
            "ORCH_ROUTER_POLICY": "static",
            # Dear tokens make budget limits reachable in a few requests.
            "ORCH_LLM_PRICES": '{"gpt-4o-mini": [200, 200]}',
            # At these prices a task holds its worst case (~$5) until its cost is known; the
            # tests that want a cost cap set one per goal, the rest must not meet the default.
            "ORCH_BUDGET_MAX_DAILY_COST": "1000",
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "test-key",
            "ORCH_LLM_TIMEOUT": "3",
            "ORCH_LLM_MAX_RETRIES": "1",
            "ORCH_RETIRE_SWEEP_SECONDS": "0.5",
            "ORCH_LOG_LEVEL": "INFO",
            "ORCH_IMPROVE_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        """Start one more instance of a service; only the budget reads the moved clock.

        The service sees its share of the environment only, as under `orchestrator up`.
        """
        extra = {"ORCH_CLOCK_FILE": str(self.clock_file)} if name == "budget" else {}
        log = open(self.data_dir / f"{name}-{len(self.procs.get(name, []))}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=ROOT,
            env=service_env(name, {**self.env, **extra, **env}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.setdefault(name, []).append(proc)
        return proc

    def kill(self, name: str) -> None:
        for proc in self.procs.get(name, []):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)

    def alive(self, name: str) -> bool:
        return any(p.poll() is None for p in self.procs.get(name, []))

    def stop(self) -> None:
        for procs in self.procs.values():
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
        deadline = time.monotonic() + 15
        for procs in self.procs.values():
            for proc in procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def move_clock(self, seconds: float) -> None:
        current = float(self.clock_file.read_text()) if self.clock_file.exists() else 0.0
        self.clock_file.write_text(str(current + seconds))
        # mtime granularity: make sure readers see a new file time
        t = time.time() + 1
        os.utime(self.clock_file, (t, t))

    def logs(self, name: str) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.data_dir.glob(f"{name}-*.log"))
        )

    async def events(self, topic: str, *, run_id: str | None = None) -> list:
        """Every event now on ``topic`` (optionally of one run), read from the beginning."""
        from streams.registry import read_topics_to_end

        out = await read_topics_to_end(self.settings, [topic])
        return [e for e in out if run_id is None or e.run_id == run_id]


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer(port=0).start_in_thread()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def platform(
    kafka_bootstrap: str, fake_llm: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    yield from _running(kafka_bootstrap, fake_llm, tmp_path_factory, dict.fromkeys(SERVICES, 1))


@pytest.fixture(scope="module")
def scaled_platform(
    kafka_bootstrap: str, fake_llm: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """Two instances each of the router, the budget and the loader, one consumer group each."""
    instances = {"budget": 2, "spawner": 1, "loader": 2, "router": 2}
    yield from _running(kafka_bootstrap, fake_llm, tmp_path_factory, instances)


def _running(
    kafka_bootstrap: str,
    fake_llm: FakeOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
    instances: dict[str, int],
) -> Iterator[Platform]:
    settings = KafkaSettings(kafka_bootstrap, f"e2e{uuid.uuid4().hex[:8]}.")
    asyncio.run(create_topics(kafka_bootstrap, prefix=settings.prefix))
    plat = Platform(settings, tmp_path_factory.mktemp("platform"), fake_llm)
    for name in SERVICES:
        for _ in range(instances.get(name, 1)):
            plat.start(name)
    try:
        asyncio.run(_warm_up(plat))
        yield plat
    except BaseException:
        for name in SERVICES:
            print(f"---- {name} log ----\n{plat.logs(name)[-3000:]}")
        raise
    finally:
        plat.stop()
        asyncio.run(delete_prefixed_topics(kafka_bootstrap, settings.prefix))


async def _warm_up(plat: Platform) -> None:
    """Wait until one request goes all the way through (every service has joined)."""
    async with OrchestratorClient(plat.settings, source="e2e-warmup") as client:
        deadline = time.monotonic() + 90
        while True:
            for name in SERVICES:
                if not plat.alive(name):
                    raise RuntimeError(f"{name} died at start:\n{plat.logs(name)[-3000:]}")
            try:
                await client.ask("warm up", goal_id="warmup", user_id="warmup", timeout=15)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[OrchestratorClient]:
    async with OrchestratorClient(platform.settings, source="e2e") as c:
        yield c


__all__ = ["EventConsumer", "Platform"]
