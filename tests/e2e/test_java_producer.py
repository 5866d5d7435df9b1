"""A producer in another language: the Java example (Apache Avro + the Kafka Java client)
asks the running platform and prints the run's terminal event, read back here from Kafka.

The build is cached under .local/java-example/, keyed by a hash of the pom and the
sources, so reruns skip Maven. Missing Java or Maven fails the test: CI has both.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from streams.budgets import read_budget
from streams.config import ROOT
from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "java"
BUILD = ROOT / ".local" / "java-example"


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted([EXAMPLE / "pom.xml", *(EXAMPLE / "src").rglob("*")]):
        if path.is_file():
            digest.update(str(path.relative_to(EXAMPLE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def java_example() -> Path:
    """The example's jar, built with `mvn -B -q package` unless the cached build is current."""
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: the Java example needs a JDK 17+ and Maven")
    BUILD.mkdir(parents=True, exist_ok=True)
    # The build dir is the checkout's, not this run's: another run of the suite in the same
    # checkout waits here rather than build into the same target dir at the same time.
    with open(BUILD / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _built()


def _built() -> Path:
    jar = BUILD / "target" / "ask-orchestrator.jar"
    stamp = BUILD / "sources.sha256"
    wanted = _sources_hash()
    if jar.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return jar
    started = time.monotonic()
    done = subprocess.run(
        ["mvn", "-B", "-q", "-f", str(EXAMPLE / "pom.xml"), "package"]
        + [f"-Dbuild.dir={BUILD / 'target'}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"mvn package failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    assert jar.is_file(), f"mvn package made no {jar}"
    stamp.write_text(wanted)
    print(f"java example built in {time.monotonic() - started:.1f}s")
    return jar


async def _ask(platform: Platform, jar: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """Run the example; its exit status and the event it printed (its last stdout line)."""
    argv = ["java", "-jar", str(jar), "--bootstrap", platform.settings.bootstrap]
    argv += ["--prefix", platform.settings.prefix, "--schemas", str(ROOT / "schemas"), *args]
    # The broker's login, as `orchestrator kafka-env` gives it to a program of one's own.
    env = {**os.environ, **platform.settings.env()}
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, encoding="utf-8", timeout=120, env=env
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"exit {done.returncode}, nothing printed\n{done.stderr}"
    return done.returncode, json.loads(lines[-1])


async def test_java_producer_gets_the_runs_answer(platform: Platform, java_example: Path):
    run_id = f"java-{uuid.uuid4().hex[:12]}"
    message = "Why does my Java program's HashMap raise a NullPointerException? Grüße ✓"
    code, printed = await _ask(
        platform,
        java_example,
        *("--run-id", run_id, "--goal", "g-java", "--user", "u-java"),
        *("--message", message, "--context", "channel=java", "--timeout", "60"),
    )
    assert code == 0, printed

    (completed,) = await platform.events("workflow_completed", run_id=run_id)
    assert printed["event_type"] == "workflow_completed"
    for name in ("event_id", "run_id", "goal_id", "user_id", "agent_id", "specialty", "text"):
        assert printed[name] == getattr(completed, name), name
    assert printed["degradation_tier"] == completed.degradation_tier == "llm"
    assert printed["cost_usd"] == pytest.approx(completed.cost_usd) and completed.cost_usd > 0
    assert printed["meta"] == completed.meta
    assert printed["occurred_at"] == int(completed.occurred_at.timestamp() * 1000)
    # The answer is to this message: the platform decoded the Java bytes, unicode included.
    assert message in completed.text
    (request,) = await platform.events("request_received", run_id=run_id)
    assert (request.source, request.goal_id, request.user_id) == (
        "java-example",
        "g-java",
        "u-java",
    )
    assert request.message == message and request.context == {"channel": "java"}


async def test_java_producer_prints_a_failed_run_and_exits_1(
    platform: Platform, java_example: Path, client
):
    goal = "g-java-none"
    await client.set_budget(goal, max_agents=0)
    deadline = time.monotonic() + 20
    while ((await read_budget(platform.settings, goal)) or {}).get("max_agents") != 0:
        assert time.monotonic() < deadline, "the budget never showed max_agents=0"
        await asyncio.sleep(0.2)
    run_id = f"java-{uuid.uuid4().hex[:12]}"
    code, printed = await _ask(
        platform, java_example, "--run-id", run_id, "--goal", goal, "--message", "Summarize this"
    )
    assert code == 1, printed
    (failed,) = await platform.events("workflow_failed", run_id=run_id)
    assert printed["event_type"] == "workflow_failed"
    assert (printed["event_id"], printed["reason"], printed["limit"]) == (
        failed.event_id,
        "budget_exceeded",
        "max_agents",
    )
    assert printed["detail"] == failed.detail
