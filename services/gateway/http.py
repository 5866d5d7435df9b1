"""The gateway's HTTP surface: OpenAI's chat completions and models, plus ``/v1/feedback``.

Every ``/v1`` route needs ``Authorization: Bearer <API key>`` (``orchestrator keys
create``): the key, never the body, says which goal and user a request is for.
Statuses: 200 answer (a degraded one too: its tier is in ``x-orchestrator-tier``),
400 invalid request, 401 unknown or revoked key, 403 another user's or goal's run,
404 unknown run, 408 the body did not arrive in time, 413 body too large, 429 budget
exceeded (``code`` names the limit, ``Retry-After`` says when it can pass), feedback rate
or the key's (or its goal's, all its keys together) share of the in-flight requests,
502 the LLM failed and no lower tier answered (how, never the endpoint's own words),
503 the gateway or platform cannot take the request now (in-flight limit, bytes of bodies
coming, stopping, Kafka unreachable), 504 no answer before the deadline.
Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Slow clients hold no slot for long: a request's body is read, within
``body_timeout_s``, before it takes one of the in-flight slots, and a connection must
deliver a request's complete headers within ``header_timeout_s`` of opening (or of its
previous answer) or it is closed (``build_runner``). Bodies being read are bounded too:
per key and per goal (its share, as for slots) and, in bytes, per goal and for the whole
gateway (``body_buffer_bytes``); and the server holds at most ``max_connections``
connections, closing the one idle the longest to make room.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiokafka.errors import KafkaError

from services.gateway.chat import (
    ChatRequest,
    Limits,
    completion,
    completion_chunks,
    error_body,
    model_list,
    parse_chat,
)
from streams.client import Answer
from streams.errors import (
    BrokerUnavailable,
    BudgetExceededError,
    FeedbackRefused,
    InvalidRequest,
    LLMFailure,
    NotRunOwner,
    NoVerdict,
    RateLimited,
    RunFailed,
    RunTimeout,
    UnknownRun,
)
from streams.events import MAX_FEEDBACK_CHARS, MAX_RUN_ID_CHARS, FeedbackDecided
from streams.http import (
    BodiesFull,
    BodyBytes,
    BodyNotJson,
    BodyTimeout,
    BodyTooLarge,
    body_bytes,
    read_json,
    runner,
)
from streams.keys import Identity
from streams.quotas import KeyShareFull, Slots, SlotsFull

__all__ = ["Backend", "GatewayApp", "build_app", "build_runner"]

log = logging.getLogger(__name__)

_TIMEOUT_HEADER = "x-orchestrator-timeout"
_NO_KEY = (
    "a valid API key is required: Authorization: Bearer <key> "
    "(create one with `orchestrator keys create --goal G --user U`)"
)
_FEEDBACK_WAIT_S = 15.0

T = TypeVar("T")


class Backend(Protocol):
    """What the HTTP layer needs from the platform (the SDK, the key and run views)."""

    async def identify(self, key: str) -> Identity | None: ...

    async def ask(
        self, message: str, *, goal_id: str, user_id: str, context: dict[str, str], timeout: float
    ) -> Answer: ...

    async def run_goal(self, run_id: str) -> str | None: ...

    def note_run(self, run_id: str, goal_id: str) -> None: ...

    async def feedback(
        self, run_id: str, *, user_id: str, score: int | None, text: str, timeout: float
    ) -> FeedbackDecided: ...

    def now(self) -> datetime: ...


class _Refusal(Exception):
    """An error answer, in OpenAI's shape, with its status and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.headers = headers or {}

    def response(self) -> web.Response:
        response = web.json_response(
            error_body(self.message, self.kind, self.code),
            status=self.status,
            headers=self.headers,
        )
        if self.headers.get("Connection") == "close":
            response.force_close()
        return response


def _kafka_refusal(
    what: str, exc: KafkaError | BrokerUnavailable, headers: Mapping[str, str] | None = None
) -> _Refusal:
    # The client's message names the broker's addresses: logged here, not sent to callers.
    log.warning("gateway cannot reach Kafka for %s: %s", what, exc)
    return _Refusal(
        503,
        f"the platform cannot take {what} now: its event log is out of reach; retry later",
        "unavailable",
        "kafka",
        dict(headers or {}),
    )


