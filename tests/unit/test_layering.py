"""Who may import whom: the event layer stands alone, services talk only through it.

- ``streams`` (events, codec, Kafka, runtime, SDK) imports neither a service nor the local
  tooling (``local``: broker launcher, fake LLM, simulated worlds, process launcher).
- ``local`` imports no service: it runs them as processes.
- A service (``services/<name>``) imports no other service.
- The CLI (``services/cli``) is a client of the platform: it imports no service either,
  and reaches the platform only through events, read models the owning services publish
  and the analytics query server's client (``streams.sql``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(
    p.name for p in (ROOT / "services").iterdir() if p.is_dir() and (p / "__init__.py").exists()
)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, top-level or inside a function, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _offences(package: Path, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


def test_the_event_layer_imports_no_service_and_no_local_tooling() -> None:
    assert _offences(ROOT / "streams", ("services", "local")) == []


@pytest.mark.parametrize("service", [s for s in SERVICES if s != "cli"])
def test_a_service_imports_no_other_service(service: str) -> None:
    others = tuple(f"services.{s}" for s in SERVICES if s != service)
    assert _offences(ROOT / "services" / service, others) == []


def test_the_cli_imports_no_service() -> None:
    services = tuple(f"services.{s}" for s in SERVICES if s != "cli")
    assert _offences(ROOT / "services" / "cli", services) == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The walker must find imports inside functions too, or the rules above prove nothing.
    (tmp_path / "m.py").write_text("def f():\n    from services.router import policy\n")
    assert _imports(tmp_path / "m.py") >= {"services.router", "services.router.policy"}


def test_the_local_tooling_imports_no_service() -> None:
    # It runs services as processes (`python -m services.<name>`); it never loads their code.
    assert _offences(ROOT / "local", ("services",)) == []
