"""Workflow versions at the loader: canary share by stable hash, promotion, rollback."""

from __future__ import annotations

from services.loader.versions import WorkflowVersions, share_of
from streams.events import ImprovementApplied, ImprovementRolledBack, WorkflowVersionSaved
from streams.workflows import with_adjustments


def _saved(v: int, prompt: str) -> WorkflowVersionSaved:
    return WorkflowVersionSaved(
        source="improvement",
        workflow_id="code",
        version=v,
        parent_version=v - 1,
        changes={"system_prompt": prompt},
    )


def test_canary_serves_its_share_and_rollback_restores_the_parent():
    versions = WorkflowVersions()
    assert versions.serve("code", "r1").version == 1
    versions.learn(_saved(2, "better prompt"))
    versions.learn(
        ImprovementApplied(
            source="improvement",
            improvement_id="i1",
            workflow_id="code",
            version=2,
            traffic_share=0.3,
        )
    )
    runs = [f"run-{i}" for i in range(2000)]
    served = [versions.serve("code", r) for r in runs]
    canary = [s for s in served if s.version == 2]
    assert 0.25 < len(canary) / len(runs) < 0.35
    assert all(s.system_prompt == "better prompt" for s in canary)
    assert all(s.system_prompt is None for s in served if s.version == 1)
    # The same run always gets the same version (a replay after a crash too).
    assert [versions.serve("code", r).version for r in runs] == [s.version for s in served]

    versions.learn(
        ImprovementRolledBack(
            source="improvement", workflow_id="code", from_version=2, to_version=1, reason="worse"
        )
    )
    assert {versions.serve("code", r).version for r in runs} == {1}


def test_a_canary_is_not_served_before_its_prompt_arrives():
    versions = WorkflowVersions()
    versions.learn(
        ImprovementApplied(
            source="improvement",
            improvement_id="i1",
            workflow_id="code",
            version=2,
            traffic_share=1.0,
        )
    )
    assert {versions.serve("code", f"r{i}").version for i in range(50)} == {1}
    versions.learn(_saved(2, "v2 prompt"))
    assert {versions.serve("code", f"r{i}").version for i in range(50)} == {2}


def test_promotion_makes_the_version_the_base_for_everyone():
    versions = WorkflowVersions()
    versions.learn(_saved(2, "v2 prompt"))
    versions.learn(
        ImprovementApplied(
            source="improvement",
            improvement_id="i1",
            workflow_id="code",
            version=2,
            traffic_share=1.0,
        )
    )
    assert {versions.serve("code", f"r{i}").version for i in range(50)} == {2}
    assert 0.0 <= share_of("x") < 1.0


def test_a_goal_version_serves_only_that_goals_runs_on_top_of_the_platform():
    versions = WorkflowVersions()
    versions.learn(
        WorkflowVersionSaved(
            source="improvement",
            workflow_id="g1/code",
            version=2,
            parent_version=1,
            changes={"instructions": "Include an example."},
        )
    )
    versions.learn(
        ImprovementApplied(
            source="improvement", improvement_id="i1", workflow_id="g1/code", version=2
        )
    )
    mine, other = versions.serve_for("g1", "code", "r1"), versions.serve_for("g2", "code", "r1")
    assert (mine.workflow_id, mine.version, mine.instructions) == (
        "g1/code",
        2,
        ("Include an example.",),
    )
    assert (other.workflow_id, other.version, other.instructions) == ("code", 1, ())
    # A platform-wide version reaches every goal, and a goal's own instructions come after.
    versions.learn(
        WorkflowVersionSaved(
            source="improvement",
            workflow_id="code",
            version=2,
            parent_version=1,
            changes={"instructions": "Be concise."},
        )
    )
    versions.learn(
        ImprovementApplied(source="improvement", improvement_id="i2", workflow_id="code", version=2)
    )
    assert versions.serve_for("g2", "code", "r1").instructions == ("Be concise.",)
    assert versions.serve_for("g1", "code", "r1").instructions == (
        "Be concise.",
        "Include an example.",
    )
    # The goal's run names the platform's version under its own, so it counts in the
    # platform's trial too; a goal without versions of its own serves the platform's alone.
    assert versions.serve_for("g1", "code", "r1").platform_version == 2
    assert versions.serve_for("g2", "code", "r1").platform_version is None
    prompt = with_adjustments(
        "You are a coder.", versions.serve_for("g1", "code", "r1").instructions
    )
    assert prompt.startswith("You are a coder.\n\n") and prompt.endswith("- Include an example.")


def test_a_goals_canary_runs_are_drawn_apart_from_the_platforms():
    """Drawn by the run alone, a goal's canary runs were exactly the platform canary's
    runs among its own: whatever the platform's trial did to them was measured as the
    goal's own change (and rolled back), while the platform's trial went unmeasured."""
    versions = WorkflowVersions()
    for workflow, text in (("code", "Sponsored line."), ("g1/code", "Be shorter.")):
        versions.learn(
            WorkflowVersionSaved(
                source="improvement",
                workflow_id=workflow,
                version=2,
                parent_version=1,
                changes={"instructions": text},
            )
        )
        versions.learn(
            ImprovementApplied(
                source="improvement",
                improvement_id=f"i-{workflow}",
                workflow_id=workflow,
                version=2,
                traffic_share=0.5,
            )
        )
    runs = [f"run-{i}" for i in range(2000)]
    served = [versions.serve_for("g1", "code", r) for r in runs]
    platform = ["Sponsored line." in s.instructions for s in served]
    own = [s.version == 2 for s in served]
    assert all(("Be shorter." in s.instructions) == (s.version == 2) for s in served)
    # Each about half; together about a quarter, as two independent draws give.
    assert 0.45 < sum(platform) / len(runs) < 0.55 and 0.45 < sum(own) / len(runs) < 0.55
    both = sum(p and o for p, o in zip(platform, own, strict=True)) / len(runs)
    assert 0.2 < both < 0.3
    # Among the goal's canary runs and its control runs alike, about half had the platform's.
    with_platform = [p for p, o in zip(platform, own, strict=True) if o]
    without = [p for p, o in zip(platform, own, strict=True) if not o]
    assert abs(sum(with_platform) / len(with_platform) - sum(without) / len(without)) < 0.08