def _invalid(message: str, code: str | None = None) -> _Refusal:
    return _Refusal(400, message, "invalid_request_error", code)


def _seconds_to_next_utc_day(now: datetime) -> int:
    now = now.astimezone(UTC)
    tomorrow = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    return max(1, int((tomorrow - now).total_seconds() + 0.999))


def _failure(exc: RunFailed, now: datetime) -> _Refusal:
    headers = {"x-orchestrator-run-id": exc.run_id}
    if isinstance(exc, BudgetExceededError):
        limit = exc.limit or "budget"
        if limit == "max_daily_cost":
            headers["Retry-After"] = str(_seconds_to_next_utc_day(now))
            headers["x-should-retry"] = "false"  # the openai client would retry at once
        elif limit == "max_concurrent":
            headers["Retry-After"] = "1"
        else:
            headers["x-should-retry"] = "false"  # waiting does not free an agent slot
        return _Refusal(
            429, f"budget exceeded ({limit}): {exc.detail}", "budget_exceeded", limit, headers
        )
    if isinstance(exc, LLMFailure):
        # The endpoint's own words are about the platform's account with its provider (an
        # organization id, its usage against its limits): for the log, not for callers.
        log.info("run %s: the LLM endpoint failed: %s", exc.run_id, exc.detail)
        return _Refusal(
            502,
            f"the LLM endpoint failed{_llm_trouble(exc.detail)} and no lower tier may answer;"
            " its run id, x-orchestrator-run-id, names the failure in the platform's log",
            "llm_failure",
            None,
            headers,
        )
    if exc.reason == "timeout":
        headers["x-should-retry"] = "false"
        return _Refusal(504, f"no answer in time: {exc.detail}", "timeout", "timeout", headers)
    if exc.reason == "invalid":
        return _Refusal(400, exc.detail, "invalid_request_error", "invalid", headers)
    if exc.reason == "no_agent":
        return _Refusal(503, exc.detail, "unavailable", "no_agent", headers)
    # What failed inside the platform (a service's exception text) is for its log, not
    # for callers: the run id finds it there.
    log.warning("run %s failed inside the platform (%s): %s", exc.run_id, exc.reason, exc.detail)
    return _Refusal(
        500,
        f"the platform failed on this request ({exc.reason}); its run id,"
        " x-orchestrator-run-id, names it in the platform's log",
        "server_error",
        exc.reason,
        headers,
    )


_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")
# What the loader says of a failure that has no HTTP status (its own words, not the
# endpoint's), as callers are told it.
_TROUBLES = (
    ("timed out", "it timed out"),
    ("unreachable", "it is unreachable"),
    ("no LLM endpoint is configured", "none is configured"),
    ("calls are paused", "it failed repeatedly; calls are paused for a moment"),
)


def _llm_trouble(detail: str) -> str:
    """What went wrong with the LLM endpoint, in the platform's words (" (status 429)"):
    the status it answered last, or the kind of failure; never what the endpoint said."""
    statuses = _HTTP_STATUS.findall(detail)
    if statuses:
        return f" (status {statuses[-1]})"
    return next((f" ({said})" for found, said in _TROUBLES if found in detail), "")


def _answer_headers(answer: Answer) -> dict[str, str]:
    return {
        "x-orchestrator-run-id": answer.run_id,
        "x-orchestrator-agent-id": answer.agent_id or "",
        "x-orchestrator-specialty": answer.specialty,
        "x-orchestrator-tier": answer.degradation_tier,
        "x-orchestrator-cost-usd": f"{answer.cost_usd:.6f}",
        # From sending the request to Kafka to reading its answer: the platform's part.
        "x-orchestrator-latency-ms": f"{answer.latency_ms:.1f}",
    }


