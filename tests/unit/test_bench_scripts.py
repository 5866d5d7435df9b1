"""Every benchmark script starts the way the docs and `make bench` run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))


def test_the_benchmarks_are_found():
    assert {"latency", "learning", "sink", "router_catchup"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("form", ["module", "path"])
def test_benchmark_script_starts(name: str, form: str) -> None:
    target = ["-m", f"bench.{name}"] if form == "module" else [str(Path("bench") / f"{name}.py")]
    done = subprocess.run(
        [sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()
