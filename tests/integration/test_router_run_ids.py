"""A run id two goals' clients sent: the router refuses the second goal's request with a
failure of its own (its client is answered), in flight and after the first run ended,
across a restart; the first goal's run is routed and ends once, and stays its goal's for
the gateway reading the terminal topics."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from local.platform import Launcher
from services.gateway.runs import RunIndex
from streams.events import RequestReceived, WorkflowFailed, terminal_event_id
from streams.kafka import EventConsumer, EventProducer

pytestmark = pytest.mark.broker


def _request(goal: str, run: str) -> RequestReceived:
    return RequestReceived(
        source="sdk",
        run_id=run,
        goal_id=goal,
        user_id=f"u-{goal}",
        message="why does my python code raise KeyError",
        context={"specialty": "code"},
    )


async def test_a_second_goals_request_under_a_used_run_id_gets_a_failure(settings, tmp_path):
    run = str(uuid.uuid4())
    # No spawner: g1's request waits for an agent, then fails (no_agent) after 3 s.
    env = {"ORCH_ROUTER_POLICY": "static", "ORCH_SPAWN_TIMEOUT": "3"}
    launcher = Launcher(tmp_path, settings=settings, data_dir=tmp_path, env=env, stop_timeout=20)
    router = launcher.start("router")
    failed = EventConsumer(settings, [WorkflowFailed.topic], group_id=None)
    try:
        async with EventProducer(settings) as producer, failed:
            ends: dict[str, list[WorkflowFailed]] = {}
            deliveries = failed.__aiter__()

            async def ended(goal: str) -> WorkflowFailed:
                while not ends.get(goal):
                    delivery = await anext(deliveries)
                    event = delivery.event
                    if isinstance(event, WorkflowFailed) and event.run_id == run:
                        ends.setdefault(str(event.goal_id), []).append(event)
                return ends[goal][0]

            await producer.send(_request("g1", run))
            await asyncio.sleep(0.5)
            await producer.send(_request("g2", run))  # while g1's run waits for its agent
            refused = await asyncio.wait_for(ended("g2"), 60)
            assert refused.reason == "invalid" and "run id" in refused.detail
            assert refused.event_id != terminal_event_id(run)
            own = await asyncio.wait_for(ended("g1"), 60)
            assert own.reason == "no_agent" and own.event_id == terminal_event_id(run)

            launcher.restart(router)  # what it knows of the run id comes back
            await producer.send(_request("g3", run))  # after g1's run ended: was dropped
            await producer.send(_request("g1", run))  # redelivered: answered already
            third = await asyncio.wait_for(ended("g3"), 90)
            assert third.reason == "invalid" and third.event_id not in {
                refused.event_id,
                own.event_id,
            }
            # g1's run is not routed again (no second no_agent): for 5 s more, the spawn
            # timeout and 2 s besides, nothing but copies of what was sent (a redelivered
            # request refused again, by the same id).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended("nobody"), 5)
            ids = {goal: {e.event_id for e in events} for goal, events in ends.items()}
            assert ids == {
                "g1": {own.event_id},
                "g2": {refused.event_id},
                "g3": {third.event_id},
            }

        # The gateway reads both refusals and g1's end under the run id: the run is g1's
        # (a refusal read last once made it the refused goal's, and g1's feedback a 403).
        index = RunIndex(settings, lookback=timedelta(hours=1), source="test")
        await index.start(datetime.now(UTC))
        try:
            assert index._view is not None  # noqa: SLF001
            await asyncio.wait_for(index._view.ready.wait(), 60)  # noqa: SLF001
            assert index.goal_of(run) == "g1"
        finally:
            await index.stop()
    finally:
        launcher.stop_all()
