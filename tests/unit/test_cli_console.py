"""The CLI's consoles look at the terminal when they print, not when the CLI was imported.

A program that imports the CLI and then changes its output (typer's CliRunner, an app
that redirects stdout, a terminal resized under the long-lived ``orchestrator up``) must
get the width and colours of that output: not a table cut to the 80 columns the terminal
had at import, nor colour codes written into a file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from types import ModuleType
from typing import Any

import pytest
from rich.table import Table
from rich.text import Text
from typer.testing import CliRunner

from services.cli import common
from services.cli import main as cli

WIDE = "w" * 150 + "-end"


def imported_with(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    """A copy of services/cli/common.py imported while ``env`` was set, then unset again:
    the CLI as a program that imported it before changing its output has it."""
    with monkeypatch.context() as at_import:
        for name, value in env.items():
            at_import.setenv(name, value)
        spec = importlib.util.spec_from_file_location("_cli_common_copy", common.__file__)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def wide_table() -> Table:
    table = Table("name")
    table.add_column("id", no_wrap=True)  # cut with an ellipsis when the console is narrow
    table.add_row(Text("a name", style="bold red"), WIDE)
    return table


def printed_to_a_file(output: Any) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        output.print(wide_table())
    return buffer.getvalue()


def test_a_file_gets_the_width_and_no_colour_of_the_file_not_of_the_terminal_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Imported on an 80-column colour terminal; then stdout goes to a file, COLUMNS=200.
    copy = imported_with(monkeypatch, COLUMNS="80", FORCE_COLOR="1", TERM="xterm-256color")
    monkeypatch.setenv("COLUMNS", "200")
    printed = printed_to_a_file(copy.out)
    assert WIDE in printed, printed
    assert "\x1b" not in printed, repr(printed)


def test_no_color_set_after_import_is_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    copy = imported_with(monkeypatch, FORCE_COLOR="1", TERM="xterm-256color")
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    assert "\x1b[" in printed_to_a_file(copy.out)  # still a terminal: rich's own styles
    monkeypatch.setenv("NO_COLOR", "1")
    printed = printed_to_a_file(copy.out)
    assert "31m" not in printed and "a name" in printed, repr(printed)


def test_force_color_set_after_import_is_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    copy = imported_with(monkeypatch, TTY_COMPATIBLE="0")  # imported with no terminal
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "200")
    assert "\x1b[1;31ma name" in printed_to_a_file(copy.out)


def test_a_terminal_resized_between_two_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    copy = imported_with(monkeypatch)
    monkeypatch.setenv("COLUMNS", "60")
    assert WIDE not in printed_to_a_file(copy.out)
    monkeypatch.setenv("COLUMNS", "200")
    assert WIDE in printed_to_a_file(copy.out)


def test_errors_go_to_the_stderr_of_the_time_of_printing(monkeypatch: pytest.MonkeyPatch) -> None:
    copy = imported_with(monkeypatch, COLUMNS="80", FORCE_COLOR="1", TERM="xterm-256color")
    monkeypatch.setenv("COLUMNS", "200")
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        copy.err.print(wide_table())
    assert WIDE in buffer.getvalue() and "\x1b" not in buffer.getvalue()


def test_the_runners_environment_reaches_the_clis_own_output() -> None:
    """The CLI itself, imported by this test run, under CliRunner's environment."""
    runner = CliRunner()
    bad_duration = ["metrics", "--since", "soon"]
    colour = runner.invoke(cli.app, bad_duration, env={"FORCE_COLOR": "1", "TERM": "xterm"})
    assert colour.exit_code == common.EXIT_INVALID
    assert "\x1b[1;31merror:" in colour.stderr, repr(colour.stderr)
    plain = runner.invoke(cli.app, bad_duration, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "31m" not in plain.stderr and "error:" in plain.stderr, repr(plain.stderr)


def test_stored_text_is_still_shown_not_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    copy = imported_with(monkeypatch)
    monkeypatch.setenv("FORCE_COLOR", "1")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        copy.out.print(Text("\x1b]0;pwned\x07 title"))
    assert "\\x1b]0;pwned" in buffer.getvalue() and "\x1b]0" not in buffer.getvalue()
