"""Feedback over HTTP: ``POST /improve`` (JSON, API key) and Slack's ``/improve`` (slack-bolt).

Every JSON route needs ``Authorization: Bearer <API key>`` (``orchestrator keys
create``); the key, not the body, says who speaks: its user and its goal. 401 for
a missing, unknown or revoked key.

``POST /improve`` takes ``{"run_id", "text", "score"?}`` (a ``user_id``, if given,
must be the key's) and answers with the improvement service's verdict: 200
``{"accepted": true, "reason", "improvement_id", "event_id", "run_id"}``, 422
``{"accepted": false, "error"}`` when the change it asks for is refused, or 202
``{"status": "pending"}`` when no verdict came in time. 400 for bad input, 404 for
an unknown run, 403 when the key's user does not own the run (or the run is
another goal's), 429 past the per-user feedback limit.

``POST /improvements/<id>/approve`` (operator keys only, else 403) sends a goal's
proposal waiting for review to that goal's canary (one already approved stays as it is:
200, and the reason says where it is); ``POST /improvements/<id>/promote`` (operator
keys only) makes an improvement saved for one goal serve every goal, and refuses (422)
one never approved. 404 for an unknown id; the verdict comes back the same way.

``POST /slack/commands`` is a slack-bolt ``AsyncApp`` (enabled when
``SLACK_SIGNING_SECRET`` is set): Bolt refuses a request whose
``X-Slack-Signature`` is wrong or stale with 401. ``/improve RUN_ID [score] text``
is given by the platform user ``ORCH_SLACK_USERS[slack_user_id]``
(``U123=alice,U456=bob``) or else ``slack:<slack_user_id>``; the reply is
ephemeral text. No bot token is needed: the answer goes back in the HTTP
response, so authorization is local and makes no call to Slack.

Slow clients are cut off: a JSON body must arrive within ``BODY_TIMEOUT_S`` (else
408), and a connection must send a request's complete headers within
``HEADER_TIMEOUT_S`` of opening or of its previous answer (``build_runner``).

Like the gateway, the JSON routes handle at most ``max_in_flight`` requests at once
(counted once the key is checked and the body has come; one more is 503 with
``Retry-After: 1``), and one key at most its share of them (429), one goal too (all its
keys together): a request holds its body and waits up to ~17 s for its run and verdict, so
without a bound one key could hold thousands, and one tenant's keys every slot. Requests
still sending their body (each buffered, up to 64 KiB) are bounded the same way: at most
``max_in_flight`` of them at once (503), one key and one goal (all its keys together) at
most its share (429), and Slack commands, whose sender is known only once the body is in,
one share together (503): one tenant's many keys, or many senders, cannot make the server
buffer more than ``max_in_flight`` x 64 KiB of bodies. A request with more than one
``Authorization`` header is refused (400): which one counts would be up to whoever reads
them, and a proxy in front may have checked another than the one this service uses.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from aiohttp import web

from services.improvement.feedback import parse_slack_command, slack_identity
from streams.errors import (
    InvalidRequest,
    NotRunOwner,
    PromotionRefused,
    RateLimited,
    UnknownRun,
)
from streams.events import (
    FeedbackDecided,
    FeedbackReceived,
    PromotionDecided,
    PromotionRequested,
    PromotionScope,
)
from streams.http import BodyNotJson, BodyTimeout, BodyTooLarge, read_json, runner
from streams.keys import Identity
from streams.quotas import KeyShareFull, Slots, SlotsFull

__all__ = [
    "BODY_TIMEOUT_S",
    "HEADER_TIMEOUT_S",
    "MAX_IN_FLIGHT",
    "FeedbackSink",
    "SlackSettings",
    "build_app",
    "build_runner",
]

log = logging.getLogger(__name__)
_MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 10.0
# Slack refuses a request older than five minutes; a signature seen is kept that long (and
# at most this many of them).
_SLACK_REPLAY_S = 330.0
_SLACK_REPLAYS_KEPT = 100_000
# The signature of the Slack request being dispatched: a command's feedback event is named
# after it, so the same signed command sent to another instance (or after a restart, which
# forgets ``answered``) is the same event, which the service decides once.
_SIGNED: ContextVar[str | None] = ContextVar("slack_signature", default=None)
_SLACK_NS = uuid.UUID("3b8f2c1e-5d7a-4e9b-a6c4-2f1d0e9b8a7c")


def _slack_event_id(signature: str | None) -> str | None:
    return None if not signature else str(uuid.uuid5(_SLACK_NS, signature))


HEADER_TIMEOUT_S = 20.0
MAX_IN_FLIGHT = 64


class FeedbackSink(Protocol):
    """Checks feedback (raises InvalidRequest, UnknownRun, NotRunOwner, RateLimited), sends it.

    A caller that passes ``wait=True`` to ``submit`` (and every caller of ``approve``)
    asks for ``verdict`` next, which lets go of what was kept for it.
    """

    async def identify(self, key: str) -> Identity | None: ...

    async def submit(
        self,
        run_id: str,
        user_id: str,
        score: int | None,
        text: str,
        channel: str,
        goal_id: str | None = None,
        *,
        wait: bool = False,
        event_id: str | None = None,
    ) -> FeedbackReceived: ...

    async def approve(
        self, improvement_id: str, user_id: str, scope: PromotionScope = "goal"
    ) -> PromotionRequested: ...

    async def verdict(
        self, request_id: str, timeout: float
    ) -> FeedbackDecided | PromotionDecided | None: ...


class SlackSettings:
    def __init__(
        self, signing_secret: str, bot_token: str | None = None, users: dict[str, str] | None = None
    ) -> None:
        self.signing_secret = signing_secret
        self.bot_token = bot_token
        self.users = dict(users or {})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _parse(body: Any) -> tuple[str, str | None, int | None, str]:
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    run_id, user_id = body.get("run_id"), body.get("user_id")
    text, score = body.get("text", ""), body.get("score")
    if not isinstance(run_id, str) or not run_id.strip():
        raise InvalidRequest("run_id must be a non-empty string")
    if user_id is not None and (not isinstance(user_id, str) or not user_id.strip()):
        raise InvalidRequest("user_id, when given, must be a non-empty string")
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int)):
        raise InvalidRequest("score must be an integer from 1 to 5")
    if not text.strip() and score is None:
        raise InvalidRequest("give feedback text or a score")
    return run_id, user_id, score, text


_VERDICT_WAIT_S = 15.0


_NO_KEY = "a valid API key is required: Authorization: Bearer <key> (orchestrator keys create)"


async def _identity(sink: FeedbackSink, request: web.Request) -> Identity | web.Response:
    """Who the request's key speaks for, or the 400 (several Authorization headers) or 401
    (no valid key) to answer."""
    given = request.headers.getall("Authorization", [])
    if len(given) > 1:
        # Which one counts would be up to whoever reads them: a proxy may check the last.
        return _error(400, "send one Authorization header, not several")
    scheme, _, key = (given[0] if given else "").partition(" ")
    key = key.strip()
    who = await sink.identify(key) if scheme.lower() == "bearer" and key else None
    return who if who is not None else _error(401, _NO_KEY)


async def _answer(sink: FeedbackSink, request_id: str, run_id: str | None) -> web.Response:
    verdict = await sink.verdict(request_id, _VERDICT_WAIT_S)
    if verdict is None:
        return web.json_response(
            {"status": "pending", "event_id": request_id, "run_id": run_id}, status=202
        )
    if not verdict.accepted:
        return web.json_response(
            {"accepted": False, "error": verdict.reason, "event_id": request_id}, status=422
        )
    body: dict[str, Any] = {"accepted": True, "reason": verdict.reason, "event_id": request_id}
    if isinstance(verdict, FeedbackDecided):
        body.update(run_id=verdict.run_id, improvement_id=verdict.improvement_id)
    else:
        body.update(improvement_id=verdict.improvement_id, workflow_id=verdict.workflow_id)
    return web.json_response(body, status=200)


async def _json_body(request: web.Request, timeout: float) -> Any:
    """The request's JSON (:func:`streams.http.read_json`), or the 400, 408 or 413 to answer."""
    try:
        return await read_json(request, timeout)
    except BodyTimeout as exc:
        response = _error(408, str(exc))
        response.force_close()  # what is left of it is not read
        return response
    except BodyTooLarge:
        return _error(413, f"the body is larger than {_MAX_BODY} bytes")
    except BodyNotJson:
        return _error(400, "body must be JSON")


