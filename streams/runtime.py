"""How a service process runs: settings from the environment, signals, logging, one stop event.

Each service is a package ``services/<name>/`` whose ``__main__`` calls
:func:`service_main` with its ``main(ctx, stop)`` coroutine. Instances of a
service share the consumer group :meth:`ServiceContext.group`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.clock import Clock, clock_from_env
from streams.config import DataDirUnsafe, ProcessSettings, data_root, private_files
from streams.kafka import EventProducer, KafkaSettings
from streams.procs import process_start, still_running

__all__ = [
    "ServiceContext",
    "ServiceMain",
    "announce_url",
    "announced_urls",
    "group_id",
    "run_service",
    "service_main",
]

log = logging.getLogger(__name__)


def group_id(settings: KafkaSettings, service: str) -> str:
    """The consumer group shared by all instances of a service."""
    return f"{settings.prefix}orchestrator.{service}"


def _url_dir(service: str) -> Path:
    return data_root() / "run" / f"{service}-urls"


def announce_url(service: str, url: str, port: int) -> Path:
    """Record that an instance of ``service`` serves ``url`` (one file per port); returns the
    file, which the instance removes when it stops. ``orchestrator status`` lists them."""
    path = _url_dir(service) / f"{port}.url"
    path.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    path.write_text(f"{url}\n{pid}\n{process_start(pid)}\n")
    return path


def announced_urls(service: str) -> list[str]:
    """The URLs instances of ``service`` on this data dir announced, less those of
    instances that are gone (killed before they removed their file: whoever holds the port
    now is not the platform's); answering is still the caller's to check."""
    folder = _url_dir(service)
    if not folder.is_dir():
        return []
    urls: set[str] = set()
    for path in folder.glob("*.url"):
        url, pid, started, *_ = [*path.read_text().split("\n"), "", "", ""]
        if pid.strip().isdigit() and not still_running(int(pid), started.strip()):
            path.unlink(missing_ok=True)
            continue
        if url.strip():
            urls.add(url.strip())
    return sorted(urls)


@dataclass
class ServiceContext:
    """What a service gets: its name, where Kafka is, a clock and a started producer."""

    name: str
    settings: KafkaSettings
    clock: Clock
    producer: EventProducer
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @property
    def group(self) -> str:
        return group_id(self.settings, self.name)


ServiceMain = Callable[[ServiceContext, asyncio.Event], Coroutine[Any, Any, None]]


async def _start_when_the_broker_answers(
    settings: KafkaSettings, name: str, stop: asyncio.Event
) -> EventProducer:
    """A started producer, after waiting for the broker as long as it takes (a broker
    outage or a restart order must not make a service exit at start)."""
    from aiokafka.errors import KafkaError

    delay = 0.5
    while True:
        producer = EventProducer(settings, client_id=f"orchestrator.{name}")
        try:
            await producer.start()
            return producer
        except (KafkaError, OSError) as exc:
            if stop.is_set():
                raise
            log.warning(
                "%s: Kafka at %s does not answer (%s); trying again in %.1f s",
                name,
                settings.bootstrap,
                exc,
                delay,
            )
            await producer.stop()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


# How long ``main`` has to end on its own once ``stop`` is set, before it is cancelled.
MAIN_STOP_S = 10.0


async def until_stopped(stop: asyncio.Event, work: Awaitable[None]) -> None:
    """``work`` until it ends (its error raised) or ``stop`` is set; then it is cancelled
    and waited for: a consumer's clean stop (``EventConsumer.run_concurrently`` finishes the
    handlers running and commits them) is its cancellation. A service's ``main`` ends this
    way on ``stop`` by itself, as :func:`run_service` expects of it."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if not task.cancelled():
        task.result()


async def run_service(
    name: str,
    main: ServiceMain,
    *,
    settings: KafkaSettings | None = None,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run ``main`` until it returns or ``stop`` is set; the producer is shared and closed after."""
    settings = settings or KafkaSettings.from_env()
    stop = stop or asyncio.Event()
    producer = await _start_when_the_broker_answers(settings, name, stop)
    ctx = ServiceContext(name, settings, clock or clock_from_env(), producer)
    task = asyncio.create_task(main(ctx, stop), name=f"{name}-main")
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            # ``main`` stops itself on ``stop`` (Faust's app.stop commits offsets and flushes
            # the sends it buffered; the sink closes its store): cancelling it here, as soon
            # as ``stop`` was set, cut that stop off at its first await. It is cancelled
            # only if it has not ended within MAIN_STOP_S.
            done, _ = await asyncio.wait({task}, timeout=MAIN_STOP_S)
            if task not in done:
                task.cancel()
                await asyncio.wait({task}, timeout=10)  # a task may ignore its cancellation
        if task.done() and not task.cancelled():
            task.result()  # a crashed service (or stop) exits non-zero, with its error
    finally:
        stopper.cancel()
        await producer.stop()


def configure_logging() -> None:
    level: str = ProcessSettings.read("log_level")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "kafka", "httpx", "openai", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


STOP_GRACE_S: float = ProcessSettings.read("stop_grace_s")


def _exit_if_stuck(name: str, grace: float) -> None:
    """A stop that has not ended after ``grace`` seconds ends the process anyway.

    A Faust app stopping under cancellation can wait forever on its own tasks or
    threads; what was not committed is replayed by the next owner (at least once).
    """

    def _expire() -> None:
        sys.stderr.write(f"{name}: clean stop took over {grace:g} s; exiting\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(grace, _expire)
    timer.daemon = True
    timer.start()


def service_main(name: str, main: ServiceMain) -> None:
    """Process entry point: SIGTERM and SIGINT stop the service cleanly."""
    configure_logging()
    try:
        private_files()
    except DataDirUnsafe as exc:
        log.error("%s does not start: %s", name, exc)
        sys.exit(1)

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def _on_signal() -> None:
            if not stop.is_set():
                _exit_if_stuck(name, STOP_GRACE_S)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal)
        log.info("%s starting (pid %s)", name, os.getpid())
        await run_service(name, main, stop=stop)
        log.info("%s stopped", name)

    code = 0
    # Not asyncio.run: on leaving, it cancels every task still pending and waits for them,
    # and a task Faust leaves behind can ignore its cancellation, so a clean stop (logged
    # "stopped", everything committed) hung there until the supervisor's SIGKILL (seen on
    # about one Ctrl-C of three under `orchestrator up`). The tasks _run left are
    # abandoned; work handed to threads (a ClickHouse insert) is still waited for, within
    # the stop's grace.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_run())
        loop.run_until_complete(loop.shutdown_default_executor())
    except Exception:
        log.exception("%s crashed", name)
        code = 1
    # Faust (mode) leaves a non-daemon thread behind even after a clean stop; ours
    # are all closed by now, so leave without waiting for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
