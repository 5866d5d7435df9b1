"""`orchestrator sql` and `metrics`: the event log, through the analytics query server."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.text import Text

from services.cli.common import (
    EXIT_INVALID,
    JsonOpt,
    fail,
    out,
    parse_duration,
    print_json,
    visible,
)
from services.cli.dashboard import compute_metrics, format_metrics
from streams.errors import StoreError
from streams.sql import FORMATS, RemoteQueries, query_sql

__all__ = ["metrics", "sql"]


def sql(
    query: Annotated[
        str, typer.Argument(help="One ClickHouse SELECT (or DESCRIBE) over the event log.")
    ],
    fmt: Annotated[str, typer.Option("--format", help="table, json, csv or tsv.")] = "table",
) -> None:
    """Query the event log: one SELECT of its tables and views, within limits; files, URLs,
    system tables, settings and writes are refused (docs/architecture.md)."""
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}", EXIT_INVALID)
    try:
        text = query_sql(query, fmt)
    except StoreError as exc:
        fail(str(exc))
    # ClickHouse renders the result; it goes out as it is, never through rich markup, but
    # with what the terminal would act on (stored text may hold anything) as escapes. Its
    # JSON escapes C0 controls itself; there C1 and bidirectional ones become \u009b, so
    # that the values read back the same.
    text = visible(text, as_json=fmt == "json")
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


def metrics(
    as_json: JsonOpt = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Only the last DURATION: 90s, 30m, 24h, 7d, 2w.")
    ] = None,
) -> None:
    """The platform dashboard, computed from the event log."""
    try:
        window = parse_duration(since) if since is not None else None
    except ValueError as exc:
        fail(f"--since: {exc}", EXIT_INVALID, as_json=as_json)
    source = RemoteQueries()
    try:
        result = compute_metrics(source, since=window)
    except StoreError as exc:
        fail(str(exc), as_json=as_json)
    finally:
        source.close()
    if as_json:
        print_json(result)
    else:
        out.print(Text(format_metrics(result)), soft_wrap=True)
