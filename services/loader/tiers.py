"""Answers when the LLM cannot serve: keyword tier, then a static fallback; each says so.

Nothing here pretends to be a model's answer: every text names its tier.
"""

from __future__ import annotations

from streams.specialties import PROFILES, tokens

__all__ = ["keyword_answer", "static_answer"]


def keyword_answer(specialty: str, message: str) -> str | None:
    """A prepared hint when the request's words match a specialty, else None."""
    words = tokens(message)
    best, hits = None, 0
    for profile in PROFILES.values():
        n = len(words & profile.keywords)
        if profile.offline_hint and (n > hits or (n == hits and n and profile.name == specialty)):
            best, hits = profile, n
    if best is None or hits == 0:
        return None
    return (
        "[degraded: keyword tier - the language model is unreachable, this is a prepared"
        f" {best.name.replace('_', ' ')} hint, not a generated answer] {best.offline_hint}"
    )


def static_answer(run_id: str) -> str:
    return (
        "[degraded: static fallback - the language model is unreachable] Your request"
        f" (run {run_id}) was received, but no model could answer it now. Please try again"
        " later; nothing was charged for this answer."
    )
