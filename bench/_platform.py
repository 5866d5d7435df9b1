"""The platform for benchmarks: broker, fresh topics, a fake LLM and N instances per service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from local.fake_openai import remote_stats
from local.localkafka import ensure_broker
from local.platform import (
    FAKE_LLM,
    Instance,
    Launcher,
    StopOnSignals,
    fake_llm_spec,
    process_cpu_s,
)
from streams.kafka import KafkaSettings
from streams.topics import create_topics, delete_prefixed_topics

__all__ = [
    "SERVICES",
    "BenchPlatform",
    "broker_pid",
    "parse_instances",
    "process_cpu_s",
]

SERVICES = ("budget", "spawner", "loader", "router")


def broker_pid(bootstrap: str) -> int | None:
    """The local process listening on the first bootstrap address, if it is on this machine."""
    port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                # state 0A = LISTEN; the local address ends in the hex port
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        return int(proc.name)
    return None


def parse_instances(spec: str) -> dict[str, int]:
    """``loader=2,router=2`` -> {"loader": 2, "router": 2}; services not named run once."""
    out = dict.fromkeys(SERVICES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        if name not in SERVICES or not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad instance spec {part!r}: want NAME=N with NAME in {SERVICES}")
        out[name] = int(count)
    return out


@dataclass
class BenchPlatform:
    """Every service as its own process on a fresh topic prefix; use as ``async with``.

    The processes, the fake LLM among them, run through the platform launcher
    (:class:`local.platform.Launcher`). ``env`` adds to (and overrides) the services'
    environment; ``python_prefix`` runs code before each service's module (the
    bench's ``--uvloop`` uses it).

    A bench stopped with SIGTERM or SIGHUP stops the services on its way out, and one
    killed outright takes them with it (Linux): none is left polling the broker beside
    the next run.
    """

    instances: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 1))
    env: Mapping[str, str] = field(default_factory=dict)
    python_prefix: str = ""
    data_dir: Path | None = None
    settings: KafkaSettings = field(init=False)
    base_url: str = field(init=False, default="")
    _launcher: Launcher | None = field(init=False, default=None)
    _stack: contextlib.ExitStack = field(init=False, default_factory=contextlib.ExitStack)
    _signals: StopOnSignals = field(init=False, default_factory=StopOnSignals)

    async def __aenter__(self) -> BenchPlatform:
        self._signals.__enter__()
        try:
            await self._start()
        except BaseException as exc:
            self.close()
            self._signals.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await asyncio.to_thread(self.close)
            # Each run makes a full set of topics under its own prefix. Left on a broker
            # kept between runs they piled up: after some hundred runs it held 9,663
            # partitions and took over 90 s to start.
            with contextlib.suppress(Exception):
                await delete_prefixed_topics(self.settings.bootstrap, self.settings.prefix)
        finally:
            self._signals.__exit__(et, e, tb)

    async def _start(self) -> None:
        bootstrap = await asyncio.to_thread(ensure_broker)
        self.settings = KafkaSettings(bootstrap, f"bench{uuid.uuid4().hex[:8]}.")
        await create_topics(bootstrap, prefix=self.settings.prefix)
        if self.data_dir is None:
            tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="orch-bench-"))
            self.data_dir = Path(tmp)
        self._launcher = Launcher(
            self.data_dir,
            settings=self.settings,
            data_dir=self.data_dir,
            env={"ORCH_LOG_LEVEL": "WARNING", **self.env},
            python_prefix=self.python_prefix,
            # Started from this (the main) thread: a SIGKILLed bench takes them along.
            die_with_parent=True,
        )
        # Its own process keeps the fake LLM's CPU off the measured client's core and GIL.
        self.base_url = self.launcher.start(fake_llm_spec(port=0)).url or ""
        self.launcher.start_all(SERVICES, self.instances)

    @property
    def launcher(self) -> Launcher:
        assert self._launcher is not None, "the platform has not started"
        return self._launcher

    @property
    def procs(self) -> list[Instance]:
        """Every service instance started so far (the fake LLM is not one)."""
        return [i for i in self.launcher.instances if i.name != FAKE_LLM]

    def start_service(self, name: str) -> Instance:
        """One more instance of ``name`` in the service's consumer group."""
        return self.launcher.start(name)

    def instances_of(self, name: str) -> list[Instance]:
        return self.launcher.instances_of(name)

    def stop_one(self, name: str, sig: int = signal.SIGTERM) -> Instance:
        """Signal the oldest live instance of ``name`` and wait for it to exit."""
        return self.launcher.stop_one(name, sig, timeout=20)

    def check_alive(self) -> None:
        self.launcher.check_alive()

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far per service (all instances summed), the broker and the fake LLM."""
        out = dict.fromkeys(SERVICES, 0.0)
        for p in self.procs:
            out[p.name] = out.get(p.name, 0.0) + p.cpu_s()
        pid = broker_pid(self.settings.bootstrap)
        out["broker"] = process_cpu_s(pid) if pid else 0.0
        out["fake_llm"] = remote_stats(self.base_url)["process_cpu_s"]
        return out

    async def warm_up(self, asks: list[tuple[str, str]], timeout: float = 120.0) -> None:
        """Ask each (message, goal) until one answer comes back; the first asks spawn agents."""
        await self.launcher.warm_up(self.settings, asks, timeout=timeout, ask_timeout=20)

    def close(self) -> None:
        if self._launcher is not None:
            self._launcher.stop_all()
        self._stack.close()

    def logs(self) -> Iterator[tuple[str, str]]:
        for p in self.procs:
            yield p.label, p.text()
