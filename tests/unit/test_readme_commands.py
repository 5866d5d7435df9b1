"""README's command table and `orchestrator --help` name the same commands."""

from __future__ import annotations

import re

import typer.main

from services.cli.main import app
from streams.config import ROOT


def _readme_commands() -> set[tuple[str, ...]]:
    """Every `orchestrator CMD [SUB]` that starts a row of the "## Commands" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `orchestrator ([a-z-]+)((?: [a-z-]+)?)", section, re.M)
    assert rows, "no command table under README's ## Commands"
    return {(cmd, *sub.split()) for cmd, sub in rows}


def _cli_commands() -> set[tuple[str, ...]]:
    # Typer's groups are not click's (it carries its own click), so look for subcommands.
    out: set[tuple[str, ...]] = set()
    for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
        subcommands = getattr(command, "commands", None)
        if subcommands:
            out.update((name, sub) for sub in subcommands)
        else:
            out.add((name,))
    return out


def test_readme_lists_exactly_the_cli_commands():
    readme = _readme_commands()
    cli = _cli_commands()
    # A plain command's row may name a first argument (`improve approve`): fold those.
    shown = {row[:1] if row[:1] in cli else row for row in readme}
    missing, extra = sorted(cli - shown), sorted(shown - cli)
    assert shown == cli, f"only in README: {extra}; only in `orchestrator --help`: {missing}"
