"""Faust's commit: the table's changelog is flushed before the agent's attached sends go out.

Chaos seed 6: the budget admitted a queued task, the admission went out (sends attached to
the input are published at commit), the goal's record did not, and the budget was killed;
read again from the older record, the same input later failed the run as a timeout, a
second outcome under the run's terminal id.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from faust.transport.consumer import Consumer

import streams.faust_app  # noqa: F401  (applies the patches)


async def test_the_producer_is_flushed_before_attached_sends_are_published():
    order: list[str] = []

    async def flush() -> None:
        order.append("flush")

    async def publish_for_tp_offset(tp: Any, offset: int) -> list[Any]:
        order.append("publish")
        return []

    app = SimpleNamespace(
        producer=SimpleNamespace(flush=flush),
        _attachments=SimpleNamespace(publish_for_tp_offset=publish_for_tp_offset),
    )
    consumer = SimpleNamespace(app=app)
    await Consumer._handle_attached(consumer, {"tp": 5})  # type: ignore[arg-type]
    assert order == ["flush", "publish"]
