"""The process supervisor behind `orchestrator up` and `down`: children, restarts, pid files."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

from services.cli.environment import service_env
from streams.config import ROOT, data_root, env_int

__all__ = [
    "FAKE_LLM",
    "SERVICE_ORDER",
    "ChildSpec",
    "Supervisor",
    "SupervisorError",
    "available_services",
    "fake_llm_spec",
    "known_services",
    "read_state",
    "restart_delay",
    "service_module",
    "service_spec",
    "spawn_detached",
    "stop_recorded",
    "supervisor_pid",
]

# Start order: the sink first so it sees everything, the router (the request intake) after
# the services it feeds; improvement learns from what the others produce; the HTTP gateway
# last, so apps reach it only once the platform behind it runs.
SERVICE_ORDER = ("analytics", "budget", "spawner", "loader", "router", "improvement", "gateway")
FAKE_LLM = "fake-llm"
_FAKE_LLM_MODULE = "local.fake_openai"
_NOT_SERVICES = frozenset({"cli"})
_SUPERVISOR = "supervisor"
_URL_LINE = re.compile(r"(https?://\S+)")

Report = Callable[[str], None]


class SupervisorError(RuntimeError):
    """The supervisor could not start or stop what it was asked to."""


def run_dir() -> Path:
    return data_root() / "run"


def log_dir() -> Path:
    return data_root() / "logs"


def _state_path() -> Path:
    return run_dir() / "supervisor.json"


def services_package() -> str:
    """The package whose sub-packages are services; a setting so tests can bring their own."""
    return os.environ.get("ORCH_SERVICES_PACKAGE", "services")


def service_module(name: str) -> str:
    return f"{services_package()}.{name}"


def _has_main(module: str) -> bool:
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ImportError:
        return False


def _extra_services() -> list[str]:
    # A service package nobody listed yet still runs, after the known ones.
    try:
        package = importlib.import_module(services_package())
    except ImportError:
        return []
    found = (m.name for m in pkgutil.iter_modules(getattr(package, "__path__", [])) if m.ispkg)
    return sorted(n for n in found if n not in SERVICE_ORDER and n not in _NOT_SERVICES)


def known_services() -> list[str]:
    """Every service name: the planned ones in start order, then any other package."""
    return [*SERVICE_ORDER, *_extra_services()]


def available_services() -> list[str]:
    """The services that can run now (their package has a ``__main__``), in start order."""
    return [n for n in known_services() if _has_main(service_module(n))]


def restart_delay(failures: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before restart number ``failures`` (1, 2, ...) of a crash loop."""
    return min(cap, base * 2.0 ** max(0, failures - 1))


@dataclass(frozen=True)
class ChildSpec:
    """One child process: ``python -m module args``.

    Its environment is what :func:`services.cli.environment.service_env` lets a
    process called ``name`` see, plus ``env``.
    """

    name: str
    module: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # The fake LLM announces its base URL on stdout once it listens.
    announces_url: bool = False

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]


def service_spec(name: str) -> ChildSpec:
    return ChildSpec(name, service_module(name))


def fake_llm_spec(port: int | None = None) -> ChildSpec:
    """The fake OpenAI-compatible server on a fixed port, so a restart keeps its URL."""
    if importlib.util.find_spec(_FAKE_LLM_MODULE) is None:
        raise SupervisorError(f"--fake-llm needs {_FAKE_LLM_MODULE}, which is not installed yet")
    if port is None:
        port = env_int("ORCH_FAKE_LLM_PORT", 0, minimum=0, maximum=65535) or _free_port()
    return ChildSpec(FAKE_LLM, _FAKE_LLM_MODULE, ("--port", str(port)), announces_url=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return ""
        done = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True)
        return done.stdout.decode(errors="replace").strip()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _write_pid_file(path: Path, pid: int, cmdline: str) -> None:
    # The command line is kept beside the pid so that `down` never signals a process
    # that merely inherited a recycled pid.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n{cmdline}\n")


def _read_pid_file(path: Path) -> tuple[int, str] | None:
    try:
        pid_line, _, rest = path.read_text().partition("\n")
        return int(pid_line.strip()), rest.strip()
    except (FileNotFoundError, ValueError):
        return None


def _ours(pid: int, cmdline: str) -> bool:
    return bool(cmdline) and _cmdline(pid) == cmdline


