"""The process supervisor behind `orchestrator up` and `down`: children, restarts, pid files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from local.platform import (
    ChildSpec,
    Instance,
    Launcher,
    LaunchError,
    describe_exit,
    popen,
)
from streams.config import data_root
from streams.procs import process_start, still_running

__all__ = [
    "Supervisor",
    "SupervisorError",
    "read_state",
    "restart_delay",
    "spawn_detached",
    "stop_recorded",
    "supervisor_pid",
]

_SUPERVISOR = "supervisor"

Report = Callable[[str], None]


class SupervisorError(RuntimeError):
    """The supervisor could not start or stop what it was asked to."""


def run_dir() -> Path:
    return data_root() / "run"


def log_dir() -> Path:
    return data_root() / "logs"


def _state_path() -> Path:
    return run_dir() / "supervisor.json"


def restart_delay(failures: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before restart number ``failures`` (1, 2, ...) of a crash loop."""
    return min(cap, base * 2.0 ** max(0, failures - 1))


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
    # The command line and the start time are kept beside the pid so that `down` never
    # signals a process that merely inherited a recycled pid.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(f"{pid}\n{cmdline}\n{process_start(pid)}\n")
    partial.replace(path)


def _read_pid_file(path: Path) -> tuple[int, str, str] | None:
    try:
        pid_line, cmdline, started, *_ = [*path.read_text().split("\n"), "", ""]
        return int(pid_line.strip()), cmdline.strip(), started.strip()
    except (FileNotFoundError, ValueError):
        return None


def _ours(pid: int, cmdline: str, started: str = "") -> bool:
    """Whether ``pid`` is still the process a pid file recorded: its command line, and its
    start time and owner where the file has them (one written before they were kept: its
    owner must be this user)."""
    if not cmdline or _cmdline(pid) != cmdline:
        return False
    return not process_start(pid) or still_running(pid, started)


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


def _signal_and_wait(pid: int, cmdline: str, timeout: float, started: str = "") -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; True once the process is gone. A stopped
    process (SIGSTOP) is continued first: it would take a SIGTERM only once continued."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, sig)
        # Not our child (its parent reaps it): gone is when it is no longer what was recorded.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _ours(pid, cmdline, started):
                return True
            time.sleep(0.1)
    return not _ours(pid, cmdline, started)


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
        pid, cmdline, started = found
        name = path.stem
        if _ours(pid, cmdline, started):
            try:
                gone = _signal_and_wait(pid, cmdline, timeout, started)
            except PermissionError:  # another user's process: never ours to stop
                report(f"{name}: pid {pid} is another user's process; left alone")
                gone = True
            if gone:
                stopped.append(name)
                report(f"stopped {name} (pid {pid})")
            else:
                report(f"could not stop {name} (pid {pid})")
                continue
        path.unlink(missing_ok=True)
    _state_path().unlink(missing_ok=True)
    return stopped


