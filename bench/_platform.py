"""The platform for benchmarks: broker, fresh topics, a fake LLM and N instances per service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from local.fake_openai import remote_stats, subprocess_server
from local.localkafka import ensure_broker
from services.cli.environment import service_env
from streams.client import OrchestratorClient
from streams.kafka import KafkaSettings
from streams.topics import create_topics

__all__ = [
    "SERVICES",
    "BenchPlatform",
    "ServiceProcess",
    "broker_pid",
    "parse_instances",
    "process_cpu_s",
]

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("budget", "spawner", "loader", "router")
_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a live process (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    # After the command name: fields[11] is utime and fields[12] stime (man 5 proc).
    return (int(fields[11]) + int(fields[12])) / _TICKS


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
class ServiceProcess:
    name: str
    index: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)


@dataclass
class BenchPlatform:
    """Every service as its own process on a fresh topic prefix; use as ``async with``.

    ``env`` adds to (and overrides) the services' environment; ``python_prefix``
    runs code before each service's module (the bench's ``--uvloop`` uses it).
    """

    instances: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 1))
    env: Mapping[str, str] = field(default_factory=dict)
    python_prefix: str = ""
    data_dir: Path | None = None
    settings: KafkaSettings = field(init=False)
    base_url: str = field(init=False, default="")
    procs: list[ServiceProcess] = field(init=False, default_factory=list)
    _stack: contextlib.ExitStack = field(init=False, default_factory=contextlib.ExitStack)

    async def __aenter__(self) -> BenchPlatform:
        try:
            await self._start()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    async def _start(self) -> None:
        bootstrap = await asyncio.to_thread(ensure_broker)
        self.settings = KafkaSettings(bootstrap, f"bench{uuid.uuid4().hex[:8]}.")
        await create_topics(bootstrap, prefix=self.settings.prefix)
        if self.data_dir is None:
            tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="orch-bench-"))
            self.data_dir = Path(tmp)
        self.base_url = self._stack.enter_context(subprocess_server())
        for name in SERVICES:
            for _ in range(self.instances.get(name, 1)):
                self.start_service(name)

    def service_env(self, name: str) -> dict[str, str]:
        """What an instance of ``name`` sees: its share of the environment, as `up` gives it."""
        assert self.data_dir is not None
        return service_env(
            name,
            {
                **os.environ,
                "KAFKA_BOOTSTRAP_SERVERS": self.settings.bootstrap,
                "ORCH_TOPIC_PREFIX": self.settings.prefix,
                "ORCH_DATA_DIR": str(self.data_dir),
                "OPENAI_BASE_URL": self.base_url,
                "OPENAI_API_KEY": "bench-key",
                "ORCH_LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
                **self.env,
            },
        )

    def start_service(self, name: str) -> ServiceProcess:
        """One more instance of ``name`` in the service's consumer group."""
        assert self.data_dir is not None
        index = sum(1 for p in self.procs if p.name == name)
        log = self.data_dir / f"{name}-{index}.log"
        module = f"services.{name}"
        if self.python_prefix:
            code = f"{self.python_prefix}; import runpy; runpy.run_module({module!r}, "
            code += "run_name='__main__', alter_sys=True)"
            argv = [sys.executable, "-c", code]
        else:
            argv = [sys.executable, "-m", module]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.service_env(name), stdout=out, stderr=subprocess.STDOUT
            )
        started = ServiceProcess(name, index, proc, log)
        self.procs.append(started)
        return started

    def instances_of(self, name: str) -> list[ServiceProcess]:
        return [p for p in self.procs if p.name == name and p.alive]

    def stop_one(self, name: str, sig: int = signal.SIGTERM) -> ServiceProcess:
        """Signal the oldest live instance of ``name`` and wait for it to exit."""
        victim = self.instances_of(name)[0]
        victim.proc.send_signal(sig)
        victim.proc.wait(20)
        return victim

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive and p.proc.returncode not in (0, -signal.SIGTERM):
                tail = p.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{p.name}-{p.index} exited {p.proc.returncode}:\n{tail}")

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far per service (all instances summed), the broker and the fake LLM."""
        out = dict.fromkeys(SERVICES, 0.0)
        for p in self.procs:
            out[p.name] += p.cpu_s()
        pid = broker_pid(self.settings.bootstrap)
        out["broker"] = process_cpu_s(pid) if pid else 0.0
        out["fake_llm"] = remote_stats(self.base_url)["process_cpu_s"]
        return out

    async def warm_up(self, asks: list[tuple[str, str]], timeout: float = 120.0) -> None:
        """Ask each (message, goal) until one answer comes back; the first asks spawn agents."""
        deadline = time.monotonic() + timeout
        async with OrchestratorClient(self.settings, source="bench-warmup") as client:
            for message, goal in asks:
                while True:
                    self.check_alive()
                    try:
                        await client.ask(message, goal_id=goal, user_id="warmup", timeout=20)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise

    def close(self) -> None:
        for p in self.procs:
            if p.alive:
                p.proc.terminate()
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(5)
        self._stack.close()

    def logs(self) -> Iterator[tuple[str, str]]:
        for p in self.procs:
            yield f"{p.name}-{p.index}", p.log.read_text(errors="replace")
