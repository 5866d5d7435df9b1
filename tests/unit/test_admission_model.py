"""A randomized model of admission tokens: the real budget rules and token stock, a
simulated router and loader, and Kafka as in-memory queues.

The budget is the real :class:`BudgetState` of one goal; the router's stock is the real
:class:`AdmissionTokens`. The router's dispatch (``Router._dispatch``) and the loader's
handling of an admission (``Loader.handle``, ``_given_back``, ``_run``) are mirrored here.
Messages travel through FIFO queues where Kafka keeps order: everything the budget reads
on one topic for the goal is in order; the budget reads its topics (task_requested,
llm_call_completed, workflow_completed, workflow_failed, admission_returned,
goal_agents_changed) in any interleaving; the router sends a binding and its admission
at once, so either may be read first (or only one, if the router dies meanwhile).

The router mirror keeps what ``Router._dispatch`` keeps: what it sent for each run (token
or none, agent, specialty; resent as it was when the request is handled again, forgotten
at the run's end), its start time (no token for a request received before it), and the
runs it knows ended (skipped). The loader skips a run whose end it has read, and drops
its own answer of a run ended elsewhere meanwhile (its cost still counts).

Faults: the router dies (its tokens and unsent admissions are lost; its uncommitted
requests are routed again under the same task id by an instance with a new holder id,
perhaps to another agent) or stops cleanly (what it was sending goes out, its requests
are committed, its tokens go back), or is handed its uncommitted requests again; the
clock jumps (everything pauses; LLM calls still end within the timeout); the budget
crashes after applying events (it reads its uncommitted input again; now and then it
lost what it was sending); the router sends an unanswered task again; agents retire
between routing and the loader's start.

At every step: no more tasks run than ``max_concurrent``; what was spent plus the worst
case of what runs is within ``max_daily_cost``; no run is started twice. At the end
(every queue drained, the clock past every lapse): every request ended, with one
outcome; the budget holds no slot and no money; its spend is what the loader reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from services.budget.state import BudgetDefaults, BudgetState, RunStore
from services.loader.service import Loader as RealLoader
from services.router.tokens import AdmissionTokens, Token
from streams.clock import FakeClock
from streams.codec import default_codec
from streams.events import (
    AdmissionGranted,
    AdmissionReturned,
    AgentRetired,
    AgentSpawned,
    BudgetTicked,
    Event,
    GoalAgentsChanged,
    LlmCallCompleted,
    TaskAdmitted,
    TaskRequested,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    terminal_event_id,
)
from streams.kafka import EventProducer, KafkaSettings
from streams.llm import InMemoryLLM, LLMSettings, ModelPrice, PriceTable
from streams.runtime import ServiceContext

GOAL = "g1"
T0 = datetime(2026, 12, 1, 1, 0, tzinfo=UTC)
SEEDS = 300
# The router's resend interval (ORCH_ROUTER_RESEND_SECONDS) and its cap on resends.
RESEND_SECONDS = 5.0
MAX_RESENDS = 12
BUDGET_TOPICS = (
    "task_requested",
    "llm_call_completed",
    "workflow_completed",
    "workflow_failed",
    "admission_returned",
    "goal_agents_changed",
)


def _defaults(rng: random.Random) -> BudgetDefaults:
    base = BudgetDefaults(
        max_concurrent=rng.choice([1, 2, 3, 4, 6]),
        # Prices that make a task's worst case grow with its message: tasks larger than
        # admission_token_bytes do not fit a token and go to the budget.
        task_reserve_usd=0.01,
        prices=PriceTable({}, ModelPrice(100.0, 200.0)),
        max_tokens=100,
        system_prompt_tokens=100,
        llm_timeout_s=rng.choice([5.0, 10.0, 30.0]),
        admission_tokens=rng.randint(1, 4),
        admission_token_seconds=rng.choice([1.0, 3.0, 10.0, 30.0]),
        admission_token_bytes=64,
    )
    hold = base.token_hold()
    cap = hold * rng.choice([0.5, 1.2, 2.5, 4.0, 7.0]) if rng.random() < 0.4 else 1000.0
    return dataclasses.replace(base, max_daily_cost=cap)


@dataclass
class Faults:
    router_deaths: bool = True
    redeliveries: bool = True
    pauses: bool = True
    budget_crashes: bool = True
    lost_sends: bool = True
    resends: bool = True
    retirements: bool = True


@dataclass
class Request:
    run: str
    message: str
    context: dict[str, str]
    deadline: datetime | None
    at: datetime


@dataclass
class Running:
    end: datetime
    cost: float
    worst: float
    agent: str


@dataclass
class Waiting:
    """A task the router sent to the budget and has seen no decision on (_Unanswered)."""

    event: TaskRequested
    resend_at: datetime
    deadline: datetime | None
    sent: int = 1


class Violation(AssertionError):
    pass


class Router:
    """One router process: its token stock, unanswered tasks, and admissions not yet sent."""

    def __init__(self, world: World, life: int) -> None:
        self.w = world
        self.holder = f"router-{life}"
        self.tokens = AdmissionTokens(
            world.defaults.admission_tokens, world.defaults.worst, holder=self.holder
        )
        self.unanswered: dict[str, Waiting] = {}
        # Bindings and admissions being sent (Router._dispatch delivers the binding, and
        # once the broker has it, the admission).
        self.outbox: list[TaskRequested | TaskAdmitted] = []
        self.after: dict[str, TaskAdmitted] = {}  # admissions waiting for their binding
        # Requests handled and not committed: routed again if this process dies.
        self.uncommitted: dict[str, Request] = {}
        # What this instance sent for each run (its token or none, agent and specialty),
        # until the run ends (Router._sent): a request handled again goes as it went.
        self.sent: dict[str, tuple[Token | None, str, str]] = {}
        # Router._started: no token for a request received before this instance started
        # (a moment after its predecessor read its last request: the model's clock may not
        # have moved between them).
        self.started = world.now + timedelta(milliseconds=1)
        # Runs with a terminal event (Router.ended): a restarted instance catches up on the
        # knowledge topics before it reads a request, so it knows every end sent so far.
        self.ended: set[str] = set(world.outcomes)

    def route(self, req: Request) -> None:
        """Router.handle, Router._task and Router._dispatch."""
        w = self.w
        now = w.now
        self.uncommitted[req.run] = req
        if req.run in self.ended:
            w.trace(f"router {self.holder} skips {req.run} (ended)")
            return
        # Router._route fails a request read past its deadline itself: left out. A request
        # read again past its deadline (after a crash or a rebalance) is failed there while
        # the budget or the loader may end the same run otherwise (one terminal id, two
        # topics): a weakness of the router without tokens too.
        agent = w.rng.choice(w.agents)
        task = TaskRequested(
            event_id=f"task-{req.run}",
            source="router",
            run_id=req.run,
            goal_id=GOAL,
            user_id="u1",
            agent_id=agent,
            specialty="s",
            message=req.message,
            context=req.context,
            requested_at=req.at,
            deadline_at=req.deadline,
            occurred_at=now,
        )
        want = self.tokens.ask(GOAL, now)
        if want:
            task = task.model_copy(update={"want_tokens": want, "holder": self.holder})
        sent = self.sent.get(req.run)
        token = None
        if sent is not None:
            token, agent, specialty = sent
            task = task.model_copy(update={"agent_id": agent, "specialty": specialty})
        elif self._may_use_token(task):
            token = self.tokens.take(GOAL, task.message, task.context, now)
        if sent is None:
            self.sent[req.run] = (token, task.agent_id, task.specialty)
        if token is None:
            self.unanswered[req.run] = Waiting(
                task, now + timedelta(seconds=RESEND_SECONDS), task.deadline_at
            )
            w.trace(f"router {self.holder} sends {req.run} to {agent} (want {want})")
            w.to_budget("task_requested", task)
            return
        bound = task.model_copy(update={"token": token.token})
        admitted = TaskAdmitted.caused_by(
            bound,
            event_id=f"admitted-{req.run}",
            source="router",
            start_by=token.bind_by,
            occurred_at=now,
        )
        w.trace(
            f"router {self.holder} admits {req.run} on {agent} with {token.token[:8]}"
            f" (bind_by +{w.secs(token.bind_by)}, want {want})"
        )
        # The binding first; the admission once the broker has the binding. A process that
        # dies meanwhile may have sent the binding alone, both or neither.
        self.outbox.append(bound)
        self.after[req.run] = admitted

    def _may_use_token(self, task: TaskRequested) -> bool:
        """Router._may_use_token."""
        if not self.tokens.enabled or task.agent_id in self.w.retired:
            return False
        return task.requested_at is None or task.requested_at >= self.started

    def send(self, i: int) -> None:
        event = self.outbox.pop(i)
        if isinstance(event, TaskRequested):
            self.w.trace(f"router {self.holder} binding of {event.run_id} reaches the broker")
            self.w.to_budget("task_requested", event)
            admitted = self.after.pop(event.run_id, None)
            if admitted is not None:
                self.outbox.append(admitted)
        elif isinstance(event, TaskAdmitted):
            self.w.trace(f"router {self.holder} admission of {event.run_id} reaches the broker")
            self.w.to_loader(event)
            self.w.knowledge["decisions"].append(event)  # task_admitted, read by routers

    def learn(self, event: Event) -> None:
        """Router.learn, for what the model sends it."""
        if isinstance(event, TaskAdmitted | WorkflowCompleted | WorkflowFailed):
            self.unanswered.pop(str(event.run_id), None)
            if not isinstance(event, TaskAdmitted):
                self.sent.pop(str(event.run_id), None)
                self.ended.add(str(event.run_id))
        elif isinstance(event, AdmissionGranted):
            before = self.tokens.held(GOAL)
            self.tokens.granted(event, self.w.now)
            self.w.trace(
                f"router {self.holder} reads grant {event.event_id[:8]} for {event.holder}:"
                f" {[t[:8] for t in event.tokens]}, stock {before} -> {self.tokens.held(GOAL)}"
            )

    def resend(self) -> None:
        """Router.resend_unanswered, for tasks."""
        now = self.w.now
        for run, waiting in list(self.unanswered.items()):
            if waiting.resend_at > now:
                continue
            last = (
                waiting.deadline is not None and now > waiting.deadline
            ) or waiting.sent > MAX_RESENDS
            if last:
                self.unanswered.pop(run, None)
            else:
                backoff = RESEND_SECONDS * 2 ** min(waiting.sent - 1, 4)
                waiting.resend_at = now + timedelta(seconds=backoff)
                if waiting.deadline is not None:
                    after = waiting.deadline + timedelta(seconds=0.5)
                    waiting.resend_at = max(
                        min(waiting.resend_at, after), now + timedelta(seconds=RESEND_SECONDS)
                    )
            waiting.sent += 1
            self.w.trace(f"router {self.holder} resends {run}")
            self.w.to_budget("task_requested", waiting.event)

    def give_back(self, *, everything: bool = False) -> None:
        for returned in self.tokens.returns(self.w.now, everything=everything):
            self.w.trace(f"router {self.holder} returns {[t[:8] for t in returned.tokens]}")
            self.w.to_budget("admission_returned", returned)


class Budget:
    """The budget service for the goal: the real rules, its input topics, its commits."""

    def __init__(self, world: World) -> None:
        self.w = world
        # As the service keeps it: the goal's record (JSON, in a table) and the runs table.
        self.runs = RunStore()
        self.record: dict[str, Any] | None = None
        self.queues: dict[str, deque[Event]] = {t: deque() for t in BUDGET_TOPICS}
        self.uncommitted: dict[str, list[Event]] = {t: [] for t in BUDGET_TOPICS}

    @property
    def state(self) -> BudgetState:
        """The goal's state as the service reads it for the next event."""
        if self.record is None:
            return BudgetState.new(GOAL, self.w.defaults, self.runs)
        return BudgetState.from_dict(self.record, self.runs, self.w.defaults)

    def save(self, state: BudgetState) -> None:
        self.record = json.loads(json.dumps(state.to_dict()))

    def apply(self, event: Event) -> list[Event]:
        """The service's _apply: the record read, the rules applied, the record written."""
        state = self.state
        decision = state.handle(event, self.w.now, self.w.defaults)
        if decision.changed or self.record is None:
            self.save(state)
        return decision.events

    def read(self, topic: str, *, lose_sends: bool = False) -> None:
        event = self.queues[topic].popleft()
        self.uncommitted[topic].append(event)
        out = self.apply(event)
        if out or not (isinstance(event, AdmissionReturned) and event.holder == "traffic"):
            self.w.trace(f"budget reads {_short(event)} -> {[_short(e) for e in out]}")
        if lose_sends:
            # Written, not sent: the process dies before the sends, and reads its input
            # again from the last commit, this event first. (Had it read other topics first,
            # past the lapse of what this event admitted, the admission would be lost: a
            # weakness the budget had before tokens, left out of this model.)
            self.w.trace("budget crashes before sending")
            self.crash()
            while self.queues[topic] and self.queues[topic][0] is not event:
                self.read(topic)
            self.read(topic)
            return
        self.emit(out)

    def tick(self) -> None:
        out = self.apply(BudgetTicked(source="budget", goal_id=GOAL, occurred_at=self.w.now))
        if out:
            self.w.trace(f"budget tick -> {[_short(e) for e in out]}")
        self.emit(out)

    def commit(self) -> None:
        for topic in BUDGET_TOPICS:
            self.uncommitted[topic].clear()

    def crash(self) -> None:
        """What was read since the last commit is read again, in order."""
        for topic in BUDGET_TOPICS:
            self.queues[topic].extendleft(reversed(self.uncommitted[topic]))
            self.uncommitted[topic].clear()

    def emit(self, out: list[Event]) -> None:
        w = self.w
        for e in out:
            if isinstance(e, TaskAdmitted):
                w.to_loader(e)
                w.knowledge["decisions"].append(e)
            elif isinstance(e, WorkflowFailed):
                w.terminal(e)
                w.to_budget("workflow_failed", e)
            elif isinstance(e, AdmissionGranted):
                w.knowledge["grants"].append(e)
            elif isinstance(e, LlmCallCompleted):
                w.to_budget("llm_call_completed", e)


