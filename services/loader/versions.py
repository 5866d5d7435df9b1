"""Which version of a specialty's workflow (its system prompt) serves a run: base or canary.

Versions come from the improvement service's events. Version 1 is each agent's
own prompt; a later version replaces it for the specialty. A canary version
serves ``traffic_share`` of runs, picked by a stable hash of the run id, so a
replayed run gets the same version again.
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

__all__ = ["Served", "WorkflowVersions", "share_of"]


def share_of(run_id: str) -> float:
    """A stable number in [0, 1) for a run."""
    return int(hashlib.sha256(run_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000


@dataclass(frozen=True)
class Served:
    version: int
    system_prompt: str | None  # None: the agent's own prompt (version 1)


@dataclass
class _Workflow:
    prompts: dict[int, str] = field(default_factory=dict)
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
        flow = self._flows.get(workflow_id)
        if flow is None:
            return Served(1, None)
        version = flow.base if flow.base == 1 or flow.base in flow.prompts else 1
        canary = flow.canary
        # A canary whose prompt has not arrived yet (another topic) is not served: a run
        # labelled with a version must really have had that version's prompt.
        if canary is not None and canary in flow.prompts and share_of(run_id) < flow.share:
            version = canary
        return Served(version, flow.prompts.get(version) if version > 1 else None)
