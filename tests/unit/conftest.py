"""Every unit test sees the environment CI has, whatever the shell that runs it set.

The settings classes read ORCH_*, KAFKA_*, OPENAI_*, CLICKHOUSE_* and SLACK_* variables:
a developer's ORCH_LLM_MODELS made 160 tests fail at once, ORCH_ROUTER_POLICY=static or
ORCH_OPERATORS others. A test that wants one sets it with ``monkeypatch`` (after this).

The terminal's variables are cleared too: the CLI's consoles take their width and colours
from COLUMNS, FORCE_COLOR and the like when they print (COLUMNS=20 wrapped the answers the
CLI tests look for). The time zone is read once, when a module is imported, so it is
settled here, before the test modules are: the embedded ClickHouse takes it from TZ (in a
zone east of UTC, the trusted reader's today() was the next day while the guarded
surface's, in UTC, was not).
"""

from __future__ import annotations

import os
import time

import pytest

_PREFIXES = ("ORCH_", "KAFKA_", "OPENAI_", "CLICKHOUSE_", "SLACK_")
_TERMINAL = ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "CLICOLOR", "CLICOLOR_FORCE",
             "TTY_COMPATIBLE", "TTY_INTERACTIVE")  # fmt: skip

for _name in _TERMINAL:
    os.environ.pop(_name, None)
os.environ["TZ"] = "UTC"
time.tzset()


@pytest.fixture(autouse=True)
def _the_environment_ci_has(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_PREFIXES) or name in _TERMINAL:
            monkeypatch.delenv(name)
