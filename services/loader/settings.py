"""The loader's settings: how many agents stay loaded, when idle ones retire, how it degrades."""

from __future__ import annotations

from typing import ClassVar

from streams.settings import EnvSettings, parsed, setting

__all__ = ["LoaderSettings"]


class LoaderSettings(EnvSettings):
    title: ClassVar[str] = "Loader"

    capacity: int = setting(
        "ORCH_LOADER_CAPACITY",
        50,
        "Agent instances one loader keeps loaded; past it the least recently used is evicted "
        "(`agent_evicted`). >= 1.",
        read_by="loader",
        ge=1,
    )
    idle_seconds: float = setting(
        "ORCH_AGENT_IDLE_SECONDS",
        24 * 3600.0,
        "An agent unused this long (or, never used, this long since its spawn) is retired "
        "(`agent_retired`) by the loader that owns its partition; a later request may revive "
        "it. >= 0.",
        read_by="loader",
        shown="`24 * 3600.0`",
        ge=0,
    )
    sweep_seconds: float = setting(
        "ORCH_RETIRE_SWEEP_SECONDS",
        60.0,
        "How often the loader looks for idle agents to retire; >= 0.",
        read_by="loader",
        ge=0,
    )
    degraded_answers: bool = setting(
        "ORCH_DEGRADED_ANSWERS",
        True,
        "`0`: a task the LLM cannot answer fails with `llm_failure`. Any other value: it is "
        "answered from the keyword tier or the static fallback.",
        read_by="loader",
        shown="`1`",
    )
    ended_window_seconds: float = setting(
        "ORCH_ENDED_WINDOW_SECONDS",
        3600.0,
        "How far back a starting loader reads the runs that ended (and the attempts that "
        "started), so that it does not answer again what an earlier owner answered; >= 0.",
        read_by="loader",
        ge=0,
    )

    _degraded = parsed("degraded_answers", lambda text: text != "0")
