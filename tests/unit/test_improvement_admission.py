"""The feedback endpoint's in-flight bound, over a real server and real sockets on 127.0.0.1:
at most ``max_in_flight`` requests at once (503 past it), one key (and one goal, all its
keys together) at most its share (429), and the same while bodies are still coming (Slack
commands one share together); slots are given back when requests end. One Authorization
header per request."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from services.improvement.http import SlackSettings, build_app, build_runner
from streams.events import FeedbackDecided, PromotionDecided
from tests.slack import slash_command
from tests.unit.test_http_slow_clients import _open, _post, _serving
from tests.unit.test_improvement_feedback import SECRET, _Sink

FEEDBACK = {"run_id": "r1", "score": 4}


class _Waiting(_Sink):
    """Holds every verdict until ``release``; ``entered`` counts the requests waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Semaphore(0)
        self.release = asyncio.Event()

    async def verdict(
        self, request_id: str, timeout: float
    ) -> FeedbackDecided | PromotionDecided | None:
        self.entered.release()
        await self.release.wait()
        return await super().verdict(request_id, timeout)


async def test_the_feedback_endpoint_bounds_requests_in_flight_and_each_keys_share() -> None:
    sink = _Waiting()
    # Two keys of the run's owner (u1 of g1): each its own key id, so its own share, but
    # one goal's share for both together. Another goal's owner (of r2), a third goal.
    first, same_goal = (sink.key("g1", "u1") for _ in range(2))
    second, third = sink.key("g2", "slack:U123"), sink.key("g3", "u3")
    app = build_app(sink, None, max_in_flight=4, key_share=0.5)
    async with _serving(build_runner(app)) as url:

        async def improve(key: str, body: dict[str, object]) -> asyncio.Task[Any]:
            return asyncio.create_task(_post(url, key, body, "/improve"))

        held = [await improve(first, FEEDBACK) for _ in range(2)]
        for _ in held:
            await asyncio.wait_for(sink.entered.acquire(), 2.0)
        status, body = await _post(url, first, FEEDBACK, "/improve")
        assert status == 429 and "share" in str(body["error"])
        # Another key of the same goal does not add a share: the goal has its own.
        status, body = await _post(url, same_goal, FEEDBACK, "/improve")
        assert status == 429 and "goal 'g1'" in str(body["error"])
        # Another goal's key still gets its slots: the first goal took only its share.
        held += [await improve(second, {"run_id": "r2", "score": 4}) for _ in range(2)]
        for _ in held[2:]:
            await asyncio.wait_for(sink.entered.acquire(), 2.0)
        status, body = await _post(url, third, FEEDBACK, "/improve")
        assert status == 503 and "in flight" in str(body["error"])
        sink.release.set()
        assert [s for s, _ in await asyncio.gather(*held)] == [200] * 4
        # Every slot was given back.
        answers = await asyncio.gather(*(_post(url, k, FEEDBACK, "/improve") for k in (first,) * 2))
        assert [s for s, _ in answers] == [200, 200]
    assert len(sink.sent) == 6


async def test_a_key_has_at_most_its_share_of_bodies_still_coming() -> None:
    sink = _Sink()
    key = sink.key("g1", "u1")
    app = build_app(sink, None, max_in_flight=4, key_share=0.5, body_timeout=5.0)
    async with _serving(build_runner(app)) as url:
        slow = []
        for _ in range(2):
            reader, writer = await _open(url)
            writer.write(
                b"POST /improve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 100\r\n\r\n{"
            )
            await writer.drain()
            slow.append((reader, writer))
        await asyncio.sleep(0.2)  # both are reading their body now
        status, body = await _post(url, key, FEEDBACK, "/improve")
        assert status == 429 and "sending their body" in str(body["error"])
        # Another goal's key sends its body (one of the same goal's meets the goal's share).
        other = sink.key("g2", "slack:U123")
        assert (await _post(url, other, {"run_id": "r2", "score": 4}, "/improve"))[0] == 200
        for _, writer in slow:
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.2)  # the server sees them gone and gives the share back
        assert (await _post(url, key, FEEDBACK, "/improve"))[0] == 200


