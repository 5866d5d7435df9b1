"""Budget state of one goal and the pure rules that change it (no I/O, clocks passed in).

The budget service is the single writer of this state per goal: every event that
changes it arrives keyed by goal_id, so one instance sees a goal's events in
order. Each rule returns the events to emit.

Crash safety: the service writes the state (a Faust table, through its changelog)
and sends the events a rule returned without atomicity, and commits the input's
offset only after both. A crash in between replays the input, which the state has
already applied (``seen``). So every event the budget sends has an id derived from
what caused it, and a replayed input sends again what the state says it decided:
the run's admission while the run is in flight, its failure while the run is in the
bounded record of runs the budget ended, the spawn's approval or denial, the spend's
decision. Readers drop the copies by event id.

Two clocks, each for one thing:

- *Budget time* for money: spend is filed under the UTC day of the budget's own
  clock when it processes the cost, and every check compares that day's spend plus
  every hold against ``max_daily_cost``. Holds do not belong to a day, so a cost that
  lands after midnight was already counted against the new day while it was held.
- *Lease time* for slots: a slot is taken back only once both the budget's clock and
  the goal's event time (the newest ``occurred_at`` the budget has read for the goal)
  are past the task's deadline plus the LLM timeout plus a grace. The loader never
  starts a task past its deadline and its call ends within the LLM timeout, so the
  run can no longer be running; a budget outage (its clock moved, the backlog's event
  times did not) or a producer with a clock ahead (event time moved, the budget's did
  not) alone expires nothing.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections import OrderedDict, deque
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from streams.admission import WorstCase
from streams.clock import utc_day
from streams.config import BudgetSettings
from streams.events import (
    MAX_WAIT_SECONDS,
    SPAWN_APPROVAL_SECONDS,
    AdmissionGranted,
    AdmissionReturned,
    BudgetExceeded,
    BudgetTicked,
    BudgetUpdateRequested,
    Event,
    GoalAgentsChanged,
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
    terminal_event_id,
)
from streams.llm import LLMSettings, PriceTable, worst_case_usd
from streams.workflows import MAX_PROMPT_CHARS

__all__ = ["BudgetDefaults", "BudgetState", "Decision", "RunStore"]

SOURCE = "budget"
_NS = uuid.UUID("5b0c7e2a-91d4-4f3e-8a6b-2c1d0e9f8a7b")
# Redeliveries after a crash come from the last uncommitted stretch (Faust commits
# every few seconds); a thousand ids covers it. The whole record is rewritten on every
# event, so every list in it is bounded: at most ~40 bytes an id, the record stays
# under ~200 KB whatever the input (queue 1000 ids, seen 1000, ended 1000). The two
# lists every busy goal fills, the ids seen and the runs other services ended, are kept
# as digests of 14 bytes in the record instead of ids of 39 (see _digest).
_SEEN_LIMIT = 1000
# Runs that ended, so that a replayed or re-routed task_requested is not admitted
# again; a run the budget failed keeps how, to send the same failure again.
_ENDED_LIMIT = 1000
# Spawn denials and spend decisions kept to be sent again on a replay.
_DECISIONS_LIMIT = 200
# Queues this short are looked at whole for deadlines on every event, longer ones on ticks.
_SCAN_EVERY_EVENT = 32
_SPAWN_HOLD_SECONDS = 60.0
# Platform calls (judge, feedback instructions) held at once for one run; more are refused.
_PLATFORM_HOLDS_PER_RUN = 8
# A report the budget sends for a call nobody reported is sent again after this long if
# it has not come back (a crash between the record's write and the send lost it).
_RESEND_SECONDS = 60.0
# Beyond the deadline and the LLM timeout, before a slot is taken back.
_LEASE_GRACE_SECONDS = 30.0
# The spawner's prompt-writing call (services/spawner/design.py): at most 300
# completion tokens; its prompt (a fixed instruction, the specialty's description and
# tools, and an excerpt of the request) is cut to fit this many UTF-8 bytes.
_SPAWN_MAX_TOKENS = 300
_SPAWN_PROMPT_BYTES = 1500
_ID_MAX = 64
# How far ahead of the budget's clock an event's time may move the goal's event time.
_EVENT_TIME_AHEAD_SECONDS = 60.0


def _digest(ref: str) -> str:
    """An id as the record keeps it where only "was it seen?" is asked: 64 bits of its
    BLAKE2b hash, 11 characters. A false "seen" needs a collision among the 1,000 kept
    (about 1 in 10^16 for each event read)."""
    raw = hashlib.blake2b(ref.encode(), digest_size=8).digest()
    return base64.urlsafe_b64encode(raw)[:11].decode()


def _in_order(raw: dict[str, Any] | list[list[Any]]) -> dict[str, Any]:
    """A record's map, oldest first: an object, or the list of pairs older records kept."""
    return dict(raw) if isinstance(raw, dict) else {k: v for k, v in raw}


def _deadline_of(task: dict[str, Any]) -> datetime | None:
    """A stored task's deadline as its event would have it (UTC, whole milliseconds),
    read without validating the rest; what does not read as a time is validated whole."""
    raw = task.get("deadline_at")
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        when = None
    if when is None:
        return TaskRequested.model_validate(task).deadline_at
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def _drop_oldest(entries: dict[str, Any], limit: int) -> None:
    while len(entries) > limit:
        del entries[next(iter(entries))]


def _ref(value: str) -> str:
    """Ids as kept in the record: a long one (run ids may have 200 characters) by its digest."""
    return value if len(value) <= _ID_MAX else str(uuid.uuid5(_NS, value))


@dataclass(frozen=True)
class BudgetDefaults:
    max_agents: int = 100
    max_concurrent: int = 10
    max_daily_cost: float = 10.0
    # The least held back per admitted task or approved spawn; the hold is the call's
    # worst case (see task_worst_case) when that is more.
    task_reserve_usd: float = 0.002
    max_queue: int = 1000
    # A task without a deadline keeps its slot this long past its admission.
    lease_seconds: float = 600.0
    # What a call can cost at most: every one of max_tokens generated and a token per
    # byte of the prompt, at the dearest price the table knows (see dearest_prices).
    prices: PriceTable = field(default_factory=lambda: LLMSettings.read("prices", {}))
    max_tokens: int = 512
    # Tokens the system prompt may take: the loader cuts it to MAX_PROMPT_CHARS
    # characters, and a character is at most 4 UTF-8 bytes.
    system_prompt_tokens: int = 4 * MAX_PROMPT_CHARS
    llm_timeout_s: float = 30.0
    # Admission tokens (see AdmissionGranted): at most this many granted at a time, each
    # usable this long after its grant and holding the worst case of a request this large.
    admission_tokens: int = 0
    admission_token_seconds: float = 5.0
    admission_token_bytes: int = 8192

    @classmethod
    def from_env(cls) -> BudgetDefaults:
        """:class:`BudgetSettings`, with the three LLM settings a call's worst case needs."""
        # 0 is a valid limit: the rules deny every spawn or task past it.
        budget = BudgetSettings.from_env()
        return cls(
            max_agents=budget.max_agents,
            max_concurrent=budget.max_concurrent,
            max_daily_cost=budget.max_daily_cost,
            task_reserve_usd=budget.task_reserve_usd,
            max_queue=budget.max_queue,
            lease_seconds=budget.lease_seconds,
            prices=LLMSettings.price_table(),
            max_tokens=LLMSettings.read("max_tokens"),
            system_prompt_tokens=budget.system_prompt_tokens,
            llm_timeout_s=LLMSettings.read("timeout_s"),
            admission_tokens=budget.admission_tokens,
            admission_token_seconds=budget.admission_token_seconds,
            admission_token_bytes=budget.admission_token_bytes,
        )

    @cached_property
    def worst(self) -> WorstCase:
        return WorstCase(
            self.prices, self.max_tokens, self.system_prompt_tokens, self.task_reserve_usd
        )

    @property
    def dearest_prices(self) -> PriceTable:
        return self.worst.dearest_prices

    def task_worst_case(self, message: str, context: dict[str, str]) -> float:
        """The most an answer to ``message`` can cost: the loader's messages, bounded."""
        return self.worst.task(message, context)

    def token_hold(self) -> float:
        """What one admission token holds: the worst case of a request of the covered size."""
        return self.worst.request_of(self.admission_token_bytes)

    def spawn_worst_case(self, specialty: str) -> float:
        messages = [{"role": "user", "content": "x" * (_SPAWN_PROMPT_BYTES + len(specialty))}]
        worst = worst_case_usd(self.dearest_prices, "any", messages, _SPAWN_MAX_TOKENS)
        return max(self.task_reserve_usd, worst)


