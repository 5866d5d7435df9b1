"""The platform launcher (local/platform.py): shares of the environment, logs, signals, stops.

Stand-in children (a small module, no broker) take the services' names: the launcher
decides a child's environment by its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from local.platform import (
    FAKE_LLM,
    SERVICE_ORDER,
    ChildSpec,
    Instance,
    Launcher,
    LaunchError,
    available_services,
    known_services,
)
from streams.kafka import KafkaSettings

_CHILD = """
import json, os, signal, sys, time
mode = sys.argv[1] if len(sys.argv) > 1 else "sleep"
if mode == "env":
    print(json.dumps(dict(os.environ)), flush=True)
elif mode == "url":
    print("listening on http://127.0.0.1:5555/v1", flush=True)
elif mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ignoring SIGTERM", flush=True)
elif mode == "crash":
    print("boom", flush=True)
    sys.exit(3)
time.sleep(60)
"""


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "launcher_child.py").write_text(_CHILD)
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(tmp_path / "pkg"),
        "OPENAI_API_KEY": "sk-launcher-test",
        "CLICKHOUSE_URL": "http://u:secret@127.0.0.1:9/db",
        "UNRELATED_TOKEN": "for nobody",
    }
    made = Launcher(
        tmp_path / "logs",
        environ=environ,
        settings=KafkaSettings("127.0.0.1:1", "t1."),
        data_dir=tmp_path / "data",
        stop_timeout=2.0,
        ready_timeout=10.0,
    )
    yield made
    made.stop_all()


def _child(name: str, mode: str = "sleep", **kw: bool) -> ChildSpec:
    return ChildSpec(name, "launcher_child", (mode,), **kw)


def _until(what: str, check: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _printed_env(instance: Instance) -> dict[str, str]:
    line = _until(
        f"{instance.label}'s environment",
        lambda: next((x for x in instance.text().splitlines() if x.startswith("{")), None),
    )
    assert isinstance(line, str)
    return dict(json.loads(line))


def test_each_instance_gets_its_share_of_the_environment_and_a_log(launcher: Launcher) -> None:
    analytics = launcher.start(_child("analytics", "env"))
    loaders = launcher.start_all([_child("loader", "env")], {"loader": 2})
    assert [i.log.name for i in [analytics, *loaders]] == [
        "analytics.log",
        "loader.log",
        "loader-1.log",
    ]

    sink, first, second = (_printed_env(i) for i in [analytics, *loaders])
    assert "OPENAI_API_KEY" not in sink and sink["CLICKHOUSE_URL"].endswith("/db")
    assert first["OPENAI_API_KEY"] == second["OPENAI_API_KEY"] == "sk-launcher-test"
    assert "CLICKHOUSE_URL" not in first
    for env in (sink, first, second):
        assert "UNRELATED_TOKEN" not in env
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:1"
        assert env["ORCH_TOPIC_PREFIX"] == "t1."
        assert env["ORCH_DATA_DIR"].endswith("data")
        assert env["PYTHONUNBUFFERED"] == "1"


def test_the_fake_llm_is_awaited_and_the_services_after_it_call_it(launcher: Launcher) -> None:
    llm = launcher.start(_child(FAKE_LLM, "url", announces_url=True))
    assert llm.url == launcher.llm_url == "http://127.0.0.1:5555/v1"
    loader = _printed_env(launcher.start(_child("loader", "env")))
    # Its placeholder key replaces the real one: a real key is never sent to the fake.
    assert loader["OPENAI_BASE_URL"] == llm.url and loader["OPENAI_API_KEY"] == "fake-llm"


def test_a_child_that_never_announces_its_url_fails_the_start(launcher: Launcher) -> None:
    launcher.ready_timeout = 0.5
    with pytest.raises(LaunchError, match="did not announce its URL"):
        launcher.start(_child(FAKE_LLM, "sleep", announces_url=True))


def test_stop_one_kill_restart_and_crashes(launcher: Launcher) -> None:
    old, young = launcher.start_all([_child("router")], {"router": 2})
    stopped = launcher.stop_one("router", signal.SIGTERM)
    assert stopped is old and old.returncode == -signal.SIGTERM
    assert launcher.instances_of("router") == [young]
    launcher.check_alive()  # an instance the launcher stopped is no crash

    crashed = launcher.start(_child("loader", "crash"))
    _until("the crash", lambda: crashed.returncode is not None)
    with pytest.raises(LaunchError, match=r"(?s)loader exited \(exit code 3\).*boom"):
        launcher.check_alive()
    first_pid = crashed.pid
    launcher.restart(crashed)
    assert crashed.restarts == 1 and crashed.pid != first_pid
    assert crashed.text().count("launcher: loader") == 2  # one log, a marker per start

    launcher.kill("router")
    assert young.returncode == -signal.SIGKILL and not launcher.alive("router")


def test_stop_all_is_bounded_and_kills_what_ignores_sigterm(launcher: Launcher) -> None:
    reported: list[str] = []
    launcher.report = reported.append
    stubborn = launcher.start(_child("router", "stubborn"))
    polite = launcher.start(_child("loader"))
    _until("the handler", lambda: "ignoring" in stubborn.text())
    began = time.monotonic()
    launcher.stop_all()
    assert time.monotonic() - began < launcher.stop_timeout + 3
    assert stubborn.returncode == -signal.SIGKILL and polite.returncode == -signal.SIGTERM
    assert any("still runs" in line and "killing it" in line for line in reported), reported


def test_waiting_for_the_platform_ends_when_an_instance_dies(launcher: Launcher) -> None:
    launcher.start(_child("budget", "crash"))

    async def never() -> bool:
        return False

    with pytest.raises(LaunchError, match="budget exited"):
        asyncio.run(launcher.wait_ready(never, timeout=10))


def test_services_are_found_without_importing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "launcher_svcs"
    for name, main in (("router", True), ("probe", True), ("planned", False), ("cli", True)):
        (package / name).mkdir(parents=True)
        (package / name / "__init__.py").write_text("raise RuntimeError('imported')\n")
        if main:
            (package / name / "__main__.py").write_text("raise RuntimeError('imported')\n")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ORCH_SERVICES_PACKAGE", "launcher_svcs")
    assert known_services() == [*SERVICE_ORDER, "planned", "probe"]
    assert available_services() == ["router", "probe"]


_SUPERVISOR = """
import asyncio, sys
from pathlib import Path
from local.platform import ChildSpec, Launcher, StopOnSignals

