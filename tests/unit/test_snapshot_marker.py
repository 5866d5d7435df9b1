"""The mark a snapshot's restore leaves while it runs: a start finding one of a process
that is gone skips that snapshot (its restore killed the process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streams.procs import process_start
from streams.snapshots import _killed_restoring, _mark


def test_a_mark_of_a_live_restore_is_not_one_of_a_dead_one(tmp_path: Path) -> None:
    marker = tmp_path / "m.restoring"
    assert not _killed_restoring(marker)  # none
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        marker.write_text(f"{other.pid}\n{process_start(other.pid)}\n")
        assert not _killed_restoring(marker)  # another instance restoring it now
    finally:
        other.kill()
        other.wait()
    assert _killed_restoring(marker)  # it died


def test_our_own_pid_in_a_mark_is_an_earlier_process_that_died(tmp_path: Path) -> None:
    # In a container every start is pid 1: the process that died restoring a snapshot had
    # our pid, and the mark read "alive" to every later start, which restored it again.
    marker = tmp_path / "m.restoring"
    marker.write_text(f"{os.getpid()}\n1:{os.getuid()}\n")
    assert _killed_restoring(marker)
    marker.write_text(f"{os.getpid()}\n")  # a mark without a start time: the same
    assert _killed_restoring(marker)
    # A pid that came round to an unrelated live process: its start time differs.
    marker.write_text(f"{os.getppid()}\n1:0\n")
    assert _killed_restoring(marker)
    _mark(marker)
    assert marker.read_text().split("\n")[:2] == [str(os.getpid()), process_start(os.getpid())]
    marker.write_text("not a pid\n")
    assert _killed_restoring(marker)
