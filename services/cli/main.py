"""The `orchestrator` command line: run the platform, ask it, inspect it, tune budgets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from local.localkafka import LocalKafkaError, ensure_broker, kafka_answers, stop_broker
from services.cli.bench_learning import bench_app
from services.cli.demo import demo_command
from services.cli.status import PlatformStatus, collect_status, wait_until_joined
from services.cli.supervisor import (
    ChildSpec,
    Supervisor,
    SupervisorError,
    available_services,
    fake_llm_spec,
    known_services,
    read_state,
    service_module,
    service_spec,
    spawn_detached,
    stop_recorded,
    supervisor_pid,
)
from services.cli.workflows import workflows_app
from streams.client import Answer, OrchestratorClient, invalid_request
from streams.errors import (
    BudgetExceededError,
    InvalidRequest,
    LLMFailure,
    NoVerdict,
    OrchestratorError,
    Refused,
    RunFailed,
    RunTimeout,
    StoreError,
)
from streams.events import (
    ApiKeyIssued,
    ApiKeyRevoked,
    BudgetUpdateRequested,
    FeedbackDecided,
    FeedbackReceived,
    PromotionDecided,
    Role,
    validate_identifier,
)
from streams.kafka import KafkaSettings
from streams.keys import KeyRegistry
from streams.registry import RegistryView, read_topics_to_end
from streams.topics import create_topics

__all__ = ["app"]

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_TIMEOUT = 3

T = TypeVar("T")

app = typer.Typer(
    name="orchestrator",
    help="Self-improving LLM agent orchestrator on Kafka.",
    no_args_is_help=True,
    add_completion=False,
)
budget_app = typer.Typer(help="Show or change a goal's budget.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")
keys_app = typer.Typer(help="API keys of the HTTP surfaces.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON only.")]


@app.callback()
def _setup() -> None:
    # aiokafka logs every retry while the CLI already reports what failed, in one line.
    for name in ("aiokafka", "kafka", "faust", "mode"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# -- output helpers ---------------------------------------------------------------------


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _fail(
    message: str, code: int = EXIT_FAILED, *, as_json: bool = False, **extra: Any
) -> NoReturn:
    if as_json:
        _print_json({"error": message, **extra})
    else:
        _err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _run(coro: Coroutine[Any, Any, T], settings: KafkaSettings, *, as_json: bool = False) -> T:
    """Run ``coro``; a broker that cannot be reached ends the command with one clear line."""
    try:
        return asyncio.run(coro)
    except (typer.Exit, OrchestratorError):
        raise  # the command's own outcome (RunTimeout is an OSError too)
    except (KafkaError, OSError) as exc:
        _unreachable(settings, f" ({exc})", as_json=as_json)
    except RuntimeError as exc:  # the SDK's word for "the topics are not there"
        _fail(f"{exc} (or start the platform: `orchestrator up`)", as_json=as_json)


def _settings() -> KafkaSettings:
    return KafkaSettings.from_env()


def _require_kafka(settings: KafkaSettings, *, as_json: bool) -> None:
    # The registry and budget readers would leave half-started clients behind (and
    # their warnings) on a broker that is not there; one cheap probe first.
    if not kafka_answers(settings.bootstrap, timeout=3.0):
        _unreachable(settings, "", as_json=as_json)


def _unreachable(settings: KafkaSettings, detail: str, *, as_json: bool) -> NoReturn:
    _fail(
        f"cannot reach Kafka at {settings.bootstrap}{detail}; is the platform up? "
        "(`orchestrator up`)",
        as_json=as_json,
    )


def _checked_id(value: str, what: str, *, as_json: bool = False) -> str:
    try:
        return validate_identifier(value)
    except ValueError as exc:
        _fail(f"{what}: {exc}", EXIT_INVALID, as_json=as_json)


# -- running the platform -----------------------------------------------------------------


def _select_services(only: str | None) -> list[str]:
    runnable = available_services()
    if only is None:
        if not runnable:
            _fail("no service can run yet: no package under services/ has a __main__")
        return runnable
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = known_services()
    for name in wanted:
        if name not in known:
            _fail(f"unknown service {name!r}; valid: {', '.join(runnable)}", EXIT_INVALID)
        if name not in runnable:
            _fail(f"service {name!r} cannot run yet (no {service_module(name)}.__main__)")
    # Start order stays the platform's, whatever order --only lists.
    return [n for n in runnable if n in wanted]


def _prepare_kafka(settings: KafkaSettings) -> None:
    try:
        bootstrap = ensure_broker()
        asyncio.run(create_topics(bootstrap, prefix=settings.prefix))
    except LocalKafkaError as exc:
        _fail(str(exc))
    except (KafkaError, OSError) as exc:
        _fail(f"cannot create topics on {settings.bootstrap}: {exc}")


def _print_running(state: dict[str, Any], settings: KafkaSettings) -> None:
    table = Table(title="orchestrator: running")
    for column in ("process", "pid", "log"):
        table.add_column(column)
    for child in state["children"]:
        table.add_row(child["name"], str(child["pid"]), child["log"])
    _out.print(table)
    _out.print(f"kafka: {settings.bootstrap}   data: {state['data_dir']}")
    if state.get("llm_url"):
        _out.print(f"fake LLM: {state['llm_url']}")


def _report(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    # One event, one line, whatever the width: these lines end up in log files.
    _out.print(f"[dim]{stamp}[/] {escape(message)}", soft_wrap=True)


@app.command()
def up(
    fake_llm: Annotated[
        bool, typer.Option("--fake-llm", help="Also run the fake OpenAI-compatible server.")
    ] = False,
    only: Annotated[
        str | None, typer.Option("--only", help="Comma-separated services to run.")
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Start in the background and return.")
    ] = False,
    wait: Annotated[
        float,
        typer.Option(help="With --detach: seconds to wait for every service to join its group."),
    ] = 60.0,
    stop_timeout: Annotated[
        float, typer.Option(help="Seconds a child gets after SIGTERM before SIGKILL.")
    ] = 15.0,
) -> None:
    """Start Kafka (unless KAFKA_BOOTSTRAP_SERVERS is set), the topics and every service."""
    names = _select_services(only)
    running = supervisor_pid()
    if running is not None:
        _fail(f"the platform already runs (supervisor pid {running}); `orchestrator down` first")
    specs: list[ChildSpec] = []
    try:
        if fake_llm:
            specs.append(fake_llm_spec())
    except SupervisorError as exc:
        _fail(str(exc))
    specs.extend(service_spec(n) for n in names)
    settings = _settings()
    _prepare_kafka(settings)
    if not fake_llm and not _llm_configured():
        _err.print(
            "[yellow]no LLM configured[/] (OPENAI_BASE_URL / OPENAI_API_KEY unset): the platform "
            "runs [bold]degraded[/]; answers come from the lower tiers and say which. "
            "Use --fake-llm for a local fake endpoint.",
            soft_wrap=True,
        )
    if detach:
        argv = [sys.executable, "-m", "services.cli.main", "up", "--only", ",".join(names)]
        argv += ["--fake-llm"] if fake_llm else []
        argv += ["--stop-timeout", str(stop_timeout)]
        try:
            state = spawn_detached(argv)
        except SupervisorError as exc:
            _fail(str(exc))
        _print_running(state, settings)
        _await_services(settings, names, wait)
        _out.print(
            f"supervisor pid {state['pid']} runs in the background; `orchestrator down` stops it"
        )
        return
    supervisor = Supervisor(specs, report=_report, stop_timeout=stop_timeout)
    try:
        code = supervisor.run(on_started=lambda s: _on_started(s, settings))
    except SupervisorError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def _await_services(settings: KafkaSettings, names: list[str], timeout: float) -> None:
    # Scripts ask right after `up --detach`: return once every service consumes.
    if timeout <= 0:
        return
    try:
        missing = wait_until_joined(settings, names, timeout)
    except (KafkaError, OSError) as exc:
        _err.print(f"[yellow]could not check the services' groups:[/] {escape(str(exc))}")
        return
    if missing:
        _err.print(
            f"[yellow]not consuming after {timeout:g}s:[/] {', '.join(missing)} "
            "(see their logs; the supervisor restarts them if they crash)"
        )
    else:
        _out.print("every service has joined its consumer group")


def _on_started(state: dict[str, Any], settings: KafkaSettings) -> None:
    _print_running(state, settings)
    _out.print("supervising; Ctrl-C stops everything")


def _llm_configured() -> bool:
    # Imported here: the openai package takes most of a second to import.
    from streams.llm import LLMSettings

    try:
        return LLMSettings.from_env().configured
    except ValueError:
        return False


@app.command()
def down(
    keep_broker: Annotated[
        bool, typer.Option("--keep-broker", help="Leave the local Kafka broker running.")
    ] = False,
) -> None:
    """Stop the services started by `up`, then the local broker."""
    stopped = stop_recorded(report=_report)
    if not stopped:
        _out.print("no orchestrator process was running")
    if keep_broker or os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return
    try:
        was_running = stop_broker()
    except LocalKafkaError as exc:
        _fail(str(exc))
    _out.print("kafka broker stopped" if was_running else "no local kafka broker was running")


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Services alive (consumer-group members), their lag, active agents, the broker."""
    settings = _settings()
    runnable = set(available_services())
    services = [(n, n in runnable) for n in known_services()]
    try:
        result = collect_status(settings, services, supervisor=read_state())
    except (KafkaError, OSError) as exc:
        _fail(f"kafka at {settings.bootstrap} did not answer in time: {exc}", as_json=as_json)
    if as_json:
        _print_json(result.to_json())
    else:
        _print_status(result)
    if not result.broker_answers:
        raise typer.Exit(EXIT_FAILED)