def _busy(message: str) -> web.Response:
    return web.json_response({"error": message}, status=503, headers={"Retry-After": "1"})


# The share of bodies still coming on the Slack route: no key is known before the body is
# in (Bolt checks its signature then), so all Slack senders share one (not a key id's shape).
_SLACK_BODIES = "slack:commands"


class _Admission:
    """The in-flight bound of the JSON routes, each key's and each goal's share of it, and the
    same bounds on requests still sending their body (see the module)."""

    def __init__(self, max_in_flight: int, key_share: float) -> None:
        per_key = max(1, int(max_in_flight * key_share))
        self.slots = Slots(max_in_flight, per_key)
        # The same share bounds each goal, all its keys together: a tenant with several keys
        # of one goal cannot take every slot from the other goals either.
        self.goals = Slots(sys.maxsize, per_key)
        # Bodies still coming, each buffered up to _MAX_BODY: as many in all as the slots,
        # each key and each goal its share of them. Per key alone, a tenant's many keys of
        # one goal made the server buffer as many bodies as it had keys.
        self.receiving = Slots(max_in_flight, per_key)
        self.receiving_goals = Slots(sys.maxsize, per_key)

    def _share(self, what: str, held: int) -> web.Response:
        return web.json_response(
            {
                "error": f"this API key has {held} requests {what} on this endpoint, its share"
                f" (ORCH_IMPROVE_KEY_SHARE of {self.slots.limit} slots: {self.slots.per_key});"
                " wait for one to end"
            },
            status=429,
            headers={"Retry-After": "1"},
        )

    def _goal_share(self, goal_id: str, what: str, held: int) -> web.Response:
        return web.json_response(
            {
                "error": f"goal {goal_id!r} has {held} requests {what} on this endpoint, its"
                f" share (ORCH_IMPROVE_KEY_SHARE of {self.slots.limit} slots:"
                f" {self.slots.per_key}, for all its keys together); wait for one to end"
            },
            status=429,
            headers={"Retry-After": "1"},
        )

    def _full(self, what: str, held: int) -> web.Response:
        return _busy(
            f"this endpoint has {held} requests {what}, its limit (ORCH_IMPROVE_MAX_IN_FLIGHT);"
            " try again"
        )

    async def body(self, request: web.Request, who: Identity, timeout: float) -> Any:
        """The request's JSON as :func:`_json_body`, or 503 when as many bodies as there are
        slots are coming already, 429 when the key, or its goal, has its share of them."""
        what = "sending their body"
        try:
            with (
                self.receiving.taken(who.key_id),
                _goal_taken(self.receiving_goals, who.goal_id),
            ):
                return await _json_body(request, timeout)
        except _GoalShareFull as exc:
            return self._goal_share(who.goal_id, what, exc.held)
        except SlotsFull:
            return self._full(what, self.receiving.in_use)
        except KeyShareFull as exc:
            return self._share(what, exc.held)

    @contextmanager
    def slack_body(self) -> Iterator[web.Response | None]:
        """While a Slack command's body comes: None, or the 503 to answer when as many bodies
        as there are slots, or Slack's share of them, are coming already."""
        refused = None
        try:
            self.receiving.take(_SLACK_BODIES)
        except SlotsFull:
            refused = self._full("sending their body", self.receiving.in_use)
        except KeyShareFull as exc:
            refused = _busy(
                f"this endpoint has {exc.held} Slack commands sending their body, their share"
                f" (ORCH_IMPROVE_KEY_SHARE of {self.slots.limit} slots: {self.slots.per_key},"
                " for every Slack sender together); try again"
            )
        if refused is not None:
            yield refused
            return
        try:
            yield None
        finally:
            self.receiving.give(_SLACK_BODIES)

    async def run(
        self, who: Identity, handle: Callable[[], Awaitable[web.Response]]
    ) -> web.Response:
        """``handle()`` in one of the slots: 503 when none is free, 429 when the key, or its
        goal (all its keys together), holds its share already."""
        try:
            with self.slots.taken(who.key_id), _goal_taken(self.goals, who.goal_id):
                return await handle()
        except _GoalShareFull as exc:
            return self._goal_share(who.goal_id, "in flight", exc.held)
        except SlotsFull:
            return self._full("in flight", self.slots.in_use)
        except KeyShareFull as exc:
            return self._share("in flight", exc.held)


