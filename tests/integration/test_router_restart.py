"""A router started on an existing log serves with everything that log taught it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from local.platform import Launcher
from services.router.policy import features_of
from streams.events import Event, RequestReceived, RouteDecided, WorkflowAssessed
from streams.kafka import EventConsumer, EventProducer

pytestmark = pytest.mark.broker

RUNS = 120


def _history() -> list[Event]:
    """Decisions and their assessments: the research specialty always did far better."""
    out: list[Event] = []
    for i in range(RUNS):
        specialty = ("research", "writing", "customer_support")[i % 3]
        message = f"summarize the survey on ledgers {i % 7}"
        out.append(
            RouteDecided(
                source="router",
                run_id=f"old-{i}",
                goal_id="g1",
                specialty=specialty,
                action="reuse",
                policy="learned",
                probability=1 / 3,
                features=features_of(message).as_list(),
            )
        )
        out.append(
            WorkflowAssessed(
                source="improvement",
                run_id=f"old-{i}",
                specialty=specialty,
                quality=0.95 if specialty == "research" else 0.1,
            )
        )
    # Every assessment is on the log before any decision: a catch-up that needs a
    # decision first would learn nothing from this history.
    return [e for e in out if isinstance(e, WorkflowAssessed)] + [
        e for e in out if isinstance(e, RouteDecided)
    ]


async def test_a_router_started_on_a_log_has_learned_from_all_of_it(settings, tmp_path):
    async with EventProducer(settings) as producer:
        await producer.send_many(_history())
    env = {
        "ORCH_ROUTER_POLICY": "learned",
        "ORCH_ROUTER_SEED": "1",
        "ORCH_ROUTER_EPSILON": "0.03",
        "ORCH_ROUTER_ARMS": "research,writing,customer_support",
    }
    launcher = Launcher(tmp_path, settings=settings, data_dir=tmp_path, env=env, stop_timeout=20)
    launcher.start("router")
    try:
        run_id = f"new-{uuid.uuid4().hex[:6]}"
        request = RequestReceived(
            source="test",
            run_id=run_id,
            goal_id="g1",
            user_id="u1",
            message="summarize the survey on ledgers 3",
        )
        decisions = EventConsumer(settings, ["route_decided"], group_id=None)
        async with EventProducer(settings) as producer, decisions:
            await producer.send(request)
            decided = None

            async def wait() -> RouteDecided:
                async for delivery in decisions:
                    if delivery.event.run_id == run_id:
                        assert isinstance(delivery.event, RouteDecided)
                        return delivery.event
                raise AssertionError("route_decided ended")

            decided = await asyncio.wait_for(wait(), 60)
        # All 120 outcomes were folded in (the version counts them), and the decision
        # follows what they taught unless this one request explored.
        assert decided.policy == "learned" and decided.policy_version == 1 + RUNS
        best = max(
            (k for k in decided.scores if k.startswith("specialty:")),
            key=lambda k: decided.scores[k],
        )
        assert best == "specialty:research"
    finally:
        launcher.stop_all()
