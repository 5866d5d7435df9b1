"""Workflow ids and how a goal's vetted adjustments join a system prompt.

A specialty's platform-wide workflow is named by the specialty (``general``);
a goal's own workflow of that specialty is ``<goal_id>/<specialty>`` (``/`` never
appears in a goal id or a specialty name, so the split is unambiguous; a workflow id
that comes from outside is checked with :func:`parse_workflow`). Versions carry only
instructions that the improvement service vetted, never user text; the loader adds
the platform's and then the goal's to the agent's own prompt, so a goal never
changes what another goal sees.
"""

from __future__ import annotations

from collections.abc import Sequence

from streams.events import validate_identifier
from streams.specialties import is_specialty_name

__all__ = [
    "ADJUSTMENTS_HEADER",
    "MAX_ADJUSTMENTS",
    "MAX_PROMPT_CHARS",
    "goal_of",
    "goal_workflow",
    "join_instructions",
    "parse_workflow",
    "split_instructions",
    "with_adjustments",
]

ADJUSTMENTS_HEADER = "Adjustments learned from users' feedback (vetted by the platform):"
MAX_ADJUSTMENTS = 8
MAX_PROMPT_CHARS = 6000


def goal_workflow(goal_id: str, specialty: str) -> str:
    return f"{goal_id}/{specialty}"


def goal_of(workflow_id: str) -> tuple[str | None, str]:
    """``(goal_id, specialty)`` of a workflow id; goal_id is None for a platform-wide one.

    A goal id never holds ``/``, so the first one ends it: whatever specialty a workflow
    id was built from, its goal reads back as the goal it was built with.
    """
    goal, sep, specialty = workflow_id.partition("/")
    return (goal, specialty) if sep else (None, workflow_id)


def parse_workflow(workflow_id: str) -> tuple[str | None, str]:
    """:func:`goal_of` for a workflow id from outside (a command, a run's specialty).

    Raises ValueError, saying why, unless it is ``SPECIALTY`` or ``GOAL/SPECIALTY`` with
    a goal id and a specialty name: a version is saved with its goal id, and a workflow
    named after anything else could not be (or would name another goal's workflow).
    """
    goal, specialty = goal_of(workflow_id)
    if not is_specialty_name(specialty):
        raise ValueError(
            f"workflow {workflow_id[:200]!r} is not SPECIALTY or GOAL/SPECIALTY:"
            f" {specialty[:60]!r} is not a specialty name"
        )
    if goal is not None:
        try:
            validate_identifier(goal)
        except ValueError as exc:
            raise ValueError(f"workflow {workflow_id[:200]!r}: goal {exc}") from None
    return goal, specialty


def join_instructions(instructions: Sequence[str]) -> str:
    return "\n".join(instructions)


def split_instructions(text: str | None) -> list[str]:
    return [line for line in (text or "").split("\n") if line.strip()]


def _key(instruction: str) -> str:
    return " ".join(instruction.casefold().split()).rstrip(".!;: ")


def with_adjustments(base: str, instructions: Sequence[str]) -> str:
    """``base`` plus the labelled block of adjustments.

    Duplicates (ignoring case, spacing and end punctuation) count once, first place
    kept. At most MAX_ADJUSTMENTS are kept, the most recent (last) ones, and fewer if
    the prompt would pass MAX_PROMPT_CHARS. A block already in ``base`` is replaced.
    """
    head = base.split(ADJUSTMENTS_HEADER, 1)[0].rstrip()[:MAX_PROMPT_CHARS]
    unique: dict[str, str] = {}
    for instruction in instructions:
        if instruction.strip():
            unique.setdefault(_key(instruction), instruction.strip())
    kept: list[str] = []
    size = len(head) + 2 + len(ADJUSTMENTS_HEADER)
    for line in reversed(list(unique.values())):
        if len(kept) == MAX_ADJUSTMENTS or size + len(line) + 3 > MAX_PROMPT_CHARS:
            break
        kept.insert(0, line)
        size += len(line) + 3
    if not kept:
        return head
    block = "\n".join([ADJUSTMENTS_HEADER, *(f"- {line}" for line in kept)])
    return f"{head}\n\n{block}" if head else block
