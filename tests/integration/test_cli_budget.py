"""`orchestrator budget show` reads what the budget service publishes, on the real broker:
a limit change and the tasks of a goal show up, with the budget running as it does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from streams.config import ROOT
from streams.events import TaskRequested
from streams.kafka import EventProducer, KafkaSettings
from tests.samples import sample_event

pytestmark = pytest.mark.broker

_WAIT = timedelta(seconds=300)  # no task may time out while the test looks


def _env(settings: KafkaSettings, data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "KAFKA_"))}
    return env | {
        **settings.env(),
        "ORCH_TOPIC_PREFIX": settings.prefix,
        "ORCH_DATA_DIR": str(data),
        "ORCH_BUDGET_REPORT_SECONDS": "0.2",
        "COLUMNS": "200",
        "PYTHONUNBUFFERED": "1",
    }


async def _cli(settings: KafkaSettings, data: Path, *args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli.main", *args],
        env=_env(settings, data),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return done.returncode, done.stdout, done.stderr


async def _shown(settings: KafkaSettings, data: Path, goal: str, **expected: Any) -> dict[str, Any]:
    """``budget show --json`` once it shows ``expected`` (the report follows a change)."""
    deadline = time.monotonic() + 90
    view: Any = None
    while time.monotonic() < deadline:
        code, out, err = await _cli(settings, data, "budget", "show", goal, "--json")
        assert code == 0, err
        view = json.loads(out)
        if view and all(view[k] == v for k, v in expected.items()):
            return dict(view)
        await asyncio.sleep(0.5)
    raise AssertionError(f"budget show {goal} never showed {expected}; last: {view}")


def _start_budget(settings: KafkaSettings, data: Path) -> subprocess.Popen[bytes]:
    """The budget service as it runs, its output in ``data/budget.log``."""
    with open(data / "budget.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.budget"],
            cwd=ROOT,
            env=_env(settings, data),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _task(goal: str, run: str) -> TaskRequested:
    now = datetime.now(UTC)
    task = sample_event(
        TaskRequested, goal_id=goal, run_id=run, requested_at=now, deadline_at=now + _WAIT
    )
    assert isinstance(task, TaskRequested)
    return task


async def test_budget_show_prints_a_limit_change_and_the_goals_tasks(
    settings: KafkaSettings, tmp_path: Path
) -> None:
    goal = "g-show"
    code, out, _ = await _cli(settings, tmp_path, "budget", "show", goal)
    assert code == 0 and f"goal {goal}: no budget state yet" in out

    budget = _start_budget(settings, tmp_path)
    try:
        code, _, err = await _cli(
            settings,
            tmp_path,
            "budget",
            "set",
            goal,
            "--max-concurrent",
            "1",
            "--cost-weight",
            "25",
        )
        assert code == 0, err
        await _shown(settings, tmp_path, goal, max_concurrent=1, in_flight=0, cost_weight=25.0)

        async with EventProducer(settings) as producer:
            for i in range(3):
                await producer.send(_task(goal, f"r-show-{i}"))
        view = await _shown(settings, tmp_path, goal, in_flight=1, queued=2)
        assert view["max_concurrent"] == 1 and view["held"] > 0
        assert view["day"] == datetime.now(UTC).strftime("%Y-%m-%d")

        code, out, err = await _cli(settings, tmp_path, "budget", "show", goal)
        assert code == 0, err
        rows = dict(line.strip("│ ").split(None, 1) for line in out.splitlines() if "│" in line)
        rows = {k: v.strip(" │") for k, v in rows.items()}
        assert rows["max_concurrent"] == "1"
        assert rows["in_flight"] == "1" and rows["queued"] == "2"
        assert set(rows) == {
            "max_agents",
            "max_concurrent",
            "max_daily_cost",
            "agents",
            "in_flight",
            "queued",
            "spent_today",
            "held",
            "day",
            "cost_weight",
        }
        assert rows["cost_weight"] == "25.0"
    finally:
        budget.terminate()
        try:
            budget.wait(30)
        except subprocess.TimeoutExpired:
            budget.kill()