def _print_status(result: PlatformStatus) -> None:
    broker = "[green]answers[/]" if result.broker_answers else "[red]does not answer[/]"
    _out.print(f"kafka {result.bootstrap}: {broker}")
    table = Table(title="services")
    for column in ("service", "state", "instances", "lag", "local pid", "restarts"):
        table.add_column(column, justify="right" if column != "service" else "left")
    colours = {"running": "green", "starting": "yellow", "stopped": "red"}
    for svc in result.services:
        colour = colours.get(svc.state, "dim")
        table.add_row(
            svc.name,
            f"[{colour}]{svc.state}[/]",
            str(svc.instances),
            "-" if svc.lag is None else str(svc.lag),
            "-" if svc.pid is None else str(svc.pid),
            str(svc.restarts),
        )
    _out.print(table)
    if result.active_agents is not None:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(result.agents_by_specialty.items()))
        _out.print(f"active agents: {result.active_agents}" + (f" ({detail})" if detail else ""))
    if result.supervisor_pid is not None:
        _out.print(f"local supervisor pid {result.supervisor_pid}")
    if result.llm_url:
        _out.print(f"fake LLM: {result.llm_url}")
    for url in result.gateway_urls:
        _out.print(f"OpenAI-compatible gateway: {url}")


@app.command()
def service(name: Annotated[str, typer.Argument(help="The service to run.")]) -> None:
    """Run one service in the foreground (the way to add instances of a consumer)."""
    runnable = available_services()
    if name not in runnable:
        planned = "" if name not in known_services() else " (it has no __main__ yet)"
        _fail(
            f"unknown service {name!r}{planned}; valid: {', '.join(runnable) or 'none yet'}",
            EXIT_INVALID,
        )
    module = service_module(name)
    os.execv(sys.executable, [sys.executable, "-m", module])