async def main() -> None:
    launcher = Launcher(Path(sys.argv[1]), environ={"PYTHONPATH": sys.argv[2]},
                        die_with_parent=True, stop_timeout=5.0)
    with StopOnSignals():
        try:
            child = launcher.start(ChildSpec("loader", "launcher_child", ("sleep",)))
            print(child.proc.pid, flush=True)
            await asyncio.sleep(60)
        finally:
            launcher.stop_all()
            print("stopped its children", flush=True)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_supervisor_stopped_or_killed_leaves_no_child_running(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # What a benchmark stopped by a signal used to leave: its services polling the broker.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "launcher_child.py").write_text(_CHILD)
    script = tmp_path / "supervisor.py"
    script.write_text(_SUPERVISOR)
    root = Path(__file__).resolve().parents[2]
    sup = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "logs"), str(tmp_path / "pkg")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert sup.stdout is not None
        child = int(sup.stdout.readline())
        assert _alive(child)
        sup.send_signal(sig)
        code = sup.wait(timeout=20)
        rest = sup.stdout.read()
        _until(f"child {child} to exit", lambda: not _alive(child))
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            # Cancelled, cleaned up, and the exit status says which signal stopped it.
            assert "stopped its children" in rest
            assert code == 128 + sig
    finally:
        sup.kill()
        sup.wait()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(child, signal.SIGKILL)
