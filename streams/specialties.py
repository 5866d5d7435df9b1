"""Specialty profiles: keywords to recognise a request, and the defaults of a new agent.

The router classifies with the keywords, the spawner takes temperature, tools
and the template prompt, and the loader's keyword tier answers from
``offline_hint`` when no LLM can be reached. A request may also name its
specialty in ``context["specialty"]``; unknown names get the ``general`` profile, and a
name that is not a specialty name (:func:`is_specialty_name`) is refused by the router.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_SPECIALTY",
    "PROFILES",
    "Profile",
    "tokens_in_order",
    "all_tokens",
    "asked_specialty",
    "classify",
    "default_prompt",
    "is_specialty_name",
    "profile_for",
    "tokens",
]


@dataclass(frozen=True)
class Profile:
    name: str
    keywords: frozenset[str]
    temperature: float
    tools: tuple[str, ...]
    description: str
    offline_hint: str


def _p(
    name: str, words: str, temperature: float, tools: str, description: str, hint: str
) -> Profile:
    return Profile(
        name, frozenset(words.split()), temperature, tuple(tools.split()), description, hint
    )


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        _p(
            "code",
            "code bug python function error compile debug refactor api class test stack"
            " exception javascript sql script",
            0.2,
            "code_interpreter repo_search",
            "writes, reviews and debugs software",
            "Check the exact error message and the smallest input that reproduces it;"
            " a failing test that shows the bug is the fastest way to a fix.",
        ),
        _p(
            "data_analysis",
            "data dataset csv chart statistics average mean median trend analyze analysis"
            " table metrics correlation plot",
            0.3,
            "code_interpreter sql_query",
            "analyses data sets and explains what the numbers say",
            "Start from a sample of the data, check for missing values, then summarise"
            " with counts, means and a plot of the trend.",
        ),
        _p(
            "math",
            "math equation solve integral derivative proof calculate probability algebra"
            " theorem number",
            0.1,
            "calculator",
            "solves and explains mathematical problems step by step",
            "Write down what is known and what is asked, then solve one step at a time"
            " and check the result by substituting it back.",
        ),
        _p(
            "writing",
            "write essay email draft blog story rewrite summarize summary letter tone"
            " edit article poem",
            0.8,
            "style_guide",
            "drafts and edits clear prose for a given audience",
            "Say who the reader is and what they should do after reading; draft, then"
            " cut every sentence that does not serve that.",
        ),
        _p(
            "research",
            "research find sources compare paper papers study evidence literature"
            " explain history why review",
            0.5,
            "web_search citation_lookup",
            "finds, compares and cites sources",
            "Collect two or three independent sources, note where they agree and"
            " disagree, and cite each claim.",
        ),
        _p(
            "customer_support",
            "order refund account password login help support cancel subscription billing"
            " invoice shipping delivery",
            0.4,
            "ticket_lookup knowledge_base",
            "resolves customer questions politely and precisely",
            "Have the order or account number at hand; most account issues are solved"
            " from the account settings page or by a password reset.",
        ),
        _p(
            "general",
            "",
            0.7,
            "",
            "answers general questions helpfully",
            "",
        ),
    )
}
DEFAULT_SPECIALTY = "general"
_WORD = re.compile(r"[a-z0-9_]+")
_SPECIALTY_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")


def asked_specialty(context: Mapping[str, str] | None) -> str:
    """The specialty a request pins in ``context["specialty"]``, trimmed and in lower case;
    "" when it pins none."""
    return (context or {}).get("specialty", "").strip().lower()


def is_specialty_name(name: str) -> bool:
    """Whether ``name`` may name a specialty: a lower-case letter, then up to 47 lower-case
    letters, digits or ``_``. Agents, workflow ids (``<goal>/<specialty>``) and version
    keys are built from it, so anything else (a ``/`` above all) is never one."""
    return _SPECIALTY_NAME.fullmatch(name) is not None


def tokens(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def all_tokens(text: str) -> list[str]:
    """Every token of ``text`` in order, repeats kept."""
    return _WORD.findall(text.lower())


def tokens_in_order(text: str) -> list[str]:
    """The distinct tokens of ``text``, in the order they first appear."""
    return list(dict.fromkeys(_WORD.findall(text.lower())))


def profile_for(specialty: str) -> Profile:
    return PROFILES.get(specialty, PROFILES[DEFAULT_SPECIALTY])


def default_prompt(specialty: str) -> str:
    """The default agent's system prompt line for ``specialty``: what a spawned agent's
    template starts with and what the loader's legacy tier answers with."""
    role = specialty.replace("_", " ")
    return f"You are a {role} specialist: you {profile_for(specialty).description}."


def classify(message: str, context: dict[str, str] | None = None) -> tuple[str, dict[str, float]]:
    """The specialty for a request and the keyword score of every known specialty."""
    asked = asked_specialty(context)
    if is_specialty_name(asked):
        return asked, {asked: 1.0}
    words = tokens(message)
    scores = {
        name: len(words & p.keywords) / (1 + 0.1 * len(words))
        for name, p in PROFILES.items()
        if p.keywords
    }
    best = max(scores, key=lambda n: scores[n], default=DEFAULT_SPECIALTY)
    if scores.get(best, 0.0) <= 0.0:
        return DEFAULT_SPECIALTY, scores
    return best, scores