# -- asking -------------------------------------------------------------------------------


def _parse_context(pairs: Sequence[str], as_json: bool) -> dict[str, str]:
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--context wants key=value, got {pair!r}", EXIT_INVALID, as_json=as_json)
        context[key.strip()] = value
    return context


def _failure_line(exc: RunFailed) -> str:
    if isinstance(exc, BudgetExceededError):
        return f"budget exceeded: {exc.limit or 'limit'} — {exc.detail}"
    if isinstance(exc, LLMFailure):
        return f"LLM failure — {exc.detail}"
    return f"{exc.reason.replace('_', ' ')}: {exc.detail}"


async def _ask(
    settings: KafkaSettings,
    message: str,
    goal: str,
    user: str,
    context: dict[str, str],
    timeout: float,
) -> Answer:
    client = OrchestratorClient(settings, source="cli")
    try:
        # Validation first, so bad input is refused before any connection is made.
        client.request(message, goal_id=goal, user_id=user, context=context, timeout=timeout)
        await client.start()
        return await client.ask(
            message, goal_id=goal, user_id=user, context=context, timeout=timeout
        )
    finally:
        await client.close()


async def _with_client(
    settings: KafkaSettings, action: Callable[[OrchestratorClient], Awaitable[T]]
) -> T:
    client = OrchestratorClient(settings, source="cli")
    try:
        await client.start()
        return await action(client)
    finally:
        # Also after a failed start: `async with` would not close what start half-opened.
        await client.close()


