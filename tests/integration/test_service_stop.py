"""A service whose clean stop hangs still leaves when told to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


def _run(kafka_bootstrap: str, grace: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "ORCH_STOP_GRACE_SECONDS": grace,
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK],
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
