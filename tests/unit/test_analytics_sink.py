"""The sink's batching policy as configured from the environment."""

from __future__ import annotations

import pytest

from services.analytics.settings import AnalyticsSettings
from services.analytics.sink import SinkConfig


def test_sink_config_from_environment(monkeypatch):
    monkeypatch.setenv("ORCH_SINK_BATCH_ROWS", "200")
    monkeypatch.setenv("ORCH_SINK_BATCH_MS", "50")
    monkeypatch.setenv("ORCH_SINK_MAX_BATCH_ROWS", "400")
    monkeypatch.setenv("ORCH_SINK_BACKOFF_MAX_MS", "1500")
    config = AnalyticsSettings.from_env().sink_config()
    assert (config.batch_rows, config.batch_wait, config.max_batch_rows, config.backoff_max) == (
        200,
        0.05,
        400,
        1.5,
    )


def test_sink_config_defaults_and_bounds(monkeypatch):
    for name in ("BATCH_ROWS", "BATCH_MS", "MAX_BATCH_ROWS", "BACKOFF_MAX_MS"):
        monkeypatch.delenv(f"ORCH_SINK_{name}", raising=False)
    config = AnalyticsSettings.from_env().sink_config()
    assert (config.batch_rows, config.batch_wait) == (5000, 0.2)
    with pytest.raises(ValueError):
        SinkConfig(batch_rows=10, max_batch_rows=5)
    with pytest.raises(ValueError):
        SinkConfig(batch_wait=0)


def test_an_idle_sink_polls_once_a_second_a_busy_one_by_its_batch_time():
    import time
    from types import SimpleNamespace

    from aiokafka import TopicPartition

    from services.analytics.sink import _Batch, _Sink
    from streams.kafka import IDLE_POLL_MS

    sink = object.__new__(_Sink)  # the polling policy alone, no consumer
    sink._config = SinkConfig(batch_wait=0.2)
    sink._batch, sink._inflight = _Batch(), None
    assert sink._poll_timeout_ms() == IDLE_POLL_MS == 1000  # nothing read, nothing writing
    sink._inflight = SimpleNamespace(done=lambda: False)
    assert sink._poll_timeout_ms() == 200  # an insert runs: look again at the batch time
    sink._batch.marks.append((TopicPartition("t", 0), 5))
    assert sink._poll_timeout_ms() == 20  # rows wait for the running insert
    sink._inflight = None
    sink._batch.started = time.monotonic()
    assert 150 <= sink._poll_timeout_ms() <= 200  # rows wait for the batch time
