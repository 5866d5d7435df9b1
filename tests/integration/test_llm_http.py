"""The real openai client path over HTTP against the fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from local.fake_openai import (
    FakeOpenAIServer,
    Usage,
    client_request_id,
    remote_control,
    remote_stats,
    subprocess_server,
)
from streams.llm import (
    Completion,
    InMemoryLLM,
    LLMClient,
    LLMError,
    LLMRejected,
    LLMSettings,
    LLMUnavailable,
    LLMUnsettled,
    OpenAILLM,
    PriceTable,
    default_answer,
)

ASK = [
    {"role": "system", "content": "You are a billing specialist."},
    {"role": "user", "content": "Why was I charged twice this month?"},
]


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer(port=0) as srv:
        yield srv


def llm_for(srv: FakeOpenAIServer, *, timeout_s: float = 5.0, max_retries: int = 2) -> OpenAILLM:
    return OpenAILLM(
        LLMSettings(base_url=srv.base_url, timeout_s=timeout_s, max_retries=max_retries)
    )


Connect = Callable[..., OpenAILLM]


@pytest.fixture
async def connect(server: FakeOpenAIServer) -> AsyncIterator[Connect]:
    """``connect(timeout_s=..., max_retries=...)``: adapters to the server, closed after."""
    made: list[OpenAILLM] = []

    def make(**options: Any) -> OpenAILLM:
        made.append(llm_for(server, **options))
        return made[-1]

    yield make
    for llm in made:
        await llm.aclose()


# -- one contract, both adapters ----------------------------------------------------------


@dataclass
class Harness:
    llm: LLMClient
    fail: Callable[[], None]  # every call fails until recover()
    recover: Callable[[], None]
    answer_with: Callable[[str, dict[str, str]], None]


@pytest.fixture(params=["in_memory", "openai_http"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "in_memory":
        script: dict[str, Any] = {}
        memory = InMemoryLLM(
            lambda messages: script.get("reply") or default_answer(messages, "gpt-4o-mini")
        )
        yield Harness(
            memory,
            fail=lambda: memory.fail_next(10**6),
            recover=lambda: memory.fail_next(0),
            answer_with=lambda text, meta: script.update(reply=(text, meta)),
        )
        await memory.aclose()
        return
    async with FakeOpenAIServer(port=0) as srv:
        llm = llm_for(srv, max_retries=0)

        def fail() -> None:
            srv.configure(mode="error500")

        def recover() -> None:
            srv.configure(mode="ok")

        def answer_with(text: str, meta: dict[str, str]) -> None:
            srv.responder = lambda body: (text, None, meta)

        yield Harness(llm, fail, recover, answer_with)
        await llm.aclose()


async def test_contract_answer_is_deterministic_and_costed(harness: Harness) -> None:
    first = await harness.llm.complete(ASK, temperature=0.0)
    again = await harness.llm.complete(ASK, temperature=0.0)
    assert first.text == again.text == default_answer(ASK, "gpt-4o-mini")
    assert first.model == "gpt-4o-mini"
    assert first.prompt_tokens > 0 and first.completion_tokens > 0
    expected = PriceTable().cost_usd("gpt-4o-mini", first.prompt_tokens, first.completion_tokens)
    assert first.cost_usd == pytest.approx(expected)
    assert first.raw_finish_reason == "stop"
    assert first.meta == {}


async def test_contract_failing_endpoint_is_unavailable_then_recovers(harness: Harness) -> None:
    harness.fail()
    with pytest.raises(LLMUnavailable):
        await harness.llm.complete(ASK)
    harness.recover()
    assert (await harness.llm.complete(ASK)).text == default_answer(ASK, "gpt-4o-mini")


async def test_contract_hidden_meta_reaches_the_completion(harness: Harness) -> None:
    harness.answer_with("a careful answer", {"quality": "0.75"})
    completion = await harness.llm.complete(ASK)
    assert (completion.text, completion.meta) == ("a careful answer", {"quality": "0.75"})


# -- the HTTP path in detail --------------------------------------------------------------


async def test_answer_with_usage_and_cost(connect: Connect, server: FakeOpenAIServer) -> None:
    llm = connect()
    completion = await llm.complete(ASK)
    text = default_answer(ASK, "gpt-4o-mini")
    assert completion.text == text
    # The fake counts words: 5 in the system prompt, 7 in the question.
    assert completion.prompt_tokens == 12
    assert completion.completion_tokens == len(text.split())
    assert completion.cost_usd == pytest.approx(
        (12 * 0.15 + completion.completion_tokens * 0.60) / 1e6
    )
    assert 0 < completion.latency_ms < 5000
    assert server.stats()["by_status"] == {"200": 1}


async def test_options_and_hidden_fields_cross_the_wire(
    connect: Connect, server: FakeOpenAIServer
) -> None:
    seen: list[dict[str, Any]] = []

    def world(body: dict[str, Any]) -> tuple[str, Usage | None, dict[str, str]]:
        seen.append(body)
        return "hidden answer", Usage(11, 4), {"quality": "0.92", "topic": "billing"}

    server.responder = world
    llm = connect()
    completion = await llm.complete(ASK, temperature=0.2, model="gpt-4.1-nano", max_tokens=50)
    assert completion.text == "hidden answer"
    assert completion.meta == {"quality": "0.92", "topic": "billing"}
    assert (completion.prompt_tokens, completion.completion_tokens) == (11, 4)
    assert completion.model == "gpt-4.1-nano"
    assert completion.cost_usd == pytest.approx((11 * 0.10 + 4 * 0.40) / 1e6)
    (body,) = seen
    assert body["messages"] == ASK
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-4.1-nano", 0.2, 50)


@pytest.mark.parametrize(
    ("changes", "statuses", "at_least_s"),
    [
        ({"fail_next": 2}, {"200": 1, "500": 2}, 0.0),
        ({"fail_next": 1, "fail_status": 429, "retry_after_ms": 300}, {"200": 1, "429": 1}, 0.3),
    ],
    ids=["500", "429_retry_after"],
)
async def test_retried_until_success(
    connect: Connect,
    server: FakeOpenAIServer,
    changes: dict[str, Any],
    statuses: dict[str, int],
    at_least_s: float,
) -> None:
    server.configure(**changes)
    llm = connect(max_retries=2)
    started = time.monotonic()
    completion = await llm.complete(ASK)
    assert at_least_s <= time.monotonic() - started < 3.0
    assert completion.text == default_answer(ASK, "gpt-4o-mini")
    assert server.stats()["by_status"] == statuses
    assert server.requests == sum(statuses.values())


@pytest.mark.parametrize(
    ("changes", "max_retries", "status"),
    [({"fail_next": 5}, 1, 500), ({"mode": "error429", "retry_after_ms": 50}, 2, 429)],
)
async def test_unavailable_after_the_retries(
    connect: Connect,
    server: FakeOpenAIServer,
    changes: dict[str, Any],
    max_retries: int,
    status: int,
) -> None:
    server.configure(**changes)
    with pytest.raises(LLMUnavailable) as caught:
        await connect(max_retries=max_retries).complete(ASK)
    assert caught.value.status_code == status
    assert server.requests == max_retries + 1


async def test_streaming_is_refused_clearly(server: FakeOpenAIServer) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="does not stream"):
        await client.chat.completions.create(model="m", messages=ASK, stream=True)  # type: ignore[arg-type]
    await client.close()


@pytest.mark.parametrize("cause", ["mode", "empty_messages"])
async def test_400_is_rejected_without_retry(
    connect: Connect, server: FakeOpenAIServer, cause: str
) -> None:
    llm = connect(max_retries=2)
    messages: list[dict[str, str]] = ASK
    if cause == "mode":
        server.configure(mode="error400")
    else:
        messages = []
    with pytest.raises(LLMRejected) as caught:
        await llm.complete(messages)
    assert caught.value.status_code == 400
    assert server.requests == 1


async def test_hang_is_unavailable_within_the_timeout(
    connect: Connect, server: FakeOpenAIServer
) -> None:
    server.configure(mode="hang")
    llm = connect(timeout_s=0.5, max_retries=2)
    started = time.monotonic()
    with pytest.raises(LLMUnavailable, match="timed out after 0.5 s"):
        await llm.complete(ASK)
    elapsed = time.monotonic() - started
    # The deadline covers the retries too, so the caller waits about timeout_s, not 3x
    # (1.5 s); the rest of the bound is room for a loaded machine.
    assert 0.45 <= elapsed < 1.4
    assert server.stats()["by_status"] == {"hang": 1}


def settling(server: FakeOpenAIServer, timeout_s: float, settle_s: float) -> OpenAILLM:
    settings = LLMSettings(
        base_url=server.base_url, timeout_s=timeout_s, settle_s=settle_s, max_retries=0
    )
    return OpenAILLM(settings)


class Late:
    """A ``late`` callback that keeps what it is told."""

    def __init__(self) -> None:
        self.outcomes: list[Completion | LLMError] = []
        self.told = asyncio.Event()

    async def __call__(self, outcome: Completion | LLMError) -> None:
        self.outcomes.append(outcome)
        self.told.set()


async def test_a_call_given_up_on_at_the_timeout_is_read_when_it_answers(
    server: FakeOpenAIServer,
) -> None:
    # The endpoint takes the call (and bills it) but answers after the caller's timeout.
    server.configure(latency_ms=1500)
    llm = settling(server, 0.3, 5.0)
    late = Late()
    started = time.monotonic()
    with pytest.raises(LLMUnavailable, match="timed out after 0.3 s") as caught:
        await llm.complete(ASK, late=late)
    # The caller is not kept waiting for the answer (1.5 s); the rest is a loaded machine's.
    assert time.monotonic() - started < 1.3
    assert caught.value.settling
    await asyncio.wait_for(late.told.wait(), 5.0)
    (outcome,) = late.outcomes
    assert isinstance(outcome, Completion)
    assert outcome.prompt_tokens > 0 and outcome.cost_usd > 0
    assert outcome.latency_ms >= 1500
    assert server.requests == 1  # the same call, not a second one
    await llm.aclose()


def test_an_answer_ready_when_a_paused_caller_resumes_past_its_timeout_is_not_lost() -> None:
    # Chaos seed 12: a loader paused (SIGSTOP) while its call was out resumed 11 s later
    # with the answer in its socket and the timeout due at once; the call was done by the
    # time the timeout was handled, and its paid answer was dropped, never counted.
    server = FakeOpenAIServer(port=0).start_in_thread()
    server.configure(latency_ms=100)
    try:

        async def scenario() -> tuple[list[Completion], Late]:
            llm = settling(server, 0.3, 5.0)
            late = Late()
            got: list[Completion] = []
            # The whole process stops for 0.8 s while the answer arrives (a paused process).
            asyncio.get_running_loop().call_later(0.05, time.sleep, 0.8)
            try:
                got.append(await llm.complete(ASK, late=late))
            except LLMUnavailable as exc:
                assert exc.settling, "given up on without anybody to tell what it cost"
                await asyncio.wait_for(late.told.wait(), 5.0)
            await llm.aclose()
            return got, late

        got, late = asyncio.run(scenario())
        answers = got + [o for o in late.outcomes if isinstance(o, Completion)]
        assert len(answers) == 1 and answers[0].cost_usd > 0
        assert server.requests == 1
    finally:
        server.stop()


async def test_without_late_the_call_is_cut_off_at_the_timeout(server: FakeOpenAIServer) -> None:
    server.configure(latency_ms=900)
    llm = settling(server, 0.3, 5.0)
    with pytest.raises(LLMUnavailable, match="timed out") as caught:
        await llm.complete(ASK)
    assert not caught.value.settling
    await llm.aclose()


async def test_a_late_failure_and_a_call_past_the_settle_time_are_reported(
    server: FakeOpenAIServer,
) -> None:
    # Settled by 1.4 s: the failure at 0.5 s is well inside it, even on a loaded machine.
    llm = settling(server, 0.2, 1.2)
    # Hangs past the timeout, then fails: nothing was billed, the error says so.
    server.configure(mode="hang", hang_s=0.5)
    failed = Late()
    with pytest.raises(LLMUnavailable):
        await llm.complete(ASK, late=failed)
    await asyncio.wait_for(failed.told.wait(), 5.0)
    (outcome,) = failed.outcomes
    assert isinstance(outcome, LLMUnavailable) and not isinstance(outcome, LLMUnsettled)
    assert outcome.status_code == 504
    # Hangs past the timeout and the settle time: whether it was billed is not known.
    server.configure(mode="hang", hang_s=3.0)
    unknown = Late()
    with pytest.raises(LLMUnavailable):
        await llm.complete(ASK, late=unknown)
    await asyncio.wait_for(unknown.told.wait(), 5.0)
    assert isinstance(unknown.outcomes[0], LLMUnsettled)
    await llm.aclose()


async def test_settle_zero_keeps_the_old_cut_off(server: FakeOpenAIServer) -> None:
    server.configure(latency_ms=600)
    llm = settling(server, 0.2, 0.0)
    late = Late()
    with pytest.raises(LLMUnavailable) as caught:
        await llm.complete(ASK, late=late)
    assert not caught.value.settling
    await asyncio.sleep(0.8)
    assert late.outcomes == []
    await llm.aclose()


async def test_close_waits_for_a_settling_call(server: FakeOpenAIServer) -> None:
    server.configure(latency_ms=500)
    llm = settling(server, 0.1, 5.0)
    late = Late()
    with pytest.raises(LLMUnavailable):
        await llm.complete(ASK, late=late)
    await llm.aclose()
    assert [type(o) for o in late.outcomes] == [Completion]


async def test_the_callers_request_id_reaches_the_endpoint() -> None:
    seen: list[str | None] = []

    def respond(body: dict[str, Any]) -> tuple[str, Usage, dict[str, str]]:
        seen.append(client_request_id())
        return "ok", Usage(3, 1), {}

    async with FakeOpenAIServer(port=0, responder=respond) as srv:
        llm = llm_for(srv)
        await llm.complete(ASK, request_id="cost-123")
        await llm.complete(ASK)
        await llm.aclose()
    assert seen == ["cost-123", None]


async def test_nothing_listening_is_unavailable() -> None:
    # Bound and never listening, kept so: a connection is refused, and no other process
    # can take the port meanwhile (closed, it was anyone's).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        llm = OpenAILLM(LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1))
        started = time.monotonic()
        with pytest.raises(LLMUnavailable, match="unreachable"):
            await llm.complete(ASK)
        await llm.aclose()
        assert time.monotonic() - started < 3.0


async def test_down_mode_resets_connections(connect: Connect, server: FakeOpenAIServer) -> None:
    server.configure(mode="down")
    llm = connect(max_retries=1)
    with pytest.raises(LLMUnavailable, match="unreachable"):
        await llm.complete(ASK)
    assert server.stats()["by_status"] == {"reset": 2}


async def test_injected_latency_and_small_server_time(
    connect: Connect, server: FakeOpenAIServer
) -> None:
    llm = connect()
    for _ in range(20):
        await llm.complete(ASK)
    server.configure(latency_ms=100)
    slow = await llm.complete(ASK)
    assert slow.latency_ms >= 100
    stats = server.stats()
    assert stats["requests"] == 21
    # Handler time excludes the injected delay and stays far below a millisecond.
    assert stats["server_us"]["count"] == 21
    assert stats["server_us"]["p50"] < 1000


async def test_one_model_can_be_slow_among_fast_ones(
    connect: Connect, server: FakeOpenAIServer
) -> None:
    llm = connect()
    server.configure(model_latency_ms={"big": 300})
    slow = await llm.complete(ASK, model="big")
    fast = await llm.complete(ASK, model="small")
    assert slow.latency_ms >= 300 > fast.latency_ms
    async with httpx.AsyncClient(base_url=server.root_url) as http:
        for bad in ({"big": -1}, {"big": "slow"}, ["big"], {"big": True}):
            refused = await http.post("/_control", json={"model_latency_ms": bad})
            assert refused.status_code == 400
            assert "model_latency_ms must map" in refused.json()["error"]["message"]
        assert (await http.get("/_control")).json()["model_latency_ms"] == {"big": 300.0}


async def test_models_endpoint(server: FakeOpenAIServer) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="not-needed")
    models = await client.models.list()
    await client.close()
    assert [m.id for m in models.data] == ["fake"]


async def test_control_endpoint_over_http(connect: Connect, server: FakeOpenAIServer) -> None:
    async with httpx.AsyncClient(base_url=server.root_url) as http:
        changed = await http.post("/_control", json={"mode": "error500", "latency_ms": 5})
        assert changed.status_code == 200
        assert changed.json()["mode"] == "error500"
        assert changed.json()["latency_ms"] == 5.0
        refused = await http.post("/_control", json={"mode": "sideways", "fail_next": 1})
        assert refused.status_code == 400
        assert "mode must be one of" in refused.json()["error"]["message"]
        # A refused change changes nothing, not even its valid part.
        current = (await http.get("/_control")).json()
        assert (current["mode"], current["fail_next"]) == ("error500", 0)
        assert (await http.post("/_control", json={"colour": "red"})).status_code == 400

        llm = connect(max_retries=0)
        with pytest.raises(LLMUnavailable):
            await llm.complete(ASK)
        assert (await http.get("/_stats")).json()["by_status"] == {"500": 1}

        await http.post("/_control", json={"mode": "ok", "reset_stats": True})
        assert (await http.get("/_stats")).json()["requests"] == 0


# -- sync use: a thread, another process --------------------------------------------------


def test_server_in_a_thread_serves_sync_clients() -> None:
    srv = FakeOpenAIServer().start_in_thread()
    stats_url = f"{srv.root_url}/_stats"
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="not-needed", max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=ASK)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == default_answer(ASK, "gpt-4o-mini")
        remote_control(srv.base_url, mode="error500")
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o-mini", messages=ASK)  # type: ignore[arg-type]
        assert remote_stats(srv.base_url)["by_status"] == {"200": 1, "500": 1}
        client.close()
    finally:
        srv.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(stats_url)


def test_stop_releases_a_hanging_request_quickly() -> None:
    with FakeOpenAIServer(port=0) as srv:
        srv.configure(mode="hang")
        statuses: list[int] = []
        caller = threading.Thread(
            target=lambda: statuses.append(
                httpx.post(
                    f"{srv.base_url}/chat/completions",
                    json={"model": "m", "messages": ASK},
                    timeout=30,
                ).status_code
            )
        )
        caller.start()
        while srv.requests == 0:
            time.sleep(0.01)
        started = time.monotonic()
    assert time.monotonic() - started < 3.0
    caller.join(5)
    assert statuses == [504]


def test_a_taken_port_fails_to_start() -> None:
    with FakeOpenAIServer(port=0) as first:
        taken = FakeOpenAIServer(port=first.port)
        with pytest.raises(OSError):
            taken.start_in_thread()


def test_command_line_server_is_controlled_from_another_process() -> None:
    with subprocess_server("--latency-ms", "30") as base_url:
        started = time.monotonic()
        ok = httpx.post(f"{base_url}/chat/completions", json={"model": "m", "messages": ASK})
        assert ok.status_code == 200
        assert time.monotonic() - started >= 0.03
        assert ok.json()["choices"][0]["message"]["content"] == default_answer(ASK, "m")
        assert ok.json()["usage"] == {
            "prompt_tokens": 12,
            "completion_tokens": len(default_answer(ASK, "m").split()),
            "total_tokens": 12 + len(default_answer(ASK, "m").split()),
        }
        assert remote_control(base_url, fail_next=1)["fail_next"] == 1
        failed = httpx.post(f"{base_url}/chat/completions", json={"model": "m", "messages": ASK})
        assert failed.status_code == 500
        assert remote_stats(base_url)["by_status"] == {"200": 1, "500": 1}


# -- an endpoint that echoes the key in its error ---------------------------------------

_SECRET = "sk-live-Q2w9e8r7t6y5u4i3o2p1"


@pytest.fixture
async def echoing_endpoint() -> AsyncIterator[tuple[str, list[int]]]:
    """Answers each call with the next status of ``statuses``, its body echoing the key."""
    statuses: list[int] = []

    async def chat(request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization", "")
        body = {
            "error": {
                "message": f"Incorrect API key provided: {sent.removeprefix('Bearer ')}. "
                f"Request headers: {{'Authorization': '{sent}'}}; retry with api_key=<yours>",
                "type": "invalid_request_error",
            }
        }
        return web.json_response(body, status=statuses.pop(0) if statuses else 401)

    async with _chat_endpoint(chat) as url:
        yield url, statuses


@contextlib.asynccontextmanager
async def _chat_endpoint(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> AsyncIterator[str]:
    """An OpenAI-shaped endpoint whose chat completions ``handler`` answers; its base URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("status", "error"), [(401, LLMRejected), (503, LLMUnavailable)])
