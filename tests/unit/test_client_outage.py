"""A request the broker does not acknowledge ends, on the client, in an error naming the outage."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaTimeoutError

from streams.client import OrchestratorClient
from streams.errors import BrokerUnavailable, OrchestratorError
from streams.events import Event
from streams.kafka import KafkaSettings


class _Unreachable:
    async def send(self, event: Event) -> None:
        raise KafkaTimeoutError()


async def test_a_request_the_broker_never_took_raises_broker_unavailable():
    client = OrchestratorClient(KafkaSettings("127.0.0.1:1", ""), source="t")
    client._producer = _Unreachable()  # type: ignore[assignment]
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await client.ask("hello", goal_id="g1", user_id="u1", timeout=1)
    finally:
        await client._replies.stop()
    assert isinstance(caught.value, OrchestratorError)
    assert "broker is unreachable" in str(caught.value) and caught.value.run_id in str(caught.value)
    assert client._waiting == {}  # nothing is left waiting for an answer
