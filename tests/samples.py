"""Valid sample events of every type, built from the models' own field types, and a
producer that records what a service sends (for unit tests of a service's handlers)."""

from __future__ import annotations

import asyncio
import types
import typing
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, get_args, get_origin

from streams.events import Event
from streams.llm import InMemoryLLM, LLMUnavailable, LLMUnsettled, PriceTable

E = typing.TypeVar("E", bound=Event)


def _value(name: str, ann: Any) -> Any:
    origin = get_origin(ann)
    if origin is typing.Annotated:
        return _value(name, get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(ann) if a is not type(None)][0]
        return _value(name, inner)
    if origin is Literal:
        return get_args(ann)[-1]
    if origin is dict:
        return {"k": _value(name, get_args(ann)[1])}
    if origin is list:
        return [_value(name, get_args(ann)[0])]
    if ann is str:
        return {"run_id": str(uuid.uuid4()), "goal_id": "goal-1", "user_id": "user-1"}.get(
            name, f"{name}-value"
        )
    if ann is int:
        return 3 if name != "score" else 4
    if ann is float:
        return 0.25
    if ann is bool:
        return True
    if ann is bytes:
        return b"\x00\xffraw"
    if ann is datetime:
        return datetime(2026, 11, 25, 12, 30, 1, 123000, tzinfo=UTC)
    raise TypeError(f"no sample for {name}: {ann}")


def sample_event(cls: type[Event], **overrides: Any) -> Event:
    """An instance with every field set, optional ones included."""
    values = {
        name: _value(name, field.annotation)
        for name, field in cls.model_fields.items()
        if name not in ("event_type", "event_id", "occurred_at")
    }
    values["source"] = "test"
    values.update(overrides)
    return cls(**values)


class RecordingProducer:
    """Stands in for a service's ``EventProducer``: keeps every event sent, in order."""

    def __init__(self) -> None:
        self.sent: list[Event] = []

    async def send(self, event: Event) -> None:
        self.sent.append(event)

    async def send_many(self, events: list[Event]) -> None:
        self.sent.extend(events)

    async def deliver(self, events: list[Event], *, what: str = "") -> None:
        self.sent.extend(events)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.sent if isinstance(e, kind)]


class GivenUpLLM(InMemoryLLM):
    """An endpoint that took the call but answers after the caller's timeout: the call
    raises (settling) at the timeout, and its outcome goes to ``late`` a moment later:
    the answer (``outcome="answer"``), an unknown end (``"unsettled"``) or a failure that
    billed nothing (``"failed"``)."""

    def __init__(self, prices: PriceTable | None = None, outcome: str = "answer") -> None:
        super().__init__(prices=prices)
        self.outcome = outcome

    async def complete(self, messages: Any, **options: Any) -> Any:
        late = options.pop("late")
        finished = await super().complete(messages, **options)

        async def answer_later() -> None:
            await asyncio.sleep(0.2)
            if self.outcome == "answer":
                await late(finished)
            elif self.outcome == "failed":
                await late(LLMUnavailable("LLM endpoint answered HTTP 503"))
            else:
                await late(LLMUnsettled("unanswered"))

        asyncio.get_running_loop().create_task(answer_later())
        failure = LLMUnavailable("LLM endpoint timed out after 10 s")
        failure.settling = True
        raise failure
