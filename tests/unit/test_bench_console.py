"""A bench's table written to a file keeps every cell (rich cut them to "0.8…" at 80 columns)."""

from __future__ import annotations

import io

import pytest
from rich.table import Table

from bench._console import FILE_WIDTH, console


def _wide_table() -> Table:
    table = Table(title="last 500 requests")
    for name in ("run", "reward", "of oracle", "of upper bound", "quality of strong"):
        table.add_column(name)
    for col in range(6):
        table.add_column(f"column number {col}")
    table.add_row("learned", "0.8251", "103.4%", "95.2%", "98.1%", *(f"{i}.123" for i in range(6)))
    return table


@pytest.mark.parametrize("stderr", [False, True])
def test_a_file_gets_the_whole_table(monkeypatch: pytest.MonkeyPatch, stderr: bool) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr" if stderr else "sys.stdout", out)
    con = console(stderr=stderr)
    assert con.width == FILE_WIDTH
    con.print(_wide_table())
    text = out.getvalue()
    assert "…" not in text
    for cell in ("learned", "0.8251", "103.4%", "95.2%", "98.1%", "5.123", "of upper bound"):
        assert cell in text
    assert max(len(line) for line in text.splitlines()) <= FILE_WIDTH