@app.command()
def ask(
    message: Annotated[str, typer.Argument(help="What to ask.")],
    goal: Annotated[str, typer.Option("--goal", help="Goal id the request counts against.")],
    user: Annotated[str, typer.Option("--user", help="Who asks.")],
    context: Annotated[
        list[str] | None, typer.Option("--context", help="key=value, repeatable.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Ask the platform and print the answer (exit 1 failed run, 2 bad input, 3 timeout)."""
    ctx = _parse_context(context or [], as_json)
    if timeout <= 0:
        _fail("--timeout must be positive", EXIT_INVALID, as_json=as_json)
    settings = _settings()
    try:
        answer = _run(_ask(settings, message, goal, user, ctx, timeout), settings, as_json=as_json)
    except InvalidRequest as exc:
        _fail(f"invalid request: {exc}", EXIT_INVALID, as_json=as_json)
    except RunTimeout as exc:
        _fail(
            f"timeout: no answer within {exc.timeout:g}s (run {exc.run_id})",
            EXIT_TIMEOUT,
            as_json=as_json,
            run_id=exc.run_id,
        )
    except RunFailed as exc:
        _fail(
            _failure_line(exc),
            as_json=as_json,
            run_id=exc.run_id,
            reason=exc.reason,
            limit=exc.limit,
        )
    if as_json:
        _print_json(asdict(answer))
        return
    _out.print(Text(answer.text))
    meta = (
        f"agent {answer.agent_id or '-'} · {answer.specialty} · ${answer.cost_usd:.6f} · "
        f"{answer.latency_ms:.0f} ms · run {answer.run_id}"
    )
    _out.print(Text(meta, style="dim"))
    if answer.degradation_tier != "llm":
        _out.print(
            Text(
                f"degraded: answered by the {answer.degradation_tier} tier, not the LLM",
                style="bold yellow",
            )
        )


@app.command()
def improve(
    run_id: Annotated[
        str, typer.Argument(help="The run the feedback is about (or `approve`, see below).")
    ],
    text: Annotated[str, typer.Argument(help="What should be better (or the improvement id).")],
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            help="Who gives the feedback (required); for `approve`, the operator"
            " (default $ORCH_OPERATOR_USER, else `operator`).",
        ),
    ] = None,
    score: Annotated[int | None, typer.Option(min=1, max=5, help="1 (bad) to 5 (great).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the verdict.")] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Give feedback on a run (`/improve`) and print the improvement service's verdict.

    `orchestrator improve approve IMPROVEMENT_ID [--user OPERATOR]` makes a goal's
    improvement serve every goal (OPERATOR: in ORCH_OPERATORS or holding an operator key).
    Exit 0 when accepted, 1 when refused (the reason is printed), 3 with no verdict.
    """
    if run_id == "approve":
        _approve(text, user or os.environ.get("ORCH_OPERATOR_USER", "operator"), timeout, as_json)
        return
    if user is None:
        _fail("--user is required: who gives the feedback", EXIT_INVALID, as_json=as_json)
    if not run_id.strip():
        _fail("run id is empty", EXIT_INVALID, as_json=as_json)
    if not text.strip() and score is None:
        _fail("give feedback text or a --score", EXIT_INVALID, as_json=as_json)
    try:
        FeedbackReceived(source="cli", run_id=run_id, user_id=user, score=score, text=text)
    except ValidationError as exc:
        _fail(f"invalid feedback: {invalid_request(exc)}", EXIT_INVALID, as_json=as_json)
    settings = _settings()

    async def send(client: OrchestratorClient) -> FeedbackDecided:
        return await client.feedback(
            run_id, user_id=user, score=score, text=text, channel="cli", timeout=timeout
        )

    verdict = _decided(_with_client(settings, send), settings, as_json)
    if as_json:
        _print_json(
            {
                "accepted": True,
                "run_id": run_id,
                "reason": verdict.reason,
                "improvement_id": verdict.improvement_id,
                "event_id": verdict.feedback_id,
            }
        )
    else:
        _out.print(f"feedback on run {escape(run_id)} accepted: {escape(verdict.reason)}")


def _decided(coro: Coroutine[Any, Any, T], settings: KafkaSettings, as_json: bool) -> T:
    """Run a command that waits for a verdict; a refusal or silence ends the CLI non-zero."""
    try:
        return _run(coro, settings, as_json=as_json)
    except Refused as exc:
        _fail(f"refused: {exc}", EXIT_FAILED, as_json=as_json, error_type=type(exc).__name__)
    except NoVerdict as exc:
        _fail(str(exc), EXIT_TIMEOUT, as_json=as_json)


def _approve(improvement_id: str, user: str, timeout: float, as_json: bool) -> None:
    user = _checked_id(user, "--user", as_json=as_json)
    if not improvement_id.strip():
        _fail("give the improvement id to approve", EXIT_INVALID, as_json=as_json)
    settings = _settings()

    async def send(client: OrchestratorClient) -> PromotionDecided:
        return await client.approve(improvement_id, user_id=user, timeout=timeout)

    verdict = _decided(_with_client(settings, send), settings, as_json)
    if as_json:
        _print_json(
            {
                "accepted": True,
                "improvement_id": improvement_id,
                "workflow_id": verdict.workflow_id,
                "reason": verdict.reason,
            }
        )
    else:
        _out.print(f"approved: {escape(verdict.reason)}")


@keys_app.command("create")
def keys_create(
    goal: Annotated[str, typer.Option("--goal", help="The goal the key speaks for.")],
    user: Annotated[str, typer.Option("--user", help="The user the key speaks for.")],
    role: Annotated[str, typer.Option("--role", help="user or operator.")] = "user",
    label: Annotated[str, typer.Option("--label", help="A note for `keys list`.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create an API key; it is printed once (last line, or `key` in JSON) and stored hashed."""
    goal = _checked_id(goal, "--goal", as_json=as_json)
    user = _checked_id(user, "--user", as_json=as_json)
    if role not in ("user", "operator"):
        _fail(f"--role must be user or operator, not {role!r}", EXIT_INVALID, as_json=as_json)
    settings = _settings()
    chosen: Role = "operator" if role == "operator" else "user"

    async def send(client: OrchestratorClient) -> tuple[str, ApiKeyIssued]:
        return await client.create_key(goal, user, chosen, label=label)

    key, event = _run(_with_client(settings, send), settings, as_json=as_json)
    if as_json:
        _print_json(
            {"key_id": event.key_id, "goal_id": goal, "user_id": user, "role": role, "key": key}
        )
        return
    _err.print(
        f"key {event.key_id} for user {escape(user)} of goal {escape(goal)} ({role});"
        " it is shown once, keep it now:"
    )
    sys.stdout.write(key + "\n")


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False) -> None:
    """Every API key (never the key itself), with who it speaks for and whether it is revoked."""
    settings = _settings()
    _require_kafka(settings, as_json=as_json)

    async def load() -> KeyRegistry:
        registry = KeyRegistry()
        for event in await read_topics_to_end(settings, (ApiKeyIssued.topic, ApiKeyRevoked.topic)):
            registry.apply(event)
        return registry

    rows = _run(load(), settings, as_json=as_json).listing()
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"API keys ({len(rows)})")
    for column in ("key id", "goal", "user", "role", "label", "created", "revoked"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            *(
                str(r[k] or "")
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
    _out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (from `keys list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke an API key for good; HTTP surfaces refuse it as soon as they read the event."""
    if not re.fullmatch(r"[0-9a-f]{16}", key_id):
        _fail(f"not a key id: {key_id!r} (16 hex digits)", EXIT_INVALID, as_json=as_json)
    settings = _settings()

    async def send(client: OrchestratorClient) -> ApiKeyRevoked:
        return await client.revoke_key(key_id)

    _run(_with_client(settings, send), settings, as_json=as_json)
    if as_json:
        _print_json({"revoked": True, "key_id": key_id})
    else:
        _out.print(f"key {key_id} revoked")


# -- inspecting -----------------------------------------------------------------------------


@app.command()
def agents(
    as_json: JsonOpt = False,
    include_retired: Annotated[bool, typer.Option("--all", help="Include retired agents.")] = False,
) -> None:
    """The agents in the registry (live ones unless --all)."""
    settings = _settings()
    _require_kafka(settings, as_json=as_json)
    view = _run(RegistryView.load(settings), settings, as_json=as_json)
    records = list(view.agents.values()) if include_retired else view.live()
    records.sort(key=lambda a: (a.goal_id, a.specialty, a.spawned_at))
    if as_json:
        _print_json([asdict(a) for a in records])
        return
    table = Table(title=f"agents ({len(records)})")
    for column in (
        "agent",
        "goal",
        "specialty",
        "model",
        "temp",
        "tools",
        "prompt",
        "v",
        "spawned",
    ):
        table.add_column(column)
    for a in records:
        name = f"[dim]{a.agent_id} (retired)[/]" if a.retired else a.agent_id
        table.add_row(
            name,
            a.goal_id,
            a.specialty,
            a.model,
            f"{a.temperature:g}",
            ", ".join(a.tools),
            a.prompt_source,
            str(a.version),
            a.spawned_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    _out.print(table)


@budget_app.command("show")
def budget_show(
    goal: Annotated[str, typer.Argument(help="Goal id.")],
    as_json: JsonOpt = False,
) -> None:
    """A goal's limits and what it uses now."""
    goal = _checked_id(goal, "goal", as_json=as_json)
    settings = _settings()
    _require_kafka(settings, as_json=as_json)
    # Imported here: the budget view pulls in Faust, which most commands do not need.
    from services.budget.view import read_budget

    budget = _run(read_budget(settings, goal), settings, as_json=as_json)
    if as_json:
        _print_json(budget)
        return
    if budget is None:
        _out.print(
            f"goal {goal}: no budget state yet (the budget service has not seen it; defaults apply)"
        )
        return
    table = Table(title=f"budget of {goal}", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in budget.items():
        if key != "goal_id":
            table.add_row(key, str(value))
    _out.print(table)


@budget_app.command("set")
def budget_set(
    goal: Annotated[str, typer.Argument(help="Goal id.")],
    max_agents: Annotated[int | None, typer.Option(help="Agents the goal may have.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Tasks running at once.")] = None,
    max_daily_cost: Annotated[float | None, typer.Option(help="USD per UTC day.")] = None,
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
    """Change a goal's limits (sent as an event; the budget service applies it)."""
    given = {
        "max_agents": max_agents,
        "max_concurrent": max_concurrent,
        "max_daily_cost": max_daily_cost,
    }
    limits = {k: v for k, v in given.items() if v is not None}
    if not limits:
        _fail(
            "nothing to set: give --max-agents, --max-concurrent and/or --max-daily-cost",
            EXIT_INVALID,
            as_json=as_json,
        )
    for key, value in limits.items():
        if value < 0:
            _fail(
                f"--{key.replace('_', '-')} must be >= 0, got {value:g}",
                EXIT_INVALID,
                as_json=as_json,
            )
    goal = _checked_id(goal, "goal", as_json=as_json)
    try:
        BudgetUpdateRequested.model_validate({"source": "cli", "goal_id": goal, **limits})
    except ValidationError as exc:
        _fail(f"invalid budget: {invalid_request(exc)}", EXIT_INVALID, as_json=as_json)
    settings = _settings()

    async def send(client: OrchestratorClient) -> BudgetUpdateRequested:
        asked: dict[str, Any] = dict(limits)
        return await client.set_budget(goal, user_id=as_user, **asked)

    event = _run(_with_client(settings, send), settings, as_json=as_json)
    if as_json:
        _print_json({"sent": True, "event_id": event.event_id, "goal_id": goal, **limits})
    else:
        shown = ", ".join(f"{k}={v:g}" for k, v in limits.items())
        _out.print(f"budget update for {goal} sent: {shown}")


# -- analytics ------------------------------------------------------------------------------


@app.command()
def sql(
    query: Annotated[
        str, typer.Argument(help="One ClickHouse SELECT (or DESCRIBE) over the event log.")
    ],
    fmt: Annotated[str, typer.Option("--format", help="table, json, csv or tsv.")] = "table",
) -> None:
    """Query the event log: one SELECT of its tables and views, within limits; files, URLs,
    system tables, settings and writes are refused (docs/architecture.md)."""
    # Imported here: only these two commands need the analytics store.
    from services.analytics.query_server import FORMATS, query_sql

    if fmt not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}", EXIT_INVALID)
    try:
        text = query_sql(query, fmt)
    except StoreError as exc:
        _fail(str(exc))
    # ClickHouse renders the result; it goes out as it is, never through rich markup.
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


@app.command()
def metrics(
    as_json: JsonOpt = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Only the last DURATION: 90s, 30m, 24h, 7d, 2w.")
    ] = None,
) -> None:
    """The platform dashboard, computed from the event log."""
    from services.analytics.metrics import compute_metrics, format_metrics, parse_duration
    from services.analytics.query_server import query_source

    try:
        window = parse_duration(since) if since is not None else None
    except ValueError as exc:
        _fail(f"--since: {exc}", EXIT_INVALID, as_json=as_json)
    source = query_source()
    try:
        result = compute_metrics(source, since=window)
    except StoreError as exc:
        _fail(str(exc), as_json=as_json)
    finally:
        source.close()
    if as_json:
        _print_json(result)
    else:
        _out.print(Text(format_metrics(result)), soft_wrap=True)


# The learning benchmark, the demo and the workflow commands live in their own modules.
app.add_typer(bench_app, name="bench")
app.command("demo")(demo_command)
app.add_typer(workflows_app)  # versions, rollback, replay


if __name__ == "__main__":
    app()
