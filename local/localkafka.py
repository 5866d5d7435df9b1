"""Local single-node KRaft Kafka broker launcher: `python -m local.localkafka up|down|status`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from string import Template
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from local.environment import service_env
from streams.config import (
    DEFAULT_KAFKA_PORT,
    ROOT,
    BrokerSettings,
    DataDirUnsafe,
    bootstrap_servers,
    data_root,
    kafka_port,
    private_files,
)

INFRA = ROOT / "infra" / "kafka"
DEFAULT_PORT = DEFAULT_KAFKA_PORT
JAVA_HINT = "install OpenJDK 17+: apt-get install openjdk-17-jre-headless"
MVN_HINT = "install Maven: apt-get install maven"

T = TypeVar("T")


class LocalKafkaError(RuntimeError):
    """The local broker could not be started, reached or stopped."""


def _kafka_dir() -> Path:
    return data_root() / "kafka"


def _libs_dir() -> Path:
    libs: Path = BrokerSettings.from_env().libs
    return libs


def _log_dir() -> Path:
    return _kafka_dir() / "data"


def _props_path() -> Path:
    return _kafka_dir() / "server.properties"


def _pid_path() -> Path:
    return _kafka_dir() / "broker.pid"


def _broker_log() -> Path:
    return _kafka_dir() / "broker.log"


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code (e.g. an async fixture): a nested asyncio.run would fail.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _tcp_open(bootstrap: str, timeout: float = 1.0) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        with contextlib.suppress(OSError, ValueError):
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
    return False


async def _metadata_brokers(bootstrap: str, wait_s: float) -> int:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="localkafka-probe",
        request_timeout_ms=max(1000, int(wait_s * 1000)),
    )
    try:
        async with asyncio.timeout(wait_s):
            await admin.start()
            cluster = await admin.describe_cluster()
        return len(cluster.get("brokers") or [])
    except (KafkaError, OSError, TimeoutError):
        return 0
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def kafka_answers(bootstrap: str, timeout: float = 5.0) -> bool:
    """True when a Kafka metadata request to `bootstrap` lists at least one broker."""
    # The TCP check first keeps aiokafka from logging connection errors while polling.
    return _tcp_open(bootstrap) and _run_sync(_metadata_brokers(bootstrap, timeout)) > 0


def _cmdline(pid: int) -> str:
    if not Path("/proc/self").exists():
        out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True)
        return out.stdout.decode(errors="replace")
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_our_broker(pid: int) -> bool:
    # The command line names our properties file as an argument of its own, so a recycled
    # pid is never mistaken for the broker, nor is another data dir's broker whose path
    # holds ours (a zombie has an empty command line and counts as gone).
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        owner = Path(f"/proc/{pid}").stat().st_uid
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False
        cmd = _cmdline(pid)  # no /proc: what ps shows
        return "kafka.Kafka" in cmd.split() and str(_props_path()) in cmd.split()
    except OSError:
        return False
    return owner == os.getuid() and "kafka.Kafka" in argv and str(_props_path()) in argv


def _our_pid() -> int | None:
    try:
        pid = int(_pid_path().read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _is_our_broker(pid) else None


def _running_port() -> int | None:
    with contextlib.suppress(FileNotFoundError):
        for line in _props_path().read_text().splitlines():
            if line.startswith("advertised.listeners="):
                return int(line.rpartition(":")[2])
    return None


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    # Two processes calling ensure_broker at once must not start two brokers.
    _kafka_dir().mkdir(parents=True, exist_ok=True)
    with open(_kafka_dir() / "launcher.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR so sockets left in TIME_WAIT by a previous broker do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise LocalKafkaError(
                f"port {port} is already in use by another process (not our broker); "
                "set ORCH_KAFKA_PORT to a free port, or KAFKA_BOOTSTRAP_SERVERS to use "
                "an existing Kafka"
            ) from None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _ensure_jars() -> Path:
    libs = _libs_dir()
    if libs.is_dir() and any(libs.glob("*.jar")):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(f"mvn not found, needed once to fetch the Kafka jars; {MVN_HINT}")
    # Download beside the target and rename, so an interrupted fetch is never mistaken
    # for a complete set of jars.
    partial = libs.with_name("libs.partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        mvn, "-B", "-q", "-f", str(INFRA / "pom.xml"), "dependency:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={partial}",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=service_env("kafka"))
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise LocalKafkaError(f"mvn failed to fetch the Kafka jars:\n{output}")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    return libs


def _cluster_id() -> str:
    path = _kafka_dir() / "cluster.id"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    while True:
        # Kafka's Uuid.randomUuid() rejects ids starting with "-"; so do we.
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            break
    path.write_text(cid + "\n")
    return cid


def render_properties(port: int) -> Path:
    """Write server.properties for `port` (controller on port + 1) into the data dir."""
    template = Template((INFRA / "server.properties").read_text())
    text = template.substitute(PORT=port, CONTROLLER_PORT=port + 1, LOG_DIR=_log_dir())
    _props_path().parent.mkdir(parents=True, exist_ok=True)
    _props_path().write_text(text)
    return _props_path()


def _format_storage(java: str, libs: Path, props: Path) -> None:
    if (_log_dir() / "meta.properties").exists():
        return
    cmd = [
        java, "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format",
        "-t", _cluster_id(), "-c", str(props), "--ignore-formatted",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=service_env("kafka"))
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise LocalKafkaError(f"kafka StorageTool format failed:\n{output}")


def _spawn(java: str, libs: Path, props: Path) -> subprocess.Popen[bytes]:
    cmd = [
        java, "-Xms256m", "-Xmx512m", "-cp", f"{libs}/*",
        f"-Dlog4j2.configurationFile={INFRA / 'log4j2.properties'}",
        "kafka.Kafka", str(props),
    ]  # fmt: skip
    # A fresh log per start keeps the file bounded and its tail about this start.
    with open(_broker_log(), "wb") as log:
        # Own session: the broker outlives this process and ignores its terminal's ^C.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=_kafka_dir(),
            start_new_session=True,
            env=service_env("kafka"),
        )
    _pid_path().write_text(f"{proc.pid}\n")
    return proc


def _wait_ready(
    bootstrap: str, pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # Our own child is checked through Popen: until it has exec'd java, its command
        # line is still this Python process and would look like a dead broker.
        alive = proc.poll() is None if proc is not None else _is_our_broker(pid)
        if not alive:
            _pid_path().unlink(missing_ok=True)
            raise LocalKafkaError(
                f"Kafka broker (pid {pid}) exited during start; last lines of "
                f"{_broker_log()}:\n{_tail(_broker_log())}"
            )
        if kafka_answers(bootstrap, timeout=min(5.0, max(1.0, deadline - time.monotonic()))):
            return
        if time.monotonic() >= deadline:
            _stop_pid(pid, 10.0)
            _pid_path().unlink(missing_ok=True)
            raise LocalKafkaError(
                f"Kafka broker did not answer on {bootstrap} within {timeout:.0f}s and was "
                f"stopped; last lines of {_broker_log()}:\n{_tail(_broker_log())}"
            )
        time.sleep(0.2)


def _wait_external(bootstrap: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not kafka_answers(bootstrap, timeout=min(5.0, max(1.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            raise LocalKafkaError(
                f"Kafka at KAFKA_BOOTSTRAP_SERVERS={bootstrap} did not answer within {timeout:.0f}s"
            )
        time.sleep(0.5)
    return bootstrap


def ensure_broker(timeout: float = 90.0) -> str:
    """Start (or reuse) the local broker and return its bootstrap servers once it answers.

    With KAFKA_BOOTSTRAP_SERVERS set, only waits for that cluster. `timeout` bounds the
    wait for the broker to answer, not the one-time jar download.
    """
    external: str | None = BrokerSettings.read("external")
    if external:
        return _wait_external(external, timeout)
    port = kafka_port()
    bootstrap = bootstrap_servers()
    with _lock():
        pid = _our_pid()
        if pid is not None:
            running = _running_port()
            if running != port:
                raise LocalKafkaError(
                    f"our broker already runs on port {running}, not {port}; "
                    "run `python -m local.localkafka down` first or unset ORCH_KAFKA_PORT"
                )
            _wait_ready(bootstrap, pid, timeout)
            return bootstrap
        _pid_path().unlink(missing_ok=True)
        _check_port_free(port)
        _check_port_free(port + 1)
        java = shutil.which("java")
        if java is None:
            raise LocalKafkaError(f"java not found; {JAVA_HINT}")
        libs = _ensure_jars()
        props = render_properties(port)
        _format_storage(java, libs, props)
        proc = _spawn(java, libs, props)
        _wait_ready(bootstrap, proc.pid, timeout, proc)
        return bootstrap


def _stop_pid(pid: int, timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not _is_our_broker(pid):
                return
            time.sleep(0.1)
    raise LocalKafkaError(f"Kafka broker pid {pid} survived SIGKILL")


def stop_broker(timeout: float = 30.0) -> bool:
    """Stop our broker (SIGTERM, then SIGKILL after `timeout`); False if none was running."""
    with _lock():
        pid = _our_pid()
        if pid is not None:
            _stop_pid(pid, timeout)
        _pid_path().unlink(missing_ok=True)
        return pid is not None


def broker_status() -> dict[str, Any]:
    """Whether the broker answers, with its pid (None when external), bootstrap and data dir."""
    external: str | None = BrokerSettings.read("external")
    if external:
        running = kafka_answers(external)
        return {"running": running, "pid": None, "bootstrap": external, "data_dir": None}
    pid = _our_pid()
    port = (_running_port() if pid is not None else None) or kafka_port()
    bootstrap = f"127.0.0.1:{port}"
    running = pid is not None and kafka_answers(bootstrap)
    return {"running": running, "pid": pid, "bootstrap": bootstrap, "data_dir": str(_log_dir())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.localkafka", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    try:
        private_files()
    except DataDirUnsafe as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.command == "up":
            started = time.monotonic()
            bootstrap = ensure_broker(args.timeout)
            print(f"kafka ready at {bootstrap} ({time.monotonic() - started:.1f}s)")
        elif args.command == "down":
            stopped = stop_broker()
            print("kafka broker stopped" if stopped else "no local kafka broker running")
        else:
            print(json.dumps(broker_status()))
    except LocalKafkaError as exc:
        print(f"localkafka: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
