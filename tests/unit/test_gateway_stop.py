"""The gateway process's stop (``services.gateway.service.main``) over stand-ins for its
Kafka parts: whatever becomes of the drain, the server, the views and the client are
closed and the URL file is removed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.gateway import service
from services.gateway.http import GatewayApp
from streams.clock import FakeClock
from streams.kafka import KafkaSettings


class _Part:
    """A Kafka part of the gateway (SDK client, key view, run index) that notes its stop."""

    def __init__(self, name: str, stopped: list[str], fails: bool = False) -> None:
        self.name, self.stopped, self.fails = name, stopped, fails
        self.registry = None

    async def start(self, *args: Any) -> None:
        pass

    async def sync(self, timeout: float) -> None:
        pass

    async def stop(self) -> None:
        self.stopped.append(self.name)
        if self.fails:
            raise RuntimeError(f"{self.name} failed to stop")

    close = stop


async def _serve_then_stop(monkeypatch, tmp_path: Path, stopped: list[str]) -> int:
    """Runs the gateway until its URL file is written, then stops it; returns its port."""
    monkeypatch.setenv("ORCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ORCH_GATEWAY_PORT", "0")
    monkeypatch.setattr(service, "OrchestratorClient", lambda *a, **k: _Part("client", stopped))
    monkeypatch.setattr(service, "KeyView", lambda *a, **k: _Part("keys", stopped))
    # The run index fails to stop: the steps after it still run.
    monkeypatch.setattr(service, "RunIndex", lambda *a, **k: _Part("runs", stopped, True))
    ctx = SimpleNamespace(settings=KafkaSettings("127.0.0.1:1"), clock=FakeClock())
    stop = asyncio.Event()
    running = asyncio.create_task(service.main(ctx, stop))  # type: ignore[arg-type]
    urls = tmp_path / "run" / "gateway-urls"
    for _ in range(200):
        files = list(urls.glob("*.url")) if urls.exists() else []
        if files:
            break
        await asyncio.sleep(0.02)
    assert files, "the gateway did not start"
    port = int(files[0].stem)
    stop.set()
    with pytest.raises(TimeoutError):  # the drain's error is still the stop's
        await asyncio.wait_for(running, 10.0)
    return port


async def test_a_failed_drain_still_closes_everything(monkeypatch, tmp_path) -> None:
    async def drain(self: GatewayApp, grace: float, linger: float = 1.0) -> int:
        raise TimeoutError  # what a pending /v1/feedback made the drain raise

    monkeypatch.setattr(GatewayApp, "drain", drain)
    stopped: list[str] = []
    port = await _serve_then_stop(monkeypatch, tmp_path, stopped)
    assert stopped == ["runs", "keys", "client"]
    assert not list((tmp_path / "run" / "gateway-urls").glob("*.url"))
    with pytest.raises(OSError):  # the server is closed: nothing listens on its port
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
