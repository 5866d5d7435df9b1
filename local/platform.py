"""The one launcher that starts the platform's services as processes, for `orchestrator up`,
the benchmarks and the end-to-end tests alike.

A service runs as ``python -m services.<name>`` (any number of instances; they share the
service's consumer group), in its own session, with its output in a log file and only
its share of the environment (:mod:`local.environment`). The launcher waits until what
it started is ready, signals, restarts or stops one instance, and stops them all within
a bound. It imports no service: it only runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from local.environment import service_env
from streams.client import Answer, OrchestratorClient
from streams.config import ROOT, LauncherSettings
from streams.kafka import KafkaSettings

__all__ = [
    "FAKE_LLM",
    "SERVICE_ORDER",
    "ChildSpec",
    "Instance",
    "LaunchError",
    "Launcher",
    "StopOnSignals",
    "available_services",
    "describe_exit",
    "fake_llm_spec",
    "free_port",
    "known_services",
    "popen",
    "process_cpu_s",
    "service_module",
    "service_spec",
    "services_package",
]

# Start order: the sink first so it sees everything, the router (the request intake) after
# the services it feeds; improvement learns from what the others produce; the HTTP gateway
# last, so apps reach it only once the platform behind it runs.
SERVICE_ORDER = ("analytics", "budget", "spawner", "loader", "router", "improvement", "gateway")
FAKE_LLM = "fake-llm"
_FAKE_LLM_MODULE = "local.fake_openai"
_NOT_SERVICES = frozenset({"cli"})
_MARKER = "launcher:"
_URL_LINE = re.compile(r"(https?://\S+)")
_TICKS = os.sysconf("SC_CLK_TCK")

Report = Callable[[str], None]


class LaunchError(RuntimeError):
    """A process did not start, did not get ready, or died while it was awaited."""


# -- what runs -------------------------------------------------------------------------------


def services_package() -> str:
    """The package whose sub-packages are services; a setting so tests can bring their own."""
    package: str = LauncherSettings.read("services_package")
    return package


def service_module(name: str) -> str:
    return f"{services_package()}.{name}"


def _package_dirs() -> list[Path]:
    # Found, not imported: the launcher runs services and never loads their code.
    try:
        spec = importlib.util.find_spec(services_package())
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def known_services() -> list[str]:
    """Every service name: the planned ones in start order, then any other package."""
    found = {
        p.name
        for folder in _package_dirs()
        if folder.is_dir()
        for p in folder.iterdir()
        if (p / "__init__.py").exists()
    }
    extra = sorted(found - set(SERVICE_ORDER) - _NOT_SERVICES)
    return [*SERVICE_ORDER, *extra]


def available_services() -> list[str]:
    """The services that can run now (their package has a ``__main__``), in start order."""
    dirs = _package_dirs()
    return [n for n in known_services() if any((d / n / "__main__.py").exists() for d in dirs)]


@dataclass(frozen=True)
class ChildSpec:
    """One kind of child process: ``python -m module args``.

    Its environment is what :func:`local.environment.service_env` lets a process
    called ``name`` see of the launcher's environment plus ``env``.
    """

    name: str
    module: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # The child prints its base URL once it listens (the fake LLM does).
    announces_url: bool = False

    def argv(self, python_prefix: str = "") -> list[str]:
        if not python_prefix:
            return [sys.executable, "-m", self.module, *self.args]
        # Code to run first (a benchmark's uvloop), then the module as `-m` would.
        code = f"{python_prefix}; import runpy, sys; sys.argv[1:] = {list(self.args)!r}; "
        code += f"runpy.run_module({self.module!r}, run_name='__main__', alter_sys=True)"
        return [sys.executable, "-c", code]


def service_spec(name: str) -> ChildSpec:
    return ChildSpec(name, service_module(name))


def fake_llm_spec(port: int | None = None) -> ChildSpec:
    """The fake OpenAI-compatible server; a fixed port keeps its URL across a restart
    (``ORCH_FAKE_LLM_PORT``, else a free one; 0 lets the server pick)."""
    if port is None:
        port = LauncherSettings.read("fake_llm_port") or free_port()
    return ChildSpec(FAKE_LLM, _FAKE_LLM_MODULE, ("--port", str(port)), announces_url=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a live process (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    # After the command name: fields[11] is utime and fields[12] stime (man 5 proc).
    return (int(fields[11]) + int(fields[12])) / _TICKS


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# -- running instances -----------------------------------------------------------------------


@dataclass(eq=False)
class Instance:
    """One running (or exited) process of a spec: the ``index``-th instance of its name."""

    spec: ChildSpec
    index: int
    log: Path
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    url: str | None = None
    # Set when the launcher itself signalled it: an exit then is no crash.
    stopping: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.name if self.index == 0 else f"{self.name}-{self.index}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def crashed(self) -> bool:
        """It exited without the launcher asking it to, and not as a clean stop would."""
        return not self.stopping and self.returncode not in (None, 0, -signal.SIGTERM)

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid) if self.proc is not None else 0.0

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, chars: int = 3000) -> str:
        return self.text()[-chars:]


def _die_with_parent() -> None:
    # Linux: a child gets SIGTERM when the thread that started it ends, so a SIGKILLed
    # supervisor leaves no orphans. Runs between fork and exec.
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def popen(
    argv: list[str],
    out: IO[bytes],
    *,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """``argv`` from the project root, in a session of its own, writing to ``out``."""
    # Own session: a Ctrl-C in the terminal reaches the launching process only, which
    # then stops the children in order instead of all of them at once.
    linux = sys.platform.startswith("linux")
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if die_with_parent and linux else None,
    )


class StopOnSignals:
    """SIGTERM or SIGHUP cancels the task that entered this block, as Ctrl-C does under
    ``asyncio.run``: its ``finally`` and ``async with`` exits then stop what it started.
    On the way out the cancellation becomes ``SystemExit(128 + signal)``. Enter and leave
    it on the event loop's thread (the main thread); elsewhere it does nothing.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._installed: list[int] = []

    def _on_signal(self, task: asyncio.Task[object], signum: int) -> None:
        if self.received is None:
            self.received = signum
            task.cancel()

    def __enter__(self) -> StopOnSignals:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            return self
        for signum in self.signals:
            try:
                loop.add_signal_handler(signum, self._on_signal, task, signum)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or no such signal here
            self._installed.append(signum)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._installed:
            loop.remove_signal_handler(signum)
        self._installed.clear()
        if self.received is not None and et is not None and issubclass(et, asyncio.CancelledError):
            raise SystemExit(128 + self.received) from None