async def _slow_bodies(url: str, path: str, headers: list[str], count: int) -> list[Any]:
    """``count`` requests to ``path`` whose headers promise a body of which one byte comes."""
    slow = []
    for _ in range(count):
        reader, writer = await _open(url)
        head = "".join(f"{h}\r\n" for h in headers)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: 1000\r\n\r\n{{".encode()
        )
        await writer.drain()
        slow.append((reader, writer))
    await asyncio.sleep(0.2)  # the server is reading their bodies now
    return slow


async def _close(slow: list[Any]) -> None:
    for _, writer in slow:
        writer.close()
        await writer.wait_closed()


def _json_headers(key: str) -> list[str]:
    return ["Content-Type: application/json", f"Authorization: Bearer {key}"]


async def test_a_goals_keys_together_have_at_most_its_share_of_bodies_still_coming() -> None:
    # Bodies were bounded per key only: a tenant with many keys of one goal made the server
    # buffer a share of bodies per key, as many as it had keys.
    sink = _Sink()
    first, second = sink.key("g1", "u1"), sink.key("g1", "u1")
    app = build_app(sink, None, max_in_flight=4, key_share=0.5, body_timeout=5.0)
    async with _serving(build_runner(app)) as url:
        slow = await _slow_bodies(url, "/improve", _json_headers(first), 2)
        status, body = await _post(url, second, FEEDBACK, "/improve")
        assert status == 429
        assert "goal 'g1' has 2 requests sending their body" in str(body["error"])
        assert "for all its keys together" in str(body["error"])
        # Another goal still sends its body: the goal took only its share.
        other = sink.key("g2", "slack:U123")
        assert (await _post(url, other, {"run_id": "r2", "score": 4}, "/improve"))[0] == 200
        await _close(slow)
        await asyncio.sleep(0.2)  # the server sees them gone and gives the share back
        assert (await _post(url, second, FEEDBACK, "/improve"))[0] == 200
    assert len(sink.sent) == 2


async def test_bodies_still_coming_are_bounded_for_the_whole_endpoint() -> None:
    # Goals each within their share, together, still made the server buffer without bound.
    sink = _Sink()
    keys = [sink.key(f"g{n}", "u1") for n in range(3)]
    app = build_app(sink, None, max_in_flight=4, key_share=0.5, body_timeout=5.0)
    async with _serving(build_runner(app)) as url:
        slow = [
            s
            for key in keys[:2]
            for s in await _slow_bodies(url, "/improve", _json_headers(key), 2)
        ]
        status, body = await _post(url, keys[2], FEEDBACK, "/improve")
        assert status == 503
        assert body["error"] == (
            "this endpoint has 4 requests sending their body, its limit"
            " (ORCH_IMPROVE_MAX_IN_FLIGHT); try again"
        )
        await _close(slow)
        await asyncio.sleep(0.2)
        assert (await _post(url, sink.key("g1", "u1"), FEEDBACK, "/improve"))[0] == 200


async def test_slack_commands_still_sending_their_body_have_one_share_together() -> None:
    # A Slack command's sender is known only once its body is in: unbounded, anyone could
    # make the server buffer as many bodies as connections it opened.
    sink = _Sink()
    app = build_app(sink, SlackSettings(SECRET), max_in_flight=4, key_share=0.5, body_timeout=5.0)
    signed = ["Content-Type: application/x-www-form-urlencoded", "X-Slack-Signature: v0=ab",
              "X-Slack-Request-Timestamp: 1700000000"]  # fmt: skip
    async with _serving(build_runner(app)) as url:
        slow = await _slow_bodies(url, "/slack/commands", signed, 2)
        async with aiohttp.ClientSession() as session:
            body, headers = slash_command(SECRET, "r2 2 answers should cite sources")
            async with session.post(url + "/slack/commands", data=body, headers=headers) as resp:
                assert resp.status == 503
                assert (
                    "has 2 Slack commands sending their body, their share"
                    in (await resp.json())["error"]
                )
        # The JSON routes keep the rest of the endpoint's bodies.
        assert (await _post(url, sink.key("g1", "u1"), FEEDBACK, "/improve"))[0] == 200
        await _close(slow)
    assert [e.channel for e in sink.sent] == ["http"]


async def test_a_request_with_two_authorization_headers_is_refused() -> None:
    # The service acted as the first key while a proxy in front may have checked the second.
    sink = _Sink()
    mine, operator = sink.key("g1", "u1"), sink.key("g1", "ops", role="operator")
    async with TestClient(TestServer(build_app(sink, None))) as client:
        for path, first, second in (
            ("/improve", mine, sink.key("g9", "u9")),
            ("/improve", sink.key("g9", "u9"), mine),
            ("/improvements/imp_1/approve", operator, mine),
            ("/improvements/imp_1/promote", operator, mine),
        ):
            both = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
            resp = await client.post(path, json=FEEDBACK, headers=CIMultiDict(both))
            assert resp.status == 400, path
            assert (await resp.json())["error"] == "send one Authorization header, not several"
        one = {"Authorization": f"Bearer {mine}"}
        assert (await client.post("/improve", json=FEEDBACK, headers=one)).status == 200
    assert len(sink.sent) == 1 and sink.asked == []