class Loader:
    """One loader for every agent: Loader.handle, _given_back and _run."""

    def __init__(self, world: World) -> None:
        self.w = world
        self.queues: dict[str, deque[TaskAdmitted]] = {a: deque() for a in world.agents}
        self.running: dict[str, Running] = {}
        self.finished: set[str] = set()
        self.started: set[str] = set()
        self.tasks: dict[str, TaskAdmitted] = {}
        # Runs with a terminal event (Loader.ended, followed from the terminal topics),
        # and the ends on those topics not read yet.
        self.ended: set[str] = set()
        self.news: deque[str] = deque()
        self.given: set[tuple[str, str]] = set()  # Loader._given

    def handle(self, agent: str) -> None:
        task = self.queues[agent].popleft()
        w = self.w
        run = task.run_id
        if run in self.finished or run in self.ended or run in self.running:
            w.trace(f"loader drops {_short(task)} (done or running)")
            return
        if task.token is not None and self._given_back(task):
            return
        self._run(task)

    def _given_back(self, task: TaskAdmitted) -> bool:
        w = self.w
        now = w.now
        if (task.run_id, str(task.token)) in self.given:
            w.trace(f"loader drops {_short(task)} (a copy of one given back)")
            return True
        if task.deadline_at is not None and task.deadline_at <= now:
            return False
        late = task.start_by is not None and task.start_by <= now
        if not late and task.agent_id not in w.retired:
            return False
        self.given.add((task.run_id, str(task.token)))
        back = TaskRequested.caused_by(
            task,
            event_id=f"given-back-{task.run_id}-{task.token}",
            source="loader",
            given_back=True,
            occurred_at=now,
        )
        w.trace(f"loader gives back {task.run_id} ({'late' if late else 'retired agent'})")
        w.to_budget("task_requested", back)
        return True

    def _run(self, task: TaskAdmitted) -> None:
        w = self.w
        now = w.now
        run = task.run_id
        agent = task.agent_id
        if task.deadline_at is not None and task.deadline_at <= now:
            if agent in w.retired:
                w.to_budget("goal_agents_changed", w.agent_change(agent, "retired"))
            self._end(task, None)
            return
        if agent in w.retired:
            w.trace(f"loader revives {agent} for {run}")
            w.retired.discard(agent)
            w.to_budget("goal_agents_changed", w.agent_change(agent, "revived"))
        latest = min((t for t in (task.deadline_at, task.start_by) if t is not None), default=None)
        if latest is not None and latest <= now:
            self._end(task, None)
            return
        if run in self.running or run in self.started:
            raise w.violation(f"run {run} started twice")
        worst = w.defaults.task_worst_case(task.message, task.context)
        duration = w.rng.uniform(0.05, w.defaults.llm_timeout_s)
        cost = w.rng.choice([0.0, worst, w.rng.uniform(0.0, worst)])
        self.running[run] = Running(now + timedelta(seconds=duration), cost, worst, agent)
        self.started.add(run)
        self.tasks[run] = task
        w.trace(
            f"loader starts {run} on {agent} (token {str(task.token)[:8]},"
            f" start_by {w.secs(task.start_by)}), ends +{w.secs(now)}+{duration:.1f}s,"
            f" running {len(self.running)}"
        )

    def learn(self) -> None:
        """EndedRuns.apply, for the loader."""
        self.ended.add(self.news.popleft())

    def end_due(self) -> None:
        """The calls that ended by now, in order of their end."""
        due = sorted((r.end, run) for run, r in self.running.items() if r.end <= self.w.now)
        for _, run in due:
            self._end(self.tasks[run], self.running.pop(run))

    def _end(self, task: TaskAdmitted, running: Running | None) -> None:
        w = self.w
        self.finished.add(task.run_id)
        if running is None:
            failed = WorkflowFailed.caused_by(
                task,
                event_id=terminal_event_id(task.run_id),
                source="loader",
                reason="timeout",
                detail="deadline passed before the task could start",
                admitted=True,
                occurred_at=w.now,
            )
            w.terminal(failed)
            w.to_budget("workflow_failed", failed)
            return
        w.spent += running.cost
        w.trace(f"loader ends {task.run_id} at +{w.secs(running.end)}, cost {running.cost:.4f}")
        w.to_budget(
            "llm_call_completed",
            LlmCallCompleted(
                event_id=f"cost-{task.run_id}",
                source="loader",
                run_id=task.run_id,
                goal_id=GOAL,
                agent_id=task.agent_id,
                model="m",
                purpose="answer",
                cost_usd=running.cost,
                ok=True,
                occurred_at=running.end,
            ),
        )
        if task.run_id in self.ended:
            # Answered (or failed) elsewhere while it ran: its answer is dropped, its cost
            # still counted (Loader.handle).
            w.trace(f"loader drops its answer of {task.run_id}: ended elsewhere")
            return
        done = WorkflowCompleted.caused_by(
            task,
            event_id=terminal_event_id(task.run_id),
            source="loader",
            specialty=task.specialty,
            text="ok",
            cost_usd=running.cost,
            occurred_at=running.end,
        )
        w.terminal(done)
        w.to_budget("workflow_completed", done)


