"""Waiting for what a test reads: polled until a deadline, never a fixed sleep that
assumes it came (a loaded CI machine can be several times slower than a laptop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Return once ``check()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(0.02)
