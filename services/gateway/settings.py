"""The gateway's settings: where it listens, how much it takes on, how long it waits."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from services.gateway.chat import Limits
from streams.settings import EnvSettings, setting

__all__ = ["GatewaySettings"]


class GatewaySettings(EnvSettings):
    title: ClassVar[str] = "Gateway (OpenAI-compatible HTTP)"

    host: str = setting(
        "ORCH_GATEWAY_HOST",
        "127.0.0.1",
        "Address the HTTP server listens on. Keep it on loopback unless a TLS proxy is in "
        "front: keys travel in the `Authorization` header.",
        read_by="gateway",
    )
    port: int = setting(
        "ORCH_GATEWAY_PORT",
        8400,
        "Port, 0-65535 (0 picks a free one). The URL is written to "
        "`<ORCH_DATA_DIR>/run/gateway-urls/<port>.url` while the instance runs; `orchestrator "
        "status --json` lists the ones that answer (`gateway_urls`). A port already taken "
        "stops the instance with an error.",
        read_by="gateway",
        ge=0,
        le=65535,
    )
    max_in_flight: int = setting(
        "ORCH_GATEWAY_MAX_IN_FLIGHT",
        256,
        "Chat and feedback requests one process handles at once, counted once their key is "
        "checked and their body has come (a request without a valid key, or still sending "
        "its body, takes no slot); one more is answered 503 (`code: overloaded`, "
        "`Retry-After: 1`) at once. >= 1.",
        read_by="gateway",
        ge=1,
    )
    key_share: float = setting(
        "ORCH_GATEWAY_KEY_SHARE",
        0.5,
        "Largest share of `ORCH_GATEWAY_MAX_IN_FLIGHT` one API key may hold at once (at least "
        "one slot), so one key cannot take every slot from the others; one more of its "
        "requests is answered 429 (`code: key_in_flight`, `Retry-After: 1`). The same share "
        "bounds one goal, all its keys together (`code: goal_in_flight`), so a tenant with "
        "many keys cannot take every slot from the other goals either; and each key's, and "
        "each goal's, requests still sending their body. Raise it to 1 when a single goal "
        "is all that uses the gateway. More than 0, at most 1.",
        read_by="gateway",
        gt=0.0,
        le=1.0,
    )
    timeout_s: float = setting(
        "ORCH_GATEWAY_TIMEOUT_SECONDS",
        60.0,
        "How long a request waits for its answer before 504 (the run goes on in the platform "
        "and its id is in `x-orchestrator-run-id`). A request may ask for less with the header "
        "`x-orchestrator-timeout: <seconds>`, never more. >= 0.1.",
        read_by="gateway",
        ge=0.1,
    )
    drain_s: float = setting(
        "ORCH_GATEWAY_DRAIN_SECONDS",
        8.0,
        "After SIGTERM: how long requests in flight get to be answered while new ones get 503 "
        "(`code: stopping`); what is still waiting then gets 503. 0-8 (a stopping service gets "
        "10 s before it is cancelled).",
        read_by="gateway",
        ge=0.0,
        le=8.0,
    )
    body_timeout_s: float = setting(
        "ORCH_GATEWAY_BODY_TIMEOUT_SECONDS",
        10.0,
        "How long a request's body may take to arrive, from the end of its headers; a slower "
        "one gets 408 (`code: body_timeout`) and its connection is closed. The body is read "
        "before the request takes an in-flight slot. >= 0.1.",
        read_by="gateway",
        ge=0.1,
    )
    header_timeout_s: float = setting(
        "ORCH_GATEWAY_HEADER_TIMEOUT_SECONDS",
        20.0,
        "How long a connection may take to send a request's complete headers, from its opening "
        "or its previous answer, however slowly the bytes come; then it is closed. Idle "
        "keep-alive connections close after it too: keep it above the idle time after which "
        "your clients drop a pooled connection (httpx: 5 s, aiohttp: 15 s). >= 0.1.",
        read_by="gateway",
        ge=0.1,
    )
    max_body: int = setting(
        "ORCH_GATEWAY_MAX_BODY_BYTES",
        1024 * 1024,
        "Largest request body; a larger one gets 413 before it is parsed. >= 1024.",
        read_by="gateway",
        ge=1024,
    )
    body_buffer_bytes: int = setting(
        "ORCH_GATEWAY_BODY_BUFFER_BYTES",
        64 * 1024 * 1024,
        "Bytes of request bodies one process holds while they arrive, all keys together; a "
        "body counts for its `Content-Length` (`ORCH_GATEWAY_MAX_BODY_BYTES` when chunked or "
        "compressed) from before it is read until it is in. One more is answered 503 (`code: "
        "overloaded`, `Retry-After: 1`); a goal, all its keys together, may hold its "
        "`ORCH_GATEWAY_KEY_SHARE` of them (then 429, `code: goal_in_flight`), so slow "
        "bodies of one tenant neither run the gateway out of memory nor fill it for the "
        "others. At least `ORCH_GATEWAY_MAX_BODY_BYTES` is used. >= 1024.",
        read_by="gateway",
        ge=1024,
    )
    max_connections: int = setting(
        "ORCH_GATEWAY_MAX_CONNECTIONS",
        0,
        "Connections one process holds at once, counted from before any key is checked; one "
        "more closes the connection idle the longest (the new one when every other is "
        "handling a request), so connections opened and left idle neither use up the "
        "process's file descriptors nor shut other clients out. 0: 4096. Either way at most "
        "what the open-file limit leaves once a quarter of it, at least 256, is kept for "
        "Kafka, files and bursts of new connections (768 at `ulimit -n` 1024); the gateway "
        "raises its open-file limit to the hard one (`ulimit -Hn`, at most 65536) as it "
        "starts. >= 0.",
        read_by="gateway",
        ge=0,
    )
    max_messages: int = setting(
        "ORCH_GATEWAY_MAX_MESSAGES",
        Limits.max_messages,
        "Most items in `messages`; more is 400. >= 1. (The last user message may be 32 KiB; "
        "earlier turns are passed on as at most 8,000 characters of context, newest first, the "
        "system message as at most 4,000.)",
        read_by="gateway",
        ge=1,
    )
    run_lookback_hours: float = setting(
        "ORCH_GATEWAY_RUN_LOOKBACK_HOURS",
        24.0,
        "`POST /v1/feedback` checks that the run belongs to the key's goal from the runs that "
        "ended this long before the gateway started (and every one since); feedback on an "
        "older run gets 404 here (the CLI and the improvement service's own endpoint still "
        "take it). >= 0.",
        read_by="gateway",
        ge=0.0,
    )
    runs_per_goal: int = setting(
        "ORCH_GATEWAY_RUNS_PER_GOAL",
        50_000,
        "Most runs of one goal the gateway remembers for `POST /v1/feedback` (of 200,000 for "
        "all goals): a goal's newer runs push out only its own older ones, and past 200,000 "
        "the goal holding the most loses its oldest, so one key's flood of requests never "
        "makes another goal's feedback 404. Raise it when one goal answers more than this "
        "within `ORCH_GATEWAY_RUN_LOOKBACK_HOURS`. 1-200000.",
        read_by="gateway",
        ge=1,
        le=200_000,
    )

    @property
    def run_lookback(self) -> timedelta:
        return timedelta(hours=self.run_lookback_hours)

    @property
    def max_in_flight_per_key(self) -> int:
        return max(1, int(self.max_in_flight * self.key_share))

    @property
    def connection_limit(self) -> int | None:
        """``max_connections``, or None for the default (:func:`streams.http.connection_limit`)."""
        return self.max_connections or None

    @property
    def limits(self) -> Limits:
        return Limits(max_messages=self.max_messages)
