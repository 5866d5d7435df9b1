"""The real OpenAILLM against a hostile endpoint on 127.0.0.1: what it answers is read within
bounds (body size, meta, model name, token counts, nesting), and what is out of bounds is an
LLMError, never an uncaught exception or a record too large for Kafka."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from streams.events import LlmCallCompleted, WorkflowCompleted
from streams.llm import (
    MAX_META_ENTRIES,
    MAX_META_KEY_CHARS,
    MAX_META_VALUE_CHARS,
    MAX_MODEL_CHARS,
    MAX_RESPONSE_BYTES,
    META_FIELD,
    Completion,
    LLMRejected,
    LLMSettings,
    LLMUnavailable,
    OpenAILLM,
    PriceTable,
    estimate_tokens,
)
from tests.unit.test_loader_attempts import _loader, _task

ASK = [{"role": "user", "content": "Why was I charged twice this month?"}]
PRICES = PriceTable()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer(
    *,
    text: str = "hi",
    model: str = "gpt-4o-mini",
    usage: Any = None,
    meta: Any = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2} if usage is None else usage,
    }
    if meta is not None:
        body[META_FIELD] = meta
    return body


class Endpoint:
    """An OpenAI-compatible endpoint answering with ``handler``; it keeps each request's
    headers."""

    def __init__(self) -> None:
        self.handler: Handler = self.json(answer())
        self.headers: list[dict[str, str]] = []
        self.url = ""
        self.released = asyncio.Event()
        self._made: list[OpenAILLM] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.headers.append(dict(request.headers))
        return await self.handler(request)

    @staticmethod
    def json(body: Any, *, status: int = 200) -> Handler:
        return Endpoint.raw(json.dumps(body).encode(), status=status)

    @staticmethod
    def raw(data: bytes, *, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(
                body=data,
                status=status,
                headers={"Content-Type": "application/json", **(headers or {})},
            )

        return handler

    def llm(self, **settings: Any) -> OpenAILLM:
        options: dict[str, Any] = {"timeout_s": 10.0, "max_retries": 0, "prices": PRICES}
        self._made.append(OpenAILLM(LLMSettings(base_url=self.url, **{**options, **settings})))
        return self._made[-1]

    async def aclose(self) -> None:
        self.released.set()
        for llm in self._made:
            await llm.aclose()


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", ep.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    ep.url = f"http://{host}:{port}/v1"
    try:
        yield ep
    finally:
        await ep.aclose()
        await runner.cleanup()


def streamed(
    head: bytes, filler: int, tail: bytes, *, content_length: int | None = None
) -> Handler:
    """A 200 sending ``head``, ``filler`` bytes of "a" in 1 MiB pieces, then ``tail``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if content_length is not None:
            response.content_length = content_length
        await response.prepare(request)
        try:
            await response.write(head)
            left = filler
            while left > 0:
                piece = min(left, 1 << 20)
                await response.write(b"a" * piece)
                left -= piece
            await response.write(tail)
        except ConnectionError:
            pass  # the client hung up, as it should
        return response

    return handler


HEAD = b'{"model": "gpt-4o-mini", "choices": [{"message": {"content": "'
TAIL = b'"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'


# -- F3: how much of a body is read -------------------------------------------------------


async def test_a_body_streamed_past_the_limit_is_refused_naming_the_limit(
    endpoint: Endpoint,
) -> None:
    # Chunked, so no Content-Length warns: the bytes read are what is counted.
    endpoint.handler = streamed(HEAD, MAX_RESPONSE_BYTES + (1 << 20), TAIL)
    with pytest.raises(LLMUnavailable, match=f"limit of {MAX_RESPONSE_BYTES} bytes") as caught:
        await endpoint.llm().complete(ASK)
    assert "cut off" in str(caught.value) and caught.value.status_code is None


async def test_a_declared_length_past_the_limit_is_refused_before_it_is_read(
    endpoint: Endpoint,
) -> None:
    # It says 300 MiB is coming, sends a few bytes and keeps the connection open: the client
    # neither reads it nor waits for it to time out.
    declared = 300 << 20

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = declared
        await response.prepare(request)
        await response.write(HEAD)
        await endpoint.released.wait()
        return response

    endpoint.handler = handler
    started = time.monotonic()
    with pytest.raises(LLMUnavailable, match=f"declares {declared} bytes"):
        await endpoint.llm(timeout_s=10.0).complete(ASK)
    assert time.monotonic() - started < 5.0


