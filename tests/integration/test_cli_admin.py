"""An operator's commands refuse what would fail out of sight, on the real broker: revoking a
key id never issued (a mistyped id was reported as revoked while the real key kept working),
and a budget change asked by someone who is not an operator (it was reported as sent, and
refused only in the dead letters)."""

from __future__ import annotations

import pytest

from streams.client import OrchestratorClient
from streams.errors import InvalidRequest
from streams.events import ApiKeyIssued, ApiKeyRevoked, BudgetUpdateRequested
from streams.kafka import KafkaSettings
from streams.keys import KEY_TOPICS, KeyRegistry
from streams.registry import read_topics_to_end
from tests.integration.test_cli_workflows import _cli

pytestmark = pytest.mark.broker


async def _registry(settings: KafkaSettings) -> tuple[KeyRegistry, list[str]]:
    keys = KeyRegistry()
    revoked: list[str] = []
    for event in await read_topics_to_end(settings, KEY_TOPICS):
        keys.apply(event)
        if isinstance(event, ApiKeyRevoked):
            revoked.append(event.key_id)
    return keys, revoked


async def test_an_unknown_key_id_is_refused_and_a_known_one_revoked(settings: KafkaSettings):
    async with OrchestratorClient(settings, source="t") as client:
        key, issued = await client.create_key("g1", "alice")
        assert isinstance(issued, ApiKeyIssued)
        typo = ("0" if issued.key_id[0] != "0" else "1") + issued.key_id[1:]
        with pytest.raises(InvalidRequest, match="never issued"):
            await client.revoke_key(typo)

        # The CLI says so and exits 2 (invalid), as it does for a malformed id.
        code, out, err = await _cli(settings, "keys", "revoke", typo, "--json")
        assert code == 2, (out, err)
        assert out["error_type"] == "InvalidRequest" and typo in out["error"]
        code, text, err = await _cli(settings, "keys", "revoke", "0123456789abcdef")
        assert code == 2 and "never issued" in err and "revoked" not in text

        keys, revoked = await _registry(settings)
        assert revoked == [] and keys.authenticate(key) is not None

        # The real id is revoked, from the CLI; again from the SDK changes nothing.
        code, out, err = await _cli(settings, "keys", "revoke", issued.key_id, "--json")
        assert code == 0 and out == {"revoked": True, "key_id": issued.key_id}, err
        await client.revoke_key(issued.key_id)
        keys, revoked = await _registry(settings)
        assert revoked == [issued.key_id, issued.key_id]
        assert keys.authenticate(key) is None


async def test_a_budget_change_by_a_user_who_is_not_an_operator_is_refused(
    settings: KafkaSettings,
):
    async with OrchestratorClient(settings, source="t") as client:
        await client.create_key("g1", "alice")
        await client.create_key("ops", "ops-bob", "operator")
    code, out, err = await _cli(
        settings, "budget", "set", "g1", "--max-concurrent", "4", "--as", "alice", "--json"
    )
    assert code == 1, (out, err)
    assert out["error_type"] == "NotOperator" and "alice" in out["error"]
    assert await read_topics_to_end(settings, [BudgetUpdateRequested.topic]) == []
    # An operator: by an operator key, or named in ORCH_OPERATORS (`operator` by default).
    for user in ("ops-bob", "operator"):
        code, out, err = await _cli(
            settings, "budget", "set", "g1", "--max-concurrent", "4", "--as", user, "--json"
        )
        assert code == 0 and out["sent"] is True, (user, out, err)
    sent = await read_topics_to_end(settings, [BudgetUpdateRequested.topic])
    assert sorted(e.user_id or "" for e in sent) == ["operator", "ops-bob"]
