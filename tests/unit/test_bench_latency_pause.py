"""`bench.latency --pause SERVICE:SECONDS@AT`: what it accepts, and that it always resumes."""

from __future__ import annotations

import argparse
import asyncio
import signal
from types import SimpleNamespace
from typing import Any

import pytest

from bench.latency import Pause


def test_a_pause_names_a_service_a_length_and_a_moment() -> None:
    assert Pause.parse("budget:2@20") == Pause("budget", 2.0, 20.0)
    assert Pause.parse("loader:0.5@0") == Pause("loader", 0.5, 0.0)


@pytest.mark.parametrize(
    "spec",
    [
        "budget",
        "budget:2",
        "budget:@20",
        "kafka:2@20",  # not a service the bench starts
        "budget:0@20",
        "budget:-1@20",
        "budget:2@-5",
        "budget:nan@20",
        "budget:inf@20",
        "budget:2@nan",
        "budget:1e9@1",
        "budget:2@20;rm -rf /",
        "",
    ],
)
def test_anything_else_is_refused_with_the_form_it_wants(spec: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="SERVICE:SECONDS@AT"):
        Pause.parse(spec)


class _Launcher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.stopped = asyncio.Event()

    def send(self, instance: Any, sig: int) -> None:
        self.sent.append((instance.name, sig))
        if sig == signal.SIGSTOP:
            self.stopped.set()


def _platform() -> Any:
    launcher = _Launcher()
    return SimpleNamespace(
        launcher=launcher, instances_of=lambda name: [SimpleNamespace(name=name)]
    )


async def test_the_service_is_stopped_then_continued() -> None:
    platform = _platform()
    await Pause("budget", 0.01, 0.0).run(platform)
    assert platform.launcher.sent == [("budget", signal.SIGSTOP), ("budget", signal.SIGCONT)]


async def test_a_run_that_ends_during_the_pause_still_continues_the_service() -> None:
    platform = _platform()
    task = asyncio.create_task(Pause("budget", 60.0, 0.0).run(platform))
    await asyncio.wait_for(platform.launcher.stopped.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert platform.launcher.sent == [("budget", signal.SIGSTOP), ("budget", signal.SIGCONT)]


async def test_a_run_that_ends_before_the_pause_never_stops_the_service() -> None:
    platform = _platform()
    task = asyncio.create_task(Pause("budget", 1.0, 60.0).run(platform))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert platform.launcher.sent == []