async def test_an_error_body_that_echoes_the_key_is_scrubbed(
    echoing_endpoint: tuple[str, list[int]], status: int, error: type[Exception]
) -> None:
    url, statuses = echoing_endpoint
    statuses.append(status)
    llm = OpenAILLM(LLMSettings(base_url=url, api_key=_SECRET, max_retries=0))
    try:
        with pytest.raises(error) as caught:
            await llm.complete(ASK)
    finally:
        await llm.aclose()
    message = str(caught.value)
    assert f"HTTP {status}" in message and "Incorrect API key provided: [redacted]" in message
    assert _SECRET not in message and "Q2w9e8r7" not in message
    assert "Bearer" not in message and "api_key=[redacted]" in message
    # Nothing chained either: a logged traceback must not show the raw body.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# -- an endpoint that answers 200 with what it likes ------------------------------------
_GOOD_ANSWER: dict[str, Any] = {
    "id": "x",
    "object": "chat.completion",
    "model": "odd-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
}


@pytest.fixture
async def odd_endpoint() -> AsyncIterator[tuple[str, list[bytes]]]:
    """Answers each POST with 200 and the next body of the list it yields."""
    bodies: list[bytes] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            status=200, body=bodies.pop(0), headers={"Content-Type": "application/json"}
        )

    async with _chat_endpoint(answer) as url:
        yield url, bodies


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>gateway error</html>", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'"just a string"', "not a JSON object"),
        (b"{}", "without choices"),
        (b'{"choices": []}', "without choices"),
        (b'{"choices": "many"}', "without choices"),
        (b'{"choices": [{"message": {"content": {"nested": true}}}]}', "not text"),
        (b'{"choices": [{"message": {"content": ["a", "b"]}}]}', "not text"),
    ],
)
async def test_a_200_answer_that_is_not_a_chat_completion_is_unavailable(
    odd_endpoint: tuple[str, list[bytes]], body: bytes, reason: str
) -> None:
    url, bodies = odd_endpoint
    bodies.append(body)
    llm = OpenAILLM(LLMSettings(base_url=url, max_retries=0))
    try:
        with pytest.raises(LLMUnavailable, match=reason):
            await llm.complete(ASK)
    finally:
        await llm.aclose()


