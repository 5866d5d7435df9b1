"""Pid files `down` and `up` trust: a recycled pid, another user's process, two supervisors
at once, a child left stopped by a supervisor killed with SIGKILL. Real processes
(``sleep``), a data dir of the test's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import supervisor as sup
from services.cli.supervisor import Supervisor, SupervisorError, stop_recorded
from streams.procs import process_start

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="start times are read from /proc (Linux)"
)


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    deadline = time.monotonic() + 10
    while "time.sleep" not in sup._cmdline(proc.pid):  # noqa: SLF001  (exec'd: its own argv)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait()


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _gone(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.05)
    return False


def test_a_recycled_pid_running_the_same_command_is_never_signalled(
    run_dir: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    # The pid file's command line matched any process running it: after a crash, a pid
    # that came round to another deployment's service of the same module was stopped.
    cmdline = sup._cmdline(sleeper.pid)  # noqa: SLF001
    (run_dir / "router.pid").write_text(f"{sleeper.pid}\n{cmdline}\n1:{os.getuid()}\n")
    said: list[str] = []
    assert stop_recorded(timeout=1.0, report=said.append) == []
    assert _alive(sleeper) and not (run_dir / "router.pid").exists()
    # Recorded as it is (its start time and owner): it is ours, and it is stopped.
    sup._write_pid_file(run_dir / "router.pid", sleeper.pid, cmdline)  # noqa: SLF001
    started = (run_dir / "router.pid").read_text().split("\n")[2]
    assert started == process_start(sleeper.pid) and started.endswith(f":{os.getuid()}")  # noqa: SLF001
    assert stop_recorded(timeout=5.0, report=said.append) == ["router"]
    assert _gone(sleeper)


def test_another_users_process_is_left_alone_and_down_goes_on(
    run_dir: Path, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.kill's PermissionError ended `down` with a traceback before the broker was
    # stopped and the pid files were removed.
    sup._write_pid_file(run_dir / "router.pid", sleeper.pid, sup._cmdline(sleeper.pid))  # noqa: SLF001

    def refused(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    said: list[str] = []
    stop_recorded(timeout=1.0, report=said.append)
    monkeypatch.undo()
    assert any("another user's process; left alone" in line for line in said)
    assert not (run_dir / "router.pid").exists()


def test_two_supervisors_never_claim_one_data_dir(run_dir: Path) -> None:
    first, second = Supervisor([], report=lambda _: None), Supervisor([], report=lambda _: None)
    first.claim()
    try:
        with pytest.raises(SupervisorError, match="already runs"):
            second.claim()  # the same process even: the lock decides, not the pid file
    finally:
        first._release()  # noqa: SLF001
    second.claim()  # released: the next one may
    second._release()  # noqa: SLF001


def test_a_child_left_stopped_by_a_killed_supervisor_is_stopped_by_the_next(
    run_dir: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    # A stopped child takes its parent's death signal only once continued: it outlived a
    # SIGKILLed supervisor, and the next `up` overwrote its pid file, so no `down` saw it.
    sup._write_pid_file(run_dir / "router.pid", sleeper.pid, sup._cmdline(sleeper.pid))  # noqa: SLF001
    os.kill(sleeper.pid, signal.SIGSTOP)
    said: list[str] = []
    supervisor = Supervisor([], report=said.append)
    supervisor.claim()
    try:
        assert _gone(sleeper)
        assert any("left by an earlier supervisor" in line for line in said)
    finally:
        supervisor._release()  # noqa: SLF001


def test_a_file_system_without_locks_still_lets_up_start(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said: list[str] = []
    supervisor = Supervisor([], report=said.append)
    supervisor.claim()  # was a traceback
    try:
        assert any("no lock on" in line for line in said)
        assert sup.supervisor_pid() == os.getpid()
    finally:
        supervisor._release()  # noqa: SLF001
