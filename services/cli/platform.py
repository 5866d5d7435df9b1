"""`orchestrator up`, `down`, `status`, `service` and `agents`: run the platform, see what runs."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from aiokafka.errors import KafkaError
from rich.markup import escape
from rich.table import Table

from local.environment import service_env
from local.localkafka import LocalKafkaError, ensure_broker, stop_broker
from local.platform import (
    ChildSpec,
    available_services,
    fake_llm_spec,
    known_services,
    service_module,
    service_spec,
)
from services.cli.common import (
    EXIT_FAILED,
    EXIT_INVALID,
    JsonOpt,
    err,
    fail,
    kafka_settings,
    out,
    print_json,
    require_kafka,
    run,
)
from services.cli.status import PlatformStatus, collect_status, wait_until_joined
from services.cli.supervisor import (
    Supervisor,
    SupervisorError,
    read_state,
    spawn_detached,
    stop_recorded,
    supervisor_pid,
)
from streams.config import BrokerAuthMissing, BrokerSettings, broker_env
from streams.kafka import KafkaSettings
from streams.registry import RegistryView
from streams.topics import create_topics

__all__ = ["agents", "down", "service", "status", "up"]


def _select_services(only: str | None) -> list[str]:
    runnable = available_services()
    if only is None:
        if not runnable:
            fail("no service can run yet: no package under services/ has a __main__")
        return runnable
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = known_services()
    for name in wanted:
        if name not in known:
            fail(f"unknown service {name!r}; valid: {', '.join(runnable)}", EXIT_INVALID)
        if name not in runnable:
            fail(f"service {name!r} cannot run yet (no {service_module(name)}.__main__)")
    # Start order stays the platform's, whatever order --only lists.
    return [n for n in runnable if n in wanted]


def _prepare_kafka(settings: KafkaSettings) -> None:
    try:
        bootstrap = ensure_broker()
        asyncio.run(create_topics(bootstrap, prefix=settings.prefix))
    except LocalKafkaError as exc:
        fail(str(exc))
    except (KafkaError, OSError) as exc:
        fail(f"cannot create topics on {settings.bootstrap}: {exc}")


def _print_running(state: dict[str, Any], settings: KafkaSettings) -> None:
    table = Table(title="orchestrator: running")
    for column in ("process", "pid", "log"):
        table.add_column(column)
    for child in state["children"]:
        table.add_row(child["name"], str(child["pid"]), child["log"])
    out.print(table)
    out.print(f"kafka: {settings.bootstrap}   data: {state['data_dir']}")
    if state.get("llm_url"):
        out.print(f"fake LLM: {state['llm_url']}")


def _report(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    # One event, one line, whatever the width: these lines end up in log files.
    out.print(f"[dim]{stamp}[/] {escape(message)}", soft_wrap=True)


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
        fail(f"the platform already runs (supervisor pid {running}); `orchestrator down` first")
    specs: list[ChildSpec] = []
    try:
        if fake_llm:
            specs.append(fake_llm_spec())
    except SupervisorError as exc:
        fail(str(exc))
    specs.extend(service_spec(n) for n in names)
    settings = kafka_settings()
    _prepare_kafka(settings)
    if not fake_llm and not _llm_configured():
        err.print(
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
            fail(str(exc))
        _print_running(state, settings)
        _await_services(settings, names, wait)
        out.print(
            f"supervisor pid {state['pid']} runs in the background; `orchestrator down` stops it"
        )
        return
    supervisor = Supervisor(specs, report=_report, stop_timeout=stop_timeout)
    try:
        code = supervisor.run(on_started=lambda s: _on_started(s, settings))
    except SupervisorError as exc:
        fail(str(exc))
    raise typer.Exit(code)


def _await_services(settings: KafkaSettings, names: list[str], timeout: float) -> None:
    # Scripts ask right after `up --detach`: return once every service consumes.
    if timeout <= 0:
        return
    try:
        # The gateway joins no consumer group (status counts the URLs that answer): it
        # was reported "not consuming" after every detached start.
        missing = wait_until_joined(settings, [n for n in names if n != "gateway"], timeout)
    except (KafkaError, OSError) as exc:
        err.print(f"[yellow]could not check the services' groups:[/] {escape(str(exc))}")
        return
    if missing:
        err.print(
            f"[yellow]not consuming after {timeout:g}s:[/] {', '.join(missing)} "
            "(see their logs; the supervisor restarts them if they crash)"
        )
    else:
        out.print("every service has joined its consumer group")


def _on_started(state: dict[str, Any], settings: KafkaSettings) -> None:
    _print_running(state, settings)
    out.print(
        "supervising; Ctrl-C stops the services (the local broker keeps running:"
        " `orchestrator down` stops it)"
    )


def _llm_configured() -> bool:
    # Imported here: the openai package takes most of a second to import.
    from streams.llm import LLMSettings

    try:
        return LLMSettings.from_env().configured
    except ValueError:
        return False


def down(
    keep_broker: Annotated[
        bool, typer.Option("--keep-broker", help="Leave the local Kafka broker running.")
    ] = False,
) -> None:
    """Stop the services started by `up`, then the local broker."""
    stopped = stop_recorded(report=_report)
    if not stopped:
        out.print("no orchestrator process was running")
    if keep_broker or BrokerSettings.read("external"):
        return
    try:
        was_running = stop_broker()
    except LocalKafkaError as exc:
        fail(str(exc))
    out.print("kafka broker stopped" if was_running else "no local kafka broker was running")


def status(as_json: JsonOpt = False) -> None:
    """Services alive (consumer-group members), their lag, active agents, the broker."""
    settings = kafka_settings()
    runnable = set(available_services())
    services = [(n, n in runnable) for n in known_services()]
    try:
        result = collect_status(settings, services, supervisor=read_state())
    except (KafkaError, OSError) as exc:
        fail(f"kafka at {settings.bootstrap} did not answer in time: {exc}", as_json=as_json)
    if as_json:
        print_json(result.to_json())
    else:
        _print_status(result)
    if not result.broker_answers:
        raise typer.Exit(EXIT_FAILED)


def kafka_env(as_json: JsonOpt = False) -> None:
    """Print the variables that send another program to this platform's broker, its login
    included (`eval "$(orchestrator kafka-env)"`)."""
    try:
        env = broker_env()
    except BrokerAuthMissing as exc:
        fail(str(exc), as_json=as_json)
    if as_json:
        print_json(env)
        return
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")


def _print_status(result: PlatformStatus) -> None:
    broker = "[green]answers[/]" if result.broker_answers else "[red]does not answer[/]"
    out.print(f"kafka {result.bootstrap}: {broker}")
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
    out.print(table)
    if result.active_agents is not None:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(result.agents_by_specialty.items()))
        out.print(f"active agents: {result.active_agents}" + (f" ({detail})" if detail else ""))
    if result.supervisor_pid is not None:
        out.print(f"local supervisor pid {result.supervisor_pid}")
    if result.llm_url:
        out.print(f"fake LLM: {result.llm_url}")
    for url in result.gateway_urls:
        out.print(f"OpenAI-compatible gateway: {url}")


def service(name: Annotated[str, typer.Argument(help="The service to run.")]) -> None:
    """Run one service in the foreground (the way to add instances of a consumer)."""
    runnable = available_services()
    if name not in runnable:
        planned = "" if name not in known_services() else " (it has no __main__ yet)"
        fail(
            f"unknown service {name!r}{planned}; valid: {', '.join(runnable) or 'none yet'}",
            EXIT_INVALID,
        )
    module = service_module(name)
    # With only what the service may see: the analytics sink never gets the LLM key, the
    # gateway neither the key nor Slack's secrets (docs/architecture.md, "Secrets").
    os.execve(sys.executable, [sys.executable, "-m", module], service_env(name))


def agents(
    as_json: JsonOpt = False,
    include_retired: Annotated[bool, typer.Option("--all", help="Include retired agents.")] = False,
) -> None:
    """The agents in the registry (live ones unless --all)."""
    settings = kafka_settings()
    require_kafka(settings, as_json=as_json)
    view = run(RegistryView.load(settings), settings, as_json=as_json)
    records = list(view.agents.values()) if include_retired else view.live()
    records.sort(key=lambda a: (a.goal_id, a.specialty, a.spawned_at))
    if as_json:
        print_json([asdict(a) for a in records])
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
    out.print(table)