async def test_a_body_that_inflates_past_the_limit_is_refused(endpoint: Endpoint) -> None:
    # A few KiB of gzip that would inflate to 9 MiB in memory.
    bomb = gzip.compress(HEAD + b"a" * (MAX_RESPONSE_BYTES + (1 << 20)) + TAIL)
    assert len(bomb) < 100_000
    endpoint.handler = Endpoint.raw(bomb, headers={"Content-Encoding": "gzip"})
    with pytest.raises(LLMUnavailable, match=f"inflated to over {MAX_RESPONSE_BYTES}"):
        await endpoint.llm().complete(ASK)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw deflate"])
async def test_an_ordinary_compressed_answer_is_read(endpoint: Endpoint, encoding: str) -> None:
    body = json.dumps(answer(text="compressed " * 50)).encode()
    if encoding == "gzip":
        data = gzip.compress(body)
    elif encoding == "deflate":
        data = zlib.compress(body)
    else:
        squeezer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = squeezer.compress(body) + squeezer.flush()
    name = encoding.removeprefix("raw ")
    endpoint.handler = Endpoint.raw(data, headers={"Content-Encoding": name})
    completion = await endpoint.llm().complete(ASK)
    assert completion.text == "compressed " * 50
    # Only encodings whose inflated size the client measures are asked for.
    assert endpoint.headers[-1]["Accept-Encoding"] == "gzip, deflate"


async def test_a_body_in_an_encoding_not_asked_for_is_refused(endpoint: Endpoint) -> None:
    endpoint.handler = Endpoint.raw(b"\x1b\x00\x00", headers={"Content-Encoding": "br"})
    with pytest.raises(LLMUnavailable, match="encoded as br"):
        await endpoint.llm().complete(ASK)


async def test_a_corrupt_gzip_body_is_an_llm_error(endpoint: Endpoint) -> None:
    endpoint.handler = Endpoint.raw(b"not gzip at all", headers={"Content-Encoding": "gzip"})
    with pytest.raises(LLMUnavailable):
        await endpoint.llm().complete(ASK)


async def test_an_answer_just_under_the_limit_is_read_whole(endpoint: Endpoint) -> None:
    text = "b" * (MAX_RESPONSE_BYTES - 1000)
    endpoint.handler = Endpoint.json(answer(text=text))
    completion = await endpoint.llm().complete(ASK)
    assert completion.text == text


async def test_an_error_body_past_the_limit_is_cut_and_its_status_counts(
    endpoint: Endpoint,
) -> None:
    huge = b'{"error": {"message": "' + b"x" * (MAX_RESPONSE_BYTES + (1 << 20)) + b'"}}'
    endpoint.handler = Endpoint.raw(huge, status=400)
    with pytest.raises(LLMRejected, match="HTTP 400") as rejected:
        await endpoint.llm().complete(ASK)
    assert rejected.value.status_code == 400 and len(str(rejected.value)) <= 2000
    # A 503 is retried as ever, then fails as unavailable.
    endpoint.handler = Endpoint.raw(huge, status=503)
    endpoint.headers.clear()
    with pytest.raises(LLMUnavailable, match="HTTP 503") as failed:
        await endpoint.llm(max_retries=1).complete(ASK)
    assert failed.value.status_code == 503 and len(endpoint.headers) == 2
    assert len(str(failed.value)) <= 2000


# -- F4: the endpoint's meta --------------------------------------------------------------


async def test_meta_is_bounded_and_the_worlds_quality_still_comes(endpoint: Endpoint) -> None:
    hidden: dict[str, Any] = {"quality": "0.9200", "score": 0.5, "turns": 3}
    hidden["huge"] = "v" * 3_000_000
    hidden["k" * (MAX_META_KEY_CHARS + 1)] = "long key"
    hidden["nested"] = {"a": [1, 2]}
    hidden["nothing"] = None
    hidden |= {f"extra{i}": str(i) for i in range(100)}
    endpoint.handler = Endpoint.json(answer(meta=hidden))
    meta = (await endpoint.llm().complete(ASK)).meta
    assert len(meta) == MAX_META_ENTRIES
    assert list(meta)[:3] == ["quality", "score", "turns"]
    assert (meta["quality"], meta["score"], meta["turns"]) == ("0.9200", "0.5", "3")
    assert all(
        len(k) <= MAX_META_KEY_CHARS and len(v) <= MAX_META_VALUE_CHARS for k, v in meta.items()
    )
    assert not {"huge", "nested", "nothing"} & set(meta)


def test_a_completion_bounds_meta_and_model_whichever_client_made_it() -> None:
    made = Completion("t", "m" * 1_000_000, 1, 1, 0.0, 1.0, meta={"k": "v" * 1_000_000, "q": "1"})
    assert made.model == "m" * MAX_MODEL_CHARS and made.meta == {"q": "1"}


