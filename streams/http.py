"""What the platform's HTTP servers share: a JSON body read within a time limit, and a
server that closes connections whose headers never finish.

The gateway and the improvement service's feedback endpoint answer in their own shapes;
both read bodies and build their servers here, so a slow or hostile client meets the
same limits on either.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

__all__ = ["BodyNotJson", "BodyTimeout", "BodyTooLarge", "read_json", "runner"]


class BodyTimeout(Exception):
    """The body did not arrive in time; the connection should close (the rest is unread)."""


class BodyTooLarge(Exception):
    """The body is over the application's ``client_max_size``."""


class BodyNotJson(Exception):
    """The body is not JSON (or is nested too deep to parse)."""


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


def runner(app: web.Application, header_timeout: float, **options: Any) -> web.AppRunner:
    """The server for ``app``. Its keep-alive timeout is the header deadline: aiohttp closes
    a connection still waiting for a request's complete headers ``header_timeout`` seconds
    after it opened (or after its previous answer), however slowly the bytes trickle in;
    idle keep-alive connections close after it too."""
    return web.AppRunner(app, access_log=None, keepalive_timeout=header_timeout, **options)
