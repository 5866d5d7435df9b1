"""The gateway's HTTP layer over a scripted platform: failure statuses, the in-flight bound,
and the stop that answers what is in flight. The real platform's tests are in tests/e2e."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaConnectionError

from services.gateway.http import GatewayApp, build_app
from services.gateway.settings import GatewaySettings
from streams.client import Answer
from streams.errors import BrokerUnavailable, BudgetExceededError, LLMFailure, RunRejected
from streams.events import MAX_FEEDBACK_CHARS, MAX_RUN_ID_CHARS, FeedbackDecided
from streams.keys import Identity

KEY = "orch_0123456789abcdef_secret-secret-secret-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER = "orch_fedcba9876543210_other-other-other-other-oth"  # another goal's key
BODY = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
NOW = datetime(2026, 3, 1, 22, 0, 0, tzinfo=UTC)


class Scripted:
    """A platform whose answer to each ask is what the test puts in ``outcome``."""

    def __init__(self) -> None:
        self.outcome: Any = None
        self.release = asyncio.Event()
        self.release.set()
        self.asked: list[dict[str, Any]] = []
        self.entered = asyncio.Semaphore(0)  # one release per ask that started

    async def identify(self, key: str) -> Identity | None:
        return {
            KEY: Identity("0123456789abcdef", "g1", "u1", "user"),
            OTHER: Identity("fedcba9876543210", "g2", "u2", "user"),
        }.get(key)

    async def ask(self, message: str, **kwargs: Any) -> Answer:
        self.asked.append({"message": message, **kwargs})
        self.entered.release()
        await self.release.wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return Answer("r1", "a1", "general", f"answer to {message}", 0.001, 5.0, "keyword")

    async def run_goal(self, run_id: str) -> str | None:
        return None

    def note_run(self, run_id: str, goal_id: str) -> None:
        pass

    async def feedback(self, run_id: str, **kwargs: Any) -> FeedbackDecided:
        raise AssertionError("not used")

    def now(self) -> datetime:
        return NOW


@pytest.fixture
async def setup() -> Any:
    backend = Scripted()
    gateway = GatewayApp(backend, max_in_flight=2, timeout_s=5.0)
    async with TestClient(TestServer(build_app(gateway))) as http:
        yield backend, gateway, http


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _post(http: TestClient, body: Any = BODY, **headers: str) -> tuple[int, Any, Any]:
    response = await http.post("/v1/chat/completions", json=body, headers={**AUTH, **headers})
    return response.status, await response.json(), response.headers


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (LLMFailure("r1", "llm_failure", "endpoint 500"), 502, None),
        (RunRejected("r1", "timeout", "deadline passed"), 504, "timeout"),
        (RunRejected("r1", "no_agent", "no agent in time"), 503, "no_agent"),
        (RunRejected("r1", "internal", "router raised"), 500, "internal"),
        (BudgetExceededError("r1", "budget_exceeded", "spent", "max_agents"), 429, "max_agents"),
    ],
)
async def test_each_failed_run_has_its_status_and_run_id(setup, error, status, code) -> None:
    backend, _, http = setup
    backend.outcome = error
    got, body, headers = await _post(http)
    assert got == status
    assert body["error"]["code"] == code
    # What failed inside the platform, and what the LLM endpoint said, stay in the log;
    # the other reasons say their detail.
    shown = error.detail in body["error"]["message"]
    assert shown == (status not in (500, 502)), body
    assert headers["x-orchestrator-run-id"] == "r1"


async def test_an_internal_failure_names_its_run_and_not_the_exception(setup) -> None:
    backend, _, http = setup
    backend.outcome = RunRejected(
        "r1", "internal", "loader error: KeyError: '/srv/orchestrator/secret-path'"
    )
    got, body, headers = await _post(http)
    assert got == 500 and body["error"]["code"] == "internal"
    assert "secret-path" not in json.dumps(body) and "KeyError" not in json.dumps(body)
    assert "x-orchestrator-run-id" in body["error"]["message"]
    assert headers["x-orchestrator-run-id"] == "r1"


async def test_an_unreachable_broker_is_503_without_its_address(setup) -> None:
    backend, _, http = setup
    backend.outcome = KafkaConnectionError("Unable to bootstrap from [('10.1.2.3', 9092)]")
    got, body, _ = await _post(http)
    assert got == 503 and body["error"]["code"] == "kafka"
    assert "out of reach" in body["error"]["message"]
    assert "10.1.2.3" not in json.dumps(body) and "9092" not in json.dumps(body)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_the_broker_did_not_acknowledge_is_503_with_its_run_id(
    setup, stream: bool
) -> None:
    """What the SDK client raises when its send times out in an outage (was a bare 500)."""
    backend, _, http = setup
    backend.outcome = BrokerUnavailable("r9", "KafkaTimeoutError at 10.1.2.3:9092")
    got, body, headers = await _post(http, {**BODY, "stream": stream})
    assert got == 503 and body["error"]["code"] == "kafka"
    assert "10.1.2.3" not in json.dumps(body)
    # It may still run once the broker is back: the run id tells a retry from it.
    assert headers["x-orchestrator-run-id"] == "r9" and headers["Retry-After"] == "1"


async def test_two_authorization_headers_are_refused(setup) -> None:
    _, _, http = setup
    response = await http.post(
        "/v1/chat/completions",
        json=BODY,
        headers=[("Authorization", f"Bearer {OTHER}"), ("Authorization", f"Bearer {KEY}")],
    )
    assert response.status == 400
    assert "one Authorization header" in (await response.json())["error"]["message"]


async def test_the_daily_cost_limit_says_when_the_next_utc_day_starts(setup) -> None:
    backend, _, http = setup
    backend.outcome = BudgetExceededError("r1", "budget_exceeded", "spent", "max_daily_cost")
    status, body, headers = await _post(http)
    assert status == 429 and body["error"]["code"] == "max_daily_cost"
    assert headers["Retry-After"] == str(2 * 3600)  # 22:00 UTC -> midnight
    assert headers["x-should-retry"] == "false"


async def test_a_degraded_answer_is_200_and_names_its_tier(setup) -> None:
    _, _, http = setup
    status, body, headers = await _post(http)
    assert status == 200 and headers["x-orchestrator-tier"] == "keyword"
    assert body["system_fingerprint"] == "tier:keyword"


async def test_beyond_the_in_flight_limit_the_answer_is_503_at_once(setup) -> None:
    backend, gateway, http = setup
    backend.release.clear()
    # One request per key: a key alone may hold only half the slots (see the next test).
    held = [asyncio.create_task(_post(http, **auth)) for auth in (AUTH, _auth(OTHER))]
    for _ in held:
        await backend.entered.acquire()
    status, body, headers = await _post(http)
    assert status == 503 and body["error"]["code"] == "overloaded"
    assert headers["Retry-After"] == "1"
    backend.release.set()
    assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200]


async def test_one_key_holds_at_most_its_share_of_the_slots(setup) -> None:
    backend, gateway, http = setup
    assert gateway.max_in_flight_per_key == 1  # half of 2
    backend.release.clear()
    held = asyncio.create_task(_post(http))
    await backend.entered.acquire()
    status, body, headers = await _post(http)
    assert status == 429 and body["error"]["code"] == "key_in_flight"
    assert headers["Retry-After"] == "1" and "share" in body["error"]["message"]
    other = asyncio.create_task(_post(http, **_auth(OTHER)))  # the free slot is another's
    await backend.entered.acquire()
    backend.release.set()
    assert [s for s, _, _ in await asyncio.gather(held, other)] == [200, 200]
    assert gateway.held == {} and gateway.in_flight == 0


def test_the_key_share_setting_bounds_each_key() -> None:
    def per_key(**env: str) -> int:
        names = {"max_in_flight": "ORCH_GATEWAY_MAX_IN_FLIGHT", "share": "ORCH_GATEWAY_KEY_SHARE"}
        return GatewaySettings.from_env({names[k]: v for k, v in env.items()}).max_in_flight_per_key

    assert per_key() == 128  # half of 256
    assert per_key(max_in_flight="5") == 2
    assert per_key(max_in_flight="5", share="1") == 5
    assert per_key(max_in_flight="1") == 1  # one slot: the only key may use it
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(ValueError, match="ORCH_GATEWAY_KEY_SHARE"):
            per_key(share=bad)


async def test_bad_bodies_are_400_never_500(setup) -> None:
    backend, _, http = setup
    for path in ("/v1/chat/completions", "/v1/feedback"):
        for raw in (b"[" * 20000 + b"]" * 20000, b"\x80{", b"{nope"):
            response = await http.post(path, data=raw, headers=AUTH)
            assert response.status == 400, (path, raw[:8])
            assert (await response.json())["error"]["code"] == "invalid_json"
    # The charset of Content-Type is not how JSON is decoded: an unknown one is no error.
    response = await http.post(
        "/v1/chat/completions",
        data=json.dumps(BODY).encode(),
        headers={**AUTH, "Content-Type": "application/json; charset=x-nope"},
    )
    assert response.status == 200


async def test_feedback_too_long_or_on_a_made_up_run_id_is_400_before_any_lookup(setup) -> None:
    _, _, http = setup  # the scripted platform knows no run: a lookup would answer 404
    for body, named in (
        ({"run_id": "r1", "text": "x" * (MAX_FEEDBACK_CHARS + 1)}, "4000"),
        ({"run_id": "r" * (MAX_RUN_ID_CHARS + 1), "score": 5}, "run_id"),
    ):
        response = await http.post("/v1/feedback", json=body, headers=AUTH)
        assert response.status == 400
        assert named in (await response.json())["error"]["message"]


async def test_a_stop_answers_what_is_in_flight_and_refuses_what_comes_after(setup) -> None:
    backend, gateway, http = setup
    backend.release.clear()
    held = asyncio.create_task(_post(http))
    await backend.entered.acquire()
    closed_at: list[float] = []
    gateway.on_drain = lambda: closed_at.append(asyncio.get_running_loop().time())
    drained = asyncio.create_task(gateway.drain(5.0, linger=1.0))
    await asyncio.sleep(0.05)
    status, body, headers = await _post(http)
    assert status == 503 and body["error"]["code"] == "stopping"
    assert headers["Connection"] == "close"
    # The linger counts from the end of the last request in flight, which is after this
    # (not from when the client has read the answer: a loaded machine may be late there).
    released = asyncio.get_running_loop().time()
    backend.release.set()
    status, _, headers = await held
    # The answer in flight comes, and tells the client not to reuse the connection.
    assert status == 200 and headers["Connection"] == "close"
    assert not closed_at  # idle connections stay for the linger, answering 503
    assert await drained == 0
    assert closed_at and closed_at[0] - released >= 0.9


async def test_what_outlives_the_drain_gets_503_not_silence(setup) -> None:
    backend, gateway, http = setup
    backend.release.clear()
    held = asyncio.create_task(_post(http))
    await backend.entered.acquire()
    assert await gateway.drain(0.2) == 1
    status, body, _ = await held
    assert status == 503 and "run goes on in the platform" in body["error"]["message"]


async def test_the_timeout_header_is_bounded_by_the_setting(setup) -> None:
    backend, _, http = setup
    assert (await _post(http, **{"x-orchestrator-timeout": "2.5"}))[0] == 200
    assert backend.asked[-1]["timeout"] == 2.5
    for bad in ("0", "-1", "nan", "99", "soon"):
        status, body, _ = await _post(http, **{"x-orchestrator-timeout": bad})
        assert status == 400 and "x-orchestrator-timeout" in body["error"]["message"]


async def test_unknown_routes_and_methods_answer_in_openai_shape(setup) -> None:
    _, _, http = setup
    response = await http.get("/v1/chat/completions", headers=AUTH)
    assert response.status == 405 and "error" in await response.json()
    response = await http.get("/v1/nothing", headers=AUTH)
    assert response.status == 404 and (await response.json())["error"]["type"] == "not_found"


async def test_status_lists_the_gateways_that_answer(setup, tmp_path, monkeypatch) -> None:
    from services.cli.status import PlatformStatus, ServiceStatus, _fill_http
    from streams.runtime import announce_url

    _, _, http = setup
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    live = f"http://127.0.0.1:{http.port}/v1"
    announce_url("gateway", live, http.port)
    announce_url("gateway", "http://127.0.0.1:9/v1", 9)  # a file left by a dead instance
    status = PlatformStatus("kafka:9092", True, [ServiceStatus("gateway", True, "g")])
    await asyncio.to_thread(_fill_http, status)
    assert status.gateway_urls == [live] and status.services[0].instances == 1
    assert status.services[0].state == "running"
    # A file of a killed instance whose port someone else answers on now: the impostor
    # was listed as the platform's gateway. Who wrote the file is recorded and checked.
    left = announce_url("gateway", "http://127.0.0.1:8/v1", 8)
    pid = await asyncio.create_subprocess_exec("true")
    await pid.wait()
    url, _, started, _ = left.read_text().split("\n")
    left.write_text(f"{url}\n{pid.pid}\n{started}\n")
    impostor = left.with_name(f"{http.port + 1}.url")
    impostor.write_text(f"{live}-impostor\n{pid.pid}\n1:0\n")
    from streams.runtime import announced_urls

    assert announced_urls("gateway") == [live, "http://127.0.0.1:9/v1"]
    assert not left.exists() and not impostor.exists()


@pytest.mark.parametrize(
    ("detail", "said"),
    [
        (
            "LLM endpoint answered HTTP 429: Error code: 429 - Rate limit reached for gpt-4o in"
            " organization org-PLATFORMOWNER123 on tokens per min (TPM): Limit 30000, Used"
            " 29950, Requested 900. Visit https://platform.openai.com/account/rate-limits",
            "(status 429)",
        ),
        (
            "the default agent failed too: LLM endpoint answered HTTP 404: The model"
            " `ft:gpt-4o:org-PLATFORMOWNER123` does not exist",
            "(status 404)",
        ),
        (
            "LLM endpoint unreachable: Cannot connect to host llm.org-PLATFORMOWNER123.internal",
            "(it is unreachable)",
        ),
    ],
)
async def test_what_the_llm_endpoint_said_stays_in_the_log(setup, caplog, detail, said) -> None:
    """With ORCH_DEGRADED_ANSWERS=0 the endpoint's own error text (about the platform's
    account with its provider: organization, usage, limits) once reached every caller."""
    backend, _, http = setup
    backend.outcome = LLMFailure("r7", "llm_failure", detail)
    with caplog.at_level("INFO", logger="services.gateway.http"):
        for stream in (False, True):
            status, body, headers = await _post(http, {**BODY, "stream": stream})
            assert status == 502 and body["error"]["type"] == "llm_failure"
            assert headers["x-orchestrator-run-id"] == "r7"
            message = body["error"]["message"]
            assert message.startswith(f"the LLM endpoint failed {said}"), message
            assert "x-orchestrator-run-id" in message
            shown = json.dumps(body)
            for private in ("PLATFORMOWNER", "29950", "30000", "rate-limits", "internal", "ft:"):
                assert private not in shown, shown
    assert detail in caplog.text  # the operator still finds it, by the run id


async def test_a_feedback_waiting_for_its_verdict_does_not_hold_up_the_stop(setup) -> None:
    """A feedback waits up to 15 s for its verdict; it once waited outside the stop's reach,
    so the drain raised TimeoutError and the process skipped closing its server, views and
    client."""
    backend, gateway, http = setup
    waiting = asyncio.Event()

    async def run_goal(run_id: str) -> str:
        return "g1"

    async def feedback(run_id: str, **kwargs: Any) -> FeedbackDecided:
        waiting.set()
        await asyncio.sleep(15)  # the longest the route waits for a verdict
        raise AssertionError("not answered")

    backend.run_goal, backend.feedback = run_goal, feedback
    pending = asyncio.create_task(
        http.post("/v1/feedback", json={"run_id": "r1", "score": 4}, headers=AUTH)
    )
    await asyncio.wait_for(waiting.wait(), 2.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(gateway.drain(0.2, linger=0.1), 10.0) == 1
    assert loop.time() - started < 5.0  # ~0.3 s; not the feedback's 15 s
    response = await asyncio.wait_for(pending, 2.0)
    body = await response.json()
    assert response.status == 503 and body["error"]["code"] == "stopping"
    assert "verdict" in body["error"]["message"]
    assert gateway.in_flight == 0
