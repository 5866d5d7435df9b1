"""API keys of the HTTP surfaces: minting, hashing, and the registry folded from the key topics.

A key reads ``orch_<key_id>_<secret>``: the id says which record to check, the
secret is 32 random bytes. Only the SHA-256 of the whole key travels in
``api_key_issued`` (a compacted topic); a fast hash is enough because the secret
is random, not a password a person chose. A key maps to one goal, one user and a
role (``user`` or ``operator``); ``api_key_revoked`` ends it for good.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from streams.config import OperatorSettings
from streams.events import ApiKeyIssued, ApiKeyRevoked, Event, Role
from streams.kafka import KafkaSettings
from streams.registry import read_topics_to_end
from streams.views import TopicView

__all__ = [
    "CATCH_UP_INTERVAL_S",
    "KEY_TOPICS",
    "Identity",
    "KeyCatchUp",
    "KeyRegistry",
    "KeyView",
    "hash_key",
    "identify_reading",
    "key_id_of",
    "mint_key",
    "operators_from",
]

KEY_TOPICS = (ApiKeyIssued.topic, ApiKeyRevoked.topic)

_KEY = re.compile(r"orch_([0-9a-f]{16})_[A-Za-z0-9_-]{20,100}")  # matched whole


# Reads of the key topics for keys a service has not seen: at most one per this many s.
CATCH_UP_INTERVAL_S = 1.0


class KeyCatchUp:
    """Reads the key topics up to now for a key not seen yet, at most once per ``interval`` s.

    Anyone may send a string shaped like a key, so a read per unknown key would be a
    broker round trip per request, as often as they like. A caller waits for a read that
    starts after it called (a key created before its request was sent is then read);
    callers that come while one waits or runs share the next.
    """

    def __init__(
        self, sync: Callable[[], Awaitable[object]], interval: float = CATCH_UP_INTERVAL_S
    ) -> None:
        self._sync = sync
        self._interval = interval
        self._lock = asyncio.Lock()
        self._started: float | None = None

    async def __call__(self) -> None:
        loop = asyncio.get_running_loop()
        called = loop.time()
        async with self._lock:
            if self._started is not None:
                if self._started >= called:
                    return  # a read that began after this call has ended
                await asyncio.sleep(self._started + self._interval - loop.time())
            self._started = loop.time()
            await self._sync()


@dataclass(frozen=True)
class Identity:
    """Who a key speaks for."""

    key_id: str
    goal_id: str
    user_id: str
    role: Role

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id in a string shaped like a key, or None; the shape says nothing of validity."""
    match = _KEY.fullmatch(key.strip())
    return match.group(1) if match else None


def mint_key(
    goal_id: str, user_id: str, role: Role = "user", *, source: str, label: str = ""
) -> tuple[str, ApiKeyIssued]:
    """A new key and the event that registers it; the key itself is shown once, never stored."""
    key_id = secrets.token_hex(8)
    key = f"orch_{key_id}_{secrets.token_urlsafe(32)}"
    event = ApiKeyIssued(
        source=source,
        goal_id=goal_id,
        user_id=user_id,
        key_id=key_id,
        key_hash=hash_key(key),
        role=role,
        label=label,
    )
    return key, event


@dataclass
class _Record:
    issued: ApiKeyIssued
    revoked_at: datetime | None = None


