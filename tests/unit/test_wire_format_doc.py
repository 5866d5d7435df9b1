"""docs/wire-format.md shows the fingerprints the codec really writes."""

from __future__ import annotations

import re

from streams.codec import MAGIC, default_codec
from streams.config import ROOT
from streams.events import RequestReceived


def test_the_documented_fingerprints_are_the_codecs():
    text = (ROOT / "docs" / "wire-format.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `((?:[0-9a-f]{2} ){7}[0-9a-f]{2})` \|$", text, re.M))
    assert set(rows) == {"request_received", "workflow_completed", "workflow_failed"}
    codec = default_codec()
    for topic, shown in rows.items():
        assert bytes.fromhex(shown.replace(" ", "")) == codec.fingerprint_for(topic), topic
    data = codec.encode(
        RequestReceived(source="t", run_id="r", goal_id="g", user_id="u", message="m")
    )
    assert data[:2] == MAGIC == b"\xc3\x01"
    assert data[2:10].hex(" ") == rows["request_received"]
