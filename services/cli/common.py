"""What every command of the CLI shares: output, exit codes, the broker, the SDK client."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import timedelta
from typing import Annotated, Any, Concatenate, NoReturn, ParamSpec, TypeVar

import typer
from aiokafka.errors import KafkaError
from rich.console import Console, ConsoleOptions, ConsoleRenderable, RenderHook
from rich.markup import escape
from rich.segment import Segment

from local.localkafka import kafka_answers
from streams.client import OrchestratorClient
from streams.config import BrokerAuthMissing, kafka_auth
from streams.errors import OrchestratorError
from streams.events import validate_identifier
from streams.kafka import KafkaSettings

__all__ = [
    "EXIT_FAILED",
    "EXIT_INVALID",
    "EXIT_TIMEOUT",
    "JsonOpt",
    "checked_id",
    "err",
    "fail",
    "kafka_settings",
    "out",
    "parse_duration",
    "print_json",
    "refused",
    "require_kafka",
    "run",
    "visible",
    "with_client",
]

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_TIMEOUT = 3

T = TypeVar("T")
P = ParamSpec("P")


# -- what reaches the terminal ----------------------------------------------------------

# What the terminal would act on rather than show: C0 controls (ESC starts a sequence that
# can retitle the window, clear the screen or recolour what follows; CR overwrites a line),
# DEL, C1 controls (U+009B is a one-character CSI) and the bidirectional controls, which
# reorder the text around them so that it reads as something else.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def visible(text: str, *, as_json: bool = False) -> str:
    """``text`` with what a terminal would act on written as an escape (``\\x1b``,
    ``\\u202e``); tab and newline stay. ``as_json``: a JSON text, whose strings then
    hold the same values (its escapes are ``\\u001b``)."""

    def escaped(match: re.Match[str]) -> str:
        char = match.group()
        if char in "\t\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 and not as_json else f"\\u{code:04x}"

    return _UNSAFE.sub(escaped, text)


class _Visible:
    """A renderable as rich lays it out, with :func:`visible` text."""

    def __init__(self, renderable: ConsoleRenderable) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        for segment in console.render(self.renderable, options):
            # Control segments are rich's own (cursor moves); only text can come from data.
            yield segment if segment.control else Segment(visible(segment.text), segment.style)


class _ShowControls(RenderHook):
    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        return [_Visible(r) for r in renderables]


def _console(*, stderr: bool) -> Console:
    # Every command prints stored text (answers, labels, instructions, errors quoting
    # values); whatever it prints, through any renderable, shows control characters.
    console = Console(stderr=stderr, highlight=False)
    console.push_render_hook(_ShowControls())
    return console


def _on_a_new_console(
    method: Callable[Concatenate[Console, P], T],
) -> Callable[Concatenate[_Output, P], T]:
    def call(self: _Output, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return method(_console(stderr=self.stderr), *args, **kwargs)

    return call


class _Output:
    """stdout or stderr, printed to through a rich Console made for that print. A Console
    settles its width and colours (COLUMNS, NO_COLOR, FORCE_COLOR, TERM, whether it writes
    to a terminal) when it is made: one made at import kept those of the output the CLI
    had then, not of the one it prints to (CliRunner's, a file stdout went to since)."""

    def __init__(self, *, stderr: bool) -> None:
        self.stderr = stderr

    print = _on_a_new_console(Console.print)


out = _Output(stderr=False)
err = _Output(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON only.")]


# -- output helpers ---------------------------------------------------------------------


def print_json(value: Any) -> None:
    # json.dumps escapes all but DEL already; the values read back the same.
    sys.stdout.write(visible(json.dumps(value, indent=2, default=str), as_json=True) + "\n")


def fail(message: str, code: int = EXIT_FAILED, *, as_json: bool = False, **extra: Any) -> NoReturn:
    if as_json:
        print_json({"error": message, **extra})
    else:
        err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


_SAYS_REFUSED = re.compile(r"\s*refused\b", re.IGNORECASE)


def refused(reason: str) -> str:
    """``reason`` as a refusal: with "refused: " before it, unless it begins with the word
    itself (the guards' reasons do: "refused: asks for secrets ...")."""
    return reason if _SAYS_REFUSED.match(reason) else f"refused: {reason}"


def run(coro: Coroutine[Any, Any, T], settings: KafkaSettings, *, as_json: bool = False) -> T:
    """Run ``coro``; a broker that cannot be reached ends the command with one clear line."""
    try:
        return asyncio.run(coro)
    except (typer.Exit, OrchestratorError):
        raise  # the command's own outcome (RunTimeout is an OSError too)
    except (KafkaError, OSError) as exc:
        _unreachable(settings, f" ({exc})", as_json=as_json)
    except RuntimeError as exc:  # the SDK's word for "the topics are not there"
        fail(f"{exc} (or start the platform: `orchestrator up`)", as_json=as_json)


def kafka_settings() -> KafkaSettings:
    return KafkaSettings.from_env()


def require_kafka(settings: KafkaSettings, *, as_json: bool) -> None:
    # The registry and budget readers would leave half-started clients behind (and
    # their warnings) on a broker that is not there; one cheap probe first.
    try:
        kafka_auth()
    except BrokerAuthMissing as exc:
        fail(str(exc), as_json=as_json)
    if not kafka_answers(settings.bootstrap, timeout=3.0):
        _unreachable(settings, "", as_json=as_json)


def _unreachable(settings: KafkaSettings, detail: str, *, as_json: bool) -> NoReturn:
    fail(
        f"cannot reach Kafka at {settings.bootstrap}{detail}; is the platform up? "
        "(`orchestrator up`)",
        as_json=as_json,
    )


def checked_id(value: str, what: str, *, as_json: bool = False) -> str:
    try:
        return validate_identifier(value)
    except ValueError as exc:
        fail(f"{what}: {exc}", EXIT_INVALID, as_json=as_json)


async def with_client(
    settings: KafkaSettings, action: Callable[[OrchestratorClient], Awaitable[T]]
) -> T:
    client = OrchestratorClient(settings, source="cli")
    try:
        await client.start()
        return await action(client)
    finally:
        # Also after a failed start: `async with` would not close what start half-opened.
        await client.close()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w`` (also ``ms``) as a timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number and one of ms, s, m, h, d, w")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
