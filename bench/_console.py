"""The benches' consoles: a pipe or a log file gets tables wide enough to keep every cell.

rich gives a console that writes to no terminal 80 columns, and a table wider than that
cuts its cells to "0.8…": a bench's numbers saved with ``> out.txt`` were lost.
"""

from __future__ import annotations

import sys

from rich.console import Console

# Wide enough for the widest bench table on one line (the learning bench's last-500 table).
FILE_WIDTH = 240


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr): the terminal's width, or FILE_WIDTH on a file."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else FILE_WIDTH)
