"""Every settings class of the platform: the one source of docs/configuration.md's tables.

``python -m services.settings``          prints every table
``python -m services.settings --write``  rewrites the tables of docs/configuration.md
``python -m services.settings --check``  exits 1 when docs/configuration.md is out of date

A setting that more than one service reads is declared in ``streams`` (broker, LLM, budget
limits, operators, processes); one that a single service reads, in that service's
``settings.py``. This module is no service: it only gathers them.
"""

from __future__ import annotations

import sys

from services.analytics.settings import AnalyticsSettings
from services.gateway.settings import GatewaySettings
from services.improvement.patterns import PatternSettings
from services.improvement.settings import ImprovementSettings
from services.improvement.versions import CanaryPolicy
from services.loader.settings import LoaderSettings
from services.router.settings import RouterSettings
from streams.config import (
    ROOT,
    BrokerSettings,
    BudgetSettings,
    JudgeSettings,
    LauncherSettings,
    OperatorSettings,
    ProcessSettings,
)
from streams.llm import LLMSettings
from streams.settings import EnvSettings, render_table, rewrite_doc

__all__ = ["CATALOG", "DOC"]

CATALOG: tuple[type[EnvSettings], ...] = (
    BrokerSettings,
    LLMSettings,
    BudgetSettings,
    RouterSettings,
    LoaderSettings,
    PatternSettings,
    CanaryPolicy,
    ImprovementSettings,
    JudgeSettings,
    AnalyticsSettings,
    GatewaySettings,
    OperatorSettings,
    ProcessSettings,
    LauncherSettings,
)
"""Every settings class, in the order of docs/configuration.md."""

DOC = ROOT / "docs" / "configuration.md"


def _main(argv: list[str]) -> int:
    if not argv:
        for cls in CATALOG:
            print(f"## {cls.title}\n\n{render_table(cls)}\n")
        return 0
    text = DOC.read_text()
    fresh = rewrite_doc(text, CATALOG)
    if argv == ["--write"]:
        DOC.write_text(fresh)
        return 0
    if argv == ["--check"]:
        if fresh != text:
            print(f"{DOC} is out of date: run python -m services.settings --write")
            return 1
        return 0
    print("usage: python -m services.settings [--write | --check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
