"""`orchestrator up --detach` waits for the services' groups, through a new broker's first
moments (no group coordinator until its offsets topic exists)."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError

from services.cli import status
from services.cli.status import GroupStatus, wait_until_joined
from streams.kafka import KafkaSettings


class _Admin:
    def __init__(self, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def _settings(monkeypatch: pytest.MonkeyPatch) -> KafkaSettings:
    monkeypatch.setattr(status, "AIOKafkaAdminClient", _Admin)
    monkeypatch.setattr(KafkaSettings, "client_args", lambda self: {})
    return KafkaSettings("127.0.0.1:1", "t.")


def test_a_new_brokers_missing_coordinator_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch)
    calls = []

    async def describe(admin: Any, groups: list[str]) -> list[GroupStatus]:
        calls.append(groups)
        if len(calls) < 3:
            raise GroupCoordinatorNotAvailableError("no coordinator yet")
        return [GroupStatus(g, "Stable", 1, frozenset()) for g in groups]

    monkeypatch.setattr(status, "describe_groups", describe)
    assert wait_until_joined(settings, ["router", "loader"], timeout=10) == []
    assert len(calls) == 3


def test_an_error_that_will_not_pass_is_said_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch)

    calls = []

    async def describe(admin: Any, groups: list[str]) -> list[GroupStatus]:
        calls.append(groups)
        raise GroupAuthorizationFailedError("this login may not read the groups")

    monkeypatch.setattr(status, "describe_groups", describe)
    with pytest.raises(GroupAuthorizationFailedError):
        wait_until_joined(settings, ["router"], timeout=10)
    assert len(calls) == 1
