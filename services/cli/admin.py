"""`orchestrator keys` and `budget`: an operator's API keys and goals' budgets."""

from __future__ import annotations

import math
import re
import sys
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from services.cli.common import (
    EXIT_INVALID,
    JsonOpt,
    checked_id,
    err,
    fail,
    kafka_settings,
    out,
    print_json,
    require_kafka,
    run,
    with_client,
)
from streams.budgets import read_budget
from streams.client import OrchestratorClient, invalid_request
from streams.errors import InvalidRequest, NotOperator
from streams.events import (
    ApiKeyIssued,
    ApiKeyRevoked,
    BudgetUpdateRequested,
    Role,
)
from streams.keys import read_keys

__all__ = ["budget_app", "keys_app"]

budget_app = typer.Typer(help="Show or change a goal's budget.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the HTTP surfaces.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    goal: Annotated[str, typer.Option("--goal", help="The goal the key speaks for.")],
    user: Annotated[str, typer.Option("--user", help="The user the key speaks for.")],
    role: Annotated[str, typer.Option("--role", help="user or operator.")] = "user",
    label: Annotated[str, typer.Option("--label", help="A note for `keys list`.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create an API key; it is printed once (last line, or `key` in JSON) and stored hashed."""
    goal = checked_id(goal, "--goal", as_json=as_json)
    user = checked_id(user, "--user", as_json=as_json)
    if role not in ("user", "operator"):
        fail(f"--role must be user or operator, not {role!r}", EXIT_INVALID, as_json=as_json)
    settings = kafka_settings()
    chosen: Role = "operator" if role == "operator" else "user"

    async def send(client: OrchestratorClient) -> tuple[str, ApiKeyIssued]:
        return await client.create_key(goal, user, chosen, label=label)

    try:
        key, event = run(with_client(settings, send), settings, as_json=as_json)
    except InvalidRequest as exc:
        fail(str(exc), EXIT_INVALID, as_json=as_json, error_type="InvalidRequest")
    if as_json:
        print_json(
            {"key_id": event.key_id, "goal_id": goal, "user_id": user, "role": role, "key": key}
        )
        return
    err.print(
        f"key {event.key_id} for user {escape(user)} of goal {escape(goal)} ({role});"
        " it is shown once, keep it now:"
    )
    sys.stdout.write(key + "\n")


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False) -> None:
    """Every API key (never the key itself), with who it speaks for and whether it is revoked."""
    settings = kafka_settings()
    require_kafka(settings, as_json=as_json)

    rows = run(read_keys(settings), settings, as_json=as_json).listing()
    if as_json:
        print_json(rows)
        return
    out.print(keys_table(rows))


def keys_table(rows: list[dict[str, object]]) -> Table:
    """``keys list`` as a table."""
    table = Table(title=f"API keys ({len(rows)})")
    # The id is what `keys revoke` takes: never cut short, whatever the terminal's width.
    table.add_column("key id", no_wrap=True, min_width=16)
    for column in ("goal", "user", "role", "label", "created", "revoked"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            *(
                escape(str(r[k] or ""))  # a label is free text: shown, not read as markup
                for k in (
                    "key_id",
                    "goal_id",
                    "user_id",
                    "role",
                    "label",
                    "created_at",
                    "revoked_at",
                )
            )
        )
    return table


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (from `keys list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke an API key for good; HTTP surfaces refuse it as soon as they read the event."""
    if not re.fullmatch(r"[0-9a-f]{16}", key_id):
        fail(f"not a key id: {key_id!r} (16 hex digits)", EXIT_INVALID, as_json=as_json)
    settings = kafka_settings()

    async def send(client: OrchestratorClient) -> ApiKeyRevoked:
        return await client.revoke_key(key_id)

    try:
        run(with_client(settings, send), settings, as_json=as_json)
    except InvalidRequest as exc:
        fail(str(exc), EXIT_INVALID, as_json=as_json, error_type="InvalidRequest")
    if as_json:
        print_json({"revoked": True, "key_id": key_id})
    else:
        out.print(f"key {key_id} revoked")


@budget_app.command("show")
def budget_show(
    goal: Annotated[str, typer.Argument(help="Goal id.")],
    as_json: JsonOpt = False,
) -> None:
    """A goal's limits and what it uses now."""
    goal = checked_id(goal, "goal", as_json=as_json)
    settings = kafka_settings()
    require_kafka(settings, as_json=as_json)
    budget = run(read_budget(settings, goal), settings, as_json=as_json)
    if as_json:
        print_json(budget)
        return
    if budget is None:
        out.print(
            f"goal {goal}: no budget state yet (the budget service has not seen it; defaults apply)"
        )
        return
    table = Table(title=f"budget of {goal}", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in budget.items():
        if key != "goal_id":
            table.add_row(key, str(value))
    out.print(table)


@budget_app.command("set")
def budget_set(
    goal: Annotated[str, typer.Argument(help="Goal id.")],
    max_agents: Annotated[int | None, typer.Option(help="Agents the goal may have.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Tasks running at once.")] = None,
    max_daily_cost: Annotated[float | None, typer.Option(help="USD per UTC day.")] = None,
    cost_weight: Annotated[
        float | None,
        typer.Option(
            help="Quality (0-1) the goal gives up per USD of an answer: the router picks the"
            " specialty and model with the best quality - W x cost (0: quality only).",
        ),
    ] = None,
    as_user: Annotated[
        str | None,
        typer.Option(
            "--as",
            help="The operator asking (default $ORCH_OPERATOR_USER, else `operator`); the budget"
            " service applies changes from operators only (ORCH_OPERATORS or an operator key).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a goal's limits (sent as an event; the budget service applies it).

    Exit 0 sent, 1 refused (the user is not an operator), 2 invalid."""
    given = {
        "max_agents": max_agents,
        "max_concurrent": max_concurrent,
        "max_daily_cost": max_daily_cost,
        "cost_weight": cost_weight,
    }
    limits = {k: v for k, v in given.items() if v is not None}
    if not limits:
        fail(
            "nothing to set: give --max-agents, --max-concurrent, --max-daily-cost and/or"
            " --cost-weight",
            EXIT_INVALID,
            as_json=as_json,
        )
    for key, value in limits.items():
        if not 0 <= value < math.inf:  # NaN fails this too
            fail(
                f"--{key.replace('_', '-')} must be a finite number >= 0, got {value:g}",
                EXIT_INVALID,
                as_json=as_json,
            )
    goal = checked_id(goal, "goal", as_json=as_json)
    try:
        BudgetUpdateRequested.model_validate({"source": "cli", "goal_id": goal, **limits})
    except ValidationError as exc:
        fail(f"invalid budget: {invalid_request(exc)}", EXIT_INVALID, as_json=as_json)
    settings = kafka_settings()

    async def send(client: OrchestratorClient) -> BudgetUpdateRequested:
        asked: dict[str, Any] = dict(limits)
        return await client.set_budget(goal, user_id=as_user, **asked)

    try:
        event = run(with_client(settings, send), settings, as_json=as_json)
    except NotOperator as exc:
        fail(str(exc), as_json=as_json, error_type="NotOperator")
    if as_json:
        print_json({"sent": True, "event_id": event.event_id, "goal_id": goal, **limits})
    else:
        shown = ", ".join(f"{k}={v:g}" for k, v in limits.items())
        out.print(f"budget update for {goal} sent: {shown}")