class World:
    def __init__(self, seed: int, faults: Faults | None = None) -> None:
        self.seed = seed
        self.faults = faults or Faults()
        self.rng = rng = random.Random(seed)
        self.defaults = _defaults(rng)
        self.now = T0
        self.step = 0
        self.log: list[str] = []
        self.agents = [f"a{i}" for i in range(rng.randint(1, 3))]
        # Busy goals queue tasks (no tokens then); quiet ones are served with tokens.
        self.arrival_rate = rng.choice([0.2, 0.5, 1.0, 3.0])
        self.retired: set[str] = set()
        self.spent = 0.0
        self.outcomes: dict[str, set[tuple[str, str]]] = {}
        self.knowledge: dict[str, deque[Event]] = {"grants": deque(), "decisions": deque()}
        self.lives = 0
        self.router = Router(self, 0)
        self.budget = Budget(self)
        self.loader = Loader(self)
        start = self.budget.state
        start.max_agents = len(self.agents) - rng.choice([0, 0, 1])
        self.budget.save(start)
        for agent in self.agents:
            self.budget.apply(self.agent_change(agent, "spawned"))
        self.requests: list[Request] = []
        self.arrivals: deque[Request] = deque()
        self.inbox: deque[Request] = deque()  # request_received, read by the router
        for i in range(rng.randint(6, 30)):
            size = rng.choice([0, 5, 10, 20, 30, 40, 60, 100, 200])
            context = {"k": "v" * rng.choice([0, 10])} if rng.random() < 0.3 else {}
            req = Request(f"r{i}", f"m{i} " + "x" * size, context, None, T0)
            self.arrivals.append(req)
            self.requests.append(req)

    # -- plumbing --------------------------------------------------------------
    def secs(self, at: datetime | None) -> str:
        return "-" if at is None else f"{(at - T0).total_seconds():.2f}"

    def trace(self, line: str) -> None:
        self.log.append(f"[{self.step} t+{self.secs(self.now)}] {line}")

    def violation(self, what: str, run: str | None = None) -> Violation:
        lines = self.log
        if run is not None:  # what happened to the run, and the faults
            faults = ("pauses", "dies", "stops", "crashes", "retires")
            pattern = re.compile(rf"\b{run}\b")
            lines = [x for x in lines if pattern.search(x) or any(f in x for f in faults)]
        tail = "\n".join(lines[-80:])
        return Violation(f"seed {self.seed}, step {self.step}: {what}\n{tail}")

    def to_budget(self, topic: str, event: Event) -> None:
        self.budget.queues[topic].append(event)

    def to_loader(self, event: TaskAdmitted) -> None:
        self.loader.queues[event.agent_id].append(event)

    def terminal(self, event: WorkflowCompleted | WorkflowFailed) -> None:
        # One outcome per run: the same kind of end, whoever sent it (every terminal event
        # of a run has the same id, and its readers keep the first).
        kind = event.reason if isinstance(event, WorkflowFailed) else "answered"
        self.outcomes.setdefault(event.run_id, set()).add((event.event_type, kind))
        self.trace(f"{event.source} ends {event.run_id}: {kind}")
        self.knowledge["decisions"].append(event)
        self.loader.news.append(event.run_id)

    def agent_change(self, agent: str, change: str) -> GoalAgentsChanged:
        return GoalAgentsChanged(
            source="loader",
            goal_id=GOAL,
            agent_id=agent,
            change=change,  # type: ignore[arg-type]
            occurred_at=self.now,
        )

    # -- the invariants ------------------------------------------------------------
    def check(self) -> None:
        running = self.loader.running
        limit = self.defaults.max_concurrent
        if len(running) > limit:
            raise self.violation(f"{len(running)} tasks run, max_concurrent is {limit}")
        exposed = self.spent + sum(r.worst for r in running.values())
        cap = self.defaults.max_daily_cost
        if exposed > cap + 1e-9:
            raise self.violation(
                f"spent {self.spent:.6f} + running worst cases = {exposed:.6f}"
                f" > max_daily_cost {cap:.6f}"
            )

    def final_check(self) -> None:
        for req in self.requests:
            outcomes = self.outcomes.get(req.run, set())
            if not outcomes:
                raise self.violation(f"request {req.run} never ended", req.run)
            if len(outcomes) > 1:
                raise self.violation(f"request {req.run} ended more than once: {outcomes}", req.run)
        state = self.budget.state
        if state.busy() != 0:
            raise self.violation(
                f"busy {state.busy()} at the end: in_flight {state.in_flight},"
                f" tokens {state.tokens}"
            )
        if abs(state.reserved()) > 1e-9:
            raise self.violation(f"reserved {state.reserved()} at the end: {state.to_dict()}")
        if abs(state.spent_today(self.now) - self.spent) > 1e-9:
            raise self.violation(
                f"spent_today {state.spent_today(self.now)} but {self.spent} was reported"
            )

    # -- the steps -------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.loader.end_due()

    def actions(self, draining: bool) -> list[tuple[float, Callable[[], None]]]:
        rng, f = self.rng, self.faults
        out: list[tuple[float, Callable[[], None]]] = []
        if self.arrivals and not draining:
            out.append((self.arrival_rate, self.arrive))
        if self.inbox:
            out.append((3.0, lambda: self.router.route(self.inbox.popleft())))
        if self.router.outbox:
            out.append((3.0, lambda: self.router.send(rng.randrange(len(self.router.outbox)))))
        for known in self.knowledge.values():
            if known:
                out.append((2.0, partial(self._learn, known)))
        for topic, queue in self.budget.queues.items():
            if queue:
                lose = not draining and f.lost_sends and rng.random() < 0.03
                out.append((1.5, partial(self.budget.read, topic, lose_sends=lose)))
        for agent, admissions in self.loader.queues.items():
            if admissions:
                out.append((1.5, partial(self.loader.handle, agent)))
        if self.loader.news:
            out.append((2.0, self.loader.learn))
        out.append((0.5, self.budget.tick))
        out.append((0.5, self.budget.commit))
        out.append((0.3, self.router.give_back))
        out.append((0.3, self._commit_router))
        if f.resends:
            out.append((0.3, self.router.resend))
        # Draining, time goes faster: what is left waits for a deadline or a lapse.
        longest = 5.0 if draining else 0.8
        out.append((2.0, lambda: self.advance(rng.uniform(0.02, longest))))
        out.append((0.3, self._traffic))
        if draining:
            return out
        if f.pauses:
            out.append((0.03, lambda: self._pause(rng.uniform(3.0, 120.0))))
        if f.router_deaths:
            out.append((0.04, self._router_dies))
        if f.redeliveries and self.router.uncommitted:
            out.append((0.04, self._redelivered))
        if f.budget_crashes:
            out.append((0.1, self._budget_crashes))
        if f.retirements:
            idle = [a for a in self.agents if a not in self.retired]
            idle = [a for a in idle if all(r.agent != a for r in self.loader.running.values())]
            if idle:
                out.append((0.2, lambda: self._retire(rng.choice(idle))))
        return out

    def arrive(self) -> None:
        req = self.arrivals.popleft()
        req.at = self.now
        if self.rng.random() < 0.7:
            req.deadline = self.now + timedelta(seconds=self.rng.uniform(2.0, 90.0))
        self.trace(f"request {req.run} arrives, deadline {self.secs(req.deadline)}")
        self.inbox.append(req)

    def _traffic(self) -> None:
        """Another event of the goal, as a busy goal has: it moves the goal's event time.

        Lease time is the earlier of the budget's clock and the goal's event time, and
        ticks do not move the latter: on a goal with no traffic at all, nothing lapses
        (a held slot or hold that a waiting task needs stays taken until an event comes).
        """
        self.to_budget(
            "admission_returned",
            AdmissionReturned(
                source="router", goal_id=GOAL, holder="traffic", tokens=[], occurred_at=self.now
            ),
        )

    def _learn(self, known: deque[Event]) -> None:
        self.router.learn(known.popleft())

    def _commit_router(self) -> None:
        waiting = {e.run_id for e in self.router.outbox} | set(self.router.after)
        for run in list(self.router.uncommitted):
            if run not in waiting:
                del self.router.uncommitted[run]

    def _pause(self, seconds: float) -> None:
        self.trace(f"everything pauses {seconds:.1f}s")
        self.advance(seconds)

    def _router_dies(self) -> None:
        old = self.router
        clean = self.rng.random() < 0.3
        if clean:
            # A clean stop lets the handlers running finish (both sends of an admission go
            # out) and commits them (EventConsumer.run_concurrently): nothing is routed
            # again. Then every token left goes back (main).
            while old.outbox:
                old.send(self.rng.randrange(len(old.outbox)))
            old.uncommitted.clear()
            old.give_back(everything=True)
        self.lives += 1
        self.router = Router(self, self.lives)
        again = [r for r in self.requests if r.run in old.uncommitted]
        self.trace(
            f"router {old.holder} {'stops' if clean else 'dies'} with {old.tokens.held(GOAL)}"
            f" tokens, {len(old.outbox)} bindings or admissions unsent;"
            f" routed again: {[r.run for r in again]}"
        )
        # Read again from the last committed offset: before what the inbox still holds.
        self.inbox.extendleft(reversed(again))

    def _redelivered(self) -> None:
        """A rebalance hands this instance its uncommitted requests again."""
        again = [r for r in self.requests if r.run in self.router.uncommitted]
        self.trace(f"router {self.router.holder} reads again: {[r.run for r in again]}")
        self.inbox.extendleft(reversed(again))

    def _budget_crashes(self) -> None:
        self.trace("budget crashes")
        self.budget.crash()

    def _retire(self, agent: str) -> None:
        self.trace(f"loader retires {agent}")
        self.retired.add(agent)
        self.to_budget("goal_agents_changed", self.agent_change(agent, "retired"))

    def busy(self) -> bool:
        return bool(
            self.arrivals
            or self.inbox
            or self.router.outbox
            or self.router.after
            or any(self.knowledge.values())
            or any(self.budget.queues.values())
            or any(self.loader.queues.values())
            or self.loader.news
            or self.loader.running
        )

    def run(self) -> None:
        rng = self.rng
        steps = 40 + 25 * len(self.requests)
        for _ in range(steps):
            self.one(draining=False)
        # No more faults: the requests still to come arrive, everything is read, and
        # every request ends.
        while self.arrivals:
            self.arrive()
        self.budget.commit()
        limit = self.now + timedelta(hours=2)
        while self.now < limit and (
            self.busy() or any(r.run not in self.outcomes for r in self.requests)
        ):
            self.one(draining=True)
        # Past every lapse: the last tokens' and runs' slots and holds come back once an
        # event of the goal (here a router's empty return) moves its event time.
        lapse = self.defaults.lease_seconds + self.defaults.llm_timeout_s + 3600.0
        self.advance(lapse)
        self.to_budget(
            "admission_returned",
            AdmissionReturned(
                source="router", goal_id=GOAL, holder="nobody", tokens=[], occurred_at=self.now
            ),
        )
        while any(self.budget.queues.values()):
            self.budget.read(rng.choice([t for t, q in self.budget.queues.items() if q]))
        self.budget.tick()
        while any(self.budget.queues.values()):
            self.budget.read(rng.choice([t for t, q in self.budget.queues.items() if q]))
        self.check()
        self.final_check()

    def one(self, draining: bool) -> None:
        self.step += 1
        choices = self.actions(draining)
        weights = [w for w, _ in choices]
        _, action = self.rng.choices(choices, weights)[0]
        action()
        self.check()


