"""Slow clients against the real servers (the gateway's and the improvement service's feedback
endpoint), built as the services build them and attacked over raw sockets on 127.0.0.1: a body
that never comes holds no in-flight slot and gets 408, one key cannot take every slot, and a
connection that never finishes its headers is closed."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from services.gateway.http import GatewayApp, build_runner
from services.gateway.settings import GatewaySettings
from services.improvement.http import build_app as build_improvement_app
from services.improvement.http import build_runner as build_improvement_runner
from streams.client import Answer
from streams.http import body_bytes
from streams.keys import Identity
from tests.unit.test_gateway_http import KEY as SCRIPTED_KEY
from tests.unit.test_gateway_http import Scripted
from tests.unit.test_improvement_feedback import _Sink

KEYS = {
    "orch_aaaaaaaaaaaaaaaa_mallory-mallory-mallory-mall": Identity(
        "aaaaaaaaaaaaaaaa", "goalA", "mallory", "user"
    ),
    "orch_bbbbbbbbbbbbbbbb_victim-victim-victim-victim-": Identity(
        "bbbbbbbbbbbbbbbb", "goalB", "victim", "user"
    ),
    # Another key of mallory's goal, and a third tenant's.
    "orch_aaaaaaaaaaaaaaa2_mallory-mallory-mallory-mall": Identity(
        "aaaaaaaaaaaaaaa2", "goalA", "mallory2", "user"
    ),
    "orch_cccccccccccccccc_carol-carol-carol-carol-caro": Identity(
        "cccccccccccccccc", "goalC", "carol", "user"
    ),
}
MALLORY, VICTIM, MALLORY_TOO, CAROL = KEYS
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
PARTIAL_HEADERS = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-a: "
SLOW_BODY = 1_000_000  # the Content-Length of _slow_body's requests


class Platform(Scripted):
    """The gateway tests' scripted platform, knowing mallory's and the victim's keys, and
    counting the asks that were cancelled while they waited."""

    cancelled = 0

    async def identify(self, key: str) -> Identity | None:
        return KEYS.get(key)

    async def ask(self, message: str, **kwargs: Any) -> Answer:
        try:
            return await super().ask(message, **kwargs)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


@asynccontextmanager
async def _serving(runner: web.AppRunner) -> AsyncIterator[str]:
    """``runner`` listening on a free port of 127.0.0.1; yields its base URL."""
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _gateway(**options: Any) -> AsyncIterator[tuple[Platform, GatewayApp, str]]:
    """A gateway over the scripted platform, listening on 127.0.0.1."""
    platform = Platform()
    gateway = GatewayApp(platform, timeout_s=5.0, **options)
    async with _serving(build_runner(gateway)) as url:
        yield platform, gateway, url


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _slow_body(url: str, key: str, path: str = "/v1/chat/completions") -> Any:
    """A request whose headers promise a megabyte of body, of which one byte comes."""
    reader, writer = await _open(url)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {SLOW_BODY}\r\n\r\n{{".encode()
    )
    await writer.drain()
    return reader, writer


async def _status_line(reader: asyncio.StreamReader, within: float) -> bytes:
    return await asyncio.wait_for(reader.readline(), within)


async def _post(url: str, key: str, body: Any = CHAT, path: str = "/v1/chat/completions") -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        return resp.status, await resp.json()


async def _until(check: Callable[[], bool], within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _closed_after(
    reader: asyncio.StreamReader, trickle: Callable[[], Coroutine[Any, Any, None]]
) -> float:
    """Seconds until the server closes the connection, while ``trickle`` keeps sending."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    dripping = asyncio.create_task(trickle())
    try:
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # EOF, nothing answered
    finally:
        dripping.cancel()
    return loop.time() - start


def _dripper(writer: asyncio.StreamWriter) -> Callable[[], Coroutine[Any, Any, None]]:
    async def drip() -> None:  # a header byte every 0.1 s: never idle, never done
        while True:
            await asyncio.sleep(0.1)
            writer.write(b"a")
            await writer.drain()

    return drip


# -- the gateway ---------------------------------------------------------------------------


async def test_a_body_that_never_comes_takes_no_slot_gets_408_and_is_cut_off() -> None:
    async with _gateway(max_in_flight=2, max_in_flight_per_key=2, body_timeout_s=0.5) as (
        _,
        gateway,
        url,
    ):
        slow = [await _slow_body(url, MALLORY) for _ in range(2)]
        await _until(lambda: gateway.receiving.get("aaaaaaaaaaaaaaaa") == 2)
        assert gateway.in_flight == 0  # bodies still coming hold no slot
        # Another tenant is answered at once, while both bodies are still coming.
        assert (await _post(url, VICTIM))[0] == 200
        for reader, writer in slow:
            assert (await _status_line(reader, 3.0)).startswith(b"HTTP/1.1 408")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
            assert b"Connection: close" in head
            writer.close()
        assert gateway.receiving == {} and gateway.in_flight == 0
        assert (await _post(url, VICTIM))[0] == 200


