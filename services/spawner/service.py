"""The spawner: turns approved spawns into agent configs in the registry table.

The registry is a Faust table keyed by agent_id (changelog-backed); every change
is also published as ``agent_spawned`` for the views other services build.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from services.spawner.design import (
    WRITE_MAX_TOKENS,
    agent_id_for,
    design_agent,
    legacy_agent_id,
    spawned_event_id,
    writing_request,
)
from streams.clock import Clock
from streams.events import (
    SPAWN_APPROVAL_SECONDS,
    SPAWN_WRITE_SECONDS,
    AgentRetired,
    AgentSpawned,
    Event,
    GoalAgentsChanged,
    LlmCallCompleted,
    SpawnApproved,
)
from streams.faust_app import create_app, event_topic, start_app
from streams.llm import (
    Completion,
    LateOutcome,
    LLMClient,
    LLMError,
    LLMSettings,
    LLMUnsettled,
    create_llm,
    worst_case_usd,
)
from streams.runtime import ServiceContext
from streams.topics import PARTITIONS

__all__ = [
    "APP_NAME",
    "AgentIdTaken",
    "approval_age",
    "known_agent",
    "main",
    "new_agent",
    "prompt_writer",
]

log = logging.getLogger(__name__)
APP_NAME = "orchestrator.spawner"
SOURCE = "spawner"
_NS = uuid.UUID("7c2e4a1b-5d3f-4e8a-9b6c-1f0a2d3e4b5c")


class StaleApproval(Exception):
    """An approval too old to act on (see ``SPAWN_APPROVAL_SECONDS``)."""


class AgentIdTaken(Exception):
    """The approval's agent id names another goal's agent in the registry."""


def approval_age(approval: SpawnApproved, now: datetime) -> float:
    """How old the approval is at ``now``, in seconds; one stamped ahead of ``now`` counts
    as old as it is ahead.

    A few seconds of clock skew leave an approval fresh; one stamped in year 8999 (a valid
    event) was never stale, so it made an agent long after the budget gave its place back.
    """
    return abs((now - approval.occurred_at).total_seconds())


def known_agent(registry: Mapping[str, Any], event: SpawnApproved) -> AgentSpawned | None:
    """The approval's agent when the registry holds it already (a redelivered approval),
    under its id or the id approvals made before ids named their goal; None when it is new.

    Only an agent of the approval's own goal is its agent: another goal's agent under the
    same id is a collision, and answering with it handed one goal's agent (its prompt, its
    place in the router) to another goal's approval. A collision under the old, short id
    is left alone (the approval makes its agent under its own id); one under its own id
    raises :class:`AgentIdTaken`, so the approval fails (its slot is given back) rather
    than overwrite the other goal's agent."""
    agent_id = agent_id_for(event.specialty, event.event_id, event.goal_id)
    raw = registry.get(agent_id)
    if raw is not None:
        known = AgentSpawned.model_validate(raw)
        if known.goal_id != event.goal_id:
            raise AgentIdTaken(f"agent id {agent_id} is another goal's agent")
        return known
    raw = registry.get(legacy_agent_id(event.specialty, event.event_id))
    if raw is not None:
        known = AgentSpawned.model_validate(raw)
        if known.goal_id == event.goal_id:
            return known
    return None


def _changed(approval: SpawnApproved, agent_id: str, change: str) -> GoalAgentsChanged:
    """The goal-keyed notice the budget counts live agents by; one id per approval and change."""
    return GoalAgentsChanged(
        event_id=str(uuid.uuid5(_NS, f"{approval.event_id}:{change}")),
        source=SOURCE,
        run_id=approval.run_id,
        goal_id=approval.goal_id,
        agent_id=agent_id,
        change=change,  # type: ignore[arg-type]
        approval_id=approval.event_id,
    )


