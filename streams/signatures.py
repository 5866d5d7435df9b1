"""Run signatures: the normalized intent of a request, shared by the pattern learner and the router.

Two requests with the same signature are "the same kind of work": same
specialty, same content words (order, case, numbers and stop words ignored).
``exact_key`` is stricter: identical requests with identical context, for a response
cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

__all__ = ["exact_key", "intent_words", "signature_of"]

_WORD = re.compile(r"[a-z][a-z0-9_']*")
_STOP = frozenset(
    "a an the and or of to in on for with is are be it this that my me i you your we our"
    " please can could would should how what why when do does from at by as about hi hello"
    " there some any just".split()
)


def intent_words(message: str, limit: int = 8) -> list[str]:
    """The first ``limit`` distinct content words, sorted."""
    seen: list[str] = []
    for w in _WORD.findall(message.lower()):
        if w not in _STOP and w not in seen:
            seen.append(w)
        if len(seen) == limit:
            break
    return sorted(seen)


def signature_of(message: str, specialty: str, steps: str = "answer") -> str:
    """``specialty|steps|word word ...`` hashed to a short, stable id."""
    text = f"{specialty}|{steps}|{' '.join(intent_words(message))}"
    return "sig_" + hashlib.sha256(text.encode()).hexdigest()[:16]


def exact_key(message: str, specialty: str, context: Mapping[str, str] | None = None) -> str:
    """Identical requests (only blank lines around them and trailing blanks dropped) to the
    same specialty, with the same context: an answer made from one caller's system message
    or earlier turns is another request's answer only when those are the same too. Case
    and inner spacing count: ``x = true`` is not ``x = True`` and indented code is not the
    same code flat (until 2026-12-06 both were folded, and one user's answer served the
    other's request)."""
    # One JSON document: a message holding "|[[...]]" once hashed like a shorter message
    # sent with that context. Blank lines around it and trailing blanks do not count; a
    # first line's indentation does (it is code's).
    text = json.dumps(
        [specialty, message.rstrip().lstrip("\r\n"), sorted((context or {}).items())],
        ensure_ascii=False,
    )
    return "req_" + hashlib.sha256(text.encode()).hexdigest()[:16]
