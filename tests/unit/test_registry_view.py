"""The registry view's answers by goal and specialty, as the router and loader ask them."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from streams.events import AgentRetired, AgentSpawned
from streams.registry import AgentRecord, RegistryView

T0 = datetime(2026, 12, 5, tzinfo=UTC)
SPECIALTIES = ("code", "writing", "math")


def _spawned(agent: str, goal: str, specialty: str, version: int = 1) -> AgentSpawned:
    return AgentSpawned(
        source="spawner", agent_id=agent, goal_id=goal, specialty=specialty,
        system_prompt="p", temperature=0.5, model="m", version=version, occurred_at=T0,
    )  # fmt: skip


def _scan(view: RegistryView, goal: str | None, specialty: str | None, retired: bool) -> set[str]:
    """What the view should answer: every record looked at."""
    return {
        a.agent_id
        for a in view.agents.values()
        if a.retired == retired
        and (goal is None or a.goal_id == goal)
        and (specialty is None or a.specialty == specialty)
    }


def _ids(records: list[AgentRecord]) -> set[str]:
    return {r.agent_id for r in records}


def test_answers_by_goal_match_a_scan_of_every_agent_through_spawns_retirements_and_revivals():
    rng = random.Random(5)
    view = RegistryView()
    for step in range(3_000):
        agent = f"a{rng.randrange(400)}"
        roll = rng.random()
        if roll < 0.5:
            known = view.get(agent)
            goal = known.goal_id if known else f"g{rng.randrange(40)}"
            specialty = known.specialty if known else rng.choice(SPECIALTIES)
            view.apply(
                _spawned(agent, goal, specialty, version=(known.version + 1) if known else 1)
            )
        elif roll < 0.8:
            view.apply(AgentRetired(source="loader", agent_id=agent, specialty="code"))
        elif (record := view.get(agent)) is not None:
            record.retired = False  # the loader revives an agent in place
        if step % 100 == 0:
            for goal in (f"g{rng.randrange(41)}", None):
                for specialty in (*SPECIALTIES, None):
                    assert _ids(view.live(goal, specialty)) == _scan(view, goal, specialty, False)
                    if goal is not None and specialty is not None:
                        got = _ids(view.retired(goal, specialty))
                        assert got == _scan(view, goal, specialty, True)
    # A snapshot's restore answers the same.
    again = RegistryView()
    again.restore(view.dump())
    for goal in {a.goal_id for a in view.agents.values()}:
        for specialty in SPECIALTIES:
            assert _ids(again.live(goal, specialty)) == _ids(view.live(goal, specialty))
            assert _ids(again.retired(goal, specialty)) == _ids(view.retired(goal, specialty))


def test_a_goals_agents_are_found_without_looking_at_other_goals():
    view = RegistryView()
    for g in range(1_000):
        for specialty in SPECIALTIES:
            view.apply(_spawned(f"{specialty}-{g}", f"g{g}", specialty))
    # A record that breaks any comparison, in the id map only: a scan of every agent ever
    # spawned (25 ms a request at 50,000 agents) would trip on it.
    view.agents["unreadable"] = None  # type: ignore[assignment]
    assert _ids(view.live("g7", "code")) == {"code-7"}
    assert _ids(view.live("g7")) == {"code-7", "writing-7", "math-7"}
    assert view.retired("g7", "code") == []


def test_a_retirement_read_before_its_spawn_still_retires_the_agent():
    # The spawner sends both at once for an agent announced too late after its approval;
    # read side by side after a restart, the retirement may come first. It was dropped, and
    # the agent served again as live (a replay in the other order retired it).
    retired = AgentRetired(source="spawner", agent_id="a1", goal_id="g1", specialty="code")
    for order in ([_spawned("a1", "g1", "code"), retired], [retired, _spawned("a1", "g1", "code")]):
        view = RegistryView()
        for event in order:
            view.apply(event)
        assert _ids(view.live("g1")) == set() and _ids(view.retired("g1", "code")) == {"a1"}
    # Across a snapshot taken between the two as well.
    view = RegistryView()
    view.apply(retired)
    restored = RegistryView()
    restored.restore(view.dump(), view.retired_first())
    restored.apply(_spawned("a1", "g1", "code"))
    assert _ids(restored.live("g1")) == set()
    # A later config of a retired agent keeps it retired, as before.
    restored.apply(_spawned("a1", "g1", "code", version=2))
    assert _ids(restored.retired("g1", "code")) == {"a1"}
