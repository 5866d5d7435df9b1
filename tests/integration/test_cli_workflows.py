"""`orchestrator versions`, `rollback` and `replay` as processes, on the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.improvement.versions import WorkflowLedger
from services.router.replay import evaluate, join_log
from streams.config import ROOT
from streams.events import (
    Event,
    ImprovementAvailable,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowVersionSaved,
)
from streams.kafka import EventProducer, KafkaSettings
from tests.integration.test_improvement_service import _platform
from tests.unit.test_replay import ARMS
from tests.unit.test_replay import _log as replay_log

pytestmark = pytest.mark.broker

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


async def _cli(settings: KafkaSettings, *args: str) -> tuple[int, Any, str]:
    """Run the CLI; its exit code, its stdout as JSON when it is JSON (else text), its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "KAFKA_"))}
    env |= {**settings.env(), "ORCH_TOPIC_PREFIX": settings.prefix}
    env["COLUMNS"] = "200"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    try:
        out: Any = json.loads(done.stdout)
    except ValueError:
        out = done.stdout
    return done.returncode, out, done.stderr


async def _clis(settings: KafkaSettings, *calls: tuple[str, ...]) -> list[tuple[int, Any, str]]:
    """Independent CLI calls run side by side (each is a process start of a second or
    more); their results in the order given."""
    return list(await asyncio.gather(*(_cli(settings, *args) for args in calls)))


def _version(workflow: str, *, share: float, changes: dict[str, str]) -> list[Event]:
    """What the improvement service writes when it starts serving version 2 of ``workflow``."""
    ledger = WorkflowLedger(workflow)
    proposed = ImprovementAvailable(
        source="t",
        improvement_id=f"imp-{workflow.replace('/', '-')}",
        workflow_id=workflow,
        kind="instructions",
        proposal="-",
        reason="from feedback",
    )
    return ledger.propose(proposed, now=T0, share=share, source="automated", changes=changes)


def _run(run_id: str, workflow: str, version: int, *qualities: float) -> list[Event]:
    """A run that ``version`` of ``workflow`` answered, and its assessments (the first counts)."""
    done = WorkflowCompleted(
        source="loader",
        run_id=run_id,
        goal_id="g1",
        specialty="code",
        text="an answer",
        meta={"workflow_id": workflow, "workflow_version": str(version)},
        occurred_at=T0 + timedelta(minutes=1),
    )
    assessed = [
        WorkflowAssessed(
            source="improvement",
            run_id=run_id,
            specialty="code",
            quality=q,
            occurred_at=T0 + timedelta(minutes=2 + i),
        )
        for i, q in enumerate(qualities)
    ]
    return [done, *assessed]


def _rows(listing: list[dict[str, Any]], workflow: str) -> dict[int, dict[str, Any]]:
    return {r["version"]: r for r in listing if r["workflow_id"] == workflow}


async def test_versions_shows_shares_canaries_and_measured_quality(settings: KafkaSettings):
    goal_flow = "g1/code"
    events = _version(goal_flow, share=0.5, changes={"instructions": "Always include an example."})
    platform = _version("code", share=1.0, changes={"system_prompt": "You write careful code."})
    events += platform
    events += _run("a1", goal_flow, 1, 0.8) + _run("a2", goal_flow, 1, 0.6)
    events += _run("b1", goal_flow, 2, 0.4, 0.9) + _run("b2", goal_flow, 2, 0.2)
    events += _run("b3", goal_flow, 2)  # answered, not assessed yet
    events += _run("c1", "code", 2, 0.7)
    async with EventProducer(settings) as producer:
        await producer.send_many(events)

    # Four reads of the log as written, none changing it: asked at once.
    (code, listing, err), one, shown, invalid = await _clis(
        settings,
        ("versions", "--json"),
        ("versions", goal_flow, "--json"),
        ("versions", goal_flow),
        ("versions", "g1/bad code", "--json"),
    )
    assert code == 0, err
    assert {r["workflow_id"] for r in listing} == {"code", goal_flow}
    mine = _rows(listing, goal_flow)
    assert (mine[1]["status"], mine[1]["traffic_share"]) == ("base", 0.5)
    assert (mine[2]["status"], mine[2]["traffic_share"]) == ("canary", 0.5)
    assert mine[2]["changes"]["instructions"] == "Always include an example."
    assert (mine[1]["runs"], mine[1]["assessed"], mine[1]["mean_quality"]) == (2, 2, 0.7)
    # b1's first assessment (0.4) counts, as in the canary's test; b3 is not assessed yet.
    assert (mine[2]["runs"], mine[2]["assessed"], mine[2]["mean_quality"]) == (3, 2, 0.3)
    everyone = _rows(listing, "code")
    assert (everyone[1]["status"], everyone[1]["traffic_share"]) == ("superseded", 0.0)
    assert (everyone[2]["status"], everyone[2]["traffic_share"]) == ("base", 1.0)
    assert (everyone[2]["runs"], everyone[2]["mean_quality"]) == (1, 0.7)
    assert everyone[1]["mean_quality"] is None

    code, listing, err = one
    assert code == 0, err
    assert [(r["workflow_id"], r["version"]) for r in listing] == [(goal_flow, 1), (goal_flow, 2)]

    code, text, err = shown
    assert code == 0, err
    for part in ("canary", "50%", "Always include an example.", "0.300 (2)", "0.700 (2)"):
        assert part in text, (part, text)

    code, refused, _ = invalid
    assert code == 2 and "invalid identifier" in refused["error"]