def supervisor_pid() -> int | None:
    """The pid of the running supervisor of this data dir, if any."""
    found = _read_pid_file(run_dir() / f"{_SUPERVISOR}.pid")
    return found[0] if found is not None and _ours(*found) else None


def read_state() -> dict[str, Any] | None:
    """What the running supervisor last wrote about its children, or None."""
    if supervisor_pid() is None:
        return None
    try:
        state: dict[str, Any] = json.loads(_state_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state


def _signal_and_wait(pid: int, cmdline: str, timeout: float) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; True once the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        # Not our child (its parent reaps it): gone is when the command line no longer matches.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _ours(pid, cmdline):
                return True
            time.sleep(0.1)
    return not _ours(pid, cmdline)


def stop_recorded(timeout: float = 20.0, report: Report = print) -> list[str]:
    """Stop the supervisor, then any child a pid file still names; returns what was stopped."""
    stopped: list[str] = []
    folder = run_dir()
    sup_file = folder / f"{_SUPERVISOR}.pid"
    # The supervisor first: it stops its own children in order and would restart any
    # child killed behind its back.
    files = [sup_file, *sorted(p for p in folder.glob("*.pid") if p != sup_file)]
    for path in files:
        found = _read_pid_file(path)
        if found is None:
            continue
        pid, cmdline = found
        name = path.stem
        if _ours(pid, cmdline):
            if _signal_and_wait(pid, cmdline, timeout):
                stopped.append(name)
                report(f"stopped {name} (pid {pid})")
            else:
                report(f"could not stop {name} (pid {pid})")
                continue
        path.unlink(missing_ok=True)
    _state_path().unlink(missing_ok=True)
    return stopped


def _die_with_parent() -> None:
    # Linux: a child gets SIGTERM if the supervisor itself is killed, so a SIGKILLed
    # supervisor leaves no orphans. Runs between fork and exec.
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _popen(
    argv: list[str],
    out: IO[bytes],
    *,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    # Own session: a Ctrl-C in the terminal reaches the supervisor only, which then
    # stops the children in order instead of all of them at once.
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


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0
    restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def log(self) -> Path:
        return log_dir() / f"{self.spec.name}.log"

    @property
    def pid_file(self) -> Path:
        return run_dir() / f"{self.spec.name}.pid"


class Supervisor:
    """Runs children in order, restarts the ones that die, stops them all on a signal.

    ``stable_after`` is how long a child must have run for its crash-loop count to
    start over; ``stop_timeout`` how long a child gets after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        specs: Iterable[ChildSpec],
        *,
        env: Mapping[str, str] | None = None,
        report: Report = print,
        stop_timeout: float = 15.0,
        stable_after: float = 30.0,
        ready_timeout: float = 30.0,
        poll_interval: float = 0.2,
    ) -> None:
        self.children = [_Child(s) for s in specs]
        self.env = dict(os.environ if env is None else env)
        # Service logs are files: unbuffered output shows up there as it happens.
        self.env["PYTHONUNBUFFERED"] = "1"
        self.report = report
        self.stop_timeout = stop_timeout
        self.stable_after = stable_after
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.llm_url: str | None = None
        self._stopping = False
        self._signals = 0

    # -- lifecycle -----------------------------------------------------------------

    def claim(self) -> None:
        """Record this process as the supervisor of the data dir; refuse a second one."""
        running = supervisor_pid()
        if running is not None and running != os.getpid():
            raise SupervisorError(
                f"a supervisor already runs for {data_root()} (pid {running}); "
                "run `orchestrator down` first"
            )
        _write_pid_file(run_dir() / f"{_SUPERVISOR}.pid", os.getpid(), _cmdline(os.getpid()))

    def start_all(self) -> None:
        log_dir().mkdir(parents=True, exist_ok=True)
        for child in self.children:
            self._start(child, note="started")
            if child.spec.announces_url:
                self._await_url(child)
        self.write_state()

    def run(self, on_started: Callable[[dict[str, Any]], None] | None = None) -> int:
        """Claim, start every child, supervise until SIGINT or SIGTERM; 0 after a clean stop."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self.claim()
            try:
                self.start_all()
                if on_started is not None:
                    on_started(self.state())
                while not self._stopping:
                    self.poll()
                    time.sleep(self.poll_interval)
            finally:
                self.stop_all()
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release()

    def request_stop(self) -> None:
        self._stopping = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self._stopping = True

    # -- children ------------------------------------------------------------------

    def _start(self, child: _Child, *, note: str) -> None:
        # Each child sees only its share of the environment: a secret reaches only
        # the services that use it (services/cli/environment.py has the table).
        env = {**service_env(child.spec.name, self.env), **child.spec.env}
        log = child.log
        with open(log, "ab") as out:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            out.write(f"--- {stamp} supervisor: {child.spec.name} {note}\n".encode())
            out.flush()
            child.proc = _popen(child.spec.argv, out, env=env, die_with_parent=True)
        child.started_at = time.monotonic()
        child.restart_at = None
        _write_pid_file(child.pid_file, child.proc.pid, " ".join(child.spec.argv))

    def _await_url(self, child: _Child) -> None:
        assert child.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            url = _announced_url(child.log)
            if url is not None:
                self.llm_url = url
                # The children that follow and call the LLM get the fake endpoint; its key
                # is a placeholder so a real key is never sent to it.
                self.env["OPENAI_BASE_URL"] = url
                self.env["OPENAI_API_KEY"] = "fake-llm"
                return
            if child.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise SupervisorError(
            f"{child.spec.name} did not announce its URL within {self.ready_timeout:g}s; "
            f"see {child.log}"
        )

    def poll(self) -> None:
        """Notice children that died, and restart them when their backoff has passed."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._start(child, note=f"restart #{child.restarts}")
                    self.report(f"restarted {child.spec.name} (pid {child.pid})")
                    self.write_state()
                continue
            code = child.proc.poll()
            if code is None:
                continue
            ran = now - child.started_at
            child.failures = 1 if ran >= self.stable_after else child.failures + 1
            delay = restart_delay(child.failures)
            child.restart_at = now + delay
            self.report(
                f"{child.spec.name} (pid {child.pid}) died: {_describe_exit(code)} after "
                f"{ran:.1f}s; restarting in {delay:g}s"
            )

    def stop_all(self) -> None:
        """SIGTERM every child (the last started first), wait, then SIGKILL what is left."""
        running = [c for c in reversed(self.children) if c.proc and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for child in running:
            assert child.proc is not None
            # A second Ctrl-C means "now": no more waiting for a clean stop.
            while child.proc.poll() is None and time.monotonic() < deadline and self._signals < 2:
                time.sleep(0.05)
            if child.proc.poll() is None:
                self.report(
                    f"{child.spec.name} (pid {child.pid}) still runs {self.stop_timeout:g}s after"
                    " SIGTERM; killing it"
                )
                child.proc.kill()
                child.proc.wait()
            self.report(f"stopped {child.spec.name} ({_describe_exit(child.proc.returncode)})")
        for child in self.children:
            child.pid_file.unlink(missing_ok=True)

    # -- state ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "data_dir": str(data_root()),
            "llm_url": self.llm_url,
            "children": [
                {
                    "name": c.spec.name,
                    "module": c.spec.module,
                    "pid": c.pid,
                    "restarts": c.restarts,
                    "log": str(c.log),
                }
                for c in self.children
            ],
        }

    def write_state(self) -> None:
        # Written whole then renamed, so a reader never sees half a file.
        path = _state_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(self.state(), indent=2))
        partial.replace(path)

    def _release(self) -> None:
        found = _read_pid_file(run_dir() / f"{_SUPERVISOR}.pid")
        if found is not None and found[0] == os.getpid():
            (run_dir() / f"{_SUPERVISOR}.pid").unlink(missing_ok=True)
            _state_path().unlink(missing_ok=True)


def _announced_url(log: Path) -> str | None:
    # Only the lines after the last start marker: an older run's URL is not this one's.
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    tail = text.rsplit("supervisor:", 1)[-1].split("\n", 1)[-1]
    match = _URL_LINE.search(tail)
    return match.group(1) if match else None


def spawn_detached(argv: list[str], *, timeout: float = 120.0) -> dict[str, Any]:
    """Start ``argv`` (a foreground `up`) in its own session; return its state once ready."""
    log_dir().mkdir(parents=True, exist_ok=True)
    log = log_dir() / f"{_SUPERVISOR}.log"
    with open(log, "ab") as out:
        proc = _popen(argv, out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise SupervisorError(f"the supervisor exited ({_describe_exit(code)}):\n{tail}")
        state = read_state()
        if state is not None and state.get("pid") == proc.pid:
            return state
        time.sleep(0.1)
    raise SupervisorError(f"the supervisor was not ready within {timeout:g}s; see {log}")