@contextmanager
def _goal_taken(goals: Slots, goal_id: str) -> Iterator[None]:
    """One of ``goals``' slots for ``goal_id`` while the block runs; raises
    :class:`_GoalShareFull` when the goal holds its share."""
    try:
        goals.take(goal_id)
    except KeyShareFull as exc:
        raise _GoalShareFull(exc.held) from None
    try:
        yield
    finally:
        goals.give(goal_id)


class _GoalShareFull(KeyShareFull):
    """The goal (all its keys together) holds its share of the slots already."""


def _improve_handler(sink: FeedbackSink, body_timeout: float, admission: _Admission) -> Any:
    async def improve(request: web.Request) -> web.Response:
        who = await _identity(sink, request)
        if isinstance(who, web.Response):
            return who
        body = await admission.body(request, who, body_timeout)
        if isinstance(body, web.Response):
            return body
        return await admission.run(who, lambda: _improve(sink, who, body))

    return improve


async def _improve(sink: FeedbackSink, who: Identity, body: Any) -> web.Response:
    """One feedback request, admitted: its verdict, or why there is none."""
    try:
        run_id, user_id, score, text = _parse(body)
        if user_id is not None and user_id != who.user_id:
            raise NotRunOwner(f"the key speaks for {who.user_id!r}, not {user_id!r}")
        event = await sink.submit(run_id, who.user_id, score, text, "http", who.goal_id, wait=True)
    except InvalidRequest as exc:
        return _error(400, str(exc))
    except UnknownRun as exc:
        return _error(404, str(exc))
    except NotRunOwner as exc:
        return _error(403, str(exc))
    except RateLimited as exc:
        return _error(429, str(exc))
    return await _answer(sink, event.event_id, event.run_id)


