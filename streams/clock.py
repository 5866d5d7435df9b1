"""The clock seam: domain logic takes a Clock, tests move a FakeClock instead of sleeping."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "FakeClock", "OffsetFileClock", "SystemClock", "clock_from_env", "utc_day"]


class Clock(Protocol):
    """Wall time for budgets and idle timeouts; monotonic time for latencies."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def set(self, when: datetime) -> None:
        delta = (when - self._now).total_seconds()
        self._now = when
        self._mono += max(delta, 0.0)


def utc_day(when: datetime) -> str:
    """The UTC calendar day a budget window belongs to, as YYYY-MM-DD."""
    return when.astimezone(UTC).strftime("%Y-%m-%d")


class OffsetFileClock:
    """System time plus an offset (seconds) read from a file.

    Lets a test move the clock of services running in other processes: write a
    number of seconds to the file and every service reading it jumps ahead.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._mtime = -1.0
        self._offset = 0.0

    def _current_offset(self) -> float:
        import os

        try:
            mtime = os.stat(self._path).st_mtime
        except FileNotFoundError:
            return 0.0
        if mtime != self._mtime:
            with open(self._path, encoding="utf-8") as fh:
                text = fh.read().strip()
            self._offset = float(text) if text else 0.0
            self._mtime = mtime
        return self._offset

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self._current_offset())

    def monotonic(self) -> float:
        return time.monotonic() + self._current_offset()


def clock_from_env() -> Clock:
    """``ORCH_CLOCK_FILE`` set: an :class:`OffsetFileClock`; else the system clock."""
    from streams.config import ProcessSettings

    path: str | None = ProcessSettings.read("clock_file")
    return OffsetFileClock(path) if path else SystemClock()