async def test_rollback_is_an_operators_and_the_service_applies_it(
    settings: KafkaSettings, tmp_path: Path
):
    flow = "g1/code"
    async with EventProducer(settings) as producer:
        await producer.send_many(_version(flow, share=0.5, changes={"instructions": "Be brief."}))
    async with _platform(settings, tmp_path, None):
        # Two refusals, neither changing anything: asked at once.
        (code, refused, err), (code_to, invalid, _) = await _clis(
            settings,
            ("rollback", flow, "--as", "mallory", "--json"),
            ("rollback", flow, "--to", "7", "--json"),
        )
        assert code == 1, (refused, err)
        assert refused["error_type"] == "NotOperator" and "mallory" in refused["error"]
        assert code_to == 2 and "has no version 7" in invalid["error"]

        # Without --to, a running canary is stopped: its base serves everyone again.
        code, done, err = await _cli(settings, "rollback", flow, "--reason", "too short", "--json")
        assert code == 0, (done, err)
        assert (done["from_version"], done["to_version"], done["user_id"]) == (2, 1, "operator")

        # The listing, and a rollback with nothing left to roll back: reads, asked at once.
        (code, listing, err), (code_again, nothing, _) = await _clis(
            settings, ("versions", flow, "--json"), ("rollback", flow, "--json")
        )
        assert code == 0, err
        rows = _rows(listing, flow)
        assert (rows[1]["status"], rows[1]["traffic_share"]) == ("base", 1.0)
        assert rows[2]["status"] == "rolled_back"
        assert rows[3]["status"] == "rollback_record" and rows[3]["user_id"] == "operator"
        assert rows[3]["changes"]["reason"] == "too short"
        assert code_again == 2 and "nothing to roll back to" in nothing["error"]

        code, text, err = await _cli(settings, "rollback", flow, "--to", "2")
        assert code == 0, err
        assert "version 2 serves everyone again (was 1)" in text


async def test_replay_scores_policies_on_the_recorded_log(settings: KafkaSettings):
    events = replay_log(400)
    async with EventProducer(settings) as producer:
        await producer.send_many(events)
    expected = {
        name: evaluate(join_log(events), name, []).as_dict() for name in ("static", "learned")
    }

    # Five reads of the same log, none changing it: asked at once.
    arms = ",".join(ARMS)
    both, arm, shown, recent_run, greedy = await _clis(
        settings,
        ("replay", "--json"),
        ("replay", "--policy", "learned", "--arms", arms, "--json"),
        ("replay",),
        ("replay", "--policy", "static", "--since", "1h", "--json"),
        ("replay", "--policy", "greedy", "--json"),
    )
    code, results, err = both
    assert code == 0, err
    assert {r["candidate"]: r for r in results} == expected
    # The log's truth (tests/unit/test_replay.py): learning beats keywords clearly.
    assert expected["learned"]["snips"] > expected["static"]["snips"] + 0.15
    assert results[0]["decisions"] == 400

    code, (learned,), err = arm
    assert code == 0, err
    assert learned == evaluate(join_log(events), "learned", ARMS).as_dict()

    code, text, err = shown
    assert code == 0, err
    assert "replay over 400 logged decisions" in text and "SNIPS" in text

    # The log is from 2026-01-01: nothing in it is from the last hour.
    code, (recent,), err = recent_run
    assert code == 0, err
    assert recent["decisions"] == 0

    code, refused, _ = greedy
    assert code == 2 and "static and learned" in refused["error"]


