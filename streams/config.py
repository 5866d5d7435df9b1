"""Typed readers for settings in environment variables.

An unset or blank variable gives the default. A value that does not parse, or is
out of range, raises :class:`ValueError` naming the variable, the value and what
is expected, e.g. ``ORCH_BUDGET_MAX_AGENTS must be a whole number >= 0, got 'abc'``.
Numbers must be finite: ``nan`` and ``inf`` are refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar, overload

__all__ = [
    "DEFAULT_KAFKA_PORT",
    "ROOT",
    "bootstrap_servers",
    "data_root",
    "env_float",
    "env_int",
    "env_str",
    "kafka_port",
]

ROOT = Path(__file__).resolve().parent.parent
"""The project's checkout (where ``.local/`` lives unless ``ORCH_DATA_DIR`` says otherwise)."""
DEFAULT_KAFKA_PORT = 9092

_N = TypeVar("_N", int, float)


def env_str(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    """The variable's text without surrounding blanks; ``default`` when unset or blank."""
    return _text(name, environ) or default


@overload
def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int: ...


@overload
def env_int(
    name: str,
    default: None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int | None: ...


def env_int(
    name: str,
    default: int | None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int | None:
    """A whole number within ``[minimum, maximum]`` (either bound optional)."""
    text = _text(name, environ)
    if not text:
        return default
    return _parse(name, text, int, "a whole number", minimum, maximum)


def env_float(
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> float:
    """A finite number within ``[minimum, maximum]`` (either bound optional)."""
    text = _text(name, environ)
    if not text:
        return default
    return _parse(name, text, _finite, "a finite number", minimum, maximum)


def _text(name: str, environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(name, "").strip()


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _parse(
    name: str,
    text: str,
    parse: Callable[[str], _N],
    kind: str,
    minimum: _N | None,
    maximum: _N | None,
) -> _N:
    expected = kind
    if minimum is not None and maximum is not None:
        expected += f" between {minimum} and {maximum}"
    elif minimum is not None:
        expected += f" >= {minimum}"
    elif maximum is not None:
        expected += f" <= {maximum}"
    try:
        value = parse(text)
    except ValueError:
        raise ValueError(f"{name} must be {expected}, got {text!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {text!r}")
    return value


def data_root() -> Path:
    """Where the platform keeps local data: ``ORCH_DATA_DIR`` or ``<project>/.local``."""
    base = os.environ.get("ORCH_DATA_DIR")
    return Path(base) if base else ROOT / ".local"


def kafka_port() -> int:
    """The local broker's port: ``ORCH_KAFKA_PORT`` (default 9092)."""
    return env_int("ORCH_KAFKA_PORT", DEFAULT_KAFKA_PORT, minimum=1, maximum=65535)


def bootstrap_servers() -> str:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set, else the local broker on 127.0.0.1."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    return external or f"127.0.0.1:{kafka_port()}"
