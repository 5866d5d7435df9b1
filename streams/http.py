"""What the platform's HTTP servers share: a JSON body read within a time limit, a bound on
the bytes of bodies being read, and a server that closes connections whose headers never
finish and holds at most so many connections at once.

The gateway and the improvement service's feedback endpoint answer in their own shapes;
both read bodies and build their servers here, so a slow or hostile client meets the
same limits on either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = [
    "BodiesFull",
    "BodyBytes",
    "BodyNotJson",
    "BodyTimeout",
    "BodyTooLarge",
    "body_bytes",
    "connection_limit",
    "more_open_files",
    "read_json",
    "runner",
]

log = logging.getLogger(__name__)


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
    # Every Content-Encoding header: aiohttp decodes by the last one, so reading the first
    # alone charged `identity, gzip` at its compressed length while it inflated to `largest`.
    codings = [c.strip().lower() for c in request.headers.getall("Content-Encoding", [])]
    if length is None or any(c not in ("", "identity") for c in codings):
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


# File descriptors a process keeps out of the connection bound: its Kafka clients (one
# socket per broker each, and more while they reconnect), logs, the data dir's files, and
# the connections asyncio accepts in one go (a listener's backlog, 128 by default) before
# the bound closes any.
_FD_RESERVE = 256
_FD_UNLIMITED = 65536  # what an unlimited open-file limit counts as
MAX_CONNECTIONS = 4096  # the default bound, when the open-file limit leaves room for it


def _open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _FD_UNLIMITED if soft == resource.RLIM_INFINITY else soft


def connection_limit(wanted: int | None = None, *, fds: int | None = None) -> int:
    """How many connections a server of this process holds at once: ``wanted`` (default
    4096), at most what the soft limit on open files (``ulimit -n``, or ``fds``) leaves
    once the rest of the process has its share: a quarter of the limit, at least 256 (768
    at 1024; at a limit under 512, a quarter of it is all connections get). Past the
    open-file limit ``accept`` itself fails: no request is answered then, another
    tenant's neither, and asyncio logs the failure many times a second."""
    fds = _open_file_limit() if fds is None else fds
    room = max(fds - max(_FD_RESERVE, fds // 4), fds // 4, 1)
    return max(1, min(wanted or MAX_CONNECTIONS, room))


def more_open_files(most: int = _FD_UNLIMITED) -> int:
    """Raises this process's soft limit on open files to its hard limit (at most ``most``),
    as a server that holds many connections wants; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.info("open-file limit stays at %d: %s", soft, exc)
            return soft
        return target
    return _open_file_limit()


_CUT_LOG_EVERY_S = 10.0


class _Connections:
    """The open connections of one server, the one idle the longest first. Past ``limit``,
    the one idle the longest is closed to make room for the new one (the new one itself
    when every other is handling a request): a connection that sends nothing holds a file
    descriptor and no more, so whoever opens many of them, without any key, pushes out
    only idle ones and never stops another's request from coming in."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.limit = max(1, limit)
        self._loop = loop
        self._open: OrderedDict[RequestHandler, None] = OrderedDict()  # longest idle first
        self._busy: set[RequestHandler] = set()
        self.cut = 0  # connections closed to keep to the limit
        self._cut_unlogged = 0
        self._logged_at: float | None = None

    def __len__(self) -> int:
        return len(self._open)

    def made(self, handler: RequestHandler) -> None:
        self._open[handler] = None
        if len(self._open) <= self.limit:
            return
        victim = next(h for h in self._open if h not in self._busy)  # the new one is idle
        del self._open[victim]
        victim.force_close()
        self.cut += 1
        self._note_cut()

    def lost(self, handler: RequestHandler) -> None:
        self._open.pop(handler, None)
        self._busy.discard(handler)

    def handling(
        self, handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """``handle``, marking its request's connection busy (not to be closed) meanwhile."""

        async def handled(request: web.BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            self._busy.add(protocol)
            try:
                return await handle(request)
            finally:
                self._busy.discard(protocol)
                if protocol in self._open:
                    self._open.move_to_end(protocol)  # idle from now

        return handled

    def _note_cut(self) -> None:
        # One line per interval however many are cut: a flood of connections is no flood
        # of log lines.
        now = self._loop.time()
        self._cut_unlogged += 1
        if self._logged_at is not None and now - self._logged_at < _CUT_LOG_EVERY_S:
            return
        log.warning(
            "%d connections open, this server's limit: closed %d idle connection(s) to make"
            " room (since the last such line); raise the open-file limit (ulimit -n) or the"
            " server's connection setting if clients are turned away",
            len(self._open),
            self._cut_unlogged,
        )
        self._logged_at = now
        self._cut_unlogged = 0


class _Runner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose server holds at most ``max_connections``."""

    def __init__(self, app: web.Application, max_connections: int, **options: Any) -> None:
        super().__init__(app, **options)
        self.max_connections = max_connections
        self.connections: _Connections | None = None

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        connections = _Connections(self.max_connections, asyncio.get_running_loop())
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            connections.made(handler)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            connections.lost(handler)
            lost(handler, exc)

        # The server's own hooks, wrapped on this instance: aiohttp builds the server
        # inside AppRunner, so there is no class of ours to give it.
        setattr(server, "connection_made", connection_made)  # noqa: B010
        setattr(server, "connection_lost", connection_lost)  # noqa: B010
        server.request_handler = connections.handling(server.request_handler)
        self.connections = connections
        return server


class _AcceptFailures(logging.Filter):
    """Lets through one of asyncio's "socket.accept() out of system resource" records per
    interval. On running out of file descriptors asyncio logs one, with its traceback, per
    connection waiting in the backlog, again and again (some 1,800 a second were seen)."""

    def __init__(self, every: float = _CUT_LOG_EVERY_S) -> None:
        super().__init__()
        self.every = every
        self.dropped = 0
        self._passed_at: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        now = record.created
        if self._passed_at is not None and now - self._passed_at < self.every:
            self.dropped += 1
            return False
        if self.dropped:
            record.msg = f"{record.msg} ({self.dropped} more since the last one not logged)"
            self.dropped = 0
        self._passed_at = now
        return True


def _quiet_accept_failures() -> None:
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AcceptFailures) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AcceptFailures())


def runner(
    app: web.Application,
    header_timeout: float,
    *,
    max_connections: int | None = None,
    **options: Any,
) -> web.AppRunner:
    """The server for ``app``. Its keep-alive timeout is the header deadline: aiohttp closes
    a connection still waiting for a request's complete headers ``header_timeout`` seconds
    after it opened (or after its previous answer), however slowly the bytes trickle in;
    idle keep-alive connections close after it too.

    It holds at most ``max_connections`` connections (:func:`connection_limit`, which also
    keeps it within the open-file limit); one more closes the connection idle the longest,
    so connections opened and left idle run the process out of neither file descriptors
    nor room for other clients."""
    _quiet_accept_failures()
    limit = connection_limit(max_connections)
    return _Runner(app, limit, access_log=None, keepalive_timeout=header_timeout, **options)
