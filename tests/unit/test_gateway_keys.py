"""The gateway's key check against a flood of made-up keys: no in-flight slot taken, and a
bounded number of reads of the key topics, while a key created a moment ago still works.

The real HTTP layer and :class:`PlatformBackend` over a key view whose topics are a list:
a read of them (``sync``) folds what was published so far and is counted.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.http import GatewayApp, build_app
from services.gateway.service import KeyCatchUp, PlatformBackend
from streams.client import Answer
from streams.clock import FakeClock
from streams.events import ApiKeyRevoked, Event
from streams.kafka import KafkaSettings
from streams.keys import KeyRegistry, KeyView, mint_key

INTERVAL = 0.3
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


class ListKeys:
    """A key view whose topics are ``published``; ``sync`` may be held with ``gate``."""

    def __init__(self) -> None:
        self.registry = KeyRegistry()
        self.published: list[Event] = []
        self.syncs = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.reading = asyncio.Event()  # set when a read starts

    async def sync(self, timeout: float = 5.0) -> None:
        self.syncs += 1
        self.reading.set()
        upto = len(self.published)  # what is on the topics when the read starts
        await self.gate.wait()
        for event in self.published[:upto]:
            self.registry.apply(event)


class Platform:
    """The SDK client and run index: every ask is answered at once."""

    async def ask(self, message: str, **kwargs: Any) -> Answer:
        return Answer("r1", "a1", "general", f"answer to {message}", 0.001, 5.0, "llm")

    def note(self, run_id: str, goal_id: str) -> None:
        pass


@pytest.fixture
async def setup() -> Any:
    keys = ListKeys()
    platform = Platform()
    backend = PlatformBackend(
        platform,  # type: ignore[arg-type]
        keys,  # type: ignore[arg-type]
        platform,  # type: ignore[arg-type]
        FakeClock(datetime(2026, 3, 1, tzinfo=UTC)),
        catch_up_interval=INTERVAL,
    )
    gateway = GatewayApp(backend, max_in_flight=1, timeout_s=5.0)
    async with TestClient(TestServer(build_app(gateway))) as http:
        yield keys, gateway, http


def _made_up() -> str:
    return f"orch_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


async def _chat(http: TestClient, key: str) -> int:
    response = await http.post(
        "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    )
    await response.read()
    return response.status


def _create(keys: ListKeys) -> str:
    key, issued = mint_key("g1", "u1", source="test")
    keys.published.append(issued)
    return key


async def test_unknown_keys_take_no_slot_while_their_read_is_pending(setup) -> None:
    keys, gateway, http = setup
    valid = _create(keys)
    await keys.sync()
    keys.gate.clear()  # the broker is slow to answer
    keys.reading.clear()
    flood = [asyncio.create_task(_chat(http, _made_up())) for _ in range(20)]
    await keys.reading.wait()
    assert gateway.in_flight == 0
    # The only slot is free for a request with a key (max_in_flight is 1).
    assert await _chat(http, valid) == 200
    keys.gate.set()
    assert await asyncio.gather(*flood) == [401] * 20


async def test_a_flood_of_unknown_keys_reads_the_topics_once_per_interval(setup) -> None:
    keys, _, http = setup
    loop = asyncio.get_running_loop()
    start = loop.time()
    statuses: list[int] = []
    for _ in range(5):
        statuses += await asyncio.gather(*(_chat(http, _made_up()) for _ in range(40)))
    elapsed = loop.time() - start
    assert statuses == [401] * 200
    assert keys.syncs <= elapsed / INTERVAL + 2, (keys.syncs, elapsed)
    assert keys.syncs < 20


async def test_a_key_works_at_once_after_its_creation(setup) -> None:
    keys, _, http = setup
    assert await _chat(http, _create(keys)) == 200
    assert keys.syncs == 1


async def test_a_key_created_during_a_flood_works_on_its_first_request(setup) -> None:
    keys, _, http = setup
    keys.gate.clear()
    flood = asyncio.gather(*(_chat(http, _made_up()) for _ in range(50)))
    await keys.reading.wait()
    # Created after the flood's read began, which cannot see it: the next read must.
    key = _create(keys)
    asking = asyncio.create_task(_chat(http, key))
    await asyncio.sleep(0.05)
    keys.gate.set()
    assert await asking == 200
    assert await flood == [401] * 50
    assert keys.syncs <= 3


async def test_only_strings_shaped_like_keys_cause_a_read(setup) -> None:
    keys, _, http = setup
    for key in ("sk-not-ours", "orch_0123456789abcdef_x", "orch_nothex_" + "x" * 43):
        assert await _chat(http, key) == 401
    assert keys.syncs == 0


async def test_callers_share_a_read_that_started_after_they_called() -> None:
    started: list[float] = []
    loop = asyncio.get_running_loop()

    async def sync() -> None:
        started.append(loop.time())
        await asyncio.sleep(0.05)

    catch_up = KeyCatchUp(sync, interval=0.2)
    await catch_up()
    called = loop.time()
    await asyncio.gather(*(catch_up() for _ in range(10)))
    assert len(started) == 2
    assert started[1] >= called  # the read they waited for began after they called
    assert started[1] - started[0] >= 0.2 - 0.01


async def test_an_operator_revoked_a_moment_ago_is_no_operator_to_a_key_view() -> None:
    # The budget asks a KeyView before changing limits; it answered from what it had read,
    # so a key revoked just before the command still passed.
    view = KeyView(KafkaSettings("127.0.0.1:1"), operators={"operator"})
    _, issued = mint_key("ops", "admin", "operator", source="t")
    view.registry.apply(issued)
    pending = [ApiKeyRevoked(source="t", key_id=issued.key_id)]

    class _Topics:
        async def sync(self, timeout: float = 5.0) -> bool:
            for event in pending:
                view.registry.apply(event)
            pending.clear()
            return True

    view._view = _Topics()  # type: ignore[assignment]  # noqa: SLF001
    assert await view.is_operator("operator")  # named in ORCH_OPERATORS: no key involved
    assert not await view.is_operator("admin")