class KeyRegistry:
    """Every key issued and revoked, folded from the log in any order."""

    def __init__(self) -> None:
        self._keys: dict[str, _Record] = {}
        self._revoked: dict[str, datetime] = {}

    def apply(self, event: Event) -> None:
        if isinstance(event, ApiKeyIssued):
            self._keys[event.key_id] = _Record(event, self._revoked.get(event.key_id))
        elif isinstance(event, ApiKeyRevoked):
            # A revocation may be read before its issue (topics are read side by side).
            self._revoked.setdefault(event.key_id, event.occurred_at)
            record = self._keys.get(event.key_id)
            if record is not None and record.revoked_at is None:
                record.revoked_at = event.occurred_at

    def authenticate(self, key: str) -> Identity | None:
        """The identity of a valid, unrevoked key; None for anything else."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        record = self._keys.get(key_id)
        if record is None or record.revoked_at is not None:
            return None
        if not hmac.compare_digest(record.issued.key_hash, hash_key(key.strip())):
            return None
        return _identity(record.issued)

    def is_operator(self, user_id: str | None) -> bool:
        """Whether ``user_id`` holds an unrevoked operator key."""
        return user_id is not None and any(
            r.revoked_at is None and r.issued.role == "operator" and r.issued.user_id == user_id
            for r in self._keys.values()
        )

    def holds_user_key(self, user_id: str) -> bool:
        """Whether ``user_id`` holds an unrevoked key of the user role, in any goal."""
        return any(
            r.revoked_at is None and r.issued.role == "user" and r.issued.user_id == user_id
            for r in self._keys.values()
        )

    def known(self, key_id: str) -> bool:
        return key_id in self._keys

    def dump(self) -> dict[str, Any]:
        """Every key and revocation as plain values (for a snapshot)."""
        return {
            "issued": [r.issued.model_dump(mode="json") for r in self._keys.values()],
            "revoked": list(self._revoked.items()),
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace every key with those of a :meth:`dump`."""
        fresh = KeyRegistry()
        for raw in data["issued"]:
            fresh.apply(ApiKeyIssued.model_validate(raw))
        for key_id, at in data["revoked"]:
            fresh._revoked[key_id] = at
            record = fresh._keys.get(key_id)
            if record is not None:
                record.revoked_at = fresh._revoked[key_id]
        self._keys, self._revoked = fresh._keys, fresh._revoked

    def listing(self) -> list[dict[str, object]]:
        """Every key without its hash, oldest first (``orchestrator keys list``)."""
        rows: list[dict[str, object]] = []
        for record in sorted(self._keys.values(), key=lambda r: r.issued.occurred_at):
            issued = record.issued
            rows.append(
                {
                    "key_id": issued.key_id,
                    "goal_id": issued.goal_id,
                    "user_id": issued.user_id,
                    "role": issued.role,
                    "label": issued.label,
                    "created_at": issued.occurred_at.isoformat(),
                    "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
                }
            )
        return rows


def _identity(issued: ApiKeyIssued) -> Identity:
    return Identity(issued.key_id, issued.goal_id, issued.user_id, issued.role)


DEFAULT_OPERATORS: str = OperatorSettings.model_fields["operators"].default


async def read_keys(settings: KafkaSettings) -> KeyRegistry:
    """Every key issued and revoked until now, read from the key topics (a one-off read;
    a service that checks keys all along keeps a :class:`KeyView`)."""
    keys = KeyRegistry()
    for event in await read_topics_to_end(settings, KEY_TOPICS):
        keys.apply(event)
    return keys


def operators_from(text: str | None = None) -> frozenset[str]:
    """``ORCH_OPERATORS`` (default ``operator``, the local CLI's identity): users trusted as
    operators without a key. Inside the Kafka boundary producers are trusted; on a shared
    cluster set it empty and give operators keys."""
    if text is None:
        text = OperatorSettings.read("operators")
    return frozenset(u.strip() for u in text.split(",") if u.strip())


class KeyView:
    """A :class:`KeyRegistry` kept current from the key topics, for a service that checks keys.

    It reads every partition outside any group; :meth:`is_operator` of a user it does
    not know yet first catches up with what is on the topics now (a key created a
    moment before its first use).
    """

    def __init__(self, settings: KafkaSettings, *, operators: Iterable[str] = ()) -> None:
        self.registry = KeyRegistry()
        self.operators = frozenset(operators)
        self._view = TopicView(settings, KEY_TOPICS, self.registry.apply, source="keys")

    async def start(self) -> None:
        await self._view.start()

    async def stop(self) -> None:
        await self._view.stop()

    async def sync(self, timeout: float = 5.0) -> None:
        """Wait until what is on the key topics now has been read (or ``timeout``)."""
        await self._view.sync(timeout=timeout)

    async def is_operator(self, user_id: str | None) -> bool:
        """Whether ``user_id`` is an operator as the key topics say now: read up to now
        first (operator commands are few), so a key issued a moment ago counts and one
        revoked a moment ago does not (the view once answered from what it had read)."""
        if user_id is None:
            return False
        if user_id in self.operators:
            return True
        await self.sync()
        return self.registry.is_operator(user_id)


async def identify_reading(
    registry: KeyRegistry, key: str, catch_up: Callable[[], Awaitable[object]]
) -> Identity | None:
    """Who ``key`` speaks for; a key-shaped string not seen yet has the key topics read up
    to now first (``catch_up``), since a key created a moment ago may not have been read."""
    who = registry.authenticate(key)
    key_id = key_id_of(key)
    if who is None and key_id is not None and not registry.known(key_id):
        await catch_up()
        who = registry.authenticate(key)
    return who