def announcement(
    approval: SpawnApproved, spawned: AgentSpawned, *, new: bool, now: datetime
) -> list[Event]:
    """What announces the approval's agent: spawned, counted by the budget; or, when it
    was written before a crash and is read again too late (the budget may have given the
    approval's place back and approved another), spawned and retired at once, so that it
    serves again only if a revival fits the goal's max_agents (the budget counts those)."""
    agent_id = spawned.agent_id
    if new or approval_age(approval, now) <= SPAWN_APPROVAL_SECONDS:
        return [spawned, _changed(approval, agent_id, "spawned")]
    retired = AgentRetired(
        event_id=str(uuid.uuid5(_NS, f"{approval.event_id}:retired late")),
        source=SOURCE,
        goal_id=approval.goal_id,
        agent_id=agent_id,
        specialty=approval.specialty,
        reason="announced too late after its approval",
        occurred_at=now,
    )
    return [spawned, retired, _changed(approval, agent_id, "retired")]


def prompt_writer(llm: LLMClient | None, age_s: float) -> LLMClient | None:
    """Who writes the prompt of an approval ``age_s`` old: the LLM while the budget's hold of
    the call's cost outlasts the call (``SPAWN_WRITE_SECONDS``), else nobody (the template)."""
    return llm if age_s <= SPAWN_WRITE_SECONDS else None


def _model_for(event: SpawnApproved, settings: LLMSettings) -> str:
    """The model the router chose for the agent, if it is one the platform offers."""
    if event.model and event.model in settings.model_names:
        return event.model
    if event.model:
        log.warning(
            "spawn %s asks for model %r, which ORCH_LLM_MODELS does not offer; %s serves",
            event.event_id,
            event.model,
            settings.default_model,
        )
    return settings.default_model


def late_prompt_report(
    ctx: ServiceContext, settings: LLMSettings, event: SpawnApproved
) -> LateOutcome:
    """Counts a prompt-writing call that went on past the timeout (the template served)."""
    agent_id = agent_id_for(event.specialty, event.event_id, event.goal_id)

    async def report(outcome: Completion | LLMError) -> None:
        if isinstance(outcome, Completion):
            usd, tokens = outcome.cost_usd, (outcome.prompt_tokens, outcome.completion_tokens)
            note = "answered after the timeout; the template served, the call is counted"
        elif isinstance(outcome, LLMUnsettled):
            ask = writing_request(event.specialty)
            usd = worst_case_usd(settings.prices, settings.model, ask, WRITE_MAX_TOKENS)
            tokens, note = (0, 0), f"{outcome}; counted at the call's worst case"
        else:
            return  # refused or failed in the end: nothing was billed
        await ctx.producer.deliver(
            [
                LlmCallCompleted(
                    event_id=str(uuid.uuid5(_NS, f"{event.event_id}:late prompt cost")),
                    source=SOURCE,
                    run_id=event.run_id,
                    goal_id=event.goal_id,
                    agent_id=agent_id,
                    model=outcome.model if isinstance(outcome, Completion) else settings.model,
                    purpose="spawn_prompt",
                    prompt_tokens=tokens[0],
                    completion_tokens=tokens[1],
                    cost_usd=usd,
                    ok=True,
                    error=note,
                    occurred_at=ctx.clock.now(),
                )
            ],
            what=f"the late prompt cost of {agent_id}",
        )

    return report


async def new_agent(
    event: SpawnApproved,
    llm: LLMClient | None,
    settings: LLMSettings,
    clock: Clock,
    late: LateOutcome | None = None,
) -> tuple[AgentSpawned, LlmCallCompleted | None]:
    """The agent an approval makes, and the cost of its prompt-writing call if one was made.

    The approval's ``context`` (the caller's system message, earlier turns) is not read:
    it belongs to the request that asked, and the loader gives it to that request's call.
    """
    agent_id = agent_id_for(event.specialty, event.event_id, event.goal_id)
    design = await design_agent(event.specialty, event.message, llm, late=late)
    now = clock.now()
    spawned = AgentSpawned(
        event_id=spawned_event_id(agent_id, 1),
        source=SOURCE,
        run_id=event.run_id,
        goal_id=event.goal_id,
        user_id=event.user_id,
        agent_id=agent_id,
        specialty=event.specialty,
        system_prompt=design.system_prompt,
        temperature=design.temperature,
        tools=design.tools,
        model=_model_for(event, settings),
        prompt_source=design.prompt_source,  # type: ignore[arg-type]
        version=1,
        occurred_at=now,
    )
    if llm is None:
        return spawned, None  # no call was made
    error = design.error
    if design.refused is not None:
        log.warning(
            "the prompt the LLM wrote for %s was %s; the template serves", agent_id, design.refused
        )
        error = f"the prompt it wrote was {design.refused}; the template served"
    cost = LlmCallCompleted(
        source=SOURCE,
        run_id=event.run_id,
        goal_id=event.goal_id,
        agent_id=agent_id,
        model=design.model or settings.model,
        purpose="spawn_prompt",
        prompt_tokens=design.prompt_tokens,
        completion_tokens=design.completion_tokens,
        cost_usd=design.cost_usd,
        latency_ms=design.latency_ms,
        ok=design.error is None,
        error=error,
        occurred_at=now,
    )
    return spawned, cost


