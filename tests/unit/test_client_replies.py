"""The SDK client (and so the gateway) takes for a request's answer only an answer of that
request's goal, and for a command's verdict only a verdict: any event naming a waiting id
once ended the wait (a verdict under a run's id was an AssertionError, a 500 from the
gateway; another goal's completion under the run's id was served as its answer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from streams.client import OrchestratorClient
from streams.events import (
    Event,
    FeedbackDecided,
    FeedbackReceived,
    RequestReceived,
    WorkflowCompleted,
    WorkflowFailed,
)
from streams.kafka import Delivery, KafkaSettings


class _Replies:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()

    async def batches(self, timeout_ms: int = 0) -> AsyncIterator[list[Delivery]]:
        while True:
            yield [await self.queue.get()]

    def put(self, event: Event) -> None:
        self.queue.put_nowait(Delivery(event, event.topic, 0, 0))


class _Platform:
    """Answers each request a moment later; ``first`` puts a hostile reply before it."""

    def __init__(self, replies: _Replies, first: Callable[[Event], Event | None]) -> None:
        self.replies, self.first = replies, first

    async def send(self, event: Event) -> None:
        hostile = self.first(event)
        if hostile is not None:
            self.replies.put(hostile)
        if isinstance(event, RequestReceived):
            answer = WorkflowCompleted(
                source="loader", goal_id=event.goal_id, run_id=event.run_id, specialty="code",
                text=f"the answer for {event.goal_id}",
            )  # fmt: skip
            asyncio.get_running_loop().call_later(0.05, self.replies.put, answer)
        if isinstance(event, FeedbackReceived):
            verdict = FeedbackDecided(
                source="improvement",
                run_id=event.run_id,
                feedback_id=event.event_id,
                accepted=True,
                reason="ok",
            )
            asyncio.get_running_loop().call_later(0.05, self.replies.put, verdict)


async def _client(first: Callable[[Event], Event | None]) -> OrchestratorClient:
    client = OrchestratorClient(KafkaSettings("127.0.0.1:1", ""), source="gateway")
    replies = _Replies()
    client._replies = replies  # type: ignore[assignment]  # noqa: SLF001
    client._producer = _Platform(replies, first)  # type: ignore[assignment]  # noqa: SLF001
    client._reader = asyncio.create_task(client._read_replies())  # noqa: SLF001
    return client


HOSTILE: dict[str, Callable[[Event], Event | None]] = {
    "a feedback verdict under the run's id": lambda e: FeedbackDecided(
        source="x", run_id="r0", feedback_id=e.run_id or "", accepted=False, reason="x"
    ),
    "another goal's completion under the run's id": lambda e: WorkflowCompleted(
        source="x", goal_id="g-other", run_id=e.run_id, specialty="code", text="FORGED"
    ),
    "another goal's failure under the run's id": lambda e: WorkflowFailed(
        source="x", goal_id="g-other", run_id=e.run_id, reason="internal", detail="forged"
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_only_the_requests_own_answer_ends_its_wait(name: str) -> None:
    client = await _client(lambda e: HOSTILE[name](e) if isinstance(e, RequestReceived) else None)
    try:
        answer = await client.ask("hi", goal_id="g1", user_id="u1", timeout=5)
        assert answer.text == "the answer for g1"
    finally:
        client._reader.cancel()  # noqa: SLF001


async def test_a_verdict_wait_takes_only_a_verdict() -> None:
    def forged(event: Event) -> Event | None:
        if isinstance(event, FeedbackReceived):  # a completion under the feedback's id
            return WorkflowCompleted(
                source="x", goal_id="g-other", run_id=event.event_id, specialty="code", text="t"
            )
        return None

    client = await _client(forged)
    try:
        verdict = await client.feedback("some-run", user_id="u1", score=1, timeout=5)
        assert verdict.accepted and verdict.reason == "ok"
    finally:
        client._reader.cancel()  # noqa: SLF001