def _short(e: Event) -> str:
    if isinstance(e, TaskRequested):
        how = "given-back" if e.given_back else (f"bind {e.token[:8]}" if e.token else "task")
        want = f" want {e.want_tokens}" if e.want_tokens else ""
        return f"{how}({e.run_id} {e.agent_id}{want})"
    if isinstance(e, TaskAdmitted):
        token = f" token {e.token[:8]}" if e.token else ""
        start = f" start_by {(e.start_by - T0).total_seconds():.2f}" if e.start_by else ""
        return f"admitted({e.run_id} {e.agent_id}{token}{start})"
    if isinstance(e, AdmissionGranted):
        return f"granted({e.holder} {[t[:8] for t in e.tokens]})"
    if isinstance(e, AdmissionReturned):
        return f"returned({e.holder} {[t[:8] for t in e.tokens]})"
    if isinstance(e, WorkflowFailed):
        return f"failed({e.run_id} {e.reason} {e.limit or ''})"
    if isinstance(e, WorkflowCompleted):
        return f"completed({e.run_id})"
    if isinstance(e, LlmCallCompleted):
        return f"cost({e.run_id} {e.cost_usd:.4f})"
    if isinstance(e, GoalAgentsChanged):
        return f"{e.change}({e.agent_id})"
    return e.event_type