async def main(ctx: ServiceContext, stop: asyncio.Event) -> None:
    settings = LLMSettings.from_env()
    llm = create_llm(settings, ctx.clock)
    app = create_app(APP_NAME, ctx.settings)
    # Written on the partition of the approval being handled (Faust's default): an agent sits
    # with its goal's approvals, so whichever instance handles a goal's approvals after a
    # rebalance or restart has recovered that goal's agents, and a redelivered approval
    # finds its agent (it once went to the partition of the agent id's hash, which another
    # instance may own: the approval then looked new, and one read too late was reported
    # spawn_failed for a live agent, freeing a max_agents place it still held).
    registry = app.Table("registry", default=None, partitions=PARTITIONS)
    approvals = event_topic(app, SpawnApproved.topic, ctx.settings, source=SOURCE)

    def _age(event: SpawnApproved) -> float:
        return approval_age(event, ctx.clock.now())

    async def _agent_of(event: SpawnApproved) -> tuple[AgentSpawned, bool]:
        """The approval's agent, made and written to the registry if it is new, and
        whether it was. Until the registry holds it, nothing exists and a failure here
        frees the approval's slot."""
        agent_id = agent_id_for(event.specialty, event.event_id, event.goal_id)
        known = known_agent(registry, event)
        if known is not None:
            return known, False
        late = late_prompt_report(ctx, settings, event)
        # An approval read late (a spawner restarted or behind) gets the template: the
        # budget's hold of a writing call's cost may lapse before a call begun now ends.
        writer = prompt_writer(llm, _age(event))
        spawned, cost = await new_agent(event, writer, settings, ctx.clock, late)
        if cost is not None:
            # The prompt call was made and is paid for: counted whatever happens next.
            await ctx.producer.deliver([cost], what=f"the prompt call's cost for {agent_id}")
        if (age := _age(event)) > SPAWN_APPROVAL_SECONDS:
            # The budget gives this approval's place back soon, if it has not already.
            raise StaleApproval(f"approved {age:.0f} s ago; {SPAWN_APPROVAL_SECONDS:.0f} s at most")
        registry[agent_id] = spawned.model_dump(mode="json")
        return spawned, True

    @app.agent(approvals)
    async def spawn(stream: Any) -> None:
        async for event in stream:
            if not isinstance(event, SpawnApproved):
                continue
            agent_id = agent_id_for(event.specialty, event.event_id, event.goal_id)
            try:
                spawned, new = await _agent_of(event)
            except Exception:  # a failed spawn is logged; the router times the wait out
                log.exception("spawn failed for %s", event.event_id)
                # The budget counted the approval under max_agents until it hears of it.
                failed = _changed(event, agent_id, "spawn_failed")
                await ctx.producer.deliver([failed], what=f"the failed spawn {event.event_id}")
                continue
            # The agent exists from here on: it is announced until the broker has every
            # event, never reported failed (the budget would free the slot of a live agent
            # and approve one more past max_agents). Sent again after a crash between the
            # table write and the send: the same event ids, one event to every reader.
            announce = announcement(event, spawned, new=new, now=ctx.clock.now())
            await ctx.producer.deliver(announce, what=f"the spawn of {agent_id}")
            log.info(
                "spawned %s for goal %s (%s prompt)%s",
                agent_id,
                event.goal_id,
                spawned.prompt_source,
                "" if len(announce) == 2 else ", retired at once: read again too late",
            )

    await start_app(app, ctx.settings)
    try:
        await stop.wait()
    finally:
        await app.stop()
        if llm is not None:
            await llm.aclose()