async def test_a_slow_feedback_body_gets_408_too() -> None:
    async with _gateway(body_timeout_s=0.3) as (_, gateway, url):
        reader, writer = await _slow_body(url, MALLORY, "/v1/feedback")
        line = await _status_line(reader, 3.0)
        writer.close()
        assert line.startswith(b"HTTP/1.1 408") and gateway.receiving == {}


async def test_one_key_holds_at_most_its_share_of_the_slots() -> None:
    async with _gateway(max_in_flight=4) as (platform, gateway, url):
        assert gateway.max_in_flight_per_key == 2  # half, by default
        platform.release.clear()
        held = [asyncio.create_task(_post(url, MALLORY)) for _ in range(2)]
        for _ in held:
            await asyncio.wait_for(platform.entered.acquire(), 2.0)
        status, body = await _post(url, MALLORY)
        assert status == 429 and body["error"]["code"] == "key_in_flight"
        assert "share" in body["error"]["message"]
        # The other key still gets a slot: the flood took only its own share.
        victim = asyncio.create_task(_post(url, VICTIM))
        await asyncio.wait_for(platform.entered.acquire(), 2.0)
        assert gateway.in_flight == 3
        platform.release.set()
        assert (await victim)[0] == 200
        assert [s for s, _ in await asyncio.gather(*held)] == [200, 200]
        assert gateway.held == {} and gateway.in_flight == 0