@pytest.mark.parametrize("seed", range(SEEDS))
def test_admission_tokens_never_pass_a_limit_and_every_request_ends(seed: int) -> None:
    World(seed).run()


# -- interleavings, one at a time ---------------------------------------------------------
NOW = T0 + timedelta(hours=1)
# Free calls: every worst case and every token's hold is the 0.01 floor.
FREE = BudgetDefaults(
    max_concurrent=2,
    task_reserve_usd=0.01,
    prices=PriceTable({}, ModelPrice(0.0, 0.0)),
    admission_tokens=1,
    admission_token_seconds=5.0,
    llm_timeout_s=30.0,
)


def _task(run: str, at: datetime = NOW, **fields: Any) -> TaskRequested:
    base: dict[str, Any] = {
        "event_id": f"task-{run}",
        "source": "router",
        "run_id": run,
        "goal_id": GOAL,
        "user_id": "u1",
        "agent_id": "a1",
        "specialty": "s",
        "message": f"task {run}",
        "occurred_at": at,
    }
    return TaskRequested(**(base | fields))


def _granted(events: list[Event]) -> AdmissionGranted:
    grants = [e for e in events if isinstance(e, AdmissionGranted)]
    assert len(grants) == 1, events
    return grants[0]


def _traffic(at: datetime) -> AdmissionReturned:
    return AdmissionReturned(source="router", goal_id=GOAL, holder="x", tokens=[], occurred_at=at)