async def test_odd_fields_of_a_usable_answer_fall_back_instead_of_failing(
    odd_endpoint: tuple[str, list[bytes]],
) -> None:
    url, bodies = odd_endpoint
    good = json.dumps(_GOOD_ANSWER).encode()
    # usage as text, negative or missing: counted by estimate; no model: the one asked for;
    # a choice that is not an object, or a message without content: an empty answer.
    odd = [
        {**_GOOD_ANSWER, "usage": {"prompt_tokens": "7", "completion_tokens": 2}},
        {**_GOOD_ANSWER, "usage": {"prompt_tokens": -7, "completion_tokens": 2}},
        {k: v for k, v in _GOOD_ANSWER.items() if k not in ("usage", "model")},
        {**_GOOD_ANSWER, "choices": [7]},
        {**_GOOD_ANSWER, "choices": [{"message": {"role": "assistant"}, "finish_reason": 3}]},
    ]
    bodies.extend([good, *(json.dumps(b).encode() for b in odd)])
    llm = OpenAILLM(LLMSettings(base_url=url, max_retries=0, model="asked-model"))
    try:
        exact = await llm.complete(ASK)
        assert (exact.text, exact.model, exact.prompt_tokens, exact.completion_tokens) == (
            "hi",
            "odd-model",
            7,
            2,
        )
        texty, negative, bare, not_object, no_content = [await llm.complete(ASK) for _ in range(5)]
    finally:
        await llm.aclose()
    for estimated in (texty, negative, bare):
        assert estimated.text == "hi" and estimated.prompt_tokens > 0
        assert estimated.prompt_tokens != 7 or estimated.completion_tokens != 2
    assert bare.model == "asked-model"
    assert not_object.text == "" and no_content.text == ""
    assert no_content.raw_finish_reason is None
