"""Slash-command requests signed the way Slack signs them, for tests of the Bolt endpoint."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode


def slash_command(
    secret: str, text: str, *, user_id: str = "U123", command: str = "/improve"
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a slash command; signature v0=hmac_sha256(secret, "v0:{ts}:{body}")."""
    body = urlencode(
        {
            "token": "legacy-verification-token",
            "team_id": "T0001",
            "team_domain": "example",
            "channel_id": "C0001",
            "user_id": user_id,
            "user_name": "someone",
            "command": command,
            "text": text,
            "response_url": "https://hooks.slack.invalid/commands/1",
            "trigger_id": "1.2.3",
        }
    )
    ts = str(int(time.time()))
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": f"v0={digest}",
    }
    return body.encode(), headers