async def test_hanging_up_does_not_let_a_key_start_more_than_its_share() -> None:
    # A request whose client went away keeps its slot until its answer comes: hanging up
    # right after sending cannot start run after run past the key's share.
    async with _gateway(max_in_flight=4) as (platform, gateway, url):
        platform.release.clear()
        body = json.dumps(CHAT).encode()
        for _ in range(2):
            reader, writer = await _open(url)
            writer.write(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer"
                f" {MALLORY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            await asyncio.wait_for(platform.entered.acquire(), 2.0)
            writer.close()
        await asyncio.sleep(0.3)
        status, answer = await _post(url, MALLORY)
        assert status == 429 and answer["error"]["code"] == "key_in_flight"
        assert len(platform.asked) == 2 and platform.cancelled == 0
        platform.release.set()
        await _until(lambda: gateway.in_flight == 0)
        assert (await _post(url, MALLORY))[0] == 200


async def test_one_key_sends_at_most_its_share_of_bodies_at_once() -> None:
    async with _gateway(max_in_flight=4, body_timeout_s=5.0) as (_, gateway, url):
        slow = [await _slow_body(url, MALLORY) for _ in range(2)]
        await _until(lambda: gateway.receiving.get("aaaaaaaaaaaaaaaa") == 2)
        status, body = await _post(url, MALLORY)
        assert status == 429 and body["error"]["code"] == "key_in_flight"
        assert (await _post(url, VICTIM))[0] == 200
        for _, writer in slow:
            writer.close()
        await _until(lambda: gateway.receiving == {})
        assert (await _post(url, MALLORY))[0] == 200


async def test_the_keys_of_one_goal_together_send_at_most_its_share_of_bodies() -> None:
    """Bodies still coming were bounded per key only: a tenant with four keys of one goal
    held 512 stalled megabyte bodies (RSS 56 -> 677 MiB) and would hold more with more keys."""
    async with _gateway(max_in_flight=4, body_timeout_s=5.0) as (_, gateway, url):
        slow = [await _slow_body(url, MALLORY) for _ in range(2)]  # the share: half of 4
        await _until(lambda: gateway.receiving.get("aaaaaaaaaaaaaaaa") == 2)
        # Another key of the same goal: the goal's share is taken.
        status, body = await _post(url, MALLORY_TOO)
        assert status == 429 and body["error"]["code"] == "goal_in_flight"
        assert "sending their body" in body["error"]["message"]
        assert (await _post(url, VICTIM))[0] == 200  # another goal is not held up
        for _, writer in slow:
            writer.close()
        await _until(lambda: gateway.receiving == {})
        assert (await _post(url, MALLORY_TOO))[0] == 200


async def test_the_bytes_of_bodies_coming_are_bounded_per_goal_and_for_the_gateway() -> None:
    # 2.5 MB for the gateway, half of it (the key share) for one goal: one slow megabyte
    # body each for two goals, and no more.
    async with _gateway(max_in_flight=8, body_buffer_bytes=2_500_000, body_timeout_s=5.0) as (
        _,
        gateway,
        url,
    ):
        held = [await _slow_body(url, MALLORY)]
        await _until(lambda: gateway.receiving.get("aaaaaaaaaaaaaaaa") == 1)
        reader, writer = await _slow_body(url, MALLORY_TOO)  # the goal's second megabyte
        assert (await _status_line(reader, 2.0)).startswith(b"HTTP/1.1 429")
        assert b"goal_in_flight" in await asyncio.wait_for(reader.read(2000), 2.0)
        writer.close()
        held.append(await _slow_body(url, VICTIM))
        await _until(lambda: gateway.receiving.get("bbbbbbbbbbbbbbbb") == 1)
        reader, writer = await _slow_body(url, CAROL)  # within goalC's share, over the total
        assert (await _status_line(reader, 2.0)).startswith(b"HTTP/1.1 503")
        answer = await asyncio.wait_for(reader.read(2000), 2.0)
        assert b"overloaded" in answer and b"ORCH_GATEWAY_BODY_BUFFER_BYTES" in answer
        writer.close()
        assert gateway.body_bytes == 2 * SLOW_BODY
        # A small body still fits: what counts is what a body may hold, not how many.
        assert (await _post(url, CAROL))[0] == 200
        for _, writer in held:
            writer.close()
        await _until(lambda: gateway.receiving == {})
        assert gateway.body_bytes == 0


async def _idle_connections(url: str, count: int) -> list[Any]:
    opened = [await _open(url) for _ in range(count)]
    await asyncio.sleep(0.1)  # the server has taken them all
    return opened


async def _cut(connection: Any) -> bool:
    """Whether the server closed ``connection`` (it sent nothing on it)."""
    reader, _ = connection
    try:
        return bool(await asyncio.wait_for(reader.read(1), 0.5) == b"")
    except TimeoutError:
        return False


async def test_connections_left_idle_make_room_for_new_ones() -> None:
    """Connections were not bounded: 300 idle ones, without any key, used up a process's 256
    file descriptors and another tenant's request timed out."""
    async with _gateway(max_connections=4) as (_, _, url):
        idle = await _idle_connections(url, 10)
        # The longest idle ones were closed to keep to 4; the newest stay open.
        assert [await _cut(c) for c in idle] == [True] * 6 + [False] * 4
        assert (await _post(url, VICTIM))[0] == 200
        assert await _cut(idle[6])  # the longest idle made room for that one
        for _, writer in idle:
            writer.close()


async def test_a_connection_handling_a_request_is_never_cut() -> None:
    async with _gateway(max_connections=2) as (platform, _, url):
        platform.release.clear()
        asked = [asyncio.create_task(_post(url, key)) for key in (VICTIM, CAROL)]
        for _ in asked:
            await asyncio.wait_for(platform.entered.acquire(), 2.0)
        # Both connections are busy: a new one is closed at once, and theirs stay.
        late = await _idle_connections(url, 3)
        assert [await _cut(c) for c in late] == [True] * 3
        platform.release.set()
        assert [s for s, _ in await asyncio.gather(*asked)] == [200, 200]
        assert (await _post(url, VICTIM))[0] == 200


_SERVER = """
import asyncio, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from aiohttp import web
from services.gateway.http import GatewayApp, build_runner
from tests.unit.test_gateway_http import Scripted

async def main():
    runner = build_runner(GatewayApp(Scripted()))  # the defaults: bounds from the fd limit
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_idle_connections_do_not_use_up_the_file_descriptors() -> None:
    """The reviewer's case: at 256 open files, 300 idle connections; the other tenant is
    answered, and the log has no flood of "Too many open files" (17,781 lines in 10 s)."""
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SERVER,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert server.stdout is not None
        port = int(await asyncio.wait_for(server.stdout.readline(), 30.0))
        url = f"http://127.0.0.1:{port}"
        idle = await _idle_connections(url, 300)
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await asyncio.wait_for(_post(url, SCRIPTED_KEY), 5.0))[0] == 200
        assert loop.time() - started < 2.0
        for _, writer in idle:
            writer.close()
    finally:
        server.kill()
        _, errors = await server.communicate()
    log = errors.decode()
    assert "Too many open files" not in log, log[-2000:]
    assert log.count("connections open, this server's limit") == 1, log[-2000:]


def test_accept_failures_are_logged_once_per_interval(caplog) -> None:
    build_runner(GatewayApp(Platform()))  # the servers' log filter is in place
    with caplog.at_level("ERROR", logger="asyncio"):
        for _ in range(1000):  # what asyncio logs per connection waiting, out of descriptors
            logging.getLogger("asyncio").error(
                "socket.accept() out of system resource\nsocket: <fd=6>",
                exc_info=OSError(24, "Too many open files"),
            )
    assert len(caplog.records) == 1


def test_the_connection_bound_keeps_file_descriptors_for_the_rest() -> None:
    from streams.http import connection_limit

    assert connection_limit(fds=1024) == 768  # a quarter kept for Kafka, files, bursts
    assert connection_limit(fds=256) == 64  # at least 256 kept, or three quarters
    assert connection_limit(fds=20000) == 4096  # the default bound
    assert connection_limit(50, fds=1024) == 50
    assert connection_limit(10_000, fds=1024) == 768  # never past what the limit leaves
    assert GatewaySettings.from_env({}).connection_limit is None  # the default
    assert GatewaySettings.from_env({"ORCH_GATEWAY_MAX_CONNECTIONS": "50"}).connection_limit == 50


def test_the_gateway_raises_its_open_file_limit_to_the_hard_one() -> None:
    script = (
        "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024));"
        "from streams.http import connection_limit, more_open_files;"
        "print(more_open_files(), resource.getrlimit(resource.RLIMIT_NOFILE)[0],"
        " connection_limit())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parents[2],
        check=True,
    )
    assert done.stdout.split() == ["1024", "1024", "768"]


async def test_the_gateway_cuts_a_connection_that_never_finishes_its_headers() -> None:
    async with _gateway(header_timeout_s=0.5) as (_, _, url):
        reader, writer = await _open(url)
        writer.write(PARTIAL_HEADERS)
        await writer.drain()
        waited = await _closed_after(reader, _dripper(writer))
        writer.close()
        assert 0.4 <= waited < 3.0
        assert (await _post(url, VICTIM))[0] == 200  # the server still answers


async def test_the_header_deadline_counts_from_the_previous_answer_on_a_kept_connection() -> None:
    async with _gateway(header_timeout_s=0.5) as (_, _, url):
        reader, writer = await _open(url)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert (await _status_line(reader, 2.0)).startswith(b"HTTP/1.1 200")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        assert json.loads(await reader.readexactly(length))["ok"] is True
        writer.write(PARTIAL_HEADERS)
        await writer.drain()
        waited = await _closed_after(reader, _dripper(writer))
        writer.close()
        assert waited < 3.0


async def test_an_answer_slower_than_the_header_deadline_still_comes() -> None:
    async with _gateway(header_timeout_s=0.3) as (platform, _, url):
        platform.release.clear()
        asked = asyncio.create_task(_post(url, VICTIM))
        await asyncio.wait_for(platform.entered.acquire(), 2.0)
        await asyncio.sleep(0.8)  # past the header deadline, while the request is handled
        platform.release.set()
        assert (await asked)[0] == 200


# -- the improvement service's feedback endpoint ------------------------------------------


def _feedback_sink() -> tuple[_Sink, str]:
    """The feedback tests' sink, and a key of u1, who owns its run r1."""
    sink = _Sink()
    return sink, sink.key("g1", "u1")


async def test_the_feedback_endpoint_cuts_a_connection_that_never_finishes_its_headers() -> None:
    sink, owner = _feedback_sink()
    runner = build_improvement_runner(build_improvement_app(sink, None), header_timeout=0.5)
    async with _serving(runner) as url:
        reader, writer = await _open(url)
        writer.write(b"POST /improve HTTP/1.1\r\nHost: x\r\nX-a: ")
        await writer.drain()
        waited = await _closed_after(reader, _dripper(writer))
        writer.close()
        assert 0.4 <= waited < 3.0
        status, body = await _post(url, owner, {"run_id": "r1", "score": 4}, "/improve")
        assert status == 200 and body["accepted"] is True


async def test_a_feedback_body_that_never_comes_gets_408() -> None:
    sink, owner = _feedback_sink()
    runner = build_improvement_runner(build_improvement_app(sink, None, body_timeout=0.3))
    async with _serving(runner) as url:
        reader, writer = await _slow_body(url, owner, "/improve")
        line = await _status_line(reader, 3.0)
        writer.close()
        assert line.startswith(b"HTTP/1.1 408")
        assert (await _post(url, owner, {"run_id": "r1", "score": 4}, "/improve"))[0] == 200


def test_a_body_is_charged_for_what_any_of_its_encodings_may_inflate_it_to() -> None:
    def charged(*codings: str, length: str = "1052") -> int:
        headers = CIMultiDict([("Content-Length", length)])
        for coding in codings:
            headers.add("Content-Encoding", coding)
        return body_bytes(make_mocked_request("POST", "/", headers=headers), 1 << 20)

    assert charged() == 1052
    assert charged("identity") == 1052
    assert charged("gzip") == 1 << 20
    # Two headers: aiohttp inflates by the last one, whatever the first says.
    assert charged("identity", "gzip") == 1 << 20
    assert charged("gzip", "identity") == 1 << 20
    assert charged("identity, gzip") == 1 << 20