async def test_improve_reports_the_verdict_and_keys_are_created_listed_and_revoked(
    settings: KafkaSettings, tmp_path: Path
):
    async with _platform(settings, tmp_path, None) as platform:
        await platform.run("r1", "Explain python generators", user="alice")
        await platform.until(lambda: any(e.run_id == "r1" for e in platform.of(WorkflowAssessed)))
        # Someone else's run, and a run nobody made: refused, exit 1, the reason printed.
        # (Refusals change nothing: independent ones are asked at once, here and below.)
        (code, out, _), (code_nope, nope, _) = await _clis(
            settings,
            ("improve", "r1", "more detail", "--user", "bob", "--json"),
            ("improve", "nope", "more detail", "--user", "alice", "--json"),
        )
        assert code == 1 and out["error_type"] == "NotRunOwner" and "does not own" in out["error"]
        assert code_nope == 1 and nope["error_type"] == "UnknownRun"
        code, out, _ = await _cli(
            settings,
            "improve",
            "r1",
            "more detail please",
            "--user",
            "alice",
            "--score",
            "2",
            "--json",
        )
        assert code == 0 and out["accepted"] and out["improvement_id"].startswith("imp_")
        improvement_id = out["improvement_id"]
        # A user can neither approve it nor promote it to every goal; an operator can.
        by_alice = [("improve", verb, improvement_id, "--user", "alice", "--json")
                    for verb in ("approve", "promote")]  # fmt: skip
        for code, out, _ in await _clis(settings, *by_alice):
            assert code == 1 and out["error_type"] == "NotOperator"
        # A named adjustment goes to its goal's canary at once: approving it (a retry,
        # say) changes nothing and says so; only `promote` makes it serve every goal.
        await platform.until(lambda: len(platform.of(WorkflowVersionSaved)) == 1)
        (code, out, err), (code_nope, nope, _) = await _clis(
            settings,
            ("improve", "approve", improvement_id, "--json"),
            ("improve", "promote", "imp_nope", "--json"),
        )
        assert code == 0 and out["workflow_id"] == "g1/code", err
        assert "already approved" in out["reason"]
        assert f"improve promote {improvement_id}" in out["reason"]
        assert code_nope == 1 and nope["error_type"] == "PromotionRefused"
        code, out, err = await _cli(settings, "improve", "promote", improvement_id, "--json")
        assert code == 0 and out["workflow_id"] == "code", err
        await platform.until(lambda: len(platform.of(WorkflowVersionSaved)) == 2)
        code, out, err = await _cli(settings, "improve", "promote", improvement_id, "--json")
        assert code == 0 and "already promoted" in out["reason"], err
        assert [e.workflow_id for e in platform.of(WorkflowVersionSaved)] == [  # type: ignore[attr-defined]
            "g1/code",
            "code",
        ]

        # Two keys made, and two refusals that depend on no key: asked at once.
        (code, made, _), (code_bob, text, _), (code_path, _, _), (code_op, op, _) = await _clis(
            settings,
            ("keys", "create", "--goal", "g1", "--user", "alice", "--json"),
            ("keys", "create", "--goal", "g1", "--user", "bob"),
            ("keys", "revoke", "../../etc", "--json"),
            ("keys", "create", "--goal", "g2", "--user", "operator", "--json"),
        )
        assert code == 0 and made["key"].startswith(f"orch_{made['key_id']}_")
        assert code_bob == 0 and text.strip().splitlines()[-1].startswith("orch_")
        assert code_path == 2
        # An operator is known by user id in every goal: a tenant's user named like one
        # would speak as one, so such keys are refused, either way round.
        assert (
            code_op == 2
            and op["error_type"] == "InvalidRequest"
            and "is an operator" in op["error"]
        )
        code, rows, _ = await _cli(settings, "keys", "list", "--json")
        assert code == 0 and {r["user_id"] for r in rows} == {"alice", "bob"}
        assert all("hash" not in str(r) and "orch_" not in str(r) for r in rows)
        code, _, _ = await _cli(settings, "keys", "revoke", made["key_id"], "--json")
        assert code == 0
        code, rows, _ = await _cli(settings, "keys", "list", "--json")
        revoked = {r["key_id"]: r["revoked_at"] for r in rows}
        assert revoked[made["key_id"]] is not None
        code, out, _ = await _cli(
            settings, "keys", "create", "--goal", "ops", "--user", "ops-root", "--role", "operator"
        )
        assert code == 0
        (code, out, _), (code_bob, bob, _) = await _clis(
            settings,
            ("keys", "create", "--goal", "g2", "--user", "ops-root", "--json"),
            ("keys", "create", "--goal", "ops", "--user", "bob", "--role", "operator", "--json"),
        )
        assert code == 2 and "is an operator" in out["error"]
        assert code_bob == 2 and "holds user keys" in bob["error"]
        code, rows, _ = await _cli(settings, "keys", "list", "--json")
        assert {(r["user_id"], r["role"]) for r in rows} == {
            ("alice", "user"),
            ("bob", "user"),
            ("ops-root", "operator"),
        }
