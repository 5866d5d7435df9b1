"""A service whose clean stop hangs still leaves when told to stop, and one whose stop
ended does not wait for what it left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streams.config import broker_env

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]

_STUCK = textwrap.dedent(
    """
    import asyncio, time
    from streams.runtime import service_main

    async def main(ctx, stop):
        print("serving", flush=True)
        await stop.wait()
        # A stop that never ends: a worker thread the loop waits for forever.
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, 3600)

    service_main("stuck", main)
    """
)


# A service whose main leaves behind a task that swallows its cancellation, as some of
# Faust's do: under `orchestrator up`, about one Ctrl-C of three left the budget or the
# spawner running after it logged "stopped" (asyncio.run waits for every task it cancels
# on its way out), until the supervisor's SIGKILL 15 s later.
_STUBBORN = textwrap.dedent(
    """
    import asyncio
    from streams.runtime import service_main

    left = []

    async def main(ctx, stop):
        async def stubborn():
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue
        left.append(asyncio.get_running_loop().create_task(stubborn()))
        print("serving", flush=True)
        await stop.wait()

    service_main("stubborn", main)
    """
)


def _run(kafka_bootstrap: str, grace: str, script: str = _STUCK) -> tuple[int, str]:
    env = {
        **os.environ,
        **broker_env(kafka_bootstrap),
        "ORCH_STOP_GRACE_SECONDS": grace,
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = ""
    while "serving" not in seen:
        line = proc.stdout.readline()
        assert line, f"the service ended before serving: {seen}"
        seen += line
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, seen + proc.stdout.read()


def test_a_stop_that_hangs_ends_the_process_after_the_grace_period(kafka_bootstrap):
    code, output = _run(kafka_bootstrap, "1")
    assert code == 1
    assert "stuck: clean stop took over 1 s; exiting" in output


def test_a_stop_that_ended_does_not_wait_for_a_task_that_ignores_its_cancellation(
    kafka_bootstrap,
):
    started = time.monotonic()
    code, output = _run(kafka_bootstrap, "60", _STUBBORN)
    # Before: still running at the 30 s wait (the grace is 60 s), then killed.
    assert code == 0, output
    assert time.monotonic() - started < 25
    assert "stubborn stopped" in output
