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
import re
import secrets
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
    BrokerAuthMissing,
    BrokerSettings,
    DataDirUnsafe,
    bootstrap_servers,
    data_root,
    kafka_auth,
    kafka_port,
    local_credentials_path,
    private_files,
)

INFRA = ROOT / "infra" / "kafka"
CLIENT_USER = "orchestrator"
CLIENT_MECHANISM = "SCRAM-SHA-512"
# SCRAM's PBKDF2 rounds: each client connection pays them once (about 4 ms at 8192 here).
SCRAM_ITERATIONS = 8192
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


async def _metadata_brokers(bootstrap: str, wait_s: float, auth: dict[str, Any]) -> int:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="localkafka-probe",
        **auth,
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


def kafka_answers(bootstrap: str, timeout: float = 5.0, auth: dict[str, Any] | None = None) -> bool:
    """True when a Kafka metadata request to `bootstrap`, authenticated as this process is
    (or with `auth`), lists at least one broker."""
    if auth is None:
        try:
            auth = kafka_auth()
        except BrokerAuthMissing:
            return False
    # The TCP check first keeps aiokafka from logging connection errors while polling.
    return _tcp_open(bootstrap) and _run_sync(_metadata_brokers(bootstrap, timeout, auth)) > 0


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


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user alone, replacing it whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    partial.replace(path)


def render_properties(port: int) -> Path:
    """Write server.properties for `port` (controller on port + 1) into the data dir, with
    fresh passwords for the broker's own connections."""
    template = Template((INFRA / "server.properties").read_text())
    text = template.substitute(
        PORT=port,
        CONTROLLER_PORT=port + 1,
        LOG_DIR=_log_dir(),
        BROKER_PASSWORD=secrets.token_urlsafe(32),
        CONTROLLER_PASSWORD=secrets.token_urlsafe(32),
    )
    _write_private(_props_path(), text)
    return _props_path()


_BROKER_PASSWORD = re.compile(
    r'^listener\.name\.client\.plain\.sasl\.jaas\.config=.*password="([^"]+)"'
)


def _broker_auth() -> dict[str, Any]:
    """The broker's own credentials, from the properties it runs with: the launcher's
    probes and its one administrative call (adding the clients' SCRAM user)."""
    with contextlib.suppress(FileNotFoundError):
        for line in _props_path().read_text().splitlines():
            found = _BROKER_PASSWORD.match(line)
            if found:
                return {
                    "security_protocol": "SASL_PLAINTEXT",
                    "sasl_mechanism": "PLAIN",
                    "sasl_plain_username": "broker",
                    "sasl_plain_password": found.group(1),
                }
    raise LocalKafkaError(
        f"the running broker's {_props_path()} has no credentials: it was started by an"
        " older version that asked none; run `orchestrator down` (or `python -m"
        " local.localkafka down`), then start it again"
    )


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address "IP:PORT" in hex, state 0A = LISTEN, the socket's inode
                if len(fields) > 9 and fields[3] == "0A":
                    if int(fields[1].rpartition(":")[2], 16) == port:
                        inodes.add(fields[9])
    return inodes


