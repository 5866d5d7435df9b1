"""`orchestrator ask` and `improve`: requests and feedback, through the SDK."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.text import Text

from services.cli.common import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_TIMEOUT,
    JsonOpt,
    checked_id,
    fail,
    kafka_settings,
    out,
    print_json,
    refused,
    run,
    with_client,
)
from streams.client import Answer, OrchestratorClient, feedback_event
from streams.config import OperatorSettings
from streams.errors import (
    BudgetExceededError,
    InvalidRequest,
    LLMFailure,
    NoVerdict,
    Refused,
    RunFailed,
    RunTimeout,
)
from streams.events import (
    FeedbackDecided,
    PromotionDecided,
)
from streams.kafka import KafkaSettings

__all__ = ["ask", "improve"]

T = TypeVar("T")


def _parse_context(pairs: Sequence[str], as_json: bool) -> dict[str, str]:
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--context wants key=value, got {pair!r}", EXIT_INVALID, as_json=as_json)
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
        fail("--timeout must be positive", EXIT_INVALID, as_json=as_json)
    settings = kafka_settings()
    try:
        answer = run(_ask(settings, message, goal, user, ctx, timeout), settings, as_json=as_json)
    except InvalidRequest as exc:
        fail(f"invalid request: {exc}", EXIT_INVALID, as_json=as_json)
    except RunTimeout as exc:
        fail(
            f"timeout: no answer within {exc.timeout:g}s (run {exc.run_id})",
            EXIT_TIMEOUT,
            as_json=as_json,
            run_id=exc.run_id,
        )
    except RunFailed as exc:
        fail(
            _failure_line(exc),
            as_json=as_json,
            run_id=exc.run_id,
            reason=exc.reason,
            limit=exc.limit,
        )
    if as_json:
        print_json(asdict(answer))
        return
    out.print(Text(answer.text))
    meta = (
        f"agent {answer.agent_id or '-'} · {answer.specialty} · ${answer.cost_usd:.6f} · "
        f"{answer.latency_ms:.0f} ms · run {answer.run_id}"
    )
    out.print(Text(meta, style="dim"))
    if answer.degradation_tier != "llm":
        out.print(
            Text(
                f"degraded: answered by the {answer.degradation_tier} tier, not the LLM",
                style="bold yellow",
            )
        )


def improve(
    run_id: Annotated[
        str,
        typer.Argument(
            help="The run the feedback is about (or `approve` or `promote`: see the text above)."
        ),
    ],
    text: Annotated[str, typer.Argument(help="What should be better (or the improvement id).")],
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            help="Who gives the feedback (required); for `approve` and `promote`, the operator"
            " (default $ORCH_OPERATOR_USER, else `operator`).",
        ),
    ] = None,
    score: Annotated[int | None, typer.Option(min=1, max=5, help="1 (bad) to 5 (great).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the verdict.")] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Give feedback on a run (`/improve`) and print the improvement service's verdict.

    `orchestrator improve approve IMPROVEMENT_ID [--user OPERATOR]` puts a goal's
    proposal that waits for review (an instruction the LLM wrote from a user's feedback)
    in that goal's canary; approving it again changes nothing and says which version it
    is. `orchestrator improve promote IMPROVEMENT_ID [--user OPERATOR]` makes an
    improvement saved for one goal serve every goal (refused for one never approved).
    OPERATOR: in ORCH_OPERATORS or holding an operator key.
    Exit 0 when accepted, 1 when refused (the reason is printed), 3 with no verdict.
    """
    if run_id in ("approve", "promote"):
        operator = user or OperatorSettings.read("operator_user")
        _approve(text, run_id == "promote", operator, timeout, as_json)
        return
    if user is None:
        fail("--user is required: who gives the feedback", EXIT_INVALID, as_json=as_json)
    if not run_id.strip():
        fail("run id is empty", EXIT_INVALID, as_json=as_json)
    if not text.strip() and score is None:
        fail("give feedback text or a --score", EXIT_INVALID, as_json=as_json)
    try:
        feedback_event(run_id, user_id=user, score=score, text=text, channel="cli", source="cli")
    except InvalidRequest as exc:
        fail(f"invalid feedback: {exc}", EXIT_INVALID, as_json=as_json)
    settings = kafka_settings()

    async def send(client: OrchestratorClient) -> FeedbackDecided:
        return await client.feedback(
            run_id, user_id=user, score=score, text=text, channel="cli", timeout=timeout
        )

    verdict = _decided(with_client(settings, send), settings, as_json)
    if as_json:
        print_json(
            {
                "accepted": True,
                "run_id": run_id,
                "reason": verdict.reason,
                "improvement_id": verdict.improvement_id,
                "event_id": verdict.feedback_id,
            }
        )
    else:
        out.print(f"feedback on run {escape(run_id)} accepted: {escape(verdict.reason)}")


def _decided(coro: Coroutine[Any, Any, T], settings: KafkaSettings, as_json: bool) -> T:
    """Run a command that waits for a verdict; a refusal or silence ends the CLI non-zero."""
    try:
        return run(coro, settings, as_json=as_json)
    except Refused as exc:
        fail(refused(str(exc)), EXIT_FAILED, as_json=as_json, error_type=type(exc).__name__)
    except NoVerdict as exc:
        fail(str(exc), EXIT_TIMEOUT, as_json=as_json)


def _approve(improvement_id: str, everyone: bool, user: str, timeout: float, as_json: bool) -> None:
    """`improve approve` (into the goal's canary) or, ``everyone``, `improve promote`."""
    user = checked_id(user, "--user", as_json=as_json)
    verb = "promote" if everyone else "approve"
    if not improvement_id.strip():
        fail(f"give the improvement id to {verb}", EXIT_INVALID, as_json=as_json)
    settings = kafka_settings()

    async def send(client: OrchestratorClient) -> PromotionDecided:
        ask = client.promote if everyone else client.approve
        return await ask(improvement_id, user_id=user, timeout=timeout)

    verdict = _decided(with_client(settings, send), settings, as_json)
    if as_json:
        print_json(
            {
                "accepted": True,
                "improvement_id": improvement_id,
                "workflow_id": verdict.workflow_id,
                "reason": verdict.reason,
            }
        )
    else:
        out.print(f"{'promoted' if everyone else 'approved'}: {escape(verdict.reason)}")
