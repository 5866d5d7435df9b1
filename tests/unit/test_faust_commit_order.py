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


def _consumer(generation: int, *, flowing: bool = True) -> Any:
    """The parts of Faust's consumer that its ack reads, on a live flow control event."""
    from collections import defaultdict

    from mode.utils.queues import FlowControlEvent

    flow = FlowControlEvent(initially_suspended=not flowing)
    app = SimpleNamespace(
        consumer_generation_id=generation,
        flow_control=flow,
        topics=SimpleNamespace(acks_enabled_for=lambda topic: True),
    )
    return SimpleNamespace(
        app=app,
        _unacked_messages=set(),
        _committed_offset=defaultdict(lambda: None),
        _acked_index=defaultdict(set),
        _acked=defaultdict(list),
        _n_acked=0,
        _waiting_for_ack=None,
    )


def _message(offset: int, generation: int) -> Any:
    from faust.types import TP, Message

    return Message(
        "budget-in",
        0,
        offset,
        0.0,
        0,
        None,
        b"k",
        b"v",
        None,
        tp=TP("budget-in", 0),
        generation_id=generation,
    )


def test_an_input_read_before_the_rebalance_is_not_marked_done_by_the_next_generation():
    # Chaos seed 5: skipped (never processed) inputs were acknowledged, their offsets
    # committed during the table's recovery, and the seek after it started past them.
    consumer = _consumer(generation=3)
    old = _message(7, generation=2)
    consumer._unacked_messages.add(old)
    assert Consumer.ack(consumer, old) is False
    assert consumer._acked[old.tp] == [] and old not in consumer._unacked_messages
    current = _message(7, generation=3)
    assert Consumer.ack(consumer, current) is True
    assert consumer._acked[current.tp] == [7]


def test_an_input_finished_while_the_flow_is_suspended_is_read_again_not_marked_done():
    consumer = _consumer(generation=3, flowing=False)
    message = _message(9, generation=3)
    assert Consumer.ack(consumer, message) is False
    assert consumer._acked[message.tp] == []
    consumer.app.flow_control.resume()
    assert Consumer.ack(consumer, _message(9, generation=3)) is True
    assert consumer._acked[message.tp] == [9]
