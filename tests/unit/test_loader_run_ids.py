"""A run is its goal's: a run id another goal used too (a producer that chose its own ids)
names another run, which the loader answers, while a task of the same goal sent again is
still answered once."""

from __future__ import annotations

import asyncio

from services.loader.service import Loader
from streams.ended import EndedRuns
from streams.events import (
    LlmCallCompleted,
    TaskAdmitted,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)
from streams.llm import InMemoryLLM
from tests.unit.test_loader_attempts import PRICES, _learn_g2s_agent, _loader, _task


def _other_goals(loader: Loader, run: str = "r1") -> TaskAdmitted:
    """Goal g2's task under ``run``, on g2's own agent a2."""
    _learn_g2s_agent(loader)
    return _task(run).model_copy(update={"goal_id": "g2", "agent_id": "a2"})


def _answers(acked: list, goal: str) -> list[WorkflowCompleted | WorkflowFailed]:
    return [
        e for e in acked if isinstance(e, WorkflowCompleted | WorkflowFailed) and e.goal_id == goal
    ]


async def test_a_run_id_answered_for_another_goal_here_does_not_drop_the_task():
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    await asyncio.wait_for(loader.handle(_task("r1")), 10)
    theirs = _other_goals(loader)
    await asyncio.wait_for(loader.handle(theirs), 10)
    (answer,) = _answers(broker.acked, "g2")
    assert isinstance(answer, WorkflowCompleted) and answer.agent_id == "a2"
    assert len(llm.calls) == 2
    # g2's task sent again (a redelivery) is answered once, as g1's is.
    await asyncio.wait_for(loader.handle(theirs), 10)
    await asyncio.wait_for(loader.handle(_task("r1")), 10)
    assert len(llm.calls) == 2
    assert len(_answers(broker.acked, "g1")) == len(_answers(broker.acked, "g2")) == 1


async def test_a_run_id_another_goal_ended_elsewhere_does_not_drop_the_task():
    # Another loader (g1's agent lives on another partition) answered g1's run r1; this one
    # reads the answer from the terminal topics, then g2's task r1 comes.
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    loader.ended.apply(
        WorkflowCompleted(
            source="loader", run_id="r1", goal_id="g1", agent_id="a1", specialty="code", text="x"
        )
    )
    theirs = _other_goals(loader)
    await asyncio.wait_for(loader.handle(theirs), 10)
    assert len(_answers(broker.acked, "g2")) == 1 and len(llm.calls) == 1
    # g1's own task r1, replayed after that answer, is not answered or paid again.
    await asyncio.wait_for(loader.handle(_task("r1")), 10)
    assert _answers(broker.acked, "g1") == [] and len(llm.calls) == 1
    # And g2's, once its answer is on the terminal topics, neither (another loader's view).
    loader2, broker2 = _loader(llm)
    for event in _answers(broker.acked, "g2"):
        loader2.ended.apply(event)
    await asyncio.wait_for(loader2.handle(_other_goals(loader2)), 10)
    assert _answers(broker2.acked, "g2") == [] and len(llm.calls) == 1


async def test_a_run_id_another_goal_is_answering_here_does_not_drop_the_task():
    llm = InMemoryLLM(prices=PRICES, delay_s=0.5)
    loader, broker = _loader(llm)
    mine = asyncio.create_task(loader.handle(_task("r1")))
    await asyncio.sleep(0.2)  # g1's r1 is being answered
    await asyncio.wait_for(loader.handle(_other_goals(loader)), 10)
    await asyncio.wait_for(mine, 10)
    assert len(_answers(broker.acked, "g1")) == len(_answers(broker.acked, "g2")) == 1
    assert len(llm.calls) == 2


async def test_another_goals_attempts_of_a_run_id_are_never_charged_to_a_goal():
    # g1's run r1 was cut off mid-call (its workflow_started is on the log, no answer);
    # g2's task r1 is another run: g2 pays for its own call alone.
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    cut_off = WorkflowStarted(
        source="loader", run_id="r1", goal_id="g1", agent_id="a1", specialty="code"
    )
    loader.ended.apply(cut_off)
    await asyncio.wait_for(loader.handle(_other_goals(loader)), 10)
    costs = [e for e in broker.acked if isinstance(e, LlmCallCompleted)]
    assert len(costs) == 1 and costs[0].goal_id == "g2"
    assert "earlier attempt" not in (costs[0].error or "")
    # g1's own repeat still counts its cut-off attempt.
    assert loader.ended.attempts("r1", goal_id="g1") == [cut_off.event_id]


def test_ended_runs_are_by_goal_and_an_older_snapshot_still_ends_its_runs():
    ended = EndedRuns(clock=None, limit=3)  # type: ignore[arg-type]
    ended.apply(
        WorkflowFailed(source="budget", run_id="r1", goal_id="g1", reason="timeout", detail="")
    )
    assert ended.has("r1", "g1") and not ended.has("r1", "g2")
    assert ended.has("r1")  # any goal's (what the router asks)
    copy = EndedRuns(clock=None)  # type: ignore[arg-type]
    copy.restore(ended.dump())
    assert copy.has("r1", "g1") and not copy.has("r1", "g2")
    # A snapshot written before runs were kept by goal: its runs ended, whichever goal asks.
    old = EndedRuns(clock=None)  # type: ignore[arg-type]
    old.restore({"runs": ["r0"], "attempts": [], "failed": []})
    assert old.has("r0", "g1") and old.has("r0", "g2") and old.has("r0")
    # The newest ``limit`` (goal, run) pairs are kept.
    for goal in ("g2", "g3", "g4"):
        ended.add("r1", goal)
    assert not ended.has("r1", "g1") and ended.has("r1", "g4") and len(ended) == 3
