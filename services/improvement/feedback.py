"""Feedback rules: when it asks for a change, the prompt it proposes, and Slack's command text.

An improvement is wanted when the score is 2 or less, or the text asks for a
change (words such as "should", "instead", "shorter", "don't"). Without an LLM
the new system prompt is the current one plus one instruction taken from the
feedback (the template rule); with one, the LLM rewrites the prompt from the
feedback and the template rule is the fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streams.events import validate_identifier
from streams.specialties import profile_for

__all__ = [
    "LOW_SCORE",
    "SlackCommand",
    "asks_for_change",
    "base_prompt",
    "clean_proposal",
    "improvement_messages",
    "parse_slack_command",
    "slack_platform_user",
    "template_prompt",
    "wants_improvement",
]

LOW_SCORE = 2
MAX_PROMPT_CHARS = 6000
_CHANGE = re.compile(
    r"\b(should|shouldn't|must|instead|please|prefer|rather|more|less|too|shorter|longer"
    r"|add|include|avoid|stop|don't|do not|never|always|wrong|incorrect|missing|improve"
    r"|better|use|explain)\b",
    re.I,
)
_FENCE = re.compile(r"^```[a-z]*\s*|\s*```$", re.I)
_LOW_SCORE_RULE = (
    "Recent answers in this area were rated poorly: be accurate and specific, answer"
    " every part of the request, and say what you are unsure of."
)


def asks_for_change(text: str) -> bool:
    return bool(_CHANGE.search(text))


def wants_improvement(score: int | None, text: str) -> bool:
    return (score is not None and score <= LOW_SCORE) or asks_for_change(text)


def base_prompt(specialty: str) -> str:
    """The specialty's template prompt, when neither a version nor an agent gives one."""
    profile = profile_for(specialty)
    return f"You are a {specialty.replace('_', ' ')} specialist who {profile.description}."


def _instruction(text: str) -> str:
    said = " ".join(text.split())[:300].strip()
    if not said:
        return _LOW_SCORE_RULE
    return f"Users asked for this; follow it: {said}"


def template_prompt(current: str, text: str) -> str | None:
    """The current prompt plus the feedback's instruction; None when it already says it."""
    rule = _instruction(text)
    if rule in current:
        return None
    return f"{current.rstrip()}\n\n{rule}"[:MAX_PROMPT_CHARS]


def improvement_messages(
    specialty: str, current: str, score: int | None, text: str
) -> list[dict[str, str]]:
    rated = f" (score {score}/5)" if score is not None else ""
    return [
        {
            "role": "system",
            "content": "You improve the system prompts of AI specialists from user feedback."
            " Keep what works, address the feedback, stay under 300 words. Reply with the"
            " new system prompt only.",
        },
        {
            "role": "user",
            "content": f"Specialty: {specialty}\n\nCurrent system prompt:\n{current}\n\n"
            f"User feedback{rated}:\n{text or '(no text; the answer was rated poorly)'}",
        },
    ]


def clean_proposal(text: str) -> str | None:
    """The LLM's proposed prompt without fences or quotes; None when unusable."""
    cleaned = _FENCE.sub("", text.strip()).strip().strip('"').strip()
    if len(cleaned) < 20 or len(cleaned) > MAX_PROMPT_CHARS:
        return None
    return cleaned


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


def slack_platform_user(slack_user: str, mapping: dict[str, str]) -> str:
    """The platform user of a Slack user: ``mapping[id]``, else ``slack:<id>``."""
    return validate_identifier(mapping.get(slack_user) or f"slack:{slack_user}")