class GatewayApp:
    """The routes, the in-flight bound and the graceful stop of one gateway process."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_in_flight: int = 256,
        timeout_s: float = 60.0,
        max_body: int = 1024 * 1024,
        limits: Limits | None = None,
        max_in_flight_per_key: int | None = None,
        body_timeout_s: float = 10.0,
        header_timeout_s: float = 20.0,
        body_buffer_bytes: int = 64 * 1024 * 1024,
        max_connections: int | None = None,
    ) -> None:
        self.backend = backend
        self.max_in_flight = max_in_flight
        # None: half the slots, so one key never holds them all (unless there is one slot).
        self.max_in_flight_per_key = max(1, max_in_flight_per_key or max_in_flight // 2)
        self.timeout_s = timeout_s
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s
        self.header_timeout_s = header_timeout_s
        self.limits = limits or Limits()
        self._slots = Slots(max_in_flight, self.max_in_flight_per_key)
        # The same share bounds each goal, all its keys together: a tenant holding several
        # keys of one goal cannot take every slot from the other goals either.
        self._goal_slots = Slots(sys.maxsize, self.max_in_flight_per_key)
        # Bodies still coming: each key and each goal at most its share of them at once, and
        # in bytes each goal its share of body_buffer_bytes, the gateway all of it.
        self._receiving = Slots(sys.maxsize, self.max_in_flight_per_key)
        self._receiving_goals = Slots(sys.maxsize, self.max_in_flight_per_key)
        self._body_bytes = BodyBytes(
            body_buffer_bytes,
            body_buffer_bytes * self.max_in_flight_per_key // max(1, max_in_flight),
            max_body,
        )
        self.max_connections = max_connections  # None: streams.http.connection_limit's
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._abort = asyncio.Event()
        # Called when a drain ends: closes the server's idle connections (busy ones close
        # once their request is answered).
        self.on_drain: Callable[[], None] | None = None

    @property
    def in_flight(self) -> int:
        return self._slots.in_use

    @property
    def held(self) -> dict[str, int]:
        """Per key id, the slots its requests hold (no entry at zero)."""
        return self._slots.held

    @property
    def held_by_goal(self) -> dict[str, int]:
        """Per goal, the slots its requests hold (no entry at zero)."""
        return self._goal_slots.held

    @property
    def receiving(self) -> dict[str, int]:
        """Per key id, its requests whose body is coming (no entry at zero)."""
        return self._receiving.held

    @property
    def receiving_by_goal(self) -> dict[str, int]:
        """Per goal, its requests whose body is coming (no entry at zero)."""
        return self._receiving_goals.held

    @property
    def body_bytes(self) -> int:
        """The bytes the bodies still coming may hold, all goals together."""
        return self._body_bytes.in_use

    # -- admission and stop --------------------------------------------------------

    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise _Refusal(
                503,
                "this gateway is stopping; send the request again (to another instance)",
                "unavailable",
                "stopping",
                {"Retry-After": "1", "Connection": "close"},
            )

    def _key_share_refusal(self, what: str, count: int) -> _Refusal:
        return self._share_refusal(f"this API key has {count} requests {what}", "", "key")

    def _goal_share_refusal(self, goal_id: str, count: int, what: str = "in flight") -> _Refusal:
        held = f"goal {goal_id!r} has {count} requests {what}"
        return self._share_refusal(held, ", for all its keys together", "goal")

    def _bodies_refusal(self, goal_id: str, full: BodiesFull) -> _Refusal:
        if full.group is not None:
            return _Refusal(
                429,
                f"goal {goal_id!r} has {full.held} bytes of request bodies still coming on this"
                f" gateway, for all its keys together; with this one it would pass its share"
                f" ({full.limit} bytes: ORCH_GATEWAY_KEY_SHARE of"
                " ORCH_GATEWAY_BODY_BUFFER_BYTES); wait for one to end",
                "rate_limit_exceeded",
                "goal_in_flight",
                {"Retry-After": "1"},
            )
        return _Refusal(
            503,
            f"this gateway has {full.held} bytes of request bodies still coming; with this one"
            f" it would pass its limit ({full.limit} bytes, ORCH_GATEWAY_BODY_BUFFER_BYTES);"
            " try again",
            "unavailable",
            "overloaded",
            {"Retry-After": "1"},
        )

    def _share_refusal(self, held: str, whose: str, code: str) -> _Refusal:
        return _Refusal(
            429,
            f"{held} on this gateway, its share (ORCH_GATEWAY_KEY_SHARE of"
            f" {self.max_in_flight} slots: {self.max_in_flight_per_key}{whose}); wait for one"
            " to end",
            "rate_limit_exceeded",
            f"{code}_in_flight",
            {"Retry-After": "1"},
        )

    @contextmanager
    def _admitted(self, who: Identity) -> Iterator[None]:
        """One in-flight slot, taken once the body is in: 503 when none is free, 429 when
        the key, or its goal (all its keys together), holds its share of them already."""
        self._refuse_while_draining()
        try:
            self._slots.take(who.key_id)
        except SlotsFull:
            raise _Refusal(
                503,
                f"this gateway has {self.in_flight} requests in flight, its limit; try again",
                "unavailable",
                "overloaded",
                {"Retry-After": "1"},
            ) from None
        except KeyShareFull as exc:
            raise self._key_share_refusal("in flight", exc.held) from None
        try:
            self._goal_slots.take(who.goal_id)
        except KeyShareFull as exc:
            self._slots.give(who.key_id)
            raise self._goal_share_refusal(who.goal_id, exc.held) from None
        self._idle.clear()
        try:
            yield
        finally:
            self._slots.give(who.key_id)
            self._goal_slots.give(who.goal_id)
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, grace: float, linger: float = 1.0) -> int:
        """Refuse new requests, let those in flight finish for ``grace`` s, then answer the
        rest with 503; returns how many were still in flight at the deadline.

        Every response sent while draining says ``Connection: close``, so a client stops
        reusing its connections to this process. Idle keep-alive connections are not cut at
        once: a client may be writing a request on one at that very moment, and a cut
        connection tells it nothing. They stay open for ``linger`` s after the last request in
        flight ended (within ``grace``), answering 503 to whatever comes, and close after."""
        self.draining = True
        log.info("gateway stopping: %d requests in flight", self.in_flight)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        left = 0
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            left = self.in_flight
            self._abort.set()
            try:
                await asyncio.wait_for(self._idle.wait(), 1.0)
            except TimeoutError:
                # A stop goes on whatever a request still waits for: its connection closes.
                log.warning("gateway stopping: %d requests did not end", self.in_flight)
        await asyncio.sleep(max(0.0, min(linger, deadline - loop.time())))
        if self.on_drain is not None:
            self.on_drain()
        return left

    async def _until_answered(
        self, work: Awaitable[T], lost: str = "the answer came; the run goes on in the platform"
    ) -> T:
        """What ``work`` returns, unless the drain gives up on it first: then 503 (``lost``
        says what did not come). Every wait of a route goes through here, so that a drain
        ends within its grace whatever the routes wait for."""
        task = asyncio.ensure_future(work)
        abort = asyncio.ensure_future(self._abort.wait())
        try:
            await asyncio.wait({task, abort}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
        if not task.done():
            task.cancel()
            raise _Refusal(
                503,
                f"this gateway stopped before {lost}",
                "unavailable",
                "stopping",
                {"Connection": "close"},
            )
        return task.result()

    # -- shared pieces -------------------------------------------------------------

    async def _identity(self, request: web.Request) -> Identity:
        given = request.headers.getall("Authorization", [])
        if len(given) > 1:
            # Which one counts would be up to whoever reads them: a proxy may read the last.
            raise _Refusal(
                400, "send one Authorization header, not several", "invalid_request_error"
            )
        scheme, _, key = (given[0] if given else "").partition(" ")
        key = key.strip()
        who = await self.backend.identify(key) if scheme.lower() == "bearer" and key else None
        if who is None:
            raise _Refusal(401, _NO_KEY, "invalid_request_error", "invalid_api_key")
        return who

    @contextmanager
    def _receiving_body(self, request: web.Request, who: Identity) -> Iterator[None]:
        """Room for ``who``'s body while it comes: 429 when the key or its goal has its
        share of the bodies coming (in number, or the goal in bytes), 503 when the bodies
        coming hold all the bytes the gateway gives them."""
        size = body_bytes(request, self.max_body)
        with ExitStack() as held:
            try:
                held.enter_context(self._receiving.taken(who.key_id))
            except KeyShareFull as exc:
                raise self._key_share_refusal("sending their body", exc.held) from None
            try:
                held.enter_context(self._receiving_goals.taken(who.goal_id))
            except KeyShareFull as exc:
                raise self._goal_share_refusal(
                    who.goal_id, exc.held, "sending their body"
                ) from None
            try:
                held.enter_context(self._body_bytes.taken(who.goal_id, size))
            except BodiesFull as exc:
                raise self._bodies_refusal(who.goal_id, exc) from None
            yield

    async def _json(self, request: web.Request, who: Identity) -> Any:
        """The body, read before any slot is taken and within ``body_timeout_s`` (else
        408 and the connection closes); a key and a goal have at most their share of such
        reads (:meth:`_receiving_body`)."""
        self._refuse_while_draining()
        try:
            with self._receiving_body(request, who):
                return await read_json(request, self.body_timeout_s)
        except BodyTooLarge:
            raise _Refusal(
                413,
                f"the body is larger than {self.max_body} bytes",
                "invalid_request_error",
                "body_too_large",
            ) from None
        except BodyTimeout as exc:
            raise _Refusal(
                408,
                str(exc),
                "invalid_request_error",
                "body_timeout",
                {"Connection": "close"},  # what is left of it is not read
            ) from None
        except BodyNotJson:
            raise _invalid("the body must be JSON", "invalid_json") from None

    def _timeout(self, request: web.Request) -> float:
        text = request.headers.get(_TIMEOUT_HEADER)
        if text is None:
            return self.timeout_s
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value <= self.timeout_s:
            raise _invalid(
                f"{_TIMEOUT_HEADER} must be seconds, more than 0 and at most {self.timeout_s:g}"
            )
        return value

    # -- routes --------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        # The key first: a request nobody sent with a key takes no slot of those who did.
        who = await self._identity(request)
        timeout = self._timeout(request)
        try:
            chat = parse_chat(await self._json(request, who), self.limits)
        except InvalidRequest as exc:
            raise _invalid(str(exc)) from None
        with self._admitted(who):
            if chat.user is not None and chat.user != who.user_id:
                raise _Refusal(
                    403,
                    f"the key speaks for user {who.user_id!r}, not {chat.user!r}: leave `user`"
                    " out or use that user's key",
                    "permission_denied",
                    "user_mismatch",
                )
            answer = await self._ask(chat, who, timeout)
            self.backend.note_run(answer.run_id, who.goal_id)
            if chat.stream:
                return await self._stream(request, chat, answer)
            return web.json_response(completion(chat, answer), headers=_answer_headers(answer))

    async def _ask(self, chat: ChatRequest, who: Identity, timeout: float) -> Answer:
        work = self.backend.ask(
            chat.message,
            goal_id=who.goal_id,
            user_id=who.user_id,
            context=chat.context,
            timeout=timeout,
        )
        try:
            return await self._until_answered(work)
        except InvalidRequest as exc:
            raise _invalid(str(exc)) from None
        except RunFailed as exc:
            self.backend.note_run(exc.run_id, who.goal_id)
            raise _failure(exc, self.backend.now()) from None
        except RunTimeout as exc:
            raise _Refusal(
                504,
                f"no answer within {exc.timeout:g} s; the run goes on in the platform",
                "timeout",
                "timeout",
                {"x-orchestrator-run-id": exc.run_id, "x-should-retry": "false"},
            ) from None
        except KafkaError as exc:
            raise _kafka_refusal("requests", exc) from None
        except BrokerUnavailable as exc:
            # The request may yet run (a broker that wrote it and died before saying so):
            # its run id goes with the refusal, so a retry can be told from it.
            raise _kafka_refusal(
                "requests", exc, {"x-orchestrator-run-id": exc.run_id, "Retry-After": "1"}
            ) from None

    async def _stream(
        self, request: web.Request, chat: ChatRequest, answer: Answer
    ) -> web.StreamResponse:
        # Headers go out once the answer is known, so a refusal is still a real status.
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **_answer_headers(answer),
            },
        )
        await response.prepare(request)
        for chunk in completion_chunks(chat, answer):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        await self._identity(request)
        return web.json_response(model_list())

    async def feedback(self, request: web.Request) -> web.Response:
        who = await self._identity(request)
        run_id, score, text = _feedback_fields(await self._json(request, who), who)
        with self._admitted(who):
            return await self._until_answered(
                self._feedback(who, run_id, score, text),
                "the feedback's verdict came; it may still be taken",
            )

    async def _feedback(
        self, who: Identity, run_id: str, score: int | None, text: str
    ) -> web.Response:
        goal = await self.backend.run_goal(run_id)
        if goal is None:
            raise _Refusal(404, f"unknown run {run_id!r}", "not_found", "unknown_run")
        if goal != who.goal_id:
            raise _Refusal(
                403,
                f"run {run_id!r} is not of goal {who.goal_id!r}, the key's goal",
                "permission_denied",
                "not_run_owner",
            )
        try:
            verdict = await self.backend.feedback(
                run_id, user_id=who.user_id, score=score, text=text, timeout=_FEEDBACK_WAIT_S
            )
        except InvalidRequest as exc:
            raise _invalid(str(exc)) from None
        except UnknownRun as exc:
            raise _Refusal(404, str(exc), "not_found", "unknown_run") from None
        except NotRunOwner as exc:
            raise _Refusal(403, str(exc), "permission_denied", "not_run_owner") from None
        except RateLimited as exc:
            raise _Refusal(429, str(exc), "rate_limit_exceeded", "feedback_rate") from None
        except FeedbackRefused as exc:
            raise _Refusal(422, str(exc), "feedback_refused", "refused") from None
        except NoVerdict:
            return web.json_response({"status": "pending", "run_id": run_id}, status=202)
        except KafkaError as exc:
            raise _kafka_refusal("feedback", exc) from None
        return web.json_response(
            {
                "accepted": True,
                "reason": verdict.reason,
                "improvement_id": verdict.improvement_id,
                "run_id": verdict.run_id,
                "event_id": verdict.feedback_id,
            }
        )

    async def health(self, _: web.Request) -> web.Response:
        status = 503 if self.draining else 200
        return web.json_response(
            {"ok": not self.draining, "in_flight": self.in_flight}, status=status
        )


def _feedback_fields(body: Any, who: Identity) -> tuple[str, int | None, str]:
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    run_id, score, text = body.get("run_id"), body.get("score"), body.get("text", "")
    if not isinstance(run_id, str) or not run_id.strip() or len(run_id) > MAX_RUN_ID_CHARS:
        raise _invalid("run_id must be a non-empty string (x-orchestrator-run-id of an answer)")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int)):
        raise _invalid("score must be a whole number from 1 to 5")
    if not isinstance(text, str):
        raise _invalid("text must be a string")
    if len(text) > MAX_FEEDBACK_CHARS:
        raise _invalid(f"text has {len(text)} characters; the limit is {MAX_FEEDBACK_CHARS}")
    if not text.strip() and score is None:
        raise _invalid("give feedback text or a score")
    user = body.get("user_id", body.get("user"))
    if user is not None and user != who.user_id:
        raise _Refusal(
            403, f"the key speaks for user {who.user_id!r}", "permission_denied", "user_mismatch"
        )
    return run_id.strip(), score, text


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Refusal as refusal:
        return refusal.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found" if exc.status == 404 else "invalid_request_error"
        return web.json_response(
            error_body(exc.reason, kind, None), status=exc.status, headers=_allow(exc)
        )


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def build_app(gateway: GatewayApp) -> web.Application:
    app = web.Application(client_max_size=gateway.max_body, middlewares=[_refusals])

    async def _close_while_draining(_: web.Request, response: web.StreamResponse) -> None:
        if gateway.draining:  # the client reuses no connection to this process
            response.force_close()
            response.headers["Connection"] = "close"  # the hook runs after headers are made

    app.on_response_prepare.append(_close_while_draining)
    app.router.add_post("/v1/chat/completions", gateway.chat)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_post("/v1/feedback", gateway.feedback)
    app.router.add_get("/health", gateway.health)
    return app


def build_runner(gateway: GatewayApp) -> web.AppRunner:
    """The server for ``gateway``'s app, closing connections whose headers do not finish
    within ``header_timeout_s`` and holding at most ``max_connections`` of them
    (:func:`streams.http.runner`)."""
    return runner(
        build_app(gateway),
        gateway.header_timeout_s,
        max_connections=gateway.max_connections,
        shutdown_timeout=1.0,
    )
