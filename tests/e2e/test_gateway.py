"""The OpenAI-compatible gateway as apps use it: the official openai client and plain HTTP,
against gateway processes in front of the whole platform on the real broker."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import aiohttp
import openai
import pytest

from streams.client import OrchestratorClient

pytestmark = pytest.mark.e2e


def _announced(platform, pid: int) -> str | None:
    """The base URL the gateway process ``pid`` announced, if it has (a file per port in the
    platform's data dir: the URL, then the pid)."""
    for path in (platform.data_dir / "run" / "gateway-urls").glob("*.url"):
        try:
            url, announcer, *_ = path.read_text().split("\n")
        except (OSError, ValueError):  # gone meanwhile, or still being written
            continue
        if announcer == str(pid):
            return url
    return None


async def _start_gateway(platform, **env: str):
    """A gateway process on a port it binds itself (port 0: a port picked here and bound
    there could be taken in between); returns (process, base URL) once it answers."""
    proc = platform.start_service("gateway", ORCH_GATEWAY_PORT="0", **env)
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.poll() is None, platform.logs("gateway")[-3000:]
            url = _announced(platform, proc.pid)
            try:
                if url is not None:
                    async with http.get(f"{url.removesuffix('/v1')}/health") as response:
                        if response.status == 200:
                            return proc, url
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "gateway did not answer in 60 s"
            await asyncio.sleep(0.2)


async def _in_flight(url: str) -> int:
    """Requests the gateway at ``url`` counts in flight (its /health says)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url.removesuffix('/v1')}/health") as response,
    ):
        return int((await response.json())["in_flight"])


@pytest.fixture(scope="module")
def gateway(platform):
    proc, url = asyncio.run(_start_gateway(platform))
    yield url
    if proc.poll() is None:
        proc.terminate()
        proc.wait(15)


async def _key(client: OrchestratorClient, goal: str, user: str = "u1") -> str:
    key, _ = await client.create_key(goal, user)
    return key


async def _post(url: str, path: str, body: object, key: str | None, **headers: str):
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}{path}", json=body, headers={**auth, **headers}) as response,
    ):
        text = await response.text()
        try:
            out = json.loads(text)
        except ValueError:
            out = text  # the HTTP parser's own refusals are plain text
        return response.status, out, response.headers


CHAT = {"model": "auto", "messages": [{"role": "user", "content": "Solve the equation x+1=3"}]}


async def test_the_openai_client_gets_an_answer_with_the_run_in_headers(platform, client, gateway):
    key = await _key(client, "gw-plain")
    oai = openai.AsyncOpenAI(base_url=gateway, api_key=key)
    raw = await oai.chat.completions.with_raw_response.create(
        model="auto",
        messages=[
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": "What is a derivative?"},
            {"role": "assistant", "content": "A rate of change."},
            {"role": "user", "content": "Solve the equation 2x = 10"},
        ],
        user="u1",
    )
    completion = raw.parse()
    run_id = raw.headers["x-orchestrator-run-id"]
    assert completion.id == f"chatcmpl-{run_id}"
    assert "answer to: Solve the equation 2x = 10" in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens > completion.usage.completion_tokens > 0
    assert raw.headers["x-orchestrator-specialty"] == "math"
    assert raw.headers["x-orchestrator-tier"] == "llm"
    assert raw.headers["x-orchestrator-agent-id"].startswith("math_")
    assert float(raw.headers["x-orchestrator-cost-usd"]) > 0

    (request,) = await platform.events("request_received", run_id=run_id)
    assert (request.goal_id, request.user_id, request.source) == ("gw-plain", "u1", "gateway")
    assert request.message == "Solve the equation 2x = 10"
    assert request.context["system"] == "Answer in one line."
    assert request.context["history"] == "user: What is a derivative?\nassistant: A rate of change."
    (done,) = await platform.events("workflow_completed", run_id=run_id)
    assert done.text == completion.choices[0].message.content
    assert done.cost_usd == pytest.approx(float(raw.headers["x-orchestrator-cost-usd"]), abs=1e-6)


async def test_the_openai_client_streams_the_answer(platform, client, gateway):
    key = await _key(client, "gw-stream")
    oai = openai.AsyncOpenAI(base_url=gateway, api_key=key)
    stream = await oai.chat.completions.create(
        model="specialty/writing",
        messages=[{"role": "user", "content": "Draft a short email to my team"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "answer to: Draft a short email to my team" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    run_id = chunks[0].id.removeprefix("chatcmpl-")
    (done,) = await platform.events("workflow_completed", run_id=run_id)
    assert done.text == text and done.specialty == "writing" and done.goal_id == "gw-stream"


async def test_models_lists_auto_and_the_specialties(client, gateway):
    oai = openai.AsyncOpenAI(base_url=gateway, api_key=await _key(client, "gw-models"))
    ids = [m.id async for m in oai.models.list()]
    assert ids[0] == "auto" and {"specialty/code", "specialty/math"} <= set(ids)


async def test_a_pinned_specialty_is_served_by_it(client, gateway):
    key = await _key(client, "gw-pin")
    body = {**CHAT, "model": "specialty/research"}
    status, out, headers = await _post(gateway, "/chat/completions", body, key)
    assert status == 200 and headers["x-orchestrator-specialty"] == "research"
    assert out["model"] == "specialty/research"


async def test_unknown_and_revoked_keys_are_401(client, gateway):
    for key in (None, "sk-not-ours", "orch_0123456789abcdef_" + "x" * 43):
        status, out, _ = await _post(gateway, "/chat/completions", CHAT, key)
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
    key, issued = await client.create_key("gw-revoke", "u1")
    assert (await _post(gateway, "/chat/completions", CHAT, key))[0] == 200
    await client.revoke_key(issued.key_id)
    deadline = time.monotonic() + 15
    while (status := (await _post(gateway, "/chat/completions", CHAT, key))[0]) != 401:
        assert status == 200 and time.monotonic() < deadline, "a revoked key still works"
        await asyncio.sleep(0.2)
    oai = openai.AsyncOpenAI(base_url=gateway, api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await oai.chat.completions.create(**CHAT)


async def test_invalid_requests_are_400_naming_the_problem(client, gateway):
    key = await _key(client, "gw-invalid")
    cases = [
        ({"model": "auto"}, "messages must be a non-empty list"),
        ({**CHAT, "model": "specialty/unknown"}, "unknown model"),
        ({**CHAT, "temperature": "warm"}, "temperature must be a number"),
        ({**CHAT, "messages": [{"role": "user", "content": "x" * 40_000}]}, "limit is 32768"),
        ({**CHAT, "messages": [{"role": "user", "content": {"$ne": 1}}]}, "content must be"),
        ({**CHAT, "messages": [{"role": "user", "content": "a"}] * 1000}, "limit is 256"),
        ({**CHAT, "n": 3}, "n must be 1"),
        ([1, 2, 3], "JSON object"),
    ]
    for body, problem in cases:
        status, out, _ = await _post(gateway, "/chat/completions", body, key)
        assert status == 400, (body, out)
        assert problem in out["error"]["message"]
        assert out["error"]["type"] == "invalid_request_error"
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for raw in (b"{not json", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe"):
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{gateway}/chat/completions", data=raw, headers=auth) as response,
        ):
            assert response.status in (400, 413)
            assert "error" in await response.json()


async def test_hostile_input_is_refused_clearly(platform, client, gateway):
    key = await _key(client, "gw-hostile", "alice")
    # More than the body limit (1 MiB): 413 before the JSON is parsed.
    status, out, _ = await _post(
        gateway, "/chat/completions", {**CHAT, "pad": "x" * 2_000_000}, key
    )
    assert status == 413 and out["error"]["code"] == "body_too_large"
    # The body cannot name another user, nor another goal: the key decides.
    status, out, _ = await _post(gateway, "/chat/completions", {**CHAT, "user": "bob"}, key)
    assert status == 403 and out["error"]["code"] == "user_mismatch"
    body = {**CHAT, "goal_id": "victim", "metadata": {"goal_id": "victim"}}
    status, _, headers = await _post(
        gateway, "/chat/completions", body, key, **{"x-orchestrator-goal": "victim"}
    )
    assert status == 200
    run_id = headers["x-orchestrator-run-id"]
    (request,) = await platform.events("request_received", run_id=run_id)
    assert (request.goal_id, request.user_id) == ("gw-hostile", "alice")
    # Nothing from the body reaches a response header.
    status, out, headers = await _post(
        gateway, "/chat/completions", {**CHAT, "model": "specialty/code\r\nX-Evil: 1"}, key
    )
    assert status == 400 and "X-Evil" not in headers
    # A header too long, and a request smuggling a second Content-Length, die in the parser.
    status, _, _ = await _post(gateway, "/chat/completions", CHAT, key, **{"x-pad": "y" * 20_000})
    assert status in (400, 431)
    host, port = gateway.removeprefix("http://").removesuffix("/v1").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(CHAT).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {key}\r\n".encode()
        + f"Content-Length: {len(payload)}\r\nContent-Length: 5\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1] == b"400"


async def test_the_budget_refusal_is_429_with_the_limit_and_retry_after(platform, client, gateway):
    from streams.budgets import read_budget

    goal = "gw-budget"
    key = await _key(client, goal)
    await client.set_budget(goal, max_daily_cost=0.0)
    deadline = time.monotonic() + 20
    while ((await read_budget(platform.settings, goal)) or {}).get("max_daily_cost") != 0.0:
        assert time.monotonic() < deadline, "the budget change was not applied"
        await asyncio.sleep(0.2)
    before = datetime.now(UTC)
    status, out, headers = await _post(gateway, "/chat/completions", CHAT, key)
    assert status == 429 and out["error"]["code"] == "max_daily_cost"
    assert out["error"]["type"] == "budget_exceeded"
    midnight = datetime(before.year, before.month, before.day, tzinfo=UTC) + timedelta(days=1)
    assert abs(int(headers["Retry-After"]) - (midnight - before).total_seconds()) < 10
    (failed,) = await platform.events("workflow_failed", run_id=headers["x-orchestrator-run-id"])
    assert failed.limit == "max_daily_cost"
    oai = openai.AsyncOpenAI(base_url=gateway, api_key=key)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(**CHAT)
    assert time.monotonic() - started < 5  # x-should-retry: false, no retry loop


async def test_a_slow_answer_is_504_and_a_degraded_one_is_200(platform, client, gateway):
    key = await _key(client, "gw-slow")
    await _post(gateway, "/chat/completions", CHAT, key)  # the goal's agent exists
    platform.llm.configure(latency_ms=2500)
    try:
        status, out, headers = await _post(
            gateway, "/chat/completions", CHAT, key, **{"x-orchestrator-timeout": "0.5"}
        )
    finally:
        platform.llm.configure(latency_ms=0)
    assert status == 504 and out["error"]["code"] == "timeout"
    assert headers["x-orchestrator-run-id"] and headers["x-should-retry"] == "false"
    platform.llm.configure(mode="error500")
    try:
        status, out, headers = await _post(gateway, "/chat/completions", CHAT, key)
    finally:
        platform.llm.configure(mode="ok")
    assert status == 200 and headers["x-orchestrator-tier"] in ("keyword", "static_fallback")
    assert headers["x-orchestrator-tier"] in out["system_fingerprint"]


async def test_past_the_in_flight_limit_a_gateway_answers_503(platform, client):
    proc, url = await _start_gateway(platform, ORCH_GATEWAY_MAX_IN_FLIGHT="1")
    try:
        key = await _key(client, "gw-busy")
        await _post(url, "/chat/completions", CHAT, key)
        platform.llm.configure(latency_ms=1500)
        try:
            first = asyncio.create_task(_post(url, "/chat/completions", CHAT, key))
            # Once the gateway counts it in flight (it is there for the LLM's 1.5 s).
            deadline = time.monotonic() + 10
            while await _in_flight(url) < 1:
                assert not first.done() and time.monotonic() < deadline, "never in flight"
                await asyncio.sleep(0.05)
            status, out, headers = await _post(url, "/chat/completions", CHAT, key)
            assert status == 503 and out["error"]["code"] == "overloaded"
            assert headers["Retry-After"] == "1"
            assert (await first)[0] == 200
        finally:
            platform.llm.configure(latency_ms=0)
    finally:
        proc.terminate()
        proc.wait(15)


async def test_feedback_through_the_gateway_gets_the_verdict(platform, client, gateway):
    key = await _key(client, "gw-feedback", "fb-user")
    other = await _key(client, "gw-feedback-other", "fb-user")
    status, _, headers = await _post(gateway, "/chat/completions", CHAT, key)
    run_id = headers["x-orchestrator-run-id"]
    body = {"run_id": run_id, "score": 2, "text": "shorter please"}
    # The same user with a key for another goal may not touch this goal's run.
    status, out, _ = await _post(gateway, "/feedback", body, other)
    assert status == 403 and out["error"]["code"] == "not_run_owner"
    status, out, _ = await _post(gateway, "/feedback", {**body, "run_id": "no-such-run"}, key)
    assert status == 404
    status, out, _ = await _post(gateway, "/feedback", {"run_id": run_id, "score": "bad"}, key)
    assert status == 400
    status, out, _ = await _post(gateway, "/feedback", body, key)
    assert status == 200 and out["accepted"] is True and out["run_id"] == run_id
    decided = [e for e in await platform.events("feedback_decided") if e.run_id == run_id]
    assert [e.feedback_id for e in decided] == [out["event_id"]]


async def test_a_gateway_stopped_mid_traffic_answers_or_refuses_every_request(platform, client):
    """Two gateways behind a client that fails over: one gets SIGTERM while requests are in
    flight. Each request it accepted is answered; each it refused says 503 (or the connection
    is refused once it is gone), and the retry on the other gateway is answered.

    A request written on a kept-alive connection at the moment the stopping gateway closes
    it is cut off before the gateway read it (the same race as any server's keep-alive
    timeout); the client fails over as on a refusal. That the gateway never read such a
    request is checked in the platform: every request that reached it was answered once."""
    goal = "gw-failover"
    key = await _key(client, goal)
    (proc_a, url_a), (proc_b, url_b) = await asyncio.gather(
        _start_gateway(platform), _start_gateway(platform)
    )
    outcomes: Counter[str] = Counter()
    t0 = [time.monotonic()]  # then: when A got its SIGTERM
    cut: dict[int, str] = {}  # request -> where and when its connection was cut
    first: dict[int, str] = {}  # what the first gateway a request went to said
    answered: list[str] = []

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        urls = [url_a, url_b] if i % 2 == 0 else [url_b, url_a]
        body = {**CHAT, "messages": [{"role": "user", "content": f"Solve equation {i}"}]}
        for url in urls:
            try:
                async with http.post(
                    f"{url}/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    out = await response.json()
                    where = "a" if url == url_a else "b"
                    first.setdefault(i, f"{response.status} {where}")
                    if response.status == 200:
                        outcomes[f"200 {where}"] += 1
                        answered.append(response.headers["x-orchestrator-run-id"])
                        return
                    assert response.status == 503, out
                    assert out["error"]["code"] == "stopping"
                    outcomes[f"503 {where}"] += 1
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                where = "a" if url == url_a else "b"
                cut[i] = f"{where} at {time.monotonic() - t0[-1]:+.2f} s"
                outcomes[f"cut {where}"] += 1
            except aiohttp.ClientConnectorError:
                first.setdefault(i, "refused connection")
                outcomes["refused connection"] += 1
        raise AssertionError(f"request {i} was answered by neither gateway")

    platform.llm.configure(latency_ms=400)
    try:
        async with aiohttp.ClientSession() as http:
            tasks = []
            for i in range(60):
                tasks.append(asyncio.create_task(one(i, http)))
                if i == 20:
                    t0.append(time.monotonic())
                    proc_a.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)
    finally:
        platform.llm.configure(latency_ms=0)
        proc_b.terminate()
    assert proc_a.wait(20) == 0
    # Only the stopping gateway cuts, and only requests sent after its signal: what it had
    # in flight before was answered.
    assert all(i >= 20 and where.startswith("a ") for i, where in cut.items()), cut
    proc_b.wait(20)
    assert len(answered) == len(set(answered)) == 60
    # A answered everything sent to it well before its SIGTERM (>= 150 ms: at 400 ms an
    # answer, many of these were in flight then); request 20 may reach it after the signal.
    assert {first[i] for i in range(0, 17, 2)} == {"200 a"}, first
    assert outcomes["503 a"] + outcomes["refused connection"] > 0, outcomes
    # Nothing was lost in the platform either: one request per answer, each ended once.
    requests = [e for e in await platform.events("request_received") if e.goal_id == goal]
    assert sorted(e.run_id for e in requests) == sorted(answered)
    ended = [e for e in await platform.events("workflow_completed") if e.goal_id == goal]
    assert sorted(e.run_id for e in ended) == sorted(answered)