class Launcher:
    """Starts, watches, signals and stops service processes; see the module docstring.

    ``environ`` is the environment the services' shares are cut from (default: this
    process's), ``env`` adds to it; ``settings`` and ``data_dir`` set the broker, the
    topic prefix and the data dir for every child. Logs go to ``log_dir``, one file per
    instance (``name.log``, then ``name-1.log``, ...), appended to across restarts.
    ``python_prefix`` is code each service runs before its module (a benchmark's uvloop).
    ``die_with_parent`` (Linux) stops the children when the thread that started them
    ends: only for a launcher that starts them from the main thread.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        environ: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        settings: KafkaSettings | None = None,
        data_dir: Path | None = None,
        python_prefix: str = "",
        die_with_parent: bool = False,
        stop_timeout: float = 15.0,
        ready_timeout: float = 30.0,
        report: Report | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.environ = dict(os.environ if environ is None else environ)
        if settings is not None:
            self.environ.update(settings.env())
            self.environ["ORCH_TOPIC_PREFIX"] = settings.prefix
        if data_dir is not None:
            self.environ["ORCH_DATA_DIR"] = str(data_dir)
        self.environ.update(env or {})
        # Service logs are files: unbuffered output shows up there as it happens.
        self.environ["PYTHONUNBUFFERED"] = "1"
        self.python_prefix = python_prefix
        self.die_with_parent = die_with_parent
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        self.report = report or (lambda message: None)
        self.instances: list[Instance] = []
        self.llm_url: str | None = None

    # -- starting ----------------------------------------------------------------------------

    def start(
        self, spec: ChildSpec | str, *, env: Mapping[str, str] | None = None, note: str = "started"
    ) -> Instance:
        """One more instance of ``spec`` (a service name or a spec), in the service's group.

        A child that announces a URL is awaited until it has; when it is the fake LLM,
        the children started after it call it (with a placeholder key, never a real one).
        """
        spec = service_spec(spec) if isinstance(spec, str) else spec
        index = sum(1 for i in self.instances if i.name == spec.name)
        log = self.log_dir / (f"{spec.name}.log" if index == 0 else f"{spec.name}-{index}.log")
        # Each child sees only its share of the environment: a secret reaches only the
        # services that use it (local/environment.py has the table).
        child_env = service_env(spec.name, {**self.environ, **spec.env, **(env or {})})
        # The prefix is for services (a benchmark's uvloop), not for the tooling beside them.
        prefix = self.python_prefix if spec.module == service_module(spec.name) else ""
        instance = Instance(spec, index, log, spec.argv(prefix), child_env)
        self.instances.append(instance)
        self._spawn(instance, note)
        if spec.announces_url:
            instance.url = self.wait_for_url(instance)
            if spec.name == FAKE_LLM:
                self.llm_url = instance.url
                self.environ["OPENAI_BASE_URL"] = instance.url
                self.environ["OPENAI_API_KEY"] = "fake-llm"
        return instance

    def start_all(
        self, specs: Iterable[ChildSpec | str], instances: Mapping[str, int] | None = None
    ) -> list[Instance]:
        """Each spec in order, ``instances[name]`` times (default once)."""
        started = []
        for spec in specs:
            name = spec if isinstance(spec, str) else spec.name
            for _ in range((instances or {}).get(name, 1)):
                started.append(self.start(spec))
        return started

    def _spawn(self, instance: Instance, note: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(instance.log, "ab") as out:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            out.write(f"--- {stamp} {_MARKER} {instance.label} {note}\n".encode())
            out.flush()
            instance.proc = popen(
                instance.argv, out, env=instance.env, die_with_parent=self.die_with_parent
            )
        instance.started_at = time.monotonic()
        instance.stopping = False

    def restart(self, instance: Instance) -> Instance:
        """The same instance again (same log, same environment); stopped first if it runs."""
        if instance.alive:
            self.stop(instance)
        instance.restarts += 1
        self._spawn(instance, f"restart #{instance.restarts}")
        return instance

    # -- readiness ---------------------------------------------------------------------------

    def wait_for_url(self, instance: Instance, timeout: float | None = None) -> str:
        """The URL ``instance`` printed since its last start."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            url = _announced_url(instance.log)
            if url is not None:
                return url
            if not instance.alive:
                break
            time.sleep(0.1)
        raise LaunchError(
            f"{instance.label} did not announce its URL within {self.ready_timeout:g}s; "
            f"see {instance.log}"
        )

    def check_alive(self) -> None:
        """Raise, with its log's tail, if an instance exited that nobody stopped."""
        for instance in self.instances:
            if instance.crashed:
                raise LaunchError(
                    f"{instance.label} exited ({describe_exit(instance.returncode or 0)}):\n"
                    f"{instance.tail()}"
                )

    async def wait_ready(
        self, probe: Callable[[], Awaitable[bool]], *, timeout: float = 120.0
    ) -> None:
        """Until ``probe`` says the platform is ready; an instance that dies meanwhile, or a
        probe that raises past the deadline, ends the wait with the error."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if await probe():
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise LaunchError(f"the platform was not ready within {timeout:g}s")
            await asyncio.sleep(0.1)

    async def warm_up(
        self,
        settings: KafkaSettings,
        asks: Sequence[tuple[str, str]] = (("warm up", "warmup"),),
        *,
        context: Mapping[str, str] | None = None,
        timeout: float = 120.0,
        ask_timeout: float = 15.0,
    ) -> list[Answer]:
        """Ask each (message, goal) until it is answered: every service on the request path
        has then joined its group (the first asks also spawn agents). Returns the answers."""
        answers: list[Answer] = []
        async with OrchestratorClient(settings, source="launcher-warmup") as client:
            for message, goal in asks:

                async def answered(message: str = message, goal: str = goal) -> bool:
                    answers.append(
                        await client.ask(
                            message,
                            goal_id=goal,
                            user_id="warmup",
                            context=dict(context) if context else None,
                            timeout=ask_timeout,
                        )
                    )
                    return True

                await self.wait_ready(answered, timeout=timeout)
        return answers

    # -- signals and stops -------------------------------------------------------------------

    def instances_of(self, name: str) -> list[Instance]:
        """The live instances of ``name``, oldest first."""
        return [i for i in self.instances if i.name == name and i.alive]

    def alive(self, name: str) -> bool:
        return bool(self.instances_of(name))

    def send(self, instance: Instance, sig: int) -> None:
        """Send ``sig``; a stopping signal marks the exit that follows as asked for."""
        if sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            instance.stopping = True
        if instance.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                instance.proc.send_signal(sig)

    def kill(self, name: str) -> None:
        """SIGKILL every live instance of ``name`` and reap them."""
        for instance in self.instances_of(name):
            self.send(instance, signal.SIGKILL)
            assert instance.proc is not None
            instance.proc.wait(10)

    def stop(self, instance: Instance, timeout: float | None = None) -> int:
        """SIGTERM, SIGKILL after ``timeout`` (default ``stop_timeout``); the exit code."""
        assert instance.proc is not None
        self.send(instance, signal.SIGTERM)
        try:
            return instance.proc.wait(self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            instance.proc.kill()
            return instance.proc.wait(5)

    def stop_one(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> Instance:
        """Signal the oldest live instance of ``name`` and wait up to ``timeout`` for its exit."""
        victim = self.instances_of(name)[0]
        self.send(victim, sig)
        assert victim.proc is not None
        victim.proc.wait(timeout)
        return victim

    def stop_all(self, *, hurry: Callable[[], bool] = lambda: False) -> None:
        """SIGTERM every instance (the last started first), wait at most ``stop_timeout``
        in all, then SIGKILL what is left; ``hurry()`` true cuts the wait short."""
        running = [i for i in reversed(self.instances) if i.alive]
        for instance in running:
            self.send(instance, signal.SIGCONT)  # a paused instance would ignore SIGTERM
            self.send(instance, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for instance in running:
            proc = instance.proc
            assert proc is not None
            while proc.poll() is None and time.monotonic() < deadline and not hurry():
                time.sleep(0.05)
            if proc.poll() is None:
                self.report(
                    f"{instance.label} (pid {proc.pid}) still runs {self.stop_timeout:g}s after"
                    " SIGTERM; killing it"
                )
                proc.kill()
                proc.wait()
            self.report(f"stopped {instance.label} ({describe_exit(proc.returncode)})")

    # -- logs --------------------------------------------------------------------------------

    def logs(self, name: str) -> str:
        """Every instance's log of ``name``, oldest instance first."""
        return "\n".join(i.text() for i in self.instances if i.name == name)


def _announced_url(log: Path) -> str | None:
    # Only the lines after the last start marker: an older run's URL is not this one's.
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    tail = text.rsplit(_MARKER, 1)[-1].split("\n", 1)[-1]
    match = _URL_LINE.search(tail)
    return match.group(1) if match else None
