"""Budget state of one goal and the pure rules that change it (no I/O, clock passed in).

The budget service is the single writer of this state per goal: every event that
changes it arrives keyed by goal_id, so one instance sees a goal's events in
order. Each rule returns the events to emit; redelivered events change nothing.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streams.clock import utc_day
from streams.config import env_float, env_int
from streams.events import (
    BudgetExceeded,
    BudgetUpdateRequested,
    Event,
    LlmCallCompleted,
    SpawnApproved,
    SpawnDenied,
    SpawnRequested,
    SpendDecided,
    SpendRequested,
    TaskAdmitted,
    TaskRequested,
    WorkflowCompleted,
    WorkflowFailed,
)

__all__ = ["BudgetDefaults", "BudgetState", "Decision"]

SOURCE = "budget"
_NS = uuid.UUID("5b0c7e2a-91d4-4f3e-8a6b-2c1d0e9f8a7b")
# Redeliveries after a crash come from the last uncommitted stretch; a thousand ids
# covers it, and the whole record is rewritten on every event, so it must stay small.
_SEEN_LIMIT = 1000
_SPAWN_HOLD_SECONDS = 60.0


@dataclass(frozen=True)
class BudgetDefaults:
    max_agents: int = 100
    max_concurrent: int = 10
    max_daily_cost: float = 10.0
    # Cost held back per admitted task until its real cost is known, so that
    # concurrent tasks can never push a day's spend past max_daily_cost.
    task_reserve_usd: float = 0.002
    max_queue: int = 1000
    lease_seconds: float = 600.0

    @classmethod
    def from_env(cls) -> BudgetDefaults:
        # 0 is a valid limit: the rules deny every spawn or task past it.
        return cls(
            max_agents=env_int("ORCH_BUDGET_MAX_AGENTS", 100, minimum=0),
            max_concurrent=env_int("ORCH_BUDGET_MAX_CONCURRENT", 10, minimum=0),
            max_daily_cost=env_float("ORCH_BUDGET_MAX_DAILY_COST", 10.0, minimum=0),
            task_reserve_usd=env_float("ORCH_BUDGET_TASK_RESERVE_USD", 0.002, minimum=0),
            max_queue=env_int("ORCH_BUDGET_MAX_QUEUE", 1000, minimum=0),
            lease_seconds=env_float("ORCH_BUDGET_LEASE_SECONDS", 600.0, minimum=0),
        )


@dataclass
class Decision:
    """Events a rule wants sent, in order."""

    events: list[Event] = field(default_factory=list)


@dataclass
class BudgetState:
    goal_id: str
    max_agents: int
    max_concurrent: int
    max_daily_cost: float
    agents: list[str] = field(default_factory=list)
    # run_id -> [admitted_at ISO, reserved USD]
    in_flight: dict[str, list[Any]] = field(default_factory=dict)
    # approved spawns whose prompt-writing cost is not known yet: run_id -> [at, USD]
    spawn_holds: dict[str, list[Any]] = field(default_factory=dict)
    queue: list[dict[str, Any]] = field(default_factory=list)
    spend: dict[str, float] = field(default_factory=dict)
    seen: deque[str] = field(default_factory=lambda: deque(maxlen=_SEEN_LIMIT))
    largest_task_cost: float = 0.0

    # -- persistence (Faust table value, JSON) ------------------------------
    @classmethod
    def new(cls, goal_id: str, defaults: BudgetDefaults) -> BudgetState:
        return cls(goal_id, defaults.max_agents, defaults.max_concurrent, defaults.max_daily_cost)

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal_id": self.goal_id,
            "max_agents": self.max_agents,
            "max_concurrent": self.max_concurrent,
            "max_daily_cost": self.max_daily_cost,
            "agents": list(self.agents),
            "in_flight": dict(self.in_flight),
            "spawn_holds": dict(self.spawn_holds),
            "queue": list(self.queue),
            "spend": dict(self.spend),
            "seen": list(self.seen),
            "largest_task_cost": self.largest_task_cost,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BudgetState:
        state = cls(
            goal_id=data["goal_id"],
            max_agents=int(data["max_agents"]),
            max_concurrent=int(data["max_concurrent"]),
            max_daily_cost=float(data["max_daily_cost"]),
            agents=list(data.get("agents", [])),
            in_flight={k: list(v) for k, v in data.get("in_flight", {}).items()},
            spawn_holds={k: list(v) for k, v in data.get("spawn_holds", {}).items()},
            queue=list(data.get("queue", [])),
            spend={k: float(v) for k, v in data.get("spend", {}).items()},
            largest_task_cost=float(data.get("largest_task_cost", 0.0)),
        )
        state.seen.extend(data.get("seen", []))
        return state

    # -- views ---------------------------------------------------------------
    def spent_today(self, now: datetime) -> float:
        return self.spend.get(utc_day(now), 0.0)

    def reserved(self) -> float:
        held = [*self.in_flight.values(), *self.spawn_holds.values()]
        return sum(float(v[1]) for v in held)

    def summary(self, now: datetime) -> dict[str, Any]:
        return {
            "goal_id": self.goal_id,
            "max_agents": self.max_agents,
            "max_concurrent": self.max_concurrent,
            "max_daily_cost": self.max_daily_cost,
            "agents": len(self.agents),
            "in_flight": len(self.in_flight),
            "queued": len(self.queue),
            "spent_today": round(self.spent_today(now), 6),
            "day": utc_day(now),
        }

    # -- rules ---------------------------------------------------------------
    def handle(self, event: Event, now: datetime, defaults: BudgetDefaults) -> Decision:
        """Apply one event; a redelivered one (same event_id) is ignored."""
        if event.event_id in self.seen:
            return Decision()
        self.seen.append(event.event_id)
        self._expire(now, defaults)
        if isinstance(event, SpawnRequested):
            return self._spawn(event, now, defaults)
        if isinstance(event, TaskRequested):
            return self._task(event, now, defaults)
        if isinstance(event, LlmCallCompleted):
            return self._charge(event, now, defaults)
        if isinstance(event, WorkflowCompleted | WorkflowFailed):
            return self._release(event.run_id, now, defaults)
        if isinstance(event, BudgetUpdateRequested):
            return self._update(event, now, defaults)
        if isinstance(event, SpendRequested):
            return self._hold(event, now)
        return Decision()

    def _hold(self, e: SpendRequested, now: datetime) -> Decision:
        """A platform call (judge, feedback instruction) for this goal: hold its worst case."""
        committed = self.spent_today(now) + self.reserved()
        approved = committed + e.amount_usd <= self.max_daily_cost + 1e-12
        out: list[Event] = []
        if approved:
            self.spawn_holds[_platform_hold(e.purpose, e.run_id)] = [now.isoformat(), e.amount_usd]
            reason = f"held {e.amount_usd:.6f} USD"
        else:
            reason = (
                f"goal {self.goal_id} has {committed:.6f} USD spent or held today; "
                f"{e.amount_usd:.6f} more would pass max_daily_cost {self.max_daily_cost:.6f} USD"
            )
            out.append(
                self._exceeded("max_daily_cost", committed, self.max_daily_cost, e.run_id, now)
            )
        out.append(
            SpendDecided(
                event_id=str(uuid.uuid5(_NS, f"{e.event_id}:decided")),
                source=SOURCE,
                run_id=e.run_id,
                goal_id=self.goal_id,
                request_id=e.event_id,
                approved=approved,
                reason=reason,
                occurred_at=now,
            )
        )
        return Decision(out)

    def _exceeded(
        self, limit: Any, current: float, maximum: float, run_id: str | None, now: datetime
    ) -> BudgetExceeded:
        return BudgetExceeded(
            source=SOURCE,
            goal_id=self.goal_id,
            run_id=run_id,
            limit=limit,
            current=current,
            maximum=maximum,
            occurred_at=now,
        )

    def _deny_spawn(
        self,
        e: SpawnRequested,
        limit: Any,
        current: float,
        maximum: float,
        detail: str,
        now: datetime,
    ) -> Decision:
        return Decision(
            [
                self._exceeded(limit, current, maximum, e.run_id, now),
                SpawnDenied(
                    source=SOURCE,
                    goal_id=self.goal_id,
                    run_id=e.run_id,
                    user_id=e.user_id,
                    specialty=e.specialty,
                    limit=limit,
                    detail=detail,
                    occurred_at=now,
                ),
            ]
        )

    def _spawn(self, e: SpawnRequested, now: datetime, defaults: BudgetDefaults) -> Decision:
        if self._cost_blocked(now, defaults):
            spent = self.spent_today(now)
            detail = (
                f"goal {self.goal_id} spent {spent:.6f} USD today; "
                f"max_daily_cost is {self.max_daily_cost:.6f} USD"
            )
            return self._deny_spawn(e, "max_daily_cost", spent, self.max_daily_cost, detail, now)
        if len(self.agents) >= self.max_agents:
            detail = (
                f"goal {self.goal_id} has {len(self.agents)} agents; "
                f"max_agents is {self.max_agents}"
            )
            return self._deny_spawn(e, "max_agents", len(self.agents), self.max_agents, detail, now)
        self.agents.append(e.event_id)
        if e.run_id:
            # The spawner may ask the LLM to write the prompt; hold its cost until known.
            self.spawn_holds[e.run_id] = [now.isoformat(), self._reserve(defaults)]
        return Decision(
            [
                SpawnApproved(
                    source=SOURCE,
                    goal_id=self.goal_id,
                    run_id=e.run_id,
                    user_id=e.user_id,
                    specialty=e.specialty,
                    message=e.message,
                    context=dict(e.context),
                    agents_after=len(self.agents),
                    occurred_at=now,
                )
            ]
        )

    def _reserve(self, defaults: BudgetDefaults) -> float:
        return max(defaults.task_reserve_usd, self.largest_task_cost)

    def _fail(
        self, t: dict[str, Any] | TaskRequested, limit: Any, detail: str, now: datetime
    ) -> WorkflowFailed:
        task = t if isinstance(t, TaskRequested) else TaskRequested.model_validate(t)
        return WorkflowFailed(
            source=SOURCE,
            run_id=task.run_id,
            goal_id=self.goal_id,
            user_id=task.user_id,
            reason="budget_exceeded",
            limit=limit,
            detail=detail,
            agent_id=task.agent_id,
            specialty=task.specialty,
            occurred_at=now,
        )

    def _admit(self, task: TaskRequested, now: datetime, defaults: BudgetDefaults) -> Event:
        self.in_flight[task.run_id] = [now.isoformat(), self._reserve(defaults)]
        return TaskAdmitted(
            source=SOURCE,
            run_id=task.run_id,
            goal_id=self.goal_id,
            user_id=task.user_id,
            agent_id=task.agent_id,
            specialty=task.specialty,
            message=task.message,
            context=dict(task.context),
            requested_at=task.requested_at,
            deadline_at=task.deadline_at,
            occurred_at=now,
        )

    def _cost_blocked(self, now: datetime, defaults: BudgetDefaults) -> bool:
        committed = self.spent_today(now) + self.reserved()
        return committed + self._reserve(defaults) > self.max_daily_cost + 1e-12

    def _task(self, e: TaskRequested, now: datetime, defaults: BudgetDefaults) -> Decision:
        if e.run_id in self.in_flight or any(q.get("run_id") == e.run_id for q in self.queue):
            return Decision()
        if self._cost_blocked(now, defaults):
            spent = self.spent_today(now)
            detail = (
                f"goal {self.goal_id} spent {spent:.6f} USD today (plus {self.reserved():.6f} held "
                f"for running tasks); max_daily_cost is {self.max_daily_cost:.6f} USD"
            )
            return Decision(
                [
                    self._exceeded("max_daily_cost", spent, self.max_daily_cost, e.run_id, now),
                    self._fail(e, "max_daily_cost", detail, now),
                ]
            )
        if len(self.in_flight) < self.max_concurrent and not self.queue:
            return Decision([self._admit(e, now, defaults)])
        if len(self.queue) >= defaults.max_queue or self.max_concurrent == 0:
            detail = (
                f"goal {self.goal_id} runs {len(self.in_flight)} tasks with {len(self.queue)} "
                f"waiting; max_concurrent is {self.max_concurrent}"
            )
            return Decision(
                [
                    self._exceeded(
                        "max_concurrent", len(self.in_flight), self.max_concurrent, e.run_id, now
                    ),
                    self._fail(e, "max_concurrent", detail, now),
                ]
            )
        self.queue.append(e.model_dump(mode="json"))
        return Decision()

    def _drain(self, now: datetime, defaults: BudgetDefaults) -> list[Event]:
        out: list[Event] = []
        while self.queue and len(self.in_flight) < self.max_concurrent:
            task = TaskRequested.model_validate(self.queue.pop(0))
            if task.deadline_at is not None and task.deadline_at <= now:
                out.append(
                    WorkflowFailed(
                        source=SOURCE,
                        run_id=task.run_id,
                        goal_id=self.goal_id,
                        user_id=task.user_id,
                        reason="timeout",
                        detail="deadline passed while waiting for a max_concurrent slot",
                        agent_id=task.agent_id,
                        specialty=task.specialty,
                        occurred_at=now,
                    )
                )
                continue
            if self._cost_blocked(now, defaults):
                detail = f"goal {self.goal_id} reached max_daily_cost {self.max_daily_cost:.6f} USD"
                out.append(self._fail(task, "max_daily_cost", detail, now))
                continue
            out.append(self._admit(task, now, defaults))
        return out

    def _charge(self, e: LlmCallCompleted, now: datetime, defaults: BudgetDefaults) -> Decision:
        day = utc_day(e.occurred_at)
        self.spend[day] = self.spend.get(day, 0.0) + e.cost_usd
        if e.purpose in ("answer", "spawn_prompt"):
            # Holds must cover the dearest call the goal has made, whichever kind.
            self.largest_task_cost = max(self.largest_task_cost, e.cost_usd)
        if e.run_id and e.purpose == "spawn_prompt":
            self.spawn_holds.pop(e.run_id, None)
        if e.purpose in ("judge", "improvement"):
            self.spawn_holds.pop(_platform_hold(e.purpose, e.run_id), None)
        if e.run_id and e.purpose == "answer":
            held = self.in_flight.get(e.run_id)
            if held is not None:
                held[1] = 0.0  # the real cost is now in spend
        # Keep a few days of history only.
        for old in sorted(self.spend)[:-7]:
            del self.spend[old]
        return Decision()

    def _release(self, run_id: str, now: datetime, defaults: BudgetDefaults) -> Decision:
        self.in_flight.pop(run_id, None)
        self.queue = [q for q in self.queue if q.get("run_id") != run_id]
        return Decision(self._drain(now, defaults))

    def _update(
        self, e: BudgetUpdateRequested, now: datetime, defaults: BudgetDefaults
    ) -> Decision:
        if e.max_agents is not None:
            self.max_agents = e.max_agents
        if e.max_concurrent is not None:
            self.max_concurrent = e.max_concurrent
        if e.max_daily_cost is not None:
            self.max_daily_cost = e.max_daily_cost
        return Decision(self._drain(now, defaults))

    def _expire(self, now: datetime, defaults: BudgetDefaults) -> None:
        # A spawn written from a template reports no cost; its hold lapses quickly.
        for run_id, (held_at, _) in list(self.spawn_holds.items()):
            if (now - datetime.fromisoformat(held_at)).total_seconds() > _SPAWN_HOLD_SECONDS:
                del self.spawn_holds[run_id]
        # A task whose loader vanished must not hold a slot forever.
        for run_id, (admitted_at, _) in list(self.in_flight.items()):
            age = (now - datetime.fromisoformat(admitted_at)).total_seconds()
            if age > defaults.lease_seconds:
                del self.in_flight[run_id]


def _platform_hold(purpose: str, run_id: str | None) -> str:
    # Beside the spawn holds (keyed by run id) without colliding with them.
    return f"{purpose}:{run_id or ''}"
