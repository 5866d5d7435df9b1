"""A fake OpenAI-compatible HTTP server for tests, benchmarks and simulations."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Literal, get_args

from aiohttp import web

from streams.llm import CLIENT_REQUEST_ID_HEADER, META_FIELD, default_answer

_client_request_id: ContextVar[str | None] = ContextVar("client_request_id", default=None)


def client_request_id() -> str | None:
    """The ``X-Client-Request-Id`` of the request being answered (for a responder)."""
    return _client_request_id.get()


__all__ = [
    "FakeBehaviour",
    "FakeOpenAIServer",
    "Mode",
    "client_request_id",
    "Responder",
    "Usage",
    "main",
    "parse_model_latencies",
    "remote_control",
    "remote_stats",
    "subprocess_server",
]

log = logging.getLogger(__name__)

Mode = Literal["ok", "error400", "error429", "error500", "hang", "down"]
_MODES: tuple[str, ...] = get_args(Mode)
_MODE_STATUS = {"error400": 400, "error429": 429, "error500": 500}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


Responder = Callable[[dict[str, Any]], tuple[str, Usage | None, dict[str, str]]]
"""``(request_json) -> (text, usage or None to count words, extra)``; ``extra`` is sent
as the response's top-level ``x_orchestrator`` object."""


@dataclass
class FakeBehaviour:
    """How the server answers chat completions; change it in process or via ``POST /_control``.

    ``mode`` holds until changed; ``fail_next`` answers the next N requests with
    ``fail_status`` and then goes back to ``mode``. ``latency_ms`` delays every answer;
    ``model_latency_ms`` adds a delay per requested model (a slow model among fast ones).
    429 answers carry ``Retry-After`` (and OpenAI's ``retry-after-ms``) of ``retry_after_ms``.
    ``hang`` holds the request for ``hang_s`` (longer than any client timeout); ``down``
    resets the connection without answering.
    """

    mode: Mode = "ok"
    latency_ms: float = 0.0
    model_latency_ms: dict[str, float] = field(default_factory=dict)
    fail_next: int = 0
    fail_status: int = 500
    retry_after_ms: int = 1000
    hang_s: float = 300.0

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply changes after checking them all, so a bad request changes nothing."""
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            checked[name] = _check_field(name, value)
        for name, value in checked.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _model_asked(raw: bytes) -> str:
    """The ``model`` a chat request names ("" when it names none or is not JSON)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def parse_model_latencies(text: str) -> dict[str, float]:
    """``name=ms,name=ms`` (the command line's form of ``model_latency_ms``)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, ms = part.partition("=")
        try:
            value = float(ms)
        except ValueError:
            value = math.nan
        if not (eq and name.strip() and math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"expected name=milliseconds, got {part!r}")
        out[name.strip()] = value
    return out


def _check_field(name: str, value: Any) -> Any:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if name == "mode":
        if value not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {value!r}")
        return value
    if name in ("latency_ms", "hang_s"):
        if not number or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        return float(value)
    if name == "model_latency_ms":
        if not isinstance(value, dict) or not all(
            isinstance(k, str)
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v >= 0
            for k, v in value.items()
        ):
            raise ValueError(
                f"model_latency_ms must map model names to non-negative numbers, got {value!r}"
            )
        return {k: float(v) for k, v in value.items()}
    if name in ("fail_next", "retry_after_ms"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        return value
    if name == "fail_status":
        if not isinstance(value, int) or isinstance(value, bool) or not 400 <= value <= 599:
            raise ValueError(f"fail_status must be an HTTP error status 400-599, got {value!r}")
        return value
    raise ValueError(f"unknown setting {name!r}")


@dataclass
class _Stats:
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    # Recent handler times only: enough for percentiles, bounded for long runs.
    work_us: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def to_json(self) -> dict[str, Any]:
        times = sorted(self.work_us)

        def pct(q: float) -> float:
            return round(times[min(len(times) - 1, int(q * len(times)))], 1) if times else 0.0

        return {
            "requests": self.requests,
            "by_status": dict(sorted(self.by_status.items())),
            "server_us": {"count": len(times), "p50": pct(0.5), "p99": pct(0.99), "max": pct(1)},
            # CPU of the whole process: a load-independent cost per request when the server
            # runs in its own process (``subprocess_server``), unlike wall-clock handler times.
            "process_cpu_s": time.process_time(),
        }


class _BadRequest(Exception):
    pass


_ERROR_TYPES = {400: "invalid_request_error", 429: "rate_limit_exceeded"}


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.Response(
        status=status, body=json.dumps(body), content_type="application/json", headers=headers
    )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # The array form of content: keep the text parts.
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        return ""
    raise _BadRequest(f"message content must be a string or a list of parts, got {content!r}")


def _messages_of(request: Any) -> tuple[str, list[dict[str, str]]]:
    if not isinstance(request, dict):
        raise _BadRequest("the body must be a JSON object")
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' is required")
    if request.get("stream"):
        # Better a clear refusal than a JSON body a streaming client cannot parse.
        raise _BadRequest("this fake server does not stream; send stream=false")
    raw = request.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _BadRequest("'messages' must be a non-empty array")
    messages = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise _BadRequest(f"each message needs a 'role', got {item!r}")
        messages.append({"role": item["role"], "content": _text_of(item.get("content"))})
    return model, messages


def _words(text: str) -> int:
    return len(text.split())


class FakeOpenAIServer:
    """``POST /v1/chat/completions`` and ``GET /v1/models`` on loopback, plus control and stats.

    Use ``async with FakeOpenAIServer(port=0) as srv`` in async code, or
    ``srv = FakeOpenAIServer().start_in_thread()`` ... ``srv.stop()`` from sync code.
    Another process controls it through ``POST /_control`` and reads ``GET /_stats``
    (see :func:`remote_control`, :func:`remote_stats`).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        behaviour: FakeBehaviour | None = None,
        responder: Responder | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.behaviour = behaviour or FakeBehaviour()
        self.responder = responder
        self._stats = _Stats()
        # The server loop may run in another thread than the test that configures it.
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- addresses, control, stats ------------------------------------------------------

    @property
    def root_url(self) -> str:
        if self._runner is None:
            raise RuntimeError("FakeOpenAIServer is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What ``OPENAI_BASE_URL`` should be set to."""
        return f"{self.root_url}/v1"

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change the behaviour (same keys as ``POST /_control``); returns the new one."""
        with self._lock:
            if changes.pop("reset_stats", False):
                self._stats = _Stats()
            self.behaviour.update(changes)
            return self.behaviour.to_json()

    def stats(self) -> dict[str, Any]:
        """Requests received, answers by status, and handler time (excluding injected delays)."""
        with self._lock:
            return self._stats.to_json()

    @property
    def requests(self) -> int:
        """Chat-completion requests received, failed ones included."""
        return self._stats.requests

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen and return the base URL."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_control", self._get_control)
        app.router.add_post("/_control", self._post_control)
        app.router.add_get("/_stats", self._get_stats)
        self._stopping = asyncio.Event()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.base_url

    async def aclose(self) -> None:
        if self._runner is None:
            return
        assert self._stopping is not None
        self._stopping.set()  # wakes hanging and delayed requests so shutdown is quick
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> FakeOpenAIServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def start_in_thread(self, timeout_s: float = 10.0) -> FakeOpenAIServer:
        """Serve from a background thread with its own event loop; returns self."""
        if self._thread is not None:
            raise RuntimeError("FakeOpenAIServer already runs in a thread")
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.aclose())
                loop.close()

        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"FakeOpenAIServer did not start within {timeout_s:g} s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop a server started with :meth:`start_in_thread`."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = self._loop = None

    def __enter__(self) -> FakeOpenAIServer:
        return self if self._thread is not None else self.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- handlers -------------------------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        """Sleep, but end early when the server stops."""
        assert self._stopping is not None
        if seconds > 0 and not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), seconds)
            except TimeoutError:
                pass

    def _take_mode(self) -> tuple[Mode | int, FakeBehaviour]:
        with self._lock:
            self._stats.requests += 1
            b = self.behaviour
            if b.fail_next > 0:
                b.fail_next -= 1
                return b.fail_status, b
            return b.mode, b

    def _record(self, outcome: str, started: float) -> None:
        with self._lock:
            self._stats.by_status[outcome] += 1
            self._stats.work_us.append((time.perf_counter() - started) * 1e6)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        # Waiting for the body is the client's time; the clock starts once it is here.
        raw = await request.read()
        _client_request_id.set(request.headers.get(CLIENT_REQUEST_ID_HEADER))
        started = time.perf_counter()
        mode, behaviour = self._take_mode()
        latency_s = behaviour.latency_ms / 1000.0
        if mode == "down":
            # A reset connection is what a client sees from a crashed endpoint.
            if request.transport is not None:
                request.transport.abort()
            self._record("reset", started)
            return web.Response(status=503)
        if mode == "hang":
            self._record("hang", started)
            await self._pause(behaviour.hang_s)
            return _error(504, "fake server stopped hanging")
        response = self._answer(raw, mode, behaviour)
        self._record(str(response.status), started)
        if behaviour.model_latency_ms:
            latency_s += behaviour.model_latency_ms.get(_model_asked(raw), 0.0) / 1000.0
        await self._pause(latency_s)
        return response

    def _answer(self, raw: bytes, mode: Mode | int, behaviour: FakeBehaviour) -> web.Response:
        status = mode if isinstance(mode, int) else _MODE_STATUS.get(mode)
        if status is not None:
            return self._failure(status, behaviour)
        try:
            body = json.loads(raw)
            model, messages = _messages_of(body)
        except (ValueError, _BadRequest) as exc:
            return _error(400, str(exc))
        extra: dict[str, str] = {}
        if self.responder is None:
            text, usage = default_answer(messages, model), None
        else:
            try:
                text, usage, extra = self.responder(body)
            except Exception as exc:
                log.exception("fake OpenAI responder failed")
                return _error(500, f"responder failed: {exc!r}")
        if usage is None:
            usage = Usage(sum(_words(m["content"]) for m in messages), _words(text))
        payload: dict[str, Any] = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            },
        }
        if extra:
            payload[META_FIELD] = {str(k): str(v) for k, v in extra.items()}
        return web.Response(body=json.dumps(payload), content_type="application/json")

    @staticmethod
    def _failure(status: int, behaviour: FakeBehaviour) -> web.Response:
        headers = {}
        if status == 429:
            ms = behaviour.retry_after_ms
            # The standard header has whole seconds; openai prefers the precise ms one.
            headers = {"Retry-After": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}
        return _error(status, f"fake server configured to fail with {status}", headers)

    async def _models(self, request: web.Request) -> web.Response:
        if self.behaviour.mode == "down" and request.transport is not None:
            request.transport.abort()
        body = {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "fake"}]}
        return web.json_response(body)

    async def _get_control(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(self.behaviour.to_json())

    async def _post_control(self, request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            return web.json_response(self.configure(**changes))
        except ValueError as exc:
            return _error(400, str(exc))

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())


# ---------------------------------------------------------------------------------------
# Control from another process


def _root(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def _remote(method: str, base_url: str, path: str, body: Any = None) -> dict[str, Any]:
    import httpx  # only callers in other processes need it

    response = httpx.request(method, f"{_root(base_url)}{path}", json=body, timeout=5.0)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def remote_control(base_url: str, **changes: Any) -> dict[str, Any]:
    """Change a fake server's behaviour over HTTP (``base_url`` with or without ``/v1``)."""
    return _remote("POST", base_url, "/_control", changes)


def remote_stats(base_url: str) -> dict[str, Any]:
    """A fake server's ``/_stats`` over HTTP."""
    return _remote("GET", base_url, "/_stats")


@contextmanager
def subprocess_server(*args: str, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``python -m local.fake_openai --port 0 *args`` and yield its base URL.

    A separate process keeps the server's CPU off the measured client's core and GIL.
    """
    command = [sys.executable, "-m", "local.fake_openai", "--port", "0", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            out = proc.stdout
            assert out is not None
            lines: list[str] = []
            # readline blocks; a thread lets a timeout bound the start.
            reader = threading.Thread(target=lambda: lines.append(out.readline().strip()))
            reader.start()
            reader.join(start_timeout_s)
            if not lines or not lines[0].startswith("http"):
                raise RuntimeError(f"fake OpenAI server did not start: {command} printed {lines}")
            yield lines[0]
        finally:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---------------------------------------------------------------------------------------
# Command line


def _load_responder(spec: str) -> Responder:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--responder wants module:function, got {spec!r}")
    responder: Responder = getattr(importlib.import_module(module), name)
    return responder


async def _serve(server: FakeOpenAIServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(server.base_url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m local.fake_openai", description=__doc__.strip() if __doc__ else None
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8199, help="0 picks a free port")
    parser.add_argument("--mode", choices=_MODES, default="ok")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--model-latency-ms",
        type=parse_model_latencies,
        default={},
        help="extra delay per requested model, e.g. big=300,huge=900",
    )
    parser.add_argument("--fail-next", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--retry-after-ms", type=int, default=1000)
    parser.add_argument("--hang-s", type=float, default=300.0)
    parser.add_argument("--responder", help="module:function answering instead of the default")
    args = parser.parse_args(argv)
    behaviour = FakeBehaviour()
    try:
        # The flags are named after the fields, so every field has its flag.
        behaviour.update({name: getattr(args, name) for name in behaviour.to_json()})
    except ValueError as exc:
        parser.error(str(exc))
    responder = _load_responder(args.responder) if args.responder else None
    server = FakeOpenAIServer(
        host=args.host, port=args.port, behaviour=behaviour, responder=responder
    )
    asyncio.run(_serve(server))


if __name__ == "__main__":
    main()
