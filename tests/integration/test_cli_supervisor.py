"""`orchestrator up --detach`, `status`, a restart after SIGKILL and `down`, on the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from local.localkafka import kafka_answers
from streams.config import ROOT
from streams.kafka import KafkaSettings

pytestmark = pytest.mark.broker

# A service as small as a real one: it joins its consumer group and reads until stopped.
_PROBE_MAIN = '''
"""A probe service for the supervisor test."""
from streams.kafka import EventConsumer
from streams.runtime import service_main


async def main(ctx, stop):
    consumer = EventConsumer(ctx.settings, ["request_received"], group_id=ctx.group)
    async with consumer:
        async for _ in consumer:
            pass


service_main("probe", main)
'''
# Stand-ins named like real services: the supervisor decides a child's environment by its
# name, so these get what the real ones would. They only wait to be stopped.
_STAND_INS = ("analytics", "loader", "router")
_STAND_IN_MAIN = "import time\n\ntime.sleep(600)\n"


@pytest.fixture
def cli_env(tmp_path: Path, settings: KafkaSettings) -> Iterator[dict[str, str]]:
    package = f"clisvc_{uuid.uuid4().hex[:8]}"
    probe = tmp_path / "pkgs" / package / "probe"
    probe.mkdir(parents=True)
    (probe.parent / "__init__.py").write_text("")
    (probe / "__init__.py").write_text("")
    (probe / "__main__.py").write_text(_PROBE_MAIN)
    for name in _STAND_INS:
        (probe.parent / name).mkdir()
        (probe.parent / name / "__init__.py").write_text("")
        (probe.parent / name / "__main__.py").write_text(_STAND_IN_MAIN)
    env = {
        **os.environ,
        **settings.env(),
        "ORCH_TOPIC_PREFIX": settings.prefix,
        "ORCH_DATA_DIR": str(tmp_path / "data"),
        "ORCH_SERVICES_PACKAGE": package,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(probe.parent.parent), str(ROOT)])),
    }
    yield env
    # Whatever the test did, nothing it started outlives it.
    _cli(env, "down", check=False)


def _cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


def _probe_status(env: dict[str, str]) -> dict[str, Any]:
    body = json.loads(_cli(env, "status", "--json").stdout)
    assert body["broker_answers"] is True
    (probe,) = [s for s in body["services"] if s["name"] == "probe"]
    return dict(probe)


def _wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    # Generous: a probe killed by SIGKILL stays in its group for the 10 s session timeout
    # before the restarted one is let in, and each probe here is a CLI process start.
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def _pid_file(env: dict[str, str], name: str) -> int | None:
    try:
        return int((Path(env["ORCH_DATA_DIR"]) / "run" / f"{name}.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _processes_of(package: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if package in cmd and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def test_up_status_restart_down(cli_env: dict[str, str], kafka_bootstrap: str) -> None:
    up = _cli(cli_env, "up", "--detach", "--only", "probe", "--stop-timeout", "5")
    assert "probe" in up.stdout
    supervisor = _pid_file(cli_env, "supervisor")
    first = _pid_file(cli_env, "probe")
    assert supervisor is not None and first is not None and _alive(first)

    running = _wait_for(
        "the probe to join its group", lambda: (s := _probe_status(cli_env))["instances"] and s
    )
    assert running["state"] == "running"
    assert running["pid"] == first
    assert running["group"] == f"{cli_env['ORCH_TOPIC_PREFIX']}orchestrator.probe"

    os.kill(first, signal.SIGKILL)
    second = _wait_for(
        "the supervisor to restart the probe",
        lambda: (pid := _pid_file(cli_env, "probe")) not in (None, first) and _alive(pid) and pid,
    )
    restarted = _wait_for(
        "the restarted probe in the group",
        lambda: (s := _probe_status(cli_env))["pid"] == second and s["instances"] and s,
    )
    assert restarted["restarts"] == 1
    log = (Path(cli_env["ORCH_DATA_DIR"]) / "logs" / "supervisor.log").read_text()
    assert "killed by SIGKILL" in log and f"restarted probe (pid {second})" in log

    down = _cli(cli_env, "down")
    assert "stopped supervisor" in down.stdout
    assert not _alive(supervisor) and not _alive(second)
    assert _processes_of(cli_env["ORCH_SERVICES_PACKAGE"]) == []
    assert list((Path(cli_env["ORCH_DATA_DIR"]) / "run").glob("*.pid")) == []
    # An external broker (KAFKA_BOOTSTRAP_SERVERS) is never stopped by `down`.
    assert kafka_answers(kafka_bootstrap)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def test_each_child_gets_only_its_share_of_the_environment(cli_env: dict[str, str]) -> None:
    secrets = {
        "OPENAI_API_KEY": "sk-supervisor-test-0123456789",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "CLICKHOUSE_URL": "http://orch:ch-secret@127.0.0.1:9/db",
        "SLACK_BOT_TOKEN": "xoxb-not-for-anyone-here",
        "UNRELATED_TOKEN": "not-for-any-service",
    }
    env = {**cli_env, **secrets}
    _cli(env, "up", "--detach", "--only", ",".join(_STAND_INS), "--wait", "0")
    seen = {}
    for name in _STAND_INS:
        pid = _pid_file(env, name)
        assert pid is not None and _alive(pid), name
        seen[name] = _environ(pid)

    analytics, loader, router = seen["analytics"], seen["loader"], seen["router"]
    assert "OPENAI_API_KEY" not in analytics and "OPENAI_BASE_URL" not in analytics
    assert analytics["CLICKHOUSE_URL"] == secrets["CLICKHOUSE_URL"]
    assert loader["OPENAI_API_KEY"] == secrets["OPENAI_API_KEY"]
    assert loader["OPENAI_BASE_URL"] == secrets["OPENAI_BASE_URL"]
    assert "CLICKHOUSE_URL" not in loader
    assert not {"OPENAI_API_KEY", "CLICKHOUSE_URL"} & router.keys()
    for name, child in seen.items():
        assert "SLACK_BOT_TOKEN" not in child and "UNRELATED_TOKEN" not in child, name
        # What every service needs to run still arrives.
        assert child["KAFKA_BOOTSTRAP_SERVERS"] == env["KAFKA_BOOTSTRAP_SERVERS"], name
        assert child["ORCH_TOPIC_PREFIX"] == env["ORCH_TOPIC_PREFIX"], name
        assert child["PYTHONPATH"] == env["PYTHONPATH"] and child["PATH"] == env["PATH"], name
