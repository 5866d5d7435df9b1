"""The whole platform as a user runs it: every service its own process, on the real broker.

One platform per test module (a fresh topic prefix and data dir), a fake
OpenAI-compatible server on loopback for the LLM, and a clock file that moves
the services' clock.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from local.fake_openai import FakeOpenAIServer
from local.platform import Launcher
from streams.client import OrchestratorClient
from streams.errors import RunTimeout
from streams.kafka import EventConsumer, KafkaSettings
from streams.topics import create_topics, delete_prefixed_topics

SERVICES = ("budget", "spawner", "loader", "router", "improvement")


class Platform(Launcher):
    """Service processes (the platform launcher's) plus the knobs tests turn (LLM, clock)."""

    def __init__(self, settings: KafkaSettings, data_dir: Path, llm: FakeOpenAIServer) -> None:
        super().__init__(
            data_dir,
            settings=settings,
            data_dir=data_dir,
            env={
                "ORCH_LLM_BREAKER_COOLDOWN_SECONDS": "1",
                # Routing by keywords keeps these tests deterministic; learning has its own tests.
                "ORCH_ROUTER_POLICY": "static",
                # Every answer graded, so a test that looks for a judgement finds one; the
                # default share (0.2) and its draws have their own tests (test_judge_sample).
                "ORCH_JUDGE_SAMPLE": "1",
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
            },
        )
        self.settings = settings
        self.data_dir = data_dir
        self.llm = llm
        self.clock_file = data_dir / "clock-offset"

    def start_service(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        """Start one more instance of a service; only the budget reads the moved clock.

        The service sees its share of the environment only, as under `orchestrator up`.
        """
        if name == "budget":
            env = {"ORCH_CLOCK_FILE": str(self.clock_file), **env}
        proc = self.start(name, env=env).proc
        assert proc is not None
        return proc

    def move_clock(self, seconds: float) -> None:
        current = float(self.clock_file.read_text()) if self.clock_file.exists() else 0.0
        self.clock_file.write_text(str(current + seconds))
        # mtime granularity: make sure readers see a new file time
        t = time.time() + 1
        os.utime(self.clock_file, (t, t))

    async def events(self, topic: str, *, run_id: str | None = None) -> list:
        """Every event now on ``topic`` (optionally of one run), read from the beginning."""
        from streams.registry import read_topics_to_end

        out = await read_topics_to_end(self.settings, [topic])
        return [e for e in out if run_id is None or e.run_id == run_id]

    async def trail(self, run_id: str) -> list:
        """Every event of one run on every topic, in time order (to say where it stopped)."""
        from streams.registry import read_topics_to_end
        from streams.topics import CATALOG

        out = await read_topics_to_end(self.settings, [t.name for t in CATALOG])
        return sorted((e for e in out if e.run_id == run_id), key=lambda e: e.occurred_at)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A run that got no answer: show where its events stop and what the services logged."""
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or not report.failed or call.excinfo is None:
        return
    exc = call.excinfo.value
    while exc is not None and not isinstance(exc, RunTimeout):
        exc = exc.__cause__ or exc.__context__
    platforms = [v for v in item.funcargs.values() if isinstance(v, Platform)]
    if not isinstance(exc, RunTimeout) or not platforms:
        return
    plat = platforms[0]
    try:
        trail = asyncio.run(plat.trail(exc.run_id))
    except Exception as err:  # the diagnosis must not hide the failure
        trail = [f"trail unavailable: {err!r}"]
    lines = [
        e if isinstance(e, str) else f"{e.occurred_at:%H:%M:%S.%f} {e.source}: {e!r}"[:400]
        for e in trail
    ]
    report.sections.append((f"trail of run {exc.run_id}", "\n".join(lines) or "no event"))
    for instance in plat.instances:
        report.sections.append((f"{instance.label} log (tail)", instance.tail(4000)))


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
    env: dict[str, str] | None = None,
) -> Iterator[Platform]:
    settings = KafkaSettings(kafka_bootstrap, f"e2e{uuid.uuid4().hex[:8]}.")
    asyncio.run(create_topics(kafka_bootstrap, prefix=settings.prefix))
    plat = Platform(settings, tmp_path_factory.mktemp("platform"), fake_llm)
    try:
        for name in SERVICES:
            for _ in range(instances.get(name, 1)):
                plat.start_service(name, **(env or {}))
        # One request all the way through: every service has joined its group.
        asyncio.run(plat.warm_up(settings, timeout=90))
        yield plat
    except BaseException:
        for name in SERVICES:
            print(f"---- {name} log ----\n{plat.logs(name)[-3000:]}")
        raise
    finally:
        plat.stop_all()
        asyncio.run(delete_prefixed_topics(kafka_bootstrap, settings.prefix))


@pytest.fixture
def prompt_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the tests that run bench.learning, whose platforms inherit this environment.

    A simulated user's feedback waits for its verdict, and the verdict for the improvement
    service's view of the run, a batched reader whose fetch the broker may hold for
    ORCH_BACKGROUND_FETCH_MAX_WAIT_MS (500 ms by default): with requests sent one at a time,
    half a second per feedback was about half of these tests' time. At 50 ms the view reads
    the same records in more, smaller fetches, and the runs learn as well: final reward
    0.858 for test_learning's learned run at both settings, 0.689-0.703 (500 ms) and 0.689
    (50 ms) for test_models'.
    """
    monkeypatch.setenv("ORCH_BACKGROUND_FETCH_MAX_WAIT_MS", "50")


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[OrchestratorClient]:
    async with OrchestratorClient(platform.settings, source="e2e") as c:
        yield c


async def events_until(
    platform: Platform,
    topic: str,
    keep: Callable[[Any], bool] = lambda e: True,
    *,
    count: int = 1,
    timeout: float = 30.0,
) -> list:
    """The events on ``topic`` that ``keep`` selects, once there are ``count`` of them.

    Each kind of event is its own topic, read apart from the others: an answer says that
    the events which caused it are on the log, not that any other kind has arrived (an
    assessment, a grant, a dead letter, a cost sent beside it). What a test reads of such a
    kind it waits for, up to ``timeout`` (generous: a loaded 2-core CI machine is slow).
    """
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in await platform.events(topic) if keep(e)]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} {topic} events in {timeout:g} s")
        await asyncio.sleep(0.2)


async def budget_shows(platform: Platform, goal: str, **expected: object) -> dict:
    """The goal's budget once its report shows ``expected`` (it follows a change within
    ORCH_BUDGET_REPORT_SECONDS)."""
    from streams.budgets import read_budget

    deadline = time.monotonic() + 20
    view: dict | None = None
    while time.monotonic() < deadline:
        view = await read_budget(platform.settings, goal)
        if view and all(view[k] == v for k, v in expected.items()):
            return view
        await asyncio.sleep(0.2)
    raise AssertionError(f"budget of {goal} never showed {expected}: {view}")


async def set_budget(
    platform: Platform, client: OrchestratorClient, goal: str, **limits: object
) -> dict:
    await client.set_budget(goal, **limits)  # type: ignore[arg-type]
    return await budget_shows(platform, goal, **limits)


__all__ = [
    "EventConsumer",
    "Platform",
    "budget_shows",
    "events_until",
    "running_platform",
    "set_budget",
]
running_platform = _running
