"""How a new agent is made: its id, system prompt (LLM or template), temperature and tools.

An agent serves every later request of its goal, from every user, so its template
prompt holds nothing a request brought: the request's own context (the caller's system
message, earlier turns) goes to that request's call alone, through the loader.
"""

from __future__ import annotations

import hashlib
import uuid

from streams.llm import LateOutcome, LLMClient, LLMError
from streams.specialties import default_prompt, profile_for

__all__ = ["AgentDesign", "agent_id_for", "design_agent", "template_prompt"]

_NS = uuid.UUID("5b0c3a52-6a4f-4d0e-9d1c-6f3b0f7e2a10")


def agent_id_for(specialty: str, approval_event_id: str) -> str:
    """Deterministic, so a redelivered approval makes the same agent, not a second one."""
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
    """A designed agent; ``completion`` is set when the LLM wrote the prompt."""

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


def writing_request(specialty: str, message: str) -> list[dict[str, str]]:
    """The messages that ask the LLM to write a new agent's system prompt."""
    profile = profile_for(specialty)
    return [
        {
            "role": "system",
            "content": "You write system prompts for specialist AI agents. Reply with the prompt"
            " only: at most 120 words, second person, concrete about scope and style.",
        },
        {
            "role": "user",
            "content": f"Specialty: {specialty}\nWhat it does: {profile.description}\n"
            f"Tools: {', '.join(profile.tools) or 'none'}\n"
            f"A typical request: {message[:500]}",
        },
    ]


async def design_agent(
    specialty: str,
    message: str,
    llm: LLMClient | None,
    late: LateOutcome | None = None,
) -> AgentDesign:
    """The agent's prompt, temperature and tools; ``late`` learns how a prompt-writing
    call given up on at the timeout ended (the template then serves). ``message`` is
    the first request's text: the LLM sees an excerpt of it, the template none."""
    profile = profile_for(specialty)
    template = template_prompt(specialty)
    design = AgentDesign(template, "template", profile.temperature, list(profile.tools))
    if llm is None:
        return design
    ask = writing_request(specialty, message)
    try:
        done = await llm.complete(ask, temperature=0.3, max_tokens=300, late=late)
    except LLMError as exc:
        design.error = f"{type(exc).__name__}: {exc}"
        return design  # the template serves; the event says which one was used
    text = done.text.strip()
    if text:
        design.system_prompt = text
        design.prompt_source = "llm"
    design.cost_usd = done.cost_usd
    design.prompt_tokens = done.prompt_tokens
    design.completion_tokens = done.completion_tokens
    design.latency_ms = done.latency_ms
    design.model = done.model
    return design