@dataclass
class _Backoff:
    """A child's crash loop: failures in a row and when its next restart is due."""

    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs children in order, restarts the ones that die, stops them all on a signal.

    The children run through the platform launcher (:class:`local.platform.Launcher`);
    the supervisor adds what `up` and `down` need: the restart policy, pid files that a
    later `down` can trust, and a state file that `status` reads.
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
        self.specs = list(specs)
        self.report = report
        self.stable_after = stable_after
        self.poll_interval = poll_interval
        # die_with_parent: a SIGKILLed supervisor leaves no orphans.
        self.launcher = Launcher(
            log_dir(),
            environ=env,
            die_with_parent=True,
            stop_timeout=stop_timeout,
            ready_timeout=ready_timeout,
            report=report,
        )
        self._backoff: dict[Instance, _Backoff] = {}
        self._stopping = False
        self._signals = 0
        self._lock: int | None = None  # the data dir's lock, once claimed

    @property
    def llm_url(self) -> str | None:
        return self.launcher.llm_url

    # -- lifecycle -----------------------------------------------------------------

    def claim(self) -> None:
        """Record this process as the supervisor of the data dir; refuse a second one.

        The data dir's lock, held for as long as this process lives, decides: two `up`s
        started together both found no supervisor's pid file and both claimed the dir.
        Children a supervisor killed before it could stop them (a stopped child takes its
        parent's death signal only once continued) are stopped first."""
        running = supervisor_pid()
        if running is not None and running != os.getpid():
            raise SupervisorError(
                f"a supervisor already runs for {data_root()} (pid {running}); "
                "run `orchestrator down` first"
            )
        run_dir().mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            fd = os.open(run_dir() / f"{_SUPERVISOR}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SupervisorError(
                    f"a supervisor already runs for {data_root()}; run `orchestrator down` first"
                ) from None
            except OSError as exc:  # a file system without locks (ENOLCK, ENOTSUP)
                self.report(f"no lock on {data_root()} ({exc.strerror}): the pid file decides")
            self._lock = fd
        _write_pid_file(run_dir() / f"{_SUPERVISOR}.pid", os.getpid(), _cmdline(os.getpid()))
        for path in sorted(run_dir().glob("*.pid")):
            found = _read_pid_file(path)
            if path.stem == _SUPERVISOR or found is None:
                continue
            if _ours(*found):
                self.report(f"stopping {path.stem} (pid {found[0]}), left by an earlier supervisor")
                with contextlib.suppress(PermissionError):
                    _signal_and_wait(found[0], found[1], 10.0, found[2])
            path.unlink(missing_ok=True)

    def start_all(self) -> None:
        for spec in self.specs:
            try:
                instance = self.launcher.start(spec)
            except LaunchError as exc:
                raise SupervisorError(str(exc)) from exc
            self._backoff[instance] = _Backoff()
            self._record(instance)
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

    def _record(self, instance: Instance) -> None:
        assert instance.pid is not None
        _write_pid_file(_pid_file(instance), instance.pid, " ".join(instance.argv))

    def poll(self) -> None:
        """Notice children that died, and restart them when their backoff has passed."""
        now = time.monotonic()
        for instance, backoff in self._backoff.items():
            if backoff.restart_at is not None:
                if now >= backoff.restart_at:
                    backoff.restart_at = None
                    self.launcher.restart(instance)
                    self._record(instance)
                    self.report(f"restarted {instance.label} (pid {instance.pid})")
                    self.write_state()
                continue
            code = instance.returncode
            if code is None:
                continue
            ran = now - instance.started_at
            backoff.failures = 1 if ran >= self.stable_after else backoff.failures + 1
            delay = restart_delay(backoff.failures)
            backoff.restart_at = now + delay
            self.report(
                f"{instance.label} (pid {instance.pid}) died: {describe_exit(code)} after "
                f"{ran:.1f}s; restarting in {delay:g}s"
            )

    def stop_all(self) -> None:
        """SIGTERM every child (the last started first), wait, then SIGKILL what is left."""
        # A second Ctrl-C means "now": no more waiting for a clean stop.
        self.launcher.stop_all(hurry=lambda: self._signals >= 2)
        for instance in self.launcher.instances:
            _pid_file(instance).unlink(missing_ok=True)

    # -- state ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "data_dir": str(data_root()),
            "llm_url": self.llm_url,
            "children": [
                {
                    "name": i.name,
                    "module": i.spec.module,
                    "pid": i.pid,
                    "restarts": i.restarts,
                    "log": str(i.log),
                }
                for i in self.launcher.instances
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
        if self._lock is not None:
            os.close(self._lock)  # the lock goes with it
            self._lock = None


def _pid_file(instance: Instance) -> Path:
    return run_dir() / f"{instance.label}.pid"


def spawn_detached(argv: list[str], *, timeout: float = 120.0) -> dict[str, Any]:
    """Start ``argv`` (a foreground `up`) in its own session; return its state once ready."""
    log_dir().mkdir(parents=True, exist_ok=True)
    log = log_dir() / f"{_SUPERVISOR}.log"
    with open(log, "ab") as out:
        proc = popen(argv, out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise SupervisorError(f"the supervisor exited ({describe_exit(code)}):\n{tail}")
        state = read_state()
        if state is not None and state.get("pid") == proc.pid:
            return state
        time.sleep(0.1)
    raise SupervisorError(f"the supervisor was not ready within {timeout:g}s; see {log}")
