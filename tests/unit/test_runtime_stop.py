"""run_service's stop: a service's own clean stop is not cancelled halfway."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import pytest

from streams import runtime


class _Producer:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stopped = False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True


async def _run(main: runtime.ServiceMain, stop: asyncio.Event) -> None:
    with mock.patch.object(runtime, "EventProducer", _Producer):
        await runtime.run_service("t", main, settings=mock.Mock(), clock=mock.Mock(), stop=stop)


async def test_a_clean_stop_runs_to_its_end() -> None:
    """A service's main sees ``stop`` and stops itself (Faust's app.stop: offsets
    committed, buffered sends flushed; the sink's store closed). run_service cancelled it
    at the first await of that stop, as soon as ``stop`` was set."""
    seen: list[str] = []

    async def main(ctx: runtime.ServiceContext, stop: asyncio.Event) -> None:
        try:
            await stop.wait()
        finally:
            try:
                await asyncio.sleep(0.05)  # app.stop(): commit, flush
                seen.append("stopped cleanly")
            except asyncio.CancelledError:
                seen.append("cancelled halfway")
                raise

    stop = asyncio.Event()
    runner = asyncio.create_task(_run(main, stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(runner, 5)
    assert seen == ["stopped cleanly"]


async def test_a_stop_that_never_ends_is_cancelled_after_the_grace() -> None:
    cancelled = asyncio.Event()

    async def main(ctx: runtime.ServiceContext, stop: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()  # ignores stop
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stop = asyncio.Event()
    with mock.patch.object(runtime, "MAIN_STOP_S", 0.1):
        runner = asyncio.create_task(_run(main, stop))
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(runner, 5)
    assert cancelled.is_set()


async def test_an_error_in_the_stop_is_reported() -> None:
    async def main(ctx: runtime.ServiceContext, stop: asyncio.Event) -> None:
        await stop.wait()
        await asyncio.sleep(0)
        raise RuntimeError("commit failed")

    stop = asyncio.Event()
    runner = asyncio.create_task(_run(main, stop))
    await asyncio.sleep(0.05)
    stop.set()
    with pytest.raises(RuntimeError, match="commit failed"):
        await asyncio.wait_for(runner, 5)