def _held_by(pid: int, port: int) -> bool:
    """Whether the socket listening on ``port`` is process ``pid``'s (Linux /proc).

    While it is, nobody else can listen there (another user cannot share a port), so what
    is sent to the port goes to that process and to no one who took it a moment before."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _add_client_user(java: str, libs: Path, bootstrap: str, pid: int, timeout: float) -> None:
    """Give the clients their SCRAM user on a data dir formatted before the broker asked
    for logins (a new one has it from its format).

    The only call made with the broker's own PLAIN login, which goes to the port as it
    is: only once the socket listening there is the broker's (a process that took the
    port during the start would have been handed it). The clients' password goes through
    0600 files, never a command line."""
    if local_credentials_path().exists():
        return
    port = int(bootstrap.rpartition(":")[2])
    deadline = time.monotonic() + timeout
    while not _held_by(pid, port):
        if not _is_our_broker(pid):
            raise LocalKafkaError(
                f"Kafka broker (pid {pid}) exited during start:\n{_tail(_broker_log())}"
            )
        if time.monotonic() >= deadline:
            raise LocalKafkaError(
                f"cannot tell that port {port} is our broker's (pid {pid}): the data dir's"
                " broker predates logins and needs one call with the broker's own password"
                " to get one; it is sent only to a listening socket /proc shows as the"
                " broker's"
            )
        time.sleep(0.2)
    password = _pending_password()
    auth = _broker_auth()
    admin = _kafka_dir() / "admin.properties"
    scram = _kafka_dir() / "scram.properties"
    _write_private(
        admin,
        "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\n"
        "sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required"
        f' username="broker" password="{auth["sasl_plain_password"]}";\n',
    )
    _write_private(scram, f"{CLIENT_MECHANISM}=iterations={SCRAM_ITERATIONS},password={password}\n")
    cmd = [
        java, "-cp", f"{libs}/*",
        f"-Dlog4j2.configurationFile={INFRA / 'log4j2.properties'}",
        "kafka.admin.ConfigCommand", "--bootstrap-server", bootstrap,
        "--command-config", str(admin), "--alter", "--add-config-file", str(scram),
        "--entity-type", "users", "--entity-name", CLIENT_USER,
    ]  # fmt: skip
    try:
        while True:
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=service_env("kafka"), timeout=120
            )
            if done.returncode == 0 or time.monotonic() >= deadline:
                break
            time.sleep(1.0)  # the broker may still be loading its metadata
    finally:
        admin.unlink(missing_ok=True)
        scram.unlink(missing_ok=True)
    if done.returncode != 0:
        output = "\n".join(
            line for line in (done.stdout + done.stderr).splitlines() if " INFO " not in line
        )
        raise LocalKafkaError(f"adding the clients' SCRAM user failed:\n{output[-2000:]}")
    _publish_credentials(password)


def _pending_password() -> str:
    """The clients' password before the broker has their user (drawn once, kept 0600)."""
    pending = local_credentials_path().with_name("client.pending.json")
    try:
        return str(json.loads(pending.read_text())["password"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        password = secrets.token_urlsafe(32)
        _write_private(pending, json.dumps({"password": password}))
        return password


def _publish_credentials(password: str) -> None:
    """Clients may log in: the broker has the user (the pending file goes)."""
    credentials = {"mechanism": CLIENT_MECHANISM, "username": CLIENT_USER, "password": password}
    _write_private(local_credentials_path(), json.dumps(credentials))
    local_credentials_path().with_name("client.pending.json").unlink(missing_ok=True)


def _java_with_args(java: str, libs: Path, args: list[str], **run: Any) -> Any:
    """Run ``java -cp libs/* @file`` with ``args`` in a 0600 file: a secret among them is
    not on the command line, which every local user can read in /proc."""
    argfile = _kafka_dir() / "java-args.txt"
    _write_private(argfile, "\n".join(f'"{a}"' for a in args) + "\n")
    try:
        return subprocess.run(
            [java, "-cp", f"{libs}/*", f"@{argfile}"],
            capture_output=True,
            text=True,
            env=service_env("kafka"),
            **run,
        )
    finally:
        argfile.unlink(missing_ok=True)


def _format_storage(java: str, libs: Path, props: Path) -> None:
    """Format a new data dir, the clients' SCRAM user in its metadata from the start."""
    if (_log_dir() / "meta.properties").exists():
        return
    password = _pending_password()
    scram = (
        f"{CLIENT_MECHANISM}=[name={CLIENT_USER},iterations={SCRAM_ITERATIONS},password={password}]"
    )
    args = [
        f"-Dlog4j2.configurationFile={INFRA / 'log4j2.properties'}",
        "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props),
        "--ignore-formatted", "--add-scram", scram,
    ]  # fmt: skip
    done = _java_with_args(java, libs, args)
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise LocalKafkaError(
            f"kafka StorageTool format failed:\n{output.replace(password, '***')}"
        )
    _publish_credentials(password)


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
        wait = min(5.0, max(1.0, deadline - time.monotonic()))
        # The clients' SCRAM login: it sends no password, so a process that took the port
        # while the broker starts learns nothing (and cannot pass for the broker).
        if kafka_answers(bootstrap, timeout=wait, auth=kafka_auth(data_root())):
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
    try:
        kafka_auth()  # credentials asked for but incomplete: say so now, not after the wait
    except BrokerAuthMissing as exc:
        raise LocalKafkaError(str(exc)) from None
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
            _broker_auth()  # a broker started before logins is named, not talked to
            _add_client_user(_java(), _ensure_jars(), bootstrap, pid, timeout)
            _wait_ready(bootstrap, pid, timeout)
            return bootstrap
        _pid_path().unlink(missing_ok=True)
        _check_port_free(port)
        _check_port_free(port + 1)
        java = _java()
        libs = _ensure_jars()
        props = render_properties(port)
        _format_storage(java, libs, props)
        proc = _spawn(java, libs, props)
        _add_client_user(java, libs, bootstrap, proc.pid, timeout)
        _wait_ready(bootstrap, proc.pid, timeout, proc)
        return bootstrap


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError(f"java not found; {JAVA_HINT}")
    return java


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