async def test_the_endpoint_cannot_set_the_keys_the_loader_owns(endpoint: Endpoint) -> None:
    forged = {
        "quality": "0.5",
        "cost_pending": "true",
        "cost_id": "someone-else",
        "cost_model": "free",
        "truncated": "no",
        "requested_specialty": "billing",
        "workflow_version": "99",
        "workflow_id": "forged",
    }
    endpoint.handler = Endpoint.json(answer(meta=forged))
    loader, broker = _loader(endpoint.llm())  # type: ignore[arg-type]
    await asyncio.wait_for(loader.handle(_task()), 10)
    [done] = [e for e in broker.acked if isinstance(e, WorkflowCompleted)]
    assert done.meta["quality"] == "0.5"
    assert not {"cost_pending", "cost_id", "cost_model", "truncated", "requested_specialty"} & set(
        done.meta
    )
    assert done.meta["workflow_version"] != "99" and done.meta["workflow_id"] != "forged"


async def test_a_huge_meta_or_model_name_still_ends_the_run(endpoint: Endpoint) -> None:
    # 1.2 MB of meta or model name made the answer or the cost too large for a Kafka record:
    # the loader retried it for ever.
    for body in (answer(meta={"k": "v" * 1_200_000}), answer(model="m" * 1_200_000)):
        endpoint.handler = Endpoint.json(body)
        loader, broker = _loader(endpoint.llm())  # type: ignore[arg-type]
        broker.max_bytes = 1_000_000
        await asyncio.wait_for(loader.handle(_task()), 10)
        [cost] = [e for e in broker.acked if isinstance(e, LlmCallCompleted)]
        [done] = [e for e in broker.acked if isinstance(e, WorkflowCompleted)]
        assert len(cost.model) <= MAX_MODEL_CHARS and "k" not in done.meta


# -- F5: the model name the endpoint reports ----------------------------------------------


async def test_a_call_is_priced_at_the_model_asked_for(endpoint: Endpoint) -> None:
    # Asked for gpt-4o, it claims the far cheaper gpt-4o-mini answered.
    endpoint.handler = Endpoint.json(
        answer(model="gpt-4o-mini", usage={"prompt_tokens": 1_000_000, "completion_tokens": 0})
    )
    completion = await endpoint.llm().complete(ASK, model="gpt-4o")
    assert completion.model == "gpt-4o-mini"  # recorded as reported
    assert completion.cost_usd == pytest.approx(2.50)  # priced as asked
    endpoint.handler = Endpoint.json(answer(model="m" * 2_000_000))
    assert (await endpoint.llm().complete(ASK)).model == "m" * MAX_MODEL_CHARS


# -- F6: token counts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [
        b'{"prompt_tokens": 100000000000000000000, "completion_tokens": 1}',
        b'{"prompt_tokens": 1, "completion_tokens": 1' + b"0" * 400 + b"}",
        b'{"prompt_tokens": 1e400, "completion_tokens": 1}',
        b'{"prompt_tokens": 100000001, "completion_tokens": 0}',
    ],
    ids=["1e20", "1e400 whole", "1e400 float", "just past the bound"],
)
async def test_token_counts_no_call_has_are_estimated(endpoint: Endpoint, usage: bytes) -> None:
    body = json.dumps(answer(usage={})).encode().replace(b'"usage": {}', b'"usage": ' + usage)
    endpoint.handler = Endpoint.raw(body)
    completion = await endpoint.llm().complete(ASK)
    assert completion.prompt_tokens == estimate_tokens(ASK[0]["content"])
    assert completion.completion_tokens == estimate_tokens("hi")
    assert math.isfinite(completion.cost_usd) and completion.cost_usd < 1e-3


async def test_the_largest_believable_count_is_kept(endpoint: Endpoint) -> None:
    endpoint.handler = Endpoint.json(
        answer(usage={"prompt_tokens": 100_000_000, "completion_tokens": 0})
    )
    assert (await endpoint.llm().complete(ASK)).prompt_tokens == 100_000_000


async def test_a_call_with_absurd_usage_is_still_counted_by_the_loader(
    endpoint: Endpoint,
) -> None:
    endpoint.handler = Endpoint.json(
        answer(usage={"prompt_tokens": 10**20, "completion_tokens": 10**20})
    )
    loader, broker = _loader(endpoint.llm())  # type: ignore[arg-type]
    await asyncio.wait_for(loader.handle(_task()), 10)
    [cost] = [e for e in broker.acked if isinstance(e, LlmCallCompleted)]
    assert cost.ok and 0 < cost.cost_usd < 1e-3
    assert any(isinstance(e, WorkflowCompleted) for e in broker.acked)


# -- F7: nesting --------------------------------------------------------------------------


async def test_json_nested_too_deep_is_an_unusable_answer(endpoint: Endpoint) -> None:
    endpoint.handler = Endpoint.raw(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(LLMUnavailable, match="not JSON"):
        await endpoint.llm().complete(ASK)
