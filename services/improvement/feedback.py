"""Feedback rules: when it asks for a change, the template prompt, and Slack's command text.

An improvement is wanted when the score is 2 or less, or the text asks for a
change (words such as "should", "instead", "shorter", "don't"). What the change
is comes from :mod:`services.improvement.instructions`: user text never becomes
part of a prompt itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streams.events import validate_identifier

__all__ = [
    "LOW_SCORE",
    "SlackCommand",
    "asks_for_change",
    "parse_slack_command",
    "slack_identity",
    "wants_improvement",
]

LOW_SCORE = 2
_CHANGE = re.compile(
    r"\b(should|shouldn't|must|instead|please|prefer|rather|more|less|too|shorter|longer"
    r"|add|include|avoid|stop|don't|do not|never|always|wrong|incorrect|missing|improve"
    r"|better|use|explain)\b",
    re.I,
)


def asks_for_change(text: str) -> bool:
    return bool(_CHANGE.search(text))


def wants_improvement(score: int | None, text: str) -> bool:
    return (score is not None and score <= LOW_SCORE) or asks_for_change(text)


@dataclass(frozen=True)
class SlackCommand:
    run_id: str
    score: int | None
    text: str


def parse_slack_command(text: str) -> SlackCommand:
    """``RUN_ID [score] text``: the score is a lone 1-5 right after the run id."""
    parts = text.split(maxsplit=2)
    if not parts:
        raise ValueError("usage: /improve RUN_ID [score 1-5] what should be better")
    run_id, rest = parts[0], parts[1:]
    score: int | None = None
    if rest and re.fullmatch(r"[1-5]", rest[0]):
        score = int(rest[0])
        rest = rest[1:]
    elif rest and re.fullmatch(r"\d+", rest[0]):
        raise ValueError(f"score must be 1-5, got {rest[0]}")
    body = " ".join(rest).strip()
    if not body and score is None:
        raise ValueError("say what should be better, or give a score 1-5")
    return SlackCommand(run_id, score, body)


def slack_identity(slack_user: str, mapping: dict[str, str]) -> tuple[str | None, str]:
    """The goal and platform user a Slack user speaks as: ``mapping[id]`` read as
    ``goal/user`` (or ``user`` alone, in any goal whose run it owns), else ``slack:<id>``.

    Users are per goal (two tenants' ``admin`` are two people): a bare name let one goal's
    admin give feedback on another goal's runs over Slack, where the HTTP key is refused."""
    mapped = mapping.get(slack_user)
    if not mapped:
        return None, validate_identifier(f"slack:{slack_user}")
    goal, _, user = mapped.rpartition("/")
    return (validate_identifier(goal) if goal else None), validate_identifier(user)