def _cost(run: str, usd: float, at: datetime) -> LlmCallCompleted:
    return LlmCallCompleted(
        event_id=f"cost-{run}",
        source="loader",
        run_id=run,
        goal_id=GOAL,
        model="m",
        cost_usd=usd,
        occurred_at=at,
    )


def _done(run: str, usd: float, at: datetime) -> WorkflowCompleted:
    return WorkflowCompleted(
        source="loader",
        run_id=run,
        goal_id=GOAL,
        specialty="s",
        text="ok",
        cost_usd=usd,
        occurred_at=at,
    )


def test_a_runs_end_and_cost_read_before_its_binding_leave_nothing_taken_in_the_end() -> None:
    """The budget reads task_requested and the terminal topics side by side: a run the
    router admitted with a token can end, and its cost come, before its binding is read.
    The binding then frees the token's slot; the money is never counted short."""
    state = BudgetState.new(GOAL, FREE)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, FREE).events)
    state.handle(_done("r1", 0.0, NOW), NOW, FREE)
    later = NOW + timedelta(seconds=3)
    state.handle(_cost("r2", 0.01, later), later, FREE)
    state.handle(_done("r2", 0.01, later), later, FREE)
    assert state.spent_today(later) == pytest.approx(0.01)
    # Still held by the unread binding's token, so never less than what was spent.
    assert state.spent_today(later) + state.reserved() >= 0.02 - 1e-12
    out = state.handle(_task("r2", token=grant.tokens[0]), later, FREE).events
    assert out == [] and state.busy() == 0 and not state.tokens
    end = NOW + timedelta(hours=1)
    state.handle(_traffic(end), end, FREE)
    assert state.busy() == 0 and state.reserved() == pytest.approx(0.0)
    assert state.spent_today(end) == pytest.approx(0.01)


def test_a_binding_read_after_its_token_lapsed_holds_nothing_its_given_back_is_decided() -> None:
    """The budget lagged: the token lapsed (no task it let start can still run) before
    its binding was read. The binding holds nothing; the loader's given-back task (it
    could not start the task by the token's start deadline) is decided like any other."""
    state = BudgetState.new(GOAL, FREE)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, FREE).events)
    state.handle(_done("r1", 0.0, NOW), NOW, FREE)
    lapsed = grant.bind_by + timedelta(seconds=FREE.llm_timeout_s + 31)
    state.handle(_traffic(lapsed), lapsed, FREE)
    assert not state.tokens
    binding = _task("r2", token=grant.tokens[0], occurred_at=NOW + timedelta(seconds=1))
    assert state.handle(binding, lapsed, FREE).events == [] and state.busy() == 0
    back = binding.model_copy(
        update={"event_id": "given-back-r2", "given_back": True, "occurred_at": lapsed}
    )
    admitted = [e for e in state.handle(back, lapsed, FREE).events if isinstance(e, TaskAdmitted)]
    assert [(a.run_id, a.token, a.start_by) for a in admitted] == [("r2", None, None)]


