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