class RunStore:
    """Queued and running tasks by run id, outside the goal's record.

    A dict in tests; in the service a Faust table whose writes go to the changelog
    partition of the event being processed, i.e. the goal's.
    """

    def __init__(self, data: MutableMapping[str, Any] | None = None) -> None:
        self.data: MutableMapping[str, Any] = {} if data is None else data

    def get(self, run: str) -> dict[str, Any] | None:
        found = self.data.get(run) if run in self.data else None
        return found if isinstance(found, dict) else None

    def put(self, run: str, value: dict[str, Any]) -> None:
        self.data[run] = value

    def delete(self, run: str) -> None:
        if run in self.data:
            del self.data[run]


class GoalRuns(RunStore):
    """One goal's view of the shared store. Run ids are the sender's, and two goals may send
    the same one: an entry another goal stored is neither read, overwritten nor deleted here
    (once, goal B's queued task was admitted when goal A's run of that id ended, past B's
    max_concurrent and max_daily_cost, and A's own task never ran)."""

    def __init__(self, store: RunStore, goal_id: str) -> None:
        super().__init__(store.data)
        self.goal_id = goal_id

    def taken(self, run: str) -> bool:
        """Whether another goal's entry is stored under ``run``."""
        found = super().get(run)
        if found is None:
            return False
        task = found.get("task")
        owner = task.get("goal_id") if isinstance(task, dict) else found.get("goal_id")
        return owner is not None and owner != self.goal_id

    def get(self, run: str) -> dict[str, Any] | None:
        return None if self.taken(run) else super().get(run)

    def put(self, run: str, value: dict[str, Any]) -> None:
        if not self.taken(run):
            super().put(run, value)

    def delete(self, run: str) -> None:
        if not self.taken(run):
            super().delete(run)


def _goal_runs(runs: RunStore | None, goal_id: str) -> GoalRuns:
    store = runs or RunStore()
    if isinstance(store, GoalRuns) and store.goal_id == goal_id:
        return store
    return GoalRuns(store, goal_id)


@dataclass
class Decision:
    """Events a rule wants sent, in order."""

    events: list[Event] = field(default_factory=list)
    # False: the goal's record is as it was (an event seen before, sent again): nothing
    # to write back. A busy goal's record is tens of KB; a budget that fell behind reads
    # many tasks twice (the router sends a task again while it waits for a decision).
    changed: bool = True