def _approve_handler(sink: FeedbackSink, admission: _Admission, scope: PromotionScope) -> Any:
    what = "promoting" if scope == "all" else "approving"

    async def approve(request: web.Request) -> web.Response:
        who = await _identity(sink, request)
        if isinstance(who, web.Response):
            return who
        if not who.is_operator:
            return _error(
                403,
                f"{what} an improvement needs an operator key; {who.user_id!r}'s is a user key",
            )

        async def approved() -> web.Response:
            improvement_id = request.match_info["improvement_id"]
            try:
                event = await sink.approve(improvement_id, who.user_id, scope)
            except PromotionRefused as exc:
                return _error(404, str(exc))
            return await _answer(sink, event.event_id, None)

        return await admission.run(who, approved)

    return approve


def _slack_handler(sink: FeedbackSink, slack: SlackSettings, admission: _Admission) -> Any:
    from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
    from slack_bolt.async_app import AsyncAck, AsyncApp
    from slack_bolt.authorization import AuthorizeResult

    async def authorize(
        enterprise_id: str | None, team_id: str | None, user_id: str | None
    ) -> AuthorizeResult:
        # Slash commands answer in the HTTP response: nothing to look up at Slack.
        return AuthorizeResult(
            enterprise_id=enterprise_id,
            team_id=team_id,
            user_id=user_id,
            bot_token=slack.bot_token,
        )

    bolt = AsyncApp(
        signing_secret=slack.signing_secret,
        authorize=authorize,
        process_before_response=True,
        ssl_check_enabled=True,
    )

    @bolt.command("/improve")
    async def on_improve(ack: AsyncAck, command: dict[str, Any]) -> None:
        try:
            parsed = parse_slack_command(str(command.get("text", "")))
            goal, user = slack_identity(str(command.get("user_id", "")), slack.users)
            # Slack gets its answer now, not the verdict: nothing waits for one.
            event = await sink.submit(
                parsed.run_id,
                user,
                parsed.score,
                parsed.text,
                "slack",
                goal,
                event_id=_slack_event_id(_SIGNED.get()),
            )
        except (InvalidRequest, ValueError, UnknownRun, NotRunOwner, RateLimited) as exc:
            await ack(text=f"Feedback not recorded: {exc}")
            return
        await ack(text=f"Thanks: feedback on run {event.run_id} recorded (event {event.event_id}).")

    # Signatures of requests already answered, for as long as Slack's timestamp window lets
    # one be sent again: a signed command sent twice once recorded its feedback twice.
    answered: OrderedDict[str, float] = OrderedDict()

    async def slack_commands(request: web.Request) -> web.Response:
        stamps = request.headers.getall("X-Slack-Request-Timestamp", [])
        signatures = request.headers.getall("X-Slack-Signature", [])
        if len(stamps) != 1 or len(signatures) != 1:
            # Bolt verifies the last of each; the replay check must see the same one.
            return _error(401, "one X-Slack-Signature and one X-Slack-Request-Timestamp")
        stamp, signature = stamps[0], signatures[0]
        if not stamp.isdigit() or len(stamp) > 12:
            return _error(401, "X-Slack-Request-Timestamp must be the request's Unix time")
        now = time.monotonic()
        while answered and next(iter(answered.values())) < now - _SLACK_REPLAY_S:
            answered.popitem(last=False)
        if signature in answered:
            return _error(401, "this signed request was answered already")
        with admission.slack_body() as refused:
            if refused is not None:
                return refused
            try:
                async with asyncio.timeout(BODY_TIMEOUT_S):  # signed only once the body is in
                    bolt_request = await to_bolt_request(request)
            except TimeoutError:
                return _error(408, f"the body did not arrive within {BODY_TIMEOUT_S:g} s")
        signed = _SIGNED.set(signature)  # the command's handler names its event after it
        try:
            response = await bolt.async_dispatch(bolt_request)
        finally:
            _SIGNED.reset(signed)
        if response.status == 200:  # Bolt checked the signature: it may not come again
            answered[signature] = now
            while len(answered) > _SLACK_REPLAYS_KEPT:
                answered.popitem(last=False)
        return await to_aiohttp_response(response)

    return slack_commands


