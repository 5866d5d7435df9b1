"""How a new agent is made: its id, system prompt (LLM or template), temperature and tools.

An agent serves every later request of its goal, from every user, so its prompt holds
nothing a request brought: the template is the specialty's own words, and the LLM that
writes a prompt is shown the specialty's profile alone, never the request that caused the
spawn (until 2026-12-06 it saw an excerpt, as quoted data, and a request could steer it in
words the guard did not read). What it writes is kept only if the guard passes it. The
request's own context (the caller's system message, earlier turns) goes to that request's
call alone, through the loader.
"""

from __future__ import annotations

import hashlib
import uuid

from streams.guard import GuardVerdict, copies_text, guard_prompt
from streams.llm import LateOutcome, LLMClient, LLMError
from streams.specialties import default_prompt, profile_for

__all__ = [
    "WRITE_MAX_TOKENS",
    "AgentDesign",
    "agent_id_for",
    "design_agent",
    "legacy_agent_id",
    "template_prompt",
]

_NS = uuid.UUID("5b0c3a52-6a4f-4d0e-9d1c-6f3b0f7e2a10")
WRITE_MAX_TOKENS = 300
# The longest written prompt kept: the 120 words asked for are about 800 characters,
# and 300 tokens about 1,200; a longer one is not what the writer was asked for.
_MAX_WRITTEN_CHARS = 1200
# The budget holds the writing call's prompt at 1,500 bytes (services/budget/state.py,
# _SPAWN_PROMPT_BYTES); the ask (the specialty's profile) is far within it.


def agent_id_for(specialty: str, approval_event_id: str, goal_id: str) -> str:
    """Deterministic, so a redelivered approval makes the same agent, not a second one.

    64 bits of the hash of the goal and the approval: with the 32 bits of the approval
    alone (:func:`legacy_agent_id`), two goals' agents of one specialty took the same id
    once some tens of thousands were made (a birthday collision), and the second goal's
    approval was answered with the first goal's agent."""
    digest = hashlib.sha256(f"{goal_id}\x00{approval_event_id}".encode()).hexdigest()[:16]
    return f"{specialty}_{digest}"


def legacy_agent_id(specialty: str, approval_event_id: str) -> str:
    """The id approvals made before ids named their goal (a redelivered one finds its agent)."""
    return f"{specialty}_{hashlib.sha256(approval_event_id.encode()).hexdigest()[:8]}"


def spawned_event_id(agent_id: str, version: int) -> str:
    return str(uuid.uuid5(_NS, f"{agent_id}:v{version}"))


def template_prompt(specialty: str) -> str:
    """The specialty's own description and tools, and nothing of any request."""
    profile = profile_for(specialty)
    lines = [
        default_prompt(specialty),
        "Answer the user's request directly and precisely; say what you are unsure of.",
    ]
    if profile.tools:
        lines.append(f"Tools you may ask for: {', '.join(profile.tools)}.")
    return "\n".join(lines)


class AgentDesign:
    """A designed agent. The cost fields are set when the LLM was asked for the prompt;
    ``error`` says why that call failed, ``refused`` why the guard refused its prompt
    (the template serves in both cases)."""

    def __init__(self, prompt: str, source: str, temperature: float, tools: list[str]) -> None:
        self.system_prompt = prompt
        self.prompt_source = source
        self.temperature = temperature
        self.tools = tools
        self.cost_usd = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency_ms = 0.0
        self.model = ""
        self.error: str | None = None
        self.refused: str | None = None


def writing_request(specialty: str) -> list[dict[str, str]]:
    """The messages that ask the LLM to write a new agent's system prompt: the specialty's
    profile and nothing of any request, so no request can steer what every later user of
    the agent is served by."""
    profile = profile_for(specialty)
    role = specialty.replace("_", " ")
    system = (
        "You write system prompts for specialist AI agents. Reply with the prompt only: at"
        f' most 120 words, second person, starting "You are a {role} specialist", concrete'
        " about scope and style, in plain English sentences without markup, code or links."
        "\nThe prompt serves every user of the agent: it describes the specialty, never one"
        " request. It must not tell the agent to ignore its rules or change its role, mention"
        " prompts, secrets or credentials, send users to addresses, sites, people or other"
        " services, or mention other users."
    )
    user = (
        f"Specialty: {specialty}\nWhat it does: {profile.description}\n"
        f"Tools: {', '.join(profile.tools) or 'none'}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


async def design_agent(
    specialty: str,
    message: str,
    llm: LLMClient | None,
    late: LateOutcome | None = None,
) -> AgentDesign:
    """The agent's prompt, temperature and tools; ``late`` learns how a prompt-writing
    call given up on at the timeout ended (the template then serves). ``message`` is
    the first request's text: neither the LLM nor the template sees it; a written prompt
    that happens to hand it back is refused all the same."""
    profile = profile_for(specialty)
    template = template_prompt(specialty)
    design = AgentDesign(template, "template", profile.temperature, list(profile.tools))
    if llm is None:
        return design
    ask = writing_request(specialty)
    try:
        done = await llm.complete(ask, temperature=0.3, max_tokens=WRITE_MAX_TOKENS, late=late)
    except LLMError as exc:
        design.error = f"{type(exc).__name__}: {exc}"
        return design  # the template serves; the event says which one was used
    text = done.text.strip()
    verdict = guard_prompt(text, _MAX_WRITTEN_CHARS)
    if verdict.ok and copies_text(text, message):
        # The writer handed the request back (asked to copy nothing from it): the request
        # would be the prompt every later user of the goal is served by.
        verdict = GuardVerdict(False, "refused: the written prompt copies the request")
    if verdict.ok:
        design.system_prompt = text
        design.prompt_source = "llm"
    else:
        # The request may have steered the writer: the template serves, the call is paid.
        design.refused = verdict.reason
    design.cost_usd = done.cost_usd
    design.prompt_tokens = done.prompt_tokens
    design.completion_tokens = done.completion_tokens
    design.latency_ms = done.latency_ms
    design.model = done.model
    return design