def test_a_task_given_back_before_its_binding_is_read_holds_one_slot() -> None:
    """The router sends the binding and the admission at once: the loader may read the
    admission, find it late and give the task back before the budget reads the binding.
    The task is decided afresh; the binding read after it frees the token's slot."""
    state = BudgetState.new(GOAL, FREE)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, FREE).events)
    state.handle(_done("r1", 0.0, NOW), NOW, FREE)
    late = grant.bind_by + timedelta(seconds=1)
    binding = _task("r2", token=grant.tokens[0])
    back = binding.model_copy(
        update={"event_id": "given-back-r2", "given_back": True, "occurred_at": late}
    )
    admitted = [e for e in state.handle(back, late, FREE).events if isinstance(e, TaskAdmitted)]
    assert [(a.run_id, a.token, a.start_by) for a in admitted] == [("r2", None, None)]
    assert state.busy() == 2  # r2, and the token until its binding is read
    assert state.handle(binding, late, FREE).events == []
    assert state.busy() == 1 and list(state.in_flight) == ["r2"] and not state.tokens


def test_a_binding_read_again_as_a_task_routed_without_a_token_keeps_its_start_deadline() -> None:
    """The router died with its binding sent and its admission not (it sends both at
    once, to two partitions); the next instance routes the request again (same task id)
    without a token (it holds none, or the task goes to a retired agent). The budget's
    admission of the bound run must keep the token's start deadline: the run's slot lapses
    bind_by + llm_timeout + 30 s after, and a task started later could still run then."""
    state = BudgetState.new(GOAL, FREE)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, FREE).events)
    state.handle(_task("r2", token=grant.tokens[0]), NOW, FREE)
    rerouted = _task("r2", at=NOW + timedelta(seconds=2))
    out = state.handle(rerouted, NOW + timedelta(seconds=2), FREE).events
    admitted = [e for e in out if isinstance(e, TaskAdmitted)]
    assert [a.run_id for a in admitted] == ["r2"]
    start_by = admitted[0].start_by
    assert start_by is not None and start_by <= grant.bind_by, admitted[0]


def test_a_grant_read_again_never_gives_the_router_a_token_it_used() -> None:
    """The budget sends a grant again when it reads the ask again (its crash, or the
    router sending the task again before it saw its admission). A token the router used
    already must not come back to its stock: a second binding of it holds nothing."""
    state = BudgetState.new(GOAL, FREE)
    stock = AdmissionTokens(1, FREE.worst, holder="R1")
    ask = _task("r1", want_tokens=stock.ask(GOAL, NOW), holder="R1")
    stock.granted(_granted(state.handle(ask, NOW, FREE).events), NOW)
    first = stock.take(GOAL, "task r2", {}, NOW)
    assert first is not None
    state.handle(_task("r2", token=first.token), NOW, FREE)  # r1 and r2 run: the goal is full
    stock.granted(_granted(state.handle(ask, NOW, FREE).events), NOW)
    again = stock.take(GOAL, "task r3", {}, NOW)
    if again is not None:
        state.handle(_task("r3", token=again.token), NOW, FREE)
        assert "r3" in state.in_flight, f"r3 runs on {again.token}, counted nowhere"
    assert state.busy() <= state.max_concurrent


def test_a_task_given_back_after_its_slot_lapsed_still_ends() -> None:
    """The loader read the router's admission past its start deadline (it was down, or
    paused) and gave the task back; by then the budget had taken the run's slot back.
    Nobody started the run: the budget must still decide it, or it never ends."""
    state = BudgetState.new(GOAL, FREE)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, FREE).events)
    state.handle(_done("r1", 0.0, NOW), NOW, FREE)
    binding = _task("r2", token=grant.tokens[0])
    state.handle(binding, NOW, FREE)
    late = grant.bind_by + timedelta(seconds=FREE.llm_timeout_s + 40)
    back = binding.model_copy(
        update={"event_id": "given-back-r2", "given_back": True, "occurred_at": late}
    )
    out = state.handle(back, late, FREE).events
    assert [e.run_id for e in out if isinstance(e, TaskAdmitted | WorkflowFailed)] == ["r2"], out


def test_a_lapsed_tokens_money_stays_held_while_its_runs_cost_may_be_unread() -> None:
    """The budget lags on task_requested: the binding of a token is unread when the token
    lapses, and so is the cost of the task it let run (on llm_call_completed). Dropping
    the token's hold then leaves that cost counted nowhere: the budget admits tasks with
    money already spent."""
    limits = dataclasses.replace(FREE, max_concurrent=10, max_daily_cost=0.03)
    state = BudgetState.new(GOAL, limits)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, limits).events)
    state.handle(_done("r1", 0.0, NOW), NOW, limits)
    # The router bound r2 with the token at once; the loader ran it, and it cost 0.01.
    spent = 0.01
    lapsed = grant.bind_by + timedelta(seconds=limits.llm_timeout_s + 31)
    state.handle(_traffic(lapsed), lapsed, limits)
    admitted = 0
    for i in range(3, 6):
        out = state.handle(_task(f"r{i}", at=lapsed), lapsed, limits).events
        admitted += sum(isinstance(e, TaskAdmitted) for e in out)
    assert spent + admitted * 0.01 <= limits.max_daily_cost + 1e-12, (
        f"{admitted} tasks admitted at 0.01 with 0.01 spent: past {limits.max_daily_cost}"
    )


def test_a_bound_run_routed_again_after_its_slot_lapsed_still_ends() -> None:
    """The router died with its binding sent and its admission not, and its requests were
    routed again only after the run's slot lapsed (a restart that took a minute). The
    task read again (same id) finds nothing in flight: the budget must still decide it,
    or nobody ever starts or ends the run."""
    state = BudgetState.new(GOAL, FREE)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, FREE).events)
    state.handle(_done("r1", 0.0, NOW), NOW, FREE)
    state.handle(_task("r2", token=grant.tokens[0]), NOW, FREE)
    late = grant.bind_by + timedelta(seconds=FREE.llm_timeout_s + 40)
    state.handle(_traffic(late), late, FREE)  # the slot lapses
    out = state.handle(_task("r2", at=late), late, FREE).events
    assert [e.run_id for e in out if isinstance(e, TaskAdmitted | WorkflowFailed)] == ["r2"], out