def build_app(
    sink: FeedbackSink,
    slack: SlackSettings | None,
    *,
    body_timeout: float = BODY_TIMEOUT_S,
    max_in_flight: int = MAX_IN_FLIGHT,
    key_share: float = 0.5,
) -> web.Application:
    """The endpoint's routes; the JSON ones handle at most ``max_in_flight`` requests at
    once, one key at most ``key_share`` of them (at least one)."""
    admission = _Admission(max_in_flight, key_share)
    app = web.Application(client_max_size=_MAX_BODY)
    app.router.add_post("/improve", _improve_handler(sink, body_timeout, admission))
    app.router.add_post(
        "/improvements/{improvement_id}/approve", _approve_handler(sink, admission, "goal")
    )
    app.router.add_post(
        "/improvements/{improvement_id}/promote", _approve_handler(sink, admission, "all")
    )

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "slack": slack is not None})

    app.router.add_get("/health", health)
    if slack is not None:
        app.router.add_post("/slack/commands", _slack_handler(sink, slack, admission))
    else:

        async def disabled(_: web.Request) -> web.Response:
            return _error(404, "Slack is not configured: set SLACK_SIGNING_SECRET")

        app.router.add_post("/slack/commands", disabled)
    return app


def build_runner(
    app: web.Application, *, header_timeout: float = HEADER_TIMEOUT_S
) -> web.AppRunner:
    """The server for ``app``, closing connections whose headers do not finish within
    ``header_timeout`` seconds (:func:`streams.http.runner`)."""
    return runner(app, header_timeout)
