"""The improvement service's settings: the feedback endpoint, Slack, the judge, feedback limits.

Patterns and canaries have their own settings (:class:`~services.improvement.patterns.
PatternSettings`, :class:`~services.improvement.versions.CanaryPolicy`).
"""

from __future__ import annotations

from typing import ClassVar

from streams.settings import EnvSettings, parsed, setting

__all__ = ["ImprovementSettings"]


class ImprovementSettings(EnvSettings):
    title: ClassVar[str] = "Feedback endpoint, Slack and the judge"

    http_host: str = setting(
        "ORCH_IMPROVE_HOST",
        "127.0.0.1",
        "Address of the feedback HTTP endpoint. Every JSON route needs an API key "
        "(`orchestrator keys create`); the key, not the body, says who speaks. Serve it over "
        "TLS (a proxy in front) before listening beyond loopback. Set but empty listens on "
        "every interface.",
        read_by="improvement",
        blank="keep",
    )
    http_port: int | None = setting(
        "ORCH_IMPROVE_PORT",
        8787,
        "Its port, 0-65535; `0` a free port, `off` or `none` no endpoint. Set but empty also "
        "means no endpoint. The port in use is written to "
        "`<ORCH_DATA_DIR>/run/improvement.port`; a port already taken is logged and the "
        "service runs without the endpoint.",
        read_by="improvement",
        blank="keep",
    )
    slack_signing_secret: str | None = setting(
        "SLACK_SIGNING_SECRET",
        None,
        "Enables Slack's `/improve` command at `POST /slack/commands` (needs the endpoint "
        "above); a request whose signature does not match this secret is refused.",
        read_by="improvement",
    )
    slack_bot_token: str | None = setting(
        "SLACK_BOT_TOKEN",
        None,
        "Handed to slack-bolt as the bot token. Not needed: `/improve` answers in the HTTP "
        "response and the platform calls no Slack API.",
        read_by="improvement",
    )
    slack_users: str = setting(
        "ORCH_SLACK_USERS",
        "",
        "Slack user ids to the goal and platform user each speaks as, `U123=g1/alice,"
        "U456=g2/bob`; a bare `U123=alice` speaks as alice in any goal (users are per goal: "
        "name the goal). An unmapped Slack user gives feedback as `slack:<slack_user_id>`. "
        "Items without `=` are ignored.",
        read_by="improvement",
    )
    judge_model: str | None = setting(
        "ORCH_JUDGE_MODEL",
        None,
        "Model that grades LLM answers, when an LLM is configured and no simulated world gives "
        "their quality.",
        read_by="improvement",
        shown="unset: `ORCH_LLM_MODEL`",
    )
    llm_reserve_usd: float = setting(
        "ORCH_PLATFORM_CALL_RESERVE_USD",
        0.002,
        "What a judge or feedback-instruction call may cost, in USD. Such a call is charged to "
        "the goal whose run it serves and is made only while that goal's spend today plus this "
        "amount stays within its `max_daily_cost` (otherwise the heuristic assesses, and named "
        "adjustments stand in for the LLM); >= 0.",
        read_by="improvement",
        ge=0.0,
    )
    feedback_limit: int = setting(
        "ORCH_FEEDBACK_PER_WINDOW",
        20,
        "Feedback one user may give per window; more is refused (HTTP 429, `RateLimited` in "
        "the SDK, exit 1 in the CLI); >= 1.",
        read_by="improvement",
        ge=1,
    )
    feedback_window_s: float = setting(
        "ORCH_FEEDBACK_WINDOW_SECONDS",
        3600.0,
        "That window, in seconds, by the feedback's event time; >= 1.",
        read_by="improvement",
        shown="`3600`",
        ge=1.0,
    )
    promote_goals: int = setting(
        "ORCH_PROMOTE_GOALS",
        3,
        "Distinct goals whose canary of the same named adjustment must beat their baseline "
        "(one-sided Welch p < `ORCH_CANARY_ALPHA`) before it is proposed to every goal (as a "
        "platform-wide canary); >= 1.",
        read_by="improvement",
        ge=1,
    )

    review: bool = setting(
        "ORCH_IMPROVE_REVIEW",
        True,
        "Whether an instruction the LLM writes from a user's feedback waits for an operator "
        "(`orchestrator improve approve IMPROVEMENT_ID`) before it reaches the goal's prompt. "
        "On (the default), only the platform's named adjustments and an operator's own "
        "feedback go to the goal's canary at once: the guard refuses known takeovers, but no "
        "rule can refuse every harmful paraphrase, and the goal's prompt serves its other "
        "users. Off: every vetted instruction goes to the goal's canary at once (for goals "
        "whose users are trusted alike). `0`, `false` or `off` turn it off.",
        read_by="improvement",
        shown="on",
    )
    max_in_flight: int = setting(
        "ORCH_IMPROVE_MAX_IN_FLIGHT",
        64,
        "Feedback and approval requests the endpoint handles at once, counted once their key "
        "is checked and their body has come; one more is answered 503 (`Retry-After: 1`) at "
        "once. Requests still sending their body (Slack commands among them) are bounded the "
        "same, apart: at most this many at once (64 KiB each), one more 503. >= 1.",
        read_by="improvement",
        ge=1,
    )
    key_share: float = setting(
        "ORCH_IMPROVE_KEY_SHARE",
        0.5,
        "Largest share of `ORCH_IMPROVE_MAX_IN_FLIGHT` one API key may hold at once (at least "
        "one slot); one more of its requests is answered 429 (`Retry-After: 1`). The same "
        "share bounds one goal, all its keys together (so one tenant's keys cannot take every "
        "slot from the other goals), and each key's and each goal's requests still sending "
        "their body (all Slack commands together one share, 503). More than 0, at most 1.",
        read_by="improvement",
        gt=0.0,
        le=1.0,
    )
    max_runs: int = setting(
        "ORCH_IMPROVE_MAX_RUNS",
        200_000,
        "Runs the service keeps to join their events and to check feedback on them (the run "
        "must be known); past it the oldest run of the goal holding the most is forgotten, so "
        "one goal's traffic never evicts another goal's runs; >= 1.",
        read_by="improvement",
        ge=1,
    )
    max_runs_per_goal: int = setting(
        "ORCH_IMPROVE_MAX_RUNS_PER_GOAL",
        50_000,
        "Of those, the most one goal keeps; past it that goal's oldest run is forgotten "
        "(feedback on it is answered 404); >= 1.",
        read_by="improvement",
        ge=1,
    )

    _port = parsed("http_port", lambda text: _port(text))

    @property
    def slack_user_map(self) -> dict[str, str]:
        """``ORCH_SLACK_USERS`` as Slack user id -> platform user."""
        pairs = (item.split("=", 1) for item in self.slack_users.split(",") if "=" in item)
        return {k.strip(): v.strip() for k, v in pairs if k.strip() and v.strip()}


def _port(raw: str) -> int | None:
    text = raw.strip().lower()
    if text in ("off", "none", ""):
        return None
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"ORCH_IMPROVE_PORT must be 0-65535 or 'off', got {text!r}")
    return port
