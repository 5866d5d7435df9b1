"""A minute without the broker in the middle of traffic: the whole platform on a broker of
its own (killing the shared one would break everyone else's tests), SIGKILLed for 60 s and
started again.

The services wait and resume without a restart; every request sent before or during the
outage ends with exactly one outcome, an answer or a failure that names the outage, and
no call is charged twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest

from bench.chaos import OwnBroker
from local.fake_openai import FakeOpenAIServer
from streams.client import Answer, OrchestratorClient
from streams.errors import BrokerUnavailable, RunFailed
from streams.events import LlmCallCompleted, RequestReceived, WorkflowCompleted, WorkflowFailed
from tests.e2e.conftest import SERVICES, Platform, _running

pytestmark = pytest.mark.e2e

OUTAGE_S = 60.0
ASK_TIMEOUT_S = 150.0  # longer than the outage: a request sent before it gets its outcome


@pytest.fixture(scope="module")
def outage_platform(
    fake_llm: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Platform, OwnBroker]]:
    broker = OwnBroker(tmp_path_factory.mktemp("own-broker"))
    broker.up()
    try:
        with pytest.MonkeyPatch.context() as env:
            # This process's clients log in to that broker (its login is in its data dir).
            for name, value in broker.client_env().items():
                env.setenv(name, value)
            instances = dict.fromkeys(SERVICES, 1)
            running = _running(broker.bootstrap, fake_llm, tmp_path_factory, instances)
            platform = next(running)
            try:
                yield platform, broker
            finally:
                next(running, None)
    finally:
        broker.down()


async def _on_the_log(platform: Platform, runs: set[str]) -> tuple[set[str], dict[str, set[str]]]:
    """Which of ``runs`` the broker took (their request is on the log), and the ids of
    each one's terminal events."""
    requests = {e.run_id for e in await platform.events(RequestReceived.topic)} & runs
    terminals: dict[str, set[str]] = defaultdict(set)
    for topic in (WorkflowCompleted.topic, WorkflowFailed.topic):
        for e in await platform.events(topic):
            if e.run_id in runs:
                terminals[e.run_id].add(e.event_id)
    return requests, terminals


async def test_a_minute_without_the_broker_in_the_middle_of_traffic(outage_platform):
    platform, broker = outage_platform
    pids = {i.name: i.proc.pid for i in platform.instances if i.proc is not None}
    outcomes: dict[str, object] = {}
    run_of: dict[int, str] = {}
    sent_during: set[str] = set()
    outage = asyncio.Event()

    class Recording(OrchestratorClient):
        def request(self, message: str, **kwargs: object) -> RequestReceived:
            event = super().request(message, **kwargs)  # type: ignore[arg-type]
            assert event.run_id is not None
            outcomes[event.run_id] = None
            run_of[int(message.split()[1].rstrip(":"))] = event.run_id
            if outage.is_set():
                sent_during.add(event.run_id)
            return event

    async with Recording(platform.settings, source="e2e-outage") as client:

        async def one(i: int) -> None:
            try:
                result: object = await client.ask(
                    f"outage {i}: explain recursion",
                    goal_id=f"outage-{i % 2}",
                    user_id="u1",
                    timeout=ASK_TIMEOUT_S,
                )
            except Exception as exc:  # every outcome is kept and judged below
                result = exc
            outcomes[run_of[i]] = result

        tasks: list[asyncio.Task[None]] = []

        async def fire(i: int) -> None:
            tasks.append(asyncio.create_task(one(i)))

        i = 0
        for _ in range(10):  # traffic before the outage
            await fire(i)
            i += 1
            await asyncio.sleep(0.5)
        await asyncio.to_thread(broker.signal, signal.SIGKILL)
        outage.set()
        down_since = time.monotonic()
        while time.monotonic() - down_since < OUTAGE_S:  # and during it
            await fire(i)
            i += 1
            await asyncio.sleep(2.0)
        await asyncio.to_thread(broker.up)
        outage.clear()
        for _ in range(6):  # and after it
            await fire(i)
            i += 1
            await asyncio.sleep(0.5)
        await asyncio.wait_for(asyncio.gather(*tasks), ASK_TIMEOUT_S + 60)

    # The services waited for the broker and resumed: none exited or was restarted.
    assert {i.name: i.proc.pid for i in platform.instances if i.proc is not None} == pids
    assert all(i.proc is None or i.proc.poll() is None for i in platform.instances)

    # Every request's client ended with an answer or a failure, never a timeout or a
    # raw error; the ones the broker never took say so.
    by_kind: dict[str, int] = defaultdict(int)
    for run, result in outcomes.items():
        if isinstance(result, Answer):
            by_kind["answered"] += 1
        elif isinstance(result, BrokerUnavailable):
            assert run in sent_during, run
            assert "broker" in str(result), result
            by_kind["not sent: broker unreachable"] += 1
        else:
            assert isinstance(result, RunFailed), (run, result)
            by_kind[f"failed: {result.reason}"] += 1
    assert by_kind["answered"] >= 10, dict(by_kind)

    # On Kafka: every request the broker took has exactly one outcome (one terminal
    # event id), the one its client was told. A request its client was told the broker
    # did not take may still have reached it: the platform answers it, but no client
    # waits for that answer, so it is waited for here.
    deadline = time.monotonic() + 60
    while True:
        requests, terminals = await _on_the_log(platform, set(outcomes))
        if set(terminals) >= requests or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    not_sent = {r for r, o in outcomes.items() if isinstance(o, BrokerUnavailable)}
    assert requests >= set(outcomes) - not_sent
    assert {r: len(ids) for r, ids in terminals.items() if len(ids) != 1} == {}
    assert set(terminals) == requests, dict(by_kind)

    # Nothing charged twice: one answer call counted per answered run, with one id.
    costs = [
        e
        for e in await platform.events(LlmCallCompleted.topic)
        if e.run_id in outcomes and e.purpose == "answer" and e.cost_usd > 0
    ]
    per_run: dict[str, set[str]] = defaultdict(set)
    for c in costs:
        per_run[c.run_id].add(c.event_id)
    assert {r: len(ids) for r, ids in per_run.items() if len(ids) > 1} == {}
    print(f"outage outcomes: {dict(by_kind)}")
