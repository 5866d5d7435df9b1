"""What the improvement service knows, folded from the log in any topic order (no I/O).

Each run is joined from up to five events (request, route, completion or
failure, assessment) that arrive from different topics and partitions in any
order; a run feeds the pattern learner and its workflow's canary statistics
exactly once, when the pieces each needs are there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from services.improvement.feedback import base_prompt
from services.improvement.patterns import PatternLearner, PatternSettings
from services.improvement.versions import WorkflowLedger
from streams.clock import Clock
from streams.events import (
    AgentRetired,
    AgentSpawned,
    AutomationCreated,
    Event,
    ImprovementApplied,
    ImprovementRolledBack,
    PatternDiscovered,
    RequestReceived,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowVersionSaved,
)
from streams.registry import RegistryView

__all__ = ["ImprovementState", "RunInfo"]

_MAX_RUNS = 200_000


@dataclass
class RunInfo:
    run_id: str
    message: str | None = None
    user_id: str | None = None
    goal_id: str | None = None
    specialty: str | None = None
    routed_specialty: str | None = None
    agent_id: str | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    version_label: str | None = None
    quality: float | None = None
    signature: str | None = None
    outcome_done: bool = False
    version_done: bool = False

    @property
    def workflow_id(self) -> str | None:
        return self.specialty or self.routed_specialty


class ImprovementState:
    """Runs, the registry, patterns and workflow ledgers; ``dirty_*`` say what to re-evaluate."""

    def __init__(self, patterns: PatternSettings, clock: Clock) -> None:
        self.runs: OrderedDict[str, RunInfo] = OrderedDict()
        self.registry = RegistryView()
        self.learner = PatternLearner(patterns, clock)
        self.flows: dict[str, WorkflowLedger] = {}
        self.dirty_signatures: set[str] = set()
        self.dirty_flows: set[str] = set()

    def run(self, run_id: str) -> RunInfo | None:
        return self.runs.get(run_id)

    def _run(self, run_id: str) -> RunInfo:
        found = self.runs.get(run_id)
        if found is None:
            found = self.runs[run_id] = RunInfo(run_id)
            if len(self.runs) > _MAX_RUNS:
                self.runs.popitem(last=False)
        return found

    def flow(self, workflow_id: str) -> WorkflowLedger:
        found = self.flows.get(workflow_id)
        if found is None:
            found = self.flows[workflow_id] = WorkflowLedger(workflow_id)
        return found

    def apply(self, event: Event) -> None:
        if isinstance(event, AgentSpawned | AgentRetired):
            self.registry.apply(event)
            return
        if isinstance(event, PatternDiscovered | AutomationCreated):
            self.learner.learn(event)
            return
        if isinstance(event, WorkflowVersionSaved | ImprovementApplied | ImprovementRolledBack):
            if self.flow(event.workflow_id).apply(event):
                self.dirty_flows.add(event.workflow_id)
            return
        if not isinstance(
            event,
            RequestReceived | RouteDecided | WorkflowCompleted | WorkflowFailed | WorkflowAssessed,
        ):
            return
        run = self._run(event.run_id)
        run.user_id = run.user_id or event.user_id
        run.goal_id = run.goal_id or event.goal_id
        if isinstance(event, RequestReceived):
            run.message, run.user_id = event.message, event.user_id
        elif isinstance(event, RouteDecided):
            run.routed_specialty = event.specialty
        elif isinstance(event, WorkflowCompleted):
            run.specialty, run.agent_id = event.specialty, event.agent_id
            run.completed_at = event.occurred_at
            run.version_label = event.meta.get("workflow_version")
        elif isinstance(event, WorkflowFailed):
            run.failed_at = event.occurred_at
            run.specialty = run.specialty or event.specialty
            run.agent_id = run.agent_id or event.agent_id
        elif run.quality is None:  # WorkflowAssessed: the first assessment counts
            run.quality = event.quality
        self._join(run)

    def _join(self, run: RunInfo) -> None:
        ended = run.completed_at or run.failed_at
        workflow = run.workflow_id
        if run.signature is None and run.message is not None and workflow and ended:
            run.signature = self.learner.observe(run.run_id, run.message, workflow, ended)
            self.dirty_signatures.add(run.signature)
        if run.signature is not None and not run.outcome_done and ended is not None:
            failed = run.completed_at is None
            if failed or run.quality is not None:
                run.outcome_done = True
                self.learner.outcome(
                    run.signature,
                    run.run_id,
                    agent_id=run.agent_id,
                    goal_id=run.goal_id,
                    quality=None if failed else run.quality,
                    at=ended,
                )
                self.dirty_signatures.add(run.signature)
        if (
            not run.version_done
            and run.completed_at is not None
            and run.version_label is not None
            and run.quality is not None
            and run.specialty
        ):
            run.version_done = True
            self.flow(run.specialty).observe(
                run.run_id, run.version_label, run.quality, run.completed_at
            )
            self.dirty_flows.add(run.specialty)

    def current_prompt(self, workflow_id: str, agent_id: str | None) -> str:
        """The prompt an improvement starts from: the serving version's, the agent's, a template."""
        ledger = self.flow(workflow_id)
        prompt = ledger.prompt_of(ledger.state.base)
        if prompt:
            return prompt
        agent = self.registry.get(agent_id) if agent_id else None
        if agent is not None and agent.system_prompt:
            return agent.system_prompt
        return base_prompt(workflow_id)
