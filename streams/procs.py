"""Who a pid is: what a file naming a local process records, so that a reader can tell the
process it names from whatever took its pid (or its port) since."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["process_start", "still_running"]


def process_start(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot) and whose it is, as ``ticks:uid``; ""
    where /proc does not say (then only the pid can be checked). A recycled pid never has
    the same start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = stat[stat.rindex(")") + 2 :].split()[19]  # field 22, after the name
        return f"{ticks}:{Path(f'/proc/{pid}').stat().st_uid}"
    except (OSError, ValueError, IndexError):
        return ""


def still_running(pid: int, started: str) -> bool:
    """Whether the process a file recorded as ``pid`` started at ``started`` (see
    :func:`process_start`) still runs; without a start time, whether ``pid`` runs as this
    user."""
    if pid <= 0:
        return False
    now = process_start(pid)
    if started and now:
        return now == started
    if now:
        return now.endswith(f":{os.getuid()}")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's
    return True
