"""The gateway process: one SDK client (one reply path), the key and run views, the HTTP server.

It reads no topic in a consumer group: the SDK's reply consumer is assigned every
partition of the terminal topics, the key view and the run index read theirs
outside any group, so starting or stopping a gateway never rebalances anything.
On SIGTERM it keeps listening but refuses new requests with 503, answers those in
flight for up to ``ORCH_GATEWAY_DRAIN_SECONDS``, then stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from aiohttp import web

from services.gateway.http import GatewayApp, build_runner
from services.gateway.runs import RunIndex
from services.gateway.settings import GatewaySettings
from streams.client import Answer, OrchestratorClient
from streams.clock import Clock
from streams.events import FeedbackDecided
from streams.http import more_open_files
from streams.keys import (
    CATCH_UP_INTERVAL_S,
    Identity,
    KeyCatchUp,
    KeyView,
    identify_reading,
    operators_from,
)
from streams.runtime import ServiceContext, announce_url

__all__ = ["KeyCatchUp", "PlatformBackend", "main"]

log = logging.getLogger(__name__)

SOURCE = "gateway"


class PlatformBackend:
    """The platform as the HTTP layer sees it: the SDK client plus the key and run views."""

    def __init__(
        self,
        client: OrchestratorClient,
        keys: KeyView,
        runs: RunIndex,
        clock: Clock,
        *,
        catch_up_interval: float = CATCH_UP_INTERVAL_S,
    ) -> None:
        self.client = client
        self.keys = keys
        self.runs = runs
        self.clock = clock
        self.catch_up = KeyCatchUp(lambda: keys.sync(timeout=2.0), catch_up_interval)

    async def identify(self, key: str) -> Identity | None:
        return await identify_reading(self.keys.registry, key, self.catch_up)

    async def ask(
        self, message: str, *, goal_id: str, user_id: str, context: dict[str, str], timeout: float
    ) -> Answer:
        return await self.client.ask(
            message, goal_id=goal_id, user_id=user_id, context=context, timeout=timeout
        )

    async def run_goal(self, run_id: str) -> str | None:
        return await self.runs.lookup(run_id)

    def note_run(self, run_id: str, goal_id: str) -> None:
        self.runs.note(run_id, goal_id)

    async def feedback(
        self, run_id: str, *, user_id: str, score: int | None, text: str, timeout: float
    ) -> FeedbackDecided:
        return await self.client.feedback(
            run_id, user_id=user_id, score=score, text=text, channel="gateway", timeout=timeout
        )

    def now(self) -> datetime:
        return self.clock.now()


async def _each_of(*steps: Callable[[], Awaitable[None]]) -> None:
    """Every step in turn; one that fails is logged and the next still runs."""
    for step in steps:
        try:
            await step()
        except Exception:
            log.exception("gateway stop: %s failed", getattr(step, "__qualname__", step))


def _close_connections(runner: web.AppRunner) -> None:
    # Each connection closes once its request is answered; idle ones close now.
    for connection in runner.server.connections if runner.server is not None else []:
        connection.close()


async def main(ctx: ServiceContext, stop: asyncio.Event) -> None:
    config = GatewaySettings.from_env()
    # Room for connections: the connection bound is taken from this limit (build_runner).
    log.info("gateway open-file limit: %d", more_open_files())
    client = OrchestratorClient(ctx.settings, source=SOURCE, clock=ctx.clock)
    keys = KeyView(ctx.settings, operators=operators_from())
    runs = RunIndex(
        ctx.settings,
        lookback=config.run_lookback,
        per_goal=config.runs_per_goal,
        source=SOURCE,
    )
    gateway = GatewayApp(
        PlatformBackend(client, keys, runs, ctx.clock),
        max_in_flight=config.max_in_flight,
        timeout_s=config.timeout_s,
        max_body=config.max_body,
        limits=config.limits,
        max_in_flight_per_key=config.max_in_flight_per_key,
        body_timeout_s=config.body_timeout_s,
        header_timeout_s=config.header_timeout_s,
        body_buffer_bytes=config.body_buffer_bytes,
        max_connections=config.connection_limit,
    )
    runner = build_runner(gateway)
    url_file: list[Path] = []

    async def close() -> None:
        try:
            left = await gateway.drain(config.drain_s)
            if left:
                log.warning("gateway stopped with %d requests unanswered (503 sent)", left)
        finally:
            # Each step whatever became of the drain or the steps before it: a drain that
            # raised once left the server, the views and the client open and the URL file in
            # place (listed by `orchestrator status` for a gateway that was gone).
            for path in url_file:
                path.unlink(missing_ok=True)
            await _each_of(runner.cleanup, runs.stop, keys.stop, client.close)
            log.info("gateway stopped")

    try:
        await client.start()
        await keys.start()
        await keys.sync(timeout=30.0)
        await runs.start(ctx.clock.now())
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        await site.start()
        gateway.on_drain = lambda: _close_connections(runner)
        port = int(runner.addresses[0][1])  # the real one when asked for port 0
        url = f"http://{config.host}:{port}/v1"
        url_file.append(announce_url(SOURCE, url, port))
        log.info("gateway serving OpenAI-compatible API on %s", url)
        await stop.wait()
    finally:
        # The service's stop cancels this task as soon as stop is set: the drain goes on
        # through that first cancellation (it is bounded by ORCH_GATEWAY_DRAIN_SECONDS, under
        # the 10 s a stopping service gets); a second one ends it.
        closing = asyncio.ensure_future(close())
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await closing
            raise
