"""Which version of a workflow (its system prompt) serves a run: base or canary.

Versions come from the improvement service's events. A specialty's platform-wide
workflow: version 1 is each agent's own prompt, a later version replaces it. A
goal's own workflow (``<goal>/<specialty>``): version 1 is whatever the platform
serves, a later version adds that goal's vetted instructions to it, and only that
goal's runs see them. A canary version serves ``traffic_share`` of runs, picked by
a stable hash of the run id, so a replayed run gets the same version again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from streams.events import (
    Event,
    ImprovementApplied,
    ImprovementRolledBack,
    WorkflowVersionSaved,
)
from streams.workflows import goal_workflow, split_instructions

__all__ = ["Served", "WorkflowVersions", "share_of"]


def share_of(run_id: str) -> float:
    """A stable number in [0, 1) for a run."""
    return int(hashlib.sha256(run_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000


@dataclass(frozen=True)
class Served:
    version: int
    system_prompt: str | None  # None: the agent's own prompt (version 1)
    workflow_id: str = ""  # the workflow whose version this is ("" when unnamed)
    instructions: tuple[str, ...] = ()  # a goal's vetted adjustments, added to the prompt
    # With a goal's own workflow: the platform-wide version under it (its workflow is the
    # specialty), so the run counts in the platform's trial too. None otherwise.
    platform_version: int | None = None


@dataclass
class _Workflow:
    prompts: dict[int, str] = field(default_factory=dict)
    instructions: dict[int, tuple[str, ...]] = field(default_factory=dict)
    base: int = 1
    canary: int | None = None
    share: float = 0.0


class WorkflowVersions:
    def __init__(self) -> None:
        self._flows: dict[str, _Workflow] = {}

    def learn(self, event: Event) -> None:
        if isinstance(event, WorkflowVersionSaved):
            flow = self._flows.setdefault(event.workflow_id, _Workflow())
            prompt = event.changes.get("system_prompt")
            if prompt:
                flow.prompts[event.version] = prompt
            if "instructions" in event.changes:
                flow.instructions[event.version] = tuple(
                    split_instructions(event.changes["instructions"])
                )
        elif isinstance(event, ImprovementApplied):
            flow = self._flows.setdefault(event.workflow_id, _Workflow())
            if event.traffic_share >= 1.0:
                flow.base, flow.canary, flow.share = event.version, None, 0.0
            else:
                flow.canary, flow.share = event.version, event.traffic_share
        elif isinstance(event, ImprovementRolledBack):
            flow = self._flows.setdefault(event.workflow_id, _Workflow())
            if flow.canary == event.from_version:
                flow.canary, flow.share = None, 0.0
            if flow.base == event.from_version:
                flow.base = event.to_version

    def serve(self, workflow_id: str, run_id: str) -> Served:
        """The version of a platform-wide workflow (a specialty) that serves ``run_id``."""
        flow = self._flows.get(workflow_id)
        if flow is None:
            return Served(1, None, workflow_id)
        version = _pick(flow, {*flow.prompts, *flow.instructions}, workflow_id, run_id)
        if version == 1:
            return Served(1, None, workflow_id)
        return Served(
            version, flow.prompts.get(version), workflow_id, flow.instructions.get(version, ())
        )

    def serve_for(self, goal_id: str, specialty: str, run_id: str) -> Served:
        """What serves a run of ``goal_id``: the platform's version plus the goal's own."""
        platform = self.serve(specialty, run_id)
        workflow_id = goal_workflow(goal_id, specialty)
        flow = self._flows.get(workflow_id)
        if flow is None:
            return platform
        version = _pick(flow, set(flow.instructions), workflow_id, run_id)
        own = flow.instructions.get(version, ()) if version > 1 else ()
        return Served(
            version,
            platform.system_prompt,
            workflow_id,
            (*platform.instructions, *own),
            platform_version=platform.version,
        )


def _pick(flow: _Workflow, known: set[int], workflow_id: str, run_id: str) -> int:
    version = flow.base if flow.base == 1 or flow.base in known else 1
    canary = flow.canary
    # A canary whose content has not arrived yet (another topic) is not served: a run
    # labelled with a version must really have had that version's prompt.
    # Each workflow draws its canary runs apart: drawn by the run alone, a goal's canary
    # runs were exactly the platform canary's runs among its own, so whatever the
    # platform's trial did to them was measured as the goal's own change.
    if canary is not None and canary in known and share_of(f"{workflow_id}:{run_id}") < flow.share:
        version = canary
    return version