@dataclass
class BudgetState:
    goal_id: str
    max_agents: int
    max_concurrent: int
    max_daily_cost: float
    # approved spawn request id -> [approved_at ISO, agents after it] (the last 200, to
    # send an approval again on a replay)
    agents: dict[str, list[Any]] = field(default_factory=dict)
    # max_agents counts these two: spawns approved and not yet spawned (or failed), by the
    # approval's event id -> approved_at ISO; and the goal's agents by id -> "live" or
    # "retired", from the spawner's and the loader's goal_agents_changed notices
    spawning: dict[str, str] = field(default_factory=dict)
    live: OrderedDict[str, str] = field(default_factory=OrderedDict)
    # denied spawn request id -> [limit, current, maximum, at ISO]
    denied: OrderedDict[str, list[Any]] = field(default_factory=OrderedDict)
    # run -> [admitted_at ISO (budget clock), held USD, lease end ISO, causing event id]
    in_flight: dict[str, list[Any]] = field(default_factory=dict)
    # ended runs whose answer's cost is not known yet: run -> [held USD, lapse ISO, the
    # cost id and model of a call still running (None: no call known to run), ISO of
    # the last report the budget sent for it at the lapse ("" none), ISO of the task's
    # admission (the day its cost counts on)]; older records have fewer fields
    pending: dict[str, list[Any]] = field(default_factory=dict)
    # approved spawns and platform calls whose cost is not known yet: key -> [at, USD]
    spawn_holds: dict[str, list[Any]] = field(default_factory=dict)
    # run ids waiting for a slot, oldest first; their tasks live in the RunStore
    queue: list[str] = field(default_factory=list)
    # runs the budget failed -> [causing event id, reason, limit, current, maximum, at
    # ISO], to send the same failure again; runs ended by another service, by digest
    # (only whether a run ended is asked of them), oldest first
    ended: dict[str, Any] = field(default_factory=dict)
    closed: dict[str, None] = field(default_factory=dict)
    # spend request id -> [approved, at ISO, committed USD]
    spends: dict[str, list[Any]] = field(default_factory=dict)
    spend: dict[str, float] = field(default_factory=dict)
    # admission tokens granted and neither used nor given back (see AdmissionGranted): each
    # holds a slot and money like a running task. token -> [granted_at ISO, held USD, slot
    # end ISO (lease time), causing event id, holder]
    tokens: dict[str, list[Any]] = field(default_factory=dict)
    # grants by causing event id -> [holder, tokens, held USD each, bind_by ISO, at ISO],
    # to send the same grant again on a replay
    grants: dict[str, list[Any]] = field(default_factory=dict)
    # runs admitted with a token whose slot lapsed with no end read (see _expire): run ->
    # [token, agent id, specialty, slot end ISO]
    relapsed: dict[str, list[Any]] = field(default_factory=dict)
    seen: deque[str] = field(default_factory=lambda: deque(maxlen=_SEEN_LIMIT))
    # newest occurred_at read for the goal (lease time)
    event_time: str = ""
    # quality given up per USD of an answer (the router's objective for this goal)
    cost_weight: float = 0.0
    runs: RunStore = field(default_factory=RunStore, repr=False, compare=False)

    # -- persistence (Faust table value, JSON) ------------------------------
    @classmethod
    def new(
        cls, goal_id: str, defaults: BudgetDefaults, runs: RunStore | None = None
    ) -> BudgetState:
        return cls(
            goal_id,
            defaults.max_agents,
            defaults.max_concurrent,
            defaults.max_daily_cost,
            runs=_goal_runs(runs, goal_id),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal_id": self.goal_id,
            "max_agents": self.max_agents,
            "max_concurrent": self.max_concurrent,
            "max_daily_cost": self.max_daily_cost,
            "agents": dict(self.agents),
            "spawning": dict(self.spawning),
            "live": [[k, v] for k, v in self.live.items()],
            "denied": [[k, v] for k, v in self.denied.items()],
            "in_flight": dict(self.in_flight),
            "pending": dict(self.pending),
            "spawn_holds": dict(self.spawn_holds),
            "queue": list(self.queue),
            # Objects, not lists of pairs: the longest lists of the record, copied and
            # read back in C (JSON and dicts keep their keys in order, oldest first); their
            # values are replaced, never changed in place, so the copies may share them.
            "ended": dict(self.ended),
            "closed": list(self.closed),
            "spends": dict(self.spends),
            "spend": dict(self.spend),
            "tokens": dict(self.tokens),
            "grants": dict(self.grants),
            "relapsed": dict(self.relapsed),
            "seen_digests": list(self.seen),
            "event_time": self.event_time,
            "cost_weight": self.cost_weight,
        }

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        runs: RunStore | None = None,
        defaults: BudgetDefaults | None = None,
    ) -> BudgetState:
        runs = _goal_runs(runs, data["goal_id"])
        lease = (defaults or BudgetDefaults()).lease_seconds
        # JSON has no infinity or NaN: records from before events refused them kept such a
        # cap or spend as null. Read back as "nothing more to spend" until a budget set.
        cap = 0.0 if data["max_daily_cost"] is None else float(data["max_daily_cost"])
        raw_agents = data.get("agents", {})
        if isinstance(raw_agents, list):  # records written before agents kept their time
            raw_agents = {a: ["", i + 1] for i, a in enumerate(raw_agents)}
        in_flight: dict[str, list[Any]] = {}
        for run, held in data.get("in_flight", {}).items():
            entry = list(held)
            if len(entry) == 2:  # [admitted_at, USD] of older records
                end = datetime.fromisoformat(entry[0]) + timedelta(seconds=lease)
                entry += [end.isoformat(), ""]
            in_flight[run] = entry
        ended: dict[str, Any] = {}
        closed: list[str] = list(data.get("closed", []))
        for run, failure in _in_order(data.get("ended", {})).items():
            if failure:
                ended[run] = failure
            else:  # older records kept the runs other services ended here, by id
                closed.append(_digest(run))
        queue: list[str] = []
        for q in data.get("queue", []):
            if isinstance(q, dict):  # older records kept whole tasks here
                runs.put(_ref(q["run_id"]), {"task": q})
                q = _ref(q["run_id"])
            queue.append(q)
        state = cls(
            goal_id=data["goal_id"],
            max_agents=int(data["max_agents"]),
            max_concurrent=int(data["max_concurrent"]),
            max_daily_cost=cap,
            agents={k: list(v) for k, v in raw_agents.items()},
            spawning=dict(data.get("spawning", {})),
            live=OrderedDict((k, v) for k, v in data.get("live", [])),
            denied=OrderedDict((k, list(v)) for k, v in data.get("denied", [])),
            in_flight=in_flight,
            pending={k: list(v) for k, v in data.get("pending", {}).items()},
            spawn_holds={k: list(v) for k, v in data.get("spawn_holds", {}).items()},
            queue=queue,
            ended=ended,
            closed=dict.fromkeys(closed),
            spends=_in_order(data.get("spends", {})),
            spend={k: cap if v is None else float(v) for k, v in data.get("spend", {}).items()},
            tokens={k: list(v) for k, v in data.get("tokens", {}).items()},
            grants=_in_order(data.get("grants", {})),
            relapsed=_in_order(data.get("relapsed") or {}),
            event_time=str(data.get("event_time", "")),
            cost_weight=float(data.get("cost_weight") or 0.0),
            runs=runs,
        )
        if "seen_digests" in data:
            state.seen.extend(data["seen_digests"])
        else:  # older records kept the ids themselves
            state.seen.extend(_digest(ref) for ref in data.get("seen", []))
        if "spawning" not in data:
            # Records from before live counting: each approval counts until it is known
            # to be spawned, which for these it never will be (they count as before).
            state.spawning = {f"approved:{k}": str(v[0]) for k, v in state.agents.items()}
        return state

    # -- views ---------------------------------------------------------------
    def spent_today(self, now: datetime) -> float:
        return self.spend.get(utc_day(now), 0.0)

    def agent_count(self) -> int:
        """What max_agents limits: live agents plus approved spawns not yet resolved."""
        return len(self.spawning) + sum(1 for v in self.live.values() if v == "live")

    def busy(self) -> int:
        """What max_concurrent limits: running tasks and unused admission tokens."""
        return len(self.in_flight) + len(self.tokens)

    def reserved(self) -> float:
        held = [h[1] for h in self.in_flight.values()]
        held += [h[1] for h in self.tokens.values()]
        held += [h[0] for h in self.pending.values()]
        held += [h[1] for h in self.spawn_holds.values()]
        return sum(float(v) for v in held)

    def summary(self, now: datetime) -> dict[str, Any]:
        return {
            "goal_id": self.goal_id,
            "max_agents": self.max_agents,
            "max_concurrent": self.max_concurrent,
            "max_daily_cost": self.max_daily_cost,
            "agents": self.agent_count(),
            "in_flight": len(self.in_flight),
            "queued": len(self.queue),
            "spent_today": round(self.spent_today(now), 6),
            "held": round(self.reserved(), 6),
            "day": utc_day(now),
            "cost_weight": self.cost_weight,
        }

    # -- rules ---------------------------------------------------------------
    def handle(self, event: Event, now: datetime, defaults: BudgetDefaults) -> Decision:
        """Apply one event; a replayed one (same event_id) sends what it decided again."""
        if isinstance(event, BudgetTicked):
            # Only the budget's clock moved: expire and drain. A tick is not kept in
            # ``seen`` (one a second per busy goal would push real ids out), but what it
            # decided names it as the cause (a run it admitted, a queued run it failed):
            # a replayed tick finds that and sends it again, as a replayed event would.
            # One that decided nothing is as good as a new tick.
            again = self._replay(event, defaults)
            if again:
                return Decision(again)
            lapsed = self._expire(now, defaults)
            return Decision(lapsed + self._drain(_ref(event.event_id), now, defaults))
        # By type and id: ids are derived from the run, so an event of another type sent
        # first under a task's id (or its terminal event's) made the real one "seen" and
        # it was dropped. A record written before keeps ids alone: those still count.
        seen = _digest(f"{event.event_type}:{_ref(event.event_id)}")
        if seen in self.seen or _digest(_ref(event.event_id)) in self.seen:
            again = self._replay(event, defaults)
            decided = any(e.run_id == event.run_id for e in again)  # not only a grant again
            if not decided and isinstance(event, TaskRequested):
                relapsed = self.relapsed.get(_ref(event.run_id))
                if isinstance(relapsed, list) and len(relapsed) == 4:
                    # Its token's slot lapsed with no end of the run read: its admission may
                    # never have gone out, and nothing else would end the run. Sent now, past
                    # its start deadline: the loader drops it if the run ran, or gives it
                    # back, and the budget decides it then.
                    token, agent, specialty, end = relapsed
                    task = event.model_copy(
                        update={"token": token, "agent_id": agent, "specialty": specialty}
                    )
                    late = self._admission(task, now, _bind_by(end, defaults))
                    return Decision([*again, late], changed=False)
            return Decision(again, changed=False)
        self.seen.append(seen)
        # Event time moves with what producers stamp, but never past the budget's own
        # clock by more than a skew: one event stamped years ahead would otherwise leave
        # lease time to the budget's clock alone, and an outage would expire live slots.
        stamp = min(event.occurred_at, now + timedelta(seconds=_EVENT_TIME_AHEAD_SECONDS))
        if not self.event_time or stamp > datetime.fromisoformat(self.event_time):
            self.event_time = stamp.isoformat()
        cause = _ref(event.event_id)
        out: list[Event] = self._expire(now, defaults)
        if isinstance(event, SpawnRequested):
            out += self._spawn(event, now, defaults)
        elif isinstance(event, TaskRequested):
            out += self._task(event, now, defaults)
        elif isinstance(event, LlmCallCompleted):
            self._charge(event, now)
        elif isinstance(event, WorkflowCompleted | WorkflowFailed):
            self._release(event, defaults)
        elif isinstance(event, BudgetUpdateRequested):
            self._update(event)
        elif isinstance(event, SpendRequested):
            out += self._hold(event, now)
        elif isinstance(event, GoalAgentsChanged):
            self._agent_changed(event)
        elif isinstance(event, AdmissionReturned):
            self._returned(event)
        # Any event may have freed a slot or money (a release, a cost, a lapse, a limit).
        return Decision(out + self._drain(cause, now, defaults, every_deadline=False))

    def _lease_now(self, now: datetime) -> datetime:
        """Lease time: the earlier of the budget's clock and the goal's event time."""
        if not self.event_time:
            return now
        return min(now, datetime.fromisoformat(self.event_time))

    # -- sending what was decided, the first time and on a replay -------------
    def _replay(self, e: Event, defaults: BudgetDefaults) -> list[Event]:
        cause = _ref(e.event_id)
        out: list[Event] = []
        if isinstance(e, TaskRequested) and _ref(e.run_id) in self.queue:
            # Queued: nothing was sent. Its task is stored again in case the store's
            # write was lost in the crash (the goal's record and the store are two writes).
            if self.runs.get(_ref(e.run_id)) is None:
                self.runs.put(_ref(e.run_id), {"task": e.model_dump(mode="json")})
        for run, entry in self.in_flight.items():
            at, end, by = entry[0], entry[2], entry[3]
            if by == cause:
                task = e if isinstance(e, TaskRequested) and _ref(e.run_id) == run else None
                if task is None:
                    kept = self.runs.get(run)
                    if kept is not None and isinstance(kept.get("task"), dict):
                        task = TaskRequested.model_validate(kept["task"])
                bind_by = None
                if task is not None and len(entry) > 6:
                    # A task the router admitted with a token, read again (the router may
                    # have died before its admission went out; a router started since may
                    # have routed the request elsewhere): the admission the token held its
                    # slot for, to the same agent, by the token's start deadline.
                    token, agent, specialty = entry[4:7]
                    task = task.model_copy(
                        update={"token": token, "agent_id": agent, "specialty": specialty}
                    )
                    bind_by = _bind_by(end, defaults)
                if task is not None:
                    out.append(self._admission(task, datetime.fromisoformat(at), bind_by))
        if isinstance(e, TaskRequested) and cause in self.grants:
            out.append(self._granted(cause))
        for run, failure in self.ended.items():
            if failure and failure[0] == cause:
                task = e if isinstance(e, TaskRequested) and _ref(e.run_id) == run else None
                out += self._failure_events(run, failure, task)
        if isinstance(e, SpawnRequested):
            approved = self.agents.get(cause)
            if approved is not None:
                out.append(self._approval(e, approved))
            refused = self.denied.get(cause)
            if refused is not None:
                out += self._denial(e, refused)
        if isinstance(e, SpendRequested) and cause in self.spends:
            out += self._spend_decision(e, self.spends[cause])
        return out

    def _admission(
        self, task: TaskRequested, at: datetime, bind_by: datetime | None = None
    ) -> TaskAdmitted:
        return TaskAdmitted.caused_by(
            task,
            event_id=str(uuid.uuid5(_NS, f"{task.run_id}:admitted")),
            source=SOURCE,
            occurred_at=at,
            start_by=bind_by,
            # Admitted by the budget (also a task given back): no token. A token-admitted
            # task sent again keeps its token (the loader gives it back if it must revive).
            token=task.token if bind_by is not None else None,
        )

    def _exceeded(
        self, key: str, limit: Any, current: float, maximum: float, run_id: str | None, at: str
    ) -> BudgetExceeded:
        return BudgetExceeded(
            event_id=str(uuid.uuid5(_NS, f"{key}:exceeded")),
            source=SOURCE,
            goal_id=self.goal_id,
            run_id=run_id,
            limit=limit,
            current=current,
            maximum=maximum,
            occurred_at=datetime.fromisoformat(at),
        )

    def _detail(self, reason: str, limit: str, current: float, maximum: float) -> str:
        if reason == "invalid":
            return "another goal's task waits or runs under this run id; send a unique one"
        if reason == "timeout":
            return "deadline passed while waiting for a max_concurrent slot"
        if limit == "max_agents":
            return (
                f"goal {self.goal_id} has {int(current)} live agents; reviving a retired"
                f" one would pass max_agents {int(maximum)}"
            )
        if reason == "internal":
            return (
                "the budget lost this queued task in a crash (its stored copy was not"
                " written) before the task was read again"
            )
        if limit == "max_daily_cost":
            return (
                f"goal {self.goal_id} has {current:.6f} USD spent or held today; this task's"
                f" worst case would pass max_daily_cost {maximum:.6f} USD"
            )
        return (
            f"goal {self.goal_id} runs {int(current)} tasks and its queue is full;"
            f" max_concurrent is {int(maximum)}"
        )

    def _failure_events(
        self, run: str, failure: list[Any], task: TaskRequested | None
    ) -> list[Event]:
        _cause, reason, limit, current, maximum, at = failure
        info: dict[str, Any] = {}
        if task is not None:
            info = {"user_id": task.user_id, "agent_id": task.agent_id, "specialty": task.specialty}
            run_id = task.run_id
        else:
            kept = self.runs.get(run) or {}
            info = dict(kept.get("info") or {})
            run_id = str(kept.get("run_id") or run)
        out: list[Event] = []
        if reason == "budget_exceeded":
            out.append(self._exceeded(run_id, limit, current, maximum, run_id, at))
        out.append(
            WorkflowFailed(
                event_id=terminal_event_id(run_id),
                source=SOURCE,
                run_id=run_id,
                goal_id=self.goal_id,
                reason=reason,
                limit=limit or None,
                detail=self._detail(reason, limit, current, maximum),
                occurred_at=datetime.fromisoformat(at),
                **info,
            )
        )
        return out

    def _fail(
        self,
        cause: str,
        task: TaskRequested,
        reason: str,
        limit: str,
        current: float,
        maximum: float,
        now: datetime,
    ) -> list[Event]:
        run = _ref(task.run_id)
        failure = [cause, reason, limit, round(current, 9), maximum, now.isoformat()]
        self._end(run, failure)
        return self._failure_events(run, failure, task)

    def _ended(self, run: str) -> bool:
        return run in self.ended or _digest(run) in self.closed

    def _end(self, run: str, failure: list[Any] | None = None) -> None:
        if run in self.ended:
            return  # failed by the budget already: the first failure is the one sent
        if not failure:
            # Its queued task or running entry left the runs table as it ended: only
            # whether it ended is kept.
            self.closed[_digest(run)] = None
            while len(self.closed) > _ENDED_LIMIT:
                del self.closed[next(iter(self.closed))]
            return
        self.ended[run] = failure
        while len(self.ended) > _ENDED_LIMIT:
            old = next(iter(self.ended))
            del self.ended[old]
            self.runs.delete(old)

    # -- platform calls ------------------------------------------------------
    def _hold(self, e: SpendRequested, now: datetime) -> list[Event]:
        """A platform call (judge, feedback instruction) for this goal: hold its worst case."""
        committed = self.spent_today(now) + self.reserved()
        approved = committed + e.amount_usd <= self.max_daily_cost + 1e-12
        key = self._free_hold(e.purpose, e.run_id)
        approved = approved and key is not None
        if approved and key is not None:
            # Each call its own hold: several for one run (feedback sent again and again on
            # one answer) once replaced one another, and a $0.01 cap let $0.04 be spent.
            self.spawn_holds[key] = [now.isoformat(), e.amount_usd]
        decision = [approved, now.isoformat(), round(committed, 9)]
        self.spends[_ref(e.event_id)] = decision
        _drop_oldest(self.spends, _DECISIONS_LIMIT)
        return self._spend_decision(e, decision)

    def _free_hold(self, purpose: str, run_id: str | None) -> str | None:
        """The key of a new hold of a ``purpose`` call for ``run_id``; None when the run has
        ``_PLATFORM_HOLDS_PER_RUN`` of them already."""
        for key in _platform_holds(purpose, run_id):
            if key not in self.spawn_holds:
                return key
        return None

    def _held_call(self, purpose: str, run_id: str | None) -> str | None:
        """The oldest hold of a ``purpose`` call for ``run_id`` (what its report settles)."""
        held = [k for k in _platform_holds(purpose, run_id) if k in self.spawn_holds]
        return min(held, key=lambda k: str(self.spawn_holds[k][0]), default=None)

    def _spend_decision(self, e: SpendRequested, decision: list[Any]) -> list[Event]:
        approved, at, committed = decision
        out: list[Event] = []
        if approved:
            reason = f"held {e.amount_usd:.6f} USD"
        else:
            reason = (
                f"goal {self.goal_id} has {committed:.6f} USD spent or held today; "
                f"{e.amount_usd:.6f} more would pass max_daily_cost {self.max_daily_cost:.6f} USD"
            )
            out.append(
                self._exceeded(
                    e.event_id, "max_daily_cost", committed, self.max_daily_cost, e.run_id, at
                )
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
                occurred_at=datetime.fromisoformat(at),
            )
        )
        return out

    # -- spawns ----------------------------------------------------------------
    def _approval(self, e: SpawnRequested, approved: list[Any]) -> SpawnApproved:
        at, after = approved
        return SpawnApproved.caused_by(
            e,
            # The spawner derives the agent's id from this id: it must not change.
            event_id=_approval_id(e),
            source=SOURCE,
            agents_after=int(after),
            occurred_at=datetime.fromisoformat(at) if at else e.occurred_at,
        )

    def _denial(self, e: SpawnRequested, refused: list[Any]) -> list[Event]:
        limit, current, maximum, at = refused
        if limit == "max_daily_cost":
            detail = (
                f"goal {self.goal_id} has {current:.6f} USD spent or held today; "
                f"max_daily_cost is {maximum:.6f} USD"
            )
        else:
            detail = f"goal {self.goal_id} has {int(current)} agents; max_agents is {int(maximum)}"
        return [
            self._exceeded(e.event_id, limit, current, maximum, e.run_id, at),
            SpawnDenied.caused_by(
                e,
                event_id=str(uuid.uuid5(_NS, f"{e.event_id}:denied")),
                source=SOURCE,
                limit=limit,
                detail=detail,
                occurred_at=datetime.fromisoformat(at),
            ),
        ]

    def _spawn(self, e: SpawnRequested, now: datetime, defaults: BudgetDefaults) -> list[Event]:
        cause = _ref(e.event_id)
        worst = defaults.spawn_worst_case(e.specialty)
        committed = self.spent_today(now) + self.reserved()
        refused: list[Any] | None = None
        if committed + worst > self.max_daily_cost + 1e-12:
            refused = ["max_daily_cost", round(committed, 9), self.max_daily_cost]
        elif self.agent_count() >= self.max_agents:
            refused = ["max_agents", self.agent_count(), self.max_agents]
        if refused is not None:
            self.denied[cause] = [*refused, now.isoformat()]
            while len(self.denied) > _DECISIONS_LIMIT:
                self.denied.popitem(last=False)
            return self._denial(e, self.denied[cause])
        self.agents[cause] = [now.isoformat(), self.agent_count() + 1]
        while len(self.agents) > _DECISIONS_LIMIT:
            del self.agents[next(iter(self.agents))]
        self.spawning[_approval_id(e)] = now.isoformat()
        if e.run_id:
            # The spawner may ask the LLM to write the prompt; hold its cost until known.
            self.spawn_holds[_ref(e.run_id)] = [now.isoformat(), worst]
        return [self._approval(e, self.agents[cause])]

    # -- tasks -----------------------------------------------------------------
    def _task(self, e: TaskRequested, now: datetime, defaults: BudgetDefaults) -> list[Event]:
        cause = _ref(e.event_id)
        if e.token is not None and not e.given_back:
            return self._bind(e, now, defaults) + self._grant(e, cause, now, defaults)
        if e.given_back:
            # The loader did not start this token-admitted task (its agent is retired, and
            # a revival needs a place under max_agents): its slot is free, and the task is
            # decided here like any other.
            held = self.in_flight.get(_ref(e.run_id))
            if held is not None and len(held) > 6 and held[4] == e.token:
                del self.in_flight[_ref(e.run_id)]  # its binding's; not another admission's
            self.relapsed.pop(_ref(e.run_id), None)
            return self._decide(e, cause, now, defaults, afresh=True)
        return self._decide(e, cause, now, defaults) + self._grant(e, cause, now, defaults)

    def _decide(
        self,
        e: TaskRequested,
        cause: str,
        now: datetime,
        defaults: BudgetDefaults,
        *,
        afresh: bool = False,
    ) -> list[Event]:
        """``afresh``: the run is known not to run (its loader gave it back): decided even if
        its money is held."""
        run = _ref(e.run_id)
        over = self._ended(run) or (run in self.pending and not afresh)
        if run in self.in_flight or over or run in self.queue:
            # Admitted, waiting or over already: a re-routed request changes nothing.
            return []
        if isinstance(self.runs, GoalRuns) and self.runs.taken(run):
            # Another goal's task waits or runs under this run id: this one is refused
            # rather than stored over it (or admitted when the other's ends).
            return self._fail(cause, e, "invalid", "", 0.0, 0.0, now)
        if self._revival_refused(e):
            # The router revives a retired agent instead of spawning one: a live agent
            # again, so it needs a place under max_agents like a spawn.
            return self._fail(
                cause, e, "budget_exceeded", "max_agents", self.agent_count(), self.max_agents, now
            )
        worst = defaults.task_worst_case(e.message, e.context)
        spent = self.spent_today(now)
        if spent + worst > self.max_daily_cost + 1e-12:
            # Not even an idle goal could pay for this call today.
            return self._fail(
                cause, e, "budget_exceeded", "max_daily_cost", spent, self.max_daily_cost, now
            )
        committed = spent + self.reserved()
        fits = committed + worst <= self.max_daily_cost + 1e-12
        if fits and self.busy() < self.max_concurrent and not self.queue:
            return [self._admit(e, cause, worst, now, defaults)]
        if len(self.queue) >= defaults.max_queue or self.max_concurrent == 0:
            return self._fail(
                cause,
                e,
                "budget_exceeded",
                "max_concurrent",
                self.busy(),
                self.max_concurrent,
                now,
            )
        # Waits for a slot, or for running tasks' holds to settle to their real cost.
        self.runs.put(run, {"task": e.model_dump(mode="json")})
        self.queue.append(run)
        return []

    def _admit(
        self,
        task: TaskRequested,
        cause: str,
        worst: float,
        now: datetime,
        defaults: BudgetDefaults,
    ) -> TaskAdmitted:
        if task.deadline_at is not None:
            # The sender stamps both the request's time and its deadline (a day apart at
            # most): one stamped in 8999 held its slot's lease until then. A day from the
            # budget's clock at most.
            end = min(task.deadline_at, now + timedelta(seconds=MAX_WAIT_SECONDS))
        else:
            end = self._lease_now(now) + timedelta(seconds=defaults.lease_seconds)
        end += timedelta(seconds=defaults.llm_timeout_s + _LEASE_GRACE_SECONDS)
        if task.agent_id and self.live.get(task.agent_id) == "retired":
            # Revived by this admission (counted at once; the loader reports the revival,
            # or the agent's retirement again if it did not run the task).
            self.live[task.agent_id] = "live"
        self.in_flight[_ref(task.run_id)] = [now.isoformat(), worst, end.isoformat(), cause]
        return self._admission(task, now)

    # -- admission tokens ---------------------------------------------------------
    def _bind(self, e: TaskRequested, now: datetime, defaults: BudgetDefaults) -> list[Event]:
        """The router admitted ``e`` with a token: its slot and money become the run's."""
        run = _ref(e.run_id)
        token = self.tokens.pop(str(e.token), None)
        if token is None:
            # Given back, lapsed or never granted: no task of it can still run (a task starts
            # by the token's bind_by, and its slot lapses only once a task started then has
            # ended). A lapsed token's money is held until its run's cost may have come.
            lapsed = self.pending.pop(_token_key(str(e.token)), None)
            if lapsed is not None and run not in self.pending:
                self.pending[run] = lapsed
            if lapsed is not None and not (run in self.in_flight or self._ended(run)):
                # Its admission may have gone out, or not (the router died between): its
                # task read again is sent that admission, late, for the loader to drop (the
                # run ran) or give back (it did not).
                # (Its start deadline is long past: any end before now will do.)
                self._relapse(run, str(e.token), e.agent_id, e.specialty, now.isoformat())
            return []
        granted_at, hold, end, _by, _holder = token
        self.relapsed.pop(run, None)
        if self._ended(run) and run not in self.pending:
            # Its end was read first (the budget reads the topics side by side): the run is
            # over, but its call's cost may still be on its way and is held until then.
            self._keep_pending(run, [granted_at, hold, end], defaults)
            return []
        if run in self.in_flight or self._ended(run) or run in self.pending or run in self.queue:
            return []  # the run is counted already: the token's slot is free again
        worst = defaults.task_worst_case(e.message, e.context)
        # The router admits only tasks whose worst case fits the token (same settings);
        # should one not, the hold is its worst case all the same.
        self.in_flight[run] = [
            granted_at,
            max(float(hold), worst),
            end,
            _ref(e.event_id),
            str(e.token),
            e.agent_id,
            e.specialty,
        ]
        return []

    def _grant(
        self, e: TaskRequested, cause: str, now: datetime, defaults: BudgetDefaults
    ) -> list[Event]:
        """Tokens for the router instance that asked, from free slots and money only."""
        if e.want_tokens <= 0 or not e.holder or defaults.admission_tokens <= 0:
            return []
        if self.queue:
            return []  # tasks wait for a slot: they come first
        held = sum(1 for t in self.tokens.values() if t[4] == e.holder)
        hold = defaults.token_hold()
        room = self.max_daily_cost - self.spent_today(now) - self.reserved()
        by_money = int(min((room + 1e-12) // hold, e.want_tokens)) if hold > 0 else e.want_tokens
        count = min(
            e.want_tokens,
            defaults.admission_tokens - held,
            self.max_concurrent - self.busy(),
            # Unused tokens of every holder take at most half the goal's slots (rounded up):
            # a router that dies with its tokens leaves the rest to serve until they lapse.
            (self.max_concurrent + 1) // 2 - len(self.tokens),
            by_money,
        )
        if count <= 0:
            return []
        bind_by = now + timedelta(seconds=defaults.admission_token_seconds)
        end = bind_by + timedelta(seconds=defaults.llm_timeout_s + _LEASE_GRACE_SECONDS)
        tokens = [str(uuid.uuid5(_NS, f"{cause}:token:{i}")) for i in range(count)]
        for token in tokens:
            self.tokens[token] = [now.isoformat(), hold, end.isoformat(), cause, e.holder]
        self.grants[cause] = [e.holder, tokens, hold, bind_by.isoformat(), now.isoformat()]
        _drop_oldest(self.grants, _DECISIONS_LIMIT)
        return [self._granted(cause)]

    def _granted(self, cause: str) -> AdmissionGranted:
        holder, tokens, hold, bind_by, at = self.grants[cause]
        return AdmissionGranted(
            event_id=str(uuid.uuid5(_NS, f"{cause}:granted")),
            source=SOURCE,
            goal_id=self.goal_id,
            holder=holder,
            tokens=list(tokens),
            hold_usd=float(hold),
            bind_by=datetime.fromisoformat(bind_by),
            occurred_at=datetime.fromisoformat(at),
        )

    def _relapse(self, run: str, token: str, agent: str, specialty: str, end: str) -> None:
        self.relapsed[run] = [token, agent, specialty, end]
        _drop_oldest(self.relapsed, _ENDED_LIMIT)

    def _returned(self, e: AdmissionReturned) -> None:
        for token in e.tokens:
            held = self.tokens.get(token)
            if held is not None and held[4] == e.holder:
                del self.tokens[token]

    def _drain(
        self, cause: str, now: datetime, defaults: BudgetDefaults, *, every_deadline: bool = True
    ) -> list[Event]:
        out: list[Event] = []
        spent = self.spent_today(now)
        # A waiting task times out by the budget's clock, whether or not a slot is free:
        # its client gave up by then, and failing it frees no slot a running task needs.
        # Only a deadline is read here: a whole task is validated for the runs that end
        # (validating each of a full queue's thousand tasks took 18 ms an event:
        # `python -m bench.budget_state`). A long queue is looked at whole only on the
        # goal's tick (every ORCH_BUDGET_TICK_SECONDS): on every event, a budget that fell
        # behind spent more on each event the longer its queue grew, and never caught up
        # (one goal at 20/s). A task at the head past its deadline is never admitted.
        scan = every_deadline or len(self.queue) <= _SCAN_EVERY_EVENT
        for run in list(self.queue) if scan else []:
            kept = self.runs.get(run)
            raw = kept.get("task") if kept is not None else None
            if not isinstance(raw, dict):
                # The goal's record and the runs table are two writes: a crash between
                # them can leave a queued run without its task (an ended run's failure
                # kept in the runs table, or nothing). It must still end.
                self.queue.remove(run)
                out += self._recover_queued(cause, run, now)
                continue
            deadline = _deadline_of(raw)
            if deadline is not None and deadline <= now:
                self.queue.remove(run)
                out += self._end_queued(
                    cause, TaskRequested.model_validate(raw), "timeout", "", spent, now
                )
        while self.queue and self.max_concurrent == 0:
            # No slot will ever come: the tasks that waited fail as new ones do (one without
            # a deadline waited for good).
            run = self.queue.pop(0)
            task = self._queued(run)
            if task is None:
                out += self._recover_queued(cause, run, now)
                continue
            out += self._end_queued(
                cause, task, "budget_exceeded", "max_concurrent", self.busy(), now, maximum=0
            )
        while self.queue and self.busy() < self.max_concurrent:
            run = self.queue[0]
            task = self._queued(run)
            if task is None:
                self.queue.pop(0)
                out += self._recover_queued(cause, run, now)
                continue
            if task.deadline_at is not None and task.deadline_at <= now:
                self.queue.pop(0)
                out += self._end_queued(cause, task, "timeout", "", spent, now)
                continue
            worst = defaults.task_worst_case(task.message, task.context)
            if self._revival_refused(task):
                self.queue.pop(0)
                out += self._end_queued(
                    cause,
                    task,
                    "budget_exceeded",
                    "max_agents",
                    self.agent_count(),
                    now,
                    self.max_agents,
                )
            elif spent + worst > self.max_daily_cost + 1e-12:
                self.queue.pop(0)
                out += self._end_queued(
                    cause, task, "budget_exceeded", "max_daily_cost", spent, now
                )
            elif spent + self.reserved() + worst > self.max_daily_cost + 1e-12:
                break  # first in, first served: wait until holds settle
            else:
                self.queue.pop(0)
                out.append(self._admit(task, cause, worst, now, defaults))
        return out

    def _recover_queued(self, cause: str, run: str, now: datetime) -> list[Event]:
        kept = self.runs.get(run) or {}
        failure = kept.get("failure")
        if not isinstance(failure, list) or len(failure) != 6:
            # Its task was never stored (or its entry was lost) and this event came before
            # the task's replay could store it again: failed, under the run's terminal id.
            failure = [cause, "internal", "", 0.0, 0.0, now.isoformat()]
        # Otherwise the budget had ended it (its failure is in the runs table) and the
        # goal record's write was lost: the same failure, the same events, again.
        self._end(run, failure)
        return self._failure_events(run, failure, None)

    def _queued(self, run: str) -> TaskRequested | None:
        kept = self.runs.get(run)
        if kept is None or not isinstance(kept.get("task"), dict):
            return None
        return TaskRequested.model_validate(kept["task"])

    def _revival_refused(self, task: TaskRequested) -> bool:
        retired = bool(task.agent_id) and self.live.get(task.agent_id) == "retired"
        return retired and self.agent_count() >= self.max_agents

    def _end_queued(
        self,
        cause: str,
        task: TaskRequested,
        reason: str,
        limit: str,
        spent: float,
        now: datetime,
        maximum: float | None = None,
    ) -> list[Event]:
        top = self.max_daily_cost if maximum is None else maximum
        out = self._fail(cause, task, reason, limit, spent, top, now)
        # Only what its failure needs to be sent again stays, the failure included (if
        # the goal record's write is lost in a crash, the run is still queued there).
        self.runs.put(
            _ref(task.run_id),
            {
                "run_id": task.run_id,
                "goal_id": self.goal_id,
                "info": {
                    "user_id": task.user_id,
                    "agent_id": task.agent_id,
                    "specialty": task.specialty,
                },
                "failure": self.ended[_ref(task.run_id)],
            },
        )
        return out

    # -- costs and ends ----------------------------------------------------------
    def _charge(self, e: LlmCallCompleted, now: datetime) -> None:
        # Counted on the day the call was let start (by the budget's clock), whose cap its
        # hold was checked against: a call held before midnight and reported after it is
        # the day before's (the endpoint billed it then), not the new day's.
        day = utc_day(self._held_at(e) or now)
        self.spend[day] = self.spend.get(day, 0.0) + e.cost_usd
        if e.run_id and e.purpose == "spawn_prompt":
            self.spawn_holds.pop(_ref(e.run_id), None)
        if e.purpose in ("judge", "improvement"):
            settled = self._held_call(e.purpose, e.run_id)
            if settled is not None:
                del self.spawn_holds[settled]
        if e.run_id and e.purpose == "answer" and (e.ok or e.cost_usd > 0):
            # A refused call (ok=False, no cost) may be followed by a paid one.
            run = _ref(e.run_id)
            held = self.in_flight.get(run)
            if held is not None:
                held[1] = 0.0  # the real cost is now in spend
            self.pending.pop(run, None)
        elif e.run_id and e.purpose == "answer" and e.cost_usd <= 0:
            # A call given up on at the timeout that failed in the end billed nothing: its
            # report comes under the cost id its answer named, and the hold goes. (Other
            # refusals of the run, the one at the timeout among them, leave it held.)
            pending = self.pending.get(_ref(e.run_id))
            if pending is not None and _pending_call(pending)[0] == e.event_id:
                del self.pending[_ref(e.run_id)]
        # Keep a few days of history only.
        for old in sorted(self.spend)[:-7]:
            del self.spend[old]

    def _held_at(self, e: LlmCallCompleted) -> datetime | None:
        """When the budget held the reported call's money (None: no hold of it known)."""
        if not e.run_id:
            return None
        at: Any = None
        if e.purpose == "answer":
            run = _ref(e.run_id)
            if run in self.in_flight:
                at = self.in_flight[run][0]
            elif run in self.pending and len(self.pending[run]) > 4:
                at = self.pending[run][4]
        elif e.purpose == "spawn_prompt" and _ref(e.run_id) in self.spawn_holds:
            at = self.spawn_holds[_ref(e.run_id)][0]
        elif e.purpose in ("judge", "improvement"):
            key = self._held_call(e.purpose, e.run_id)
            at = self.spawn_holds[key][0] if key is not None else None
        return datetime.fromisoformat(at) if isinstance(at, str) and at else None

    def _release(self, e: WorkflowCompleted | WorkflowFailed, defaults: BudgetDefaults) -> None:
        run = _ref(e.run_id)
        held = self.in_flight.pop(run, None)
        if held is not None:
            self.runs.delete(run)
            # An answer from a lower tier made no paid call, unless its call was given up
            # on at the timeout and still runs (the loader then says its cost is pending).
            no_cost = (
                isinstance(e, WorkflowCompleted)
                and e.cost_usd <= 0
                and e.meta.get("cost_pending") != "true"
            )
            if float(held[1]) > 0 and not no_cost:
                # The answer's cost may still be on its way: its hold stays until it comes.
                call = None
                if isinstance(e, WorkflowCompleted) and e.meta.get("cost_pending") == "true":
                    # A call given up on at the timeout still runs: if its loader dies
                    # before it ends, nobody reports it, and the hold is counted instead.
                    call = [e.meta.get("cost_id", ""), e.meta.get("cost_model", "")]
                self._keep_pending(run, held, defaults, call)
        elif run in self.queue:
            self.queue.remove(run)
            self.runs.delete(run)
        self.relapsed.pop(run, None)
        self._end(run)

    def _keep_pending(
        self,
        run: str,
        held: list[Any],
        defaults: BudgetDefaults,
        call: list[str] | None = None,
    ) -> None:
        lapse = datetime.fromisoformat(held[2]) + timedelta(seconds=defaults.lease_seconds)
        self.pending[run] = [float(held[1]), lapse.isoformat(), call, "", held[0]]

    def _agent_changed(self, e: GoalAgentsChanged) -> None:
        # An approval ends in its agent spawned, failed, or (announced too late to count
        # it) retired at once.
        if e.change in ("spawned", "spawn_failed", "retired") and e.approval_id:
            self.spawning.pop(e.approval_id, None)
        if e.change == "spawn_failed":
            return
        self.live[e.agent_id] = "retired" if e.change == "retired" else "live"
        self.live.move_to_end(e.agent_id)
        # Retired agents are kept to refuse a revival past max_agents; the oldest go.
        retired = [a for a, v in self.live.items() if v == "retired"]
        for agent in retired[: max(0, len(retired) - _ENDED_LIMIT)]:
            del self.live[agent]

    def _update(self, e: BudgetUpdateRequested) -> None:
        if e.max_agents is not None:
            self.max_agents = e.max_agents
        if e.max_concurrent is not None:
            self.max_concurrent = e.max_concurrent
        if e.max_daily_cost is not None:
            self.max_daily_cost = e.max_daily_cost
        if e.cost_weight is not None:
            self.cost_weight = e.cost_weight

    def _expire(self, now: datetime, defaults: BudgetDefaults) -> list[Event]:
        """Give back what lapsed; the reports of the calls nobody reported, to send."""
        t = self._lease_now(now)
        # A spawn written from a template reports no cost; its hold lapses quickly, but not
        # before the call it covers has timed out (a 120 s LLM timeout once outlived a 60 s
        # hold, and a second judge call was approved beside a first still running).
        lapse = max(_SPAWN_HOLD_SECONDS, defaults.llm_timeout_s + _LEASE_GRACE_SECONDS)
        for key, (held_at, _) in list(self.spawn_holds.items()):
            if (t - datetime.fromisoformat(held_at)).total_seconds() > lapse:
                del self.spawn_holds[key]
        # An approval the spawner never answered gives its place back; the spawner acts
        # on none this old (SPAWN_APPROVAL_SECONDS), so no agent comes of it after this.
        for approval, approved_at in list(self.spawning.items()):
            age = (t - datetime.fromisoformat(approved_at)).total_seconds()
            if age > 2 * SPAWN_APPROVAL_SECONDS:
                del self.spawning[approval]
        # An admission token never used by now never will be, nor can a task it let start
        # still run: its slot and money come back.
        for token, held in list(self.tokens.items()):
            if t > datetime.fromisoformat(held[2]):
                del self.tokens[token]
                # A run it let start may have a cost still unread (its binding too): held.
                self._keep_pending(_token_key(token), held, defaults)
        # A task past its deadline and the LLM timeout cannot be running any more: its
        # slot comes back (the queue drains after this), its money stays held a while.
        for run, held in list(self.in_flight.items()):
            if t > datetime.fromisoformat(held[2]):
                del self.in_flight[run]
                self.runs.delete(run)
                if float(held[1]) > 0:
                    self._keep_pending(run, held, defaults)
                if len(held) > 6:
                    # Admitted with a token whose admission may never have gone out (the
                    # router died between its two sends): not ended; its task read again is
                    # sent the admission, late (see _relapse).
                    self._relapse(run, held[4], held[5], held[6], held[2])
                else:
                    self._end(run)
        out: list[Event] = []
        for run, pending in list(self.pending.items()):
            if t <= datetime.fromisoformat(pending[1]):
                continue
            call, model = _pending_call(pending)
            if call is None:
                del self.pending[run]  # no call known to run: its cost is not coming
                continue
            # A call given up on at the timeout, and no report of it by now, long past
            # any call's end: its loader died before the call ended, and the endpoint may
            # well have billed it. Counted at the hold (the call's worst case) by a report
            # of the budget's own, under the call's cost id; the hold stays until the
            # report is read back (then _charge lets it go), and the report is sent again
            # if a crash lost it (the same id: it counts once).
            sent = pending[3] if len(pending) > 3 else ""
            if sent and (now - datetime.fromisoformat(sent)).total_seconds() < _RESEND_SECONDS:
                continue
            pending[3:4] = [now.isoformat()]
            out.append(self._unreported_cost(run, call, model, float(pending[0]), now))
        return out

    def _unreported_cost(
        self, run: str, call: str, model: str, usd: float, now: datetime
    ) -> LlmCallCompleted:
        return LlmCallCompleted(
            event_id=call or str(uuid.uuid5(_NS, f"{run}:unreported-cost")),
            source=SOURCE,
            goal_id=self.goal_id,
            run_id=run,
            model=model or "unknown",
            purpose="answer",
            cost_usd=usd,
            ok=True,
            error="a call given up on at the timeout was never reported (its loader stopped"
            " before the call ended); counted by the budget at the hold, its worst case",
            occurred_at=now,
        )


def _pending_call(pending: list[Any]) -> tuple[str | None, str]:
    """The cost id (None: no call known to run) and model of a pending hold; holds kept
    before calls were named have none."""
    call = pending[2] if len(pending) > 2 else None
    if not isinstance(call, list) or len(call) != 2:
        return None, ""
    return str(call[0]), str(call[1])


def _token_key(token: str) -> str:
    """Where a lapsed token's money is held among the runs' pending holds."""
    return f"token:{token}"


def _bind_by(end: str, defaults: BudgetDefaults) -> datetime:
    """The start deadline of a token whose slot ends at ``end`` (see BudgetState._grant)."""
    grace = defaults.llm_timeout_s + _LEASE_GRACE_SECONDS
    return datetime.fromisoformat(end) - timedelta(seconds=grace)


def _approval_id(e: SpawnRequested) -> str:
    return str(uuid.uuid5(_NS, f"{e.event_id}:approved"))


def _platform_holds(purpose: str, run_id: str | None) -> list[str]:
    """The keys a run's holds of ``purpose`` calls take, beside the spawn holds (keyed by
    run id) without colliding with them; the first is the one key records before
    2026-12-06 had."""
    first = f"{purpose}:{_ref(run_id or '')}"
    return [first] + [f"{first}#{n}" for n in range(1, _PLATFORM_HOLDS_PER_RUN)]
