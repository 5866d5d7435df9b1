"""What the platform's HTTP servers share: a JSON body read within a time limit, a bound on
the bytes of bodies being read, and a server that closes connections whose headers never
finish.

The gateway and the improvement service's feedback endpoint answer in their own shapes;
both read bodies and build their servers here, so a slow or hostile client meets the
same limits on either.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

__all__ = [
    "BodiesFull",
    "BodyBytes",
    "BodyNotJson",
    "BodyTimeout",
    "BodyTooLarge",
    "body_bytes",
    "read_json",
    "runner",
]


class BodyTimeout(Exception):
    """The body did not arrive in time; the connection should close (the rest is unread)."""


class BodyTooLarge(Exception):
    """The body is over the application's ``client_max_size``."""


class BodyNotJson(Exception):
    """The body is not JSON (or is nested too deep to parse)."""


class BodiesFull(Exception):
    """Bodies being read hold the bytes a group (``group`` set) or the server may hold."""

    def __init__(self, held: int, limit: int, group: str | None) -> None:
        super().__init__(f"{held} of {limit} bytes held")
        self.held = held
        self.limit = limit
        self.group = group


async def read_json(request: web.Request, timeout: float) -> Any:
    """The request's JSON, read within ``timeout`` seconds.

    Decoded from the bytes as JSON says (UTF-8, or UTF-16/32 told by the first bytes),
    never by the charset of Content-Type, so an unknown charset is no LookupError;
    nesting too deep to parse is :class:`BodyNotJson`, not a RecursionError.
    """
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the body did not arrive within {timeout:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge() from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BodyNotJson() from None


def body_bytes(request: web.BaseRequest, largest: int) -> int:
    """The bytes reading ``request``'s body may come to hold, at most ``largest`` (the largest
    body taken): its Content-Length when it is sent as it is, else ``largest`` (a chunked or
    compressed body does not say how large it will be once read)."""
    length = request.content_length
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if length is None or coding not in ("", "identity"):
        return largest
    return max(0, min(length, largest))


class BodyBytes:
    """The bytes of request bodies being read at once: at most ``limit`` for the whole server
    and ``per_group`` for one group (a goal, all its keys together), so that neither one
    tenant nor all of them together make a server hold more in memory.

    A body counts for what :func:`body_bytes` says it may come to, from before its read to
    the end of it; both bounds are at least ``largest``, so one body alone always passes."""

    def __init__(self, limit: int, per_group: int, largest: int) -> None:
        self.limit = max(limit, largest)
        self.per_group = max(min(per_group, self.limit), largest)
        self.in_use = 0
        self.held: dict[str, int] = {}  # group -> bytes its bodies hold; no entry at zero

    @contextmanager
    def taken(self, group: str, size: int) -> Iterator[None]:
        """``size`` bytes for ``group`` while the block runs; raises :class:`BodiesFull`
        (taking nothing) when the group's share or the server's bound has no room."""
        held = self.held.get(group, 0)
        if held + size > self.per_group:
            raise BodiesFull(held, self.per_group, group)
        if self.in_use + size > self.limit:
            raise BodiesFull(self.in_use, self.limit, None)
        self.in_use += size
        self.held[group] = held + size
        try:
            yield
        finally:
            self.in_use -= size
            left = self.held[group] - size
            if left:
                self.held[group] = left
            else:
                del self.held[group]


def runner(app: web.Application, header_timeout: float, **options: Any) -> web.AppRunner:
    """The server for ``app``. Its keep-alive timeout is the header deadline: aiohttp closes
    a connection still waiting for a request's complete headers ``header_timeout`` seconds
    after it opened (or after its previous answer), however slowly the bytes trickle in;
    idle keep-alive connections close after it too."""
    return web.AppRunner(app, access_log=None, keepalive_timeout=header_timeout, **options)