def test_a_binding_read_after_its_token_lapsed_then_its_task_routed_again_still_ends() -> None:
    """Seed 929 of 2,000. The router died with its binding sent and its admission not; the
    budget read the binding only after the token lapsed (it lagged, or everything paused),
    so the binding holds the token's money for the run and nothing else. The next router
    instance routes the request again without a token: the same task id, a replay, which
    decides nothing. Nobody ever admits, starts or ends the run."""
    state = BudgetState.new(GOAL, FREE)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, FREE).events)
    state.handle(_done("r1", 0.0, NOW), NOW, FREE)
    lapsed = grant.bind_by + timedelta(seconds=FREE.llm_timeout_s + 31)
    state.handle(_traffic(lapsed), lapsed, FREE)  # the token lapses, its binding unread
    binding = _task("r2", token=grant.tokens[0], occurred_at=NOW + timedelta(seconds=1))
    assert state.handle(binding, lapsed, FREE).events == []
    rerouted = _task("r2", at=lapsed)
    assert rerouted.event_id == binding.event_id
    out = state.handle(rerouted, lapsed, FREE).events
    assert [e.run_id for e in out if isinstance(e, TaskAdmitted | WorkflowFailed)] == ["r2"], out


def test_a_bound_run_whose_cost_was_read_is_not_failed_when_read_again_after_its_lapse() -> None:
    """Seed 1500 of 2,000. The loader ran a task the router admitted with a token; the
    budget read its cost, not yet its answer (it reads the topics side by side), when the
    run's slot lapsed: the run is kept as one whose admission may never have gone out. Its
    task read again (the router sent it again, or the budget read its uncommitted input
    again) is decided afresh, and refused: a second outcome for an answered run."""
    limits = dataclasses.replace(FREE, max_daily_cost=0.025)
    state = BudgetState.new(GOAL, limits)
    grant = _granted(state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, limits).events)
    state.handle(_done("r1", 0.0, NOW), NOW, limits)
    binding = _task("r2", token=grant.tokens[0])
    state.handle(binding, NOW, limits)
    ran = NOW + timedelta(seconds=2)
    state.handle(_cost("r2", 0.02, ran), ran, limits)  # r2 ran; its answer is unread
    late = grant.bind_by + timedelta(seconds=limits.llm_timeout_s + 40)
    state.handle(_traffic(late), late, limits)  # the run's slot lapses
    out = state.handle(binding, late, limits).events
    failed = [e for e in out if isinstance(e, WorkflowFailed) and e.run_id == "r2"]
    assert failed == [], f"r2 ran (its cost was read) and is failed: {failed}"


class _Broker:
    """AIOKafkaProducer.send for the real EventProducer: every record acknowledged, kept."""

    def __init__(self) -> None:
        self.acked: list[Event] = []
        self.codec = default_codec()

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acked.append(self.codec.decode(value))
        future.set_result(None)
        return future


def _real_loader(at: datetime) -> tuple[RealLoader, _Broker]:
    """The real loader of agent a1 (goal g1, specialty s), retired; answers at once."""
    settings = KafkaSettings("127.0.0.1:1", "")
    producer = EventProducer(settings)
    broker = _Broker()
    producer._producer = broker  # type: ignore[assignment]
    prices = PriceTable({}, ModelPrice(0.0, 0.0))
    ctx = ServiceContext("loader", settings, FakeClock(at), producer)
    loader = RealLoader(
        ctx, InMemoryLLM(prices=prices), LLMSettings(base_url="http://x", prices=prices)
    )
    agent = {"goal_id": GOAL, "agent_id": "a1", "specialty": "s"}
    loader.learn(AgentSpawned(source="spawner", system_prompt="Help.", temperature=0.2, **agent))
    loader.learn(AgentRetired(source="loader", reason="idle", **agent))
    return loader, broker


async def test_a_token_task_given_back_never_runs_from_another_copy_of_its_admission() -> None:
    """Seeds 1196, 1571 and 1598 of 2,000. The loader gave back a token task because its
    agent was retired; the budget freed the token's slot and decided the task afresh: it
    waits in the queue. Another task's admission then revives the agent, and a second copy
    of the token admission comes (the router sent its request again and resends what it
    sent; or the budget read the binding again and replayed its admission): not late, agent
    live, so the loader runs it, while the budget counts the run nowhere but its queue.
    Tasks then run past max_concurrent (and the run may end twice: run here, then failed at
    its deadline in the queue)."""
    state = BudgetState.new(GOAL, FREE)  # two slots, one token
    first = state.handle(_task("r1", want_tokens=1, holder="R1"), NOW, FREE).events
    [admitted_r1] = [e for e in first if isinstance(e, TaskAdmitted)]
    binding = _task("r2", token=_granted(first).tokens[0])
    state.handle(binding, NOW, FREE)  # r1 and r2 hold both slots
    assert state.handle(_task("r3"), NOW, FREE).events == []  # r3 waits
    copy = TaskAdmitted.caused_by(
        binding,
        event_id="admitted-r2",
        source="router",
        start_by=_granted(first).bind_by,
        occurred_at=NOW,
    )
    loader, broker = _real_loader(NOW)
    await loader.handle(copy)
    [back] = [e for e in broker.acked if isinstance(e, TaskRequested)]
    assert back.given_back and back.run_id == "r2"
    state.handle(back, NOW, FREE)
    assert "r2" in state.queue and "r2" not in state.in_flight  # r3 took the slot
    await loader.handle(admitted_r1)  # revives a1
    await loader.handle(copy)  # the same admission of r2 again
    started = [e.run_id for e in broker.acked if isinstance(e, WorkflowStarted)]
    assert started == ["r1"], (
        f"runs started {started}: r2 ran from the token admission it gave back, while the"
        f" budget has it waiting (queue {state.queue}, in flight {list(state.in_flight)})"
    )
