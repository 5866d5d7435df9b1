"""Admission tokens at the router: what it holds, asks for, gives back, and the events it
sends when it admits a task itself (ORCH_ADMISSION_TOKENS > 0)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from aiokafka.errors import KafkaConnectionError

from services.router.service import Router, _id
from services.router.tokens import AdmissionTokens
from streams.admission import WorstCase
from streams.clock import FakeClock
from streams.codec import default_codec
from streams.events import (
    AdmissionGranted,
    AdmissionReturned,
    AgentRetired,
    AgentSpawned,
    Event,
    RequestReceived,
    RouteDecided,
    TaskAdmitted,
    TaskRequested,
)
from streams.kafka import EventProducer, KafkaSettings
from streams.llm import ModelPrice, PriceTable
from tests.integration.waiting import until

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
# $1 / $2 per million tokens, no system prompt, 100 tokens out, no floor: a task's worst
# case grows with its message (a token per byte).
WORST = WorstCase(
    prices=PriceTable({}, ModelPrice(1.0, 2.0)),
    max_tokens=100,
    system_prompt_tokens=0,
    reserve_usd=0.0,
)


def _grant(
    tokens: list[str],
    *,
    holder: str = "me",
    goal: str = "g1",
    hold: float = 1.0,
    at: datetime = NOW,
    life: float = 10.0,
) -> AdmissionGranted:
    return AdmissionGranted(
        source="budget",
        goal_id=goal,
        holder=holder,
        tokens=tokens,
        hold_usd=hold,
        bind_by=at + timedelta(seconds=life),
        occurred_at=at,
    )


def _tokens(want: int = 4) -> AdmissionTokens:
    return AdmissionTokens(want, WORST, holder="me")


def _returned(events: list[AdmissionReturned]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        assert e.holder == "me" and e.source == "router"
        out.setdefault(e.goal_id, []).extend(e.tokens)
    return out


# -- AdmissionTokens -------------------------------------------------------------------


def test_only_grants_naming_this_instance_are_kept():
    tokens = _tokens()
    tokens.granted(_grant(["a", "b"], holder="another-router"), NOW)
    assert tokens.held("g1") == 0
    assert tokens.take("g1", "hi", {}, NOW) is None
    tokens.granted(_grant(["c", "d"]), NOW)
    assert tokens.held("g1") == 2
    # The same grant read again (a replay of the log) adds nothing.
    tokens.granted(_grant(["c", "d"]), NOW)
    assert tokens.held("g1") == 2
    taken = tokens.take("g1", "hi", {}, NOW)
    assert taken is not None and taken.token in {"c", "d"}
    assert tokens.held("g1") == 1 and tokens.held("g2") == 0


def test_a_token_is_used_only_in_the_first_half_of_its_life():
    tokens = _tokens()
    tokens.granted(_grant(["a"], life=10.0), NOW)
    [held] = tokens._stock["g1"]
    assert held.use_by == NOW + timedelta(seconds=5) and held.bind_by == NOW + timedelta(seconds=10)
    almost = tokens.take("g1", "hi", {}, NOW + timedelta(seconds=4.9))
    assert almost is not None and almost.token == "a"
    assert almost.bind_by == NOW + timedelta(seconds=10)  # the task's start deadline

    tokens.granted(_grant(["b"], at=NOW + timedelta(seconds=1), life=10.0), NOW)  # usable to 6 s
    assert tokens.take("g1", "hi", {}, NOW + timedelta(seconds=6)) is None
    assert tokens.held("g1") == 0  # expired: no longer this instance's to use
    assert _returned(tokens.returns(NOW + timedelta(seconds=6))) == {"g1": ["b"]}


def test_a_token_is_taken_only_for_a_task_its_money_covers():
    tokens = _tokens()
    small, large = "m" * 1000, "m" * 5000
    tokens.granted(_grant(["cheap"], hold=WORST.task(small, {})), NOW)
    tokens.granted(_grant(["dear"], hold=WORST.task(large, {})), NOW)
    assert WORST.task(small, {}) < WORST.task(large, {}) < WORST.task("m" * 5001, {})
    # Too large for either: none, and both are still held.
    assert tokens.take("g1", "m" * 5001, {}, NOW) is None
    assert tokens.held("g1") == 2
    # The context counts too.
    assert tokens.take("g1", large, {"k": "v" * 100}, NOW) is None
    # Only the dear token covers the large task: it is the one taken, the cheap one stays.
    taken = tokens.take("g1", large, {}, NOW)
    assert taken is not None and taken.token == "dear"
    assert [t.token for t in tokens._stock["g1"]] == ["cheap"]
    taken = tokens.take("g1", small, {}, NOW)
    assert taken is not None and taken.token == "cheap"
    assert tokens.take("g1", small, {}, NOW) is None
    # A token is handed out once only, and none was lapsed by the takes.
    assert tokens.returns(NOW) == []


def test_it_asks_for_the_rest_when_half_or_fewer_are_left_and_not_again_within_a_second():
    tokens = _tokens(want=4)
    assert tokens.ask("g1", NOW) == 4
    # Not again within a second with no grant seen...
    assert tokens.ask("g1", NOW + timedelta(seconds=0.99)) == 0
    # ...though another goal is asked for on its own.
    assert tokens.ask("g2", NOW + timedelta(seconds=0.5)) == 4
    # After a second with no grant: asked again.
    assert tokens.ask("g1", NOW + timedelta(seconds=1.0)) == 4
    # A grant lets it ask again at once, if half or fewer are left.
    tokens.granted(_grant(["a", "b", "c"], at=NOW + timedelta(seconds=1.0)), NOW)
    assert tokens.ask("g1", NOW + timedelta(seconds=1.1)) == 0  # 3 > 4 // 2
    assert tokens.take("g1", "hi", {}, NOW + timedelta(seconds=1.1)) is not None
    assert tokens.ask("g1", NOW + timedelta(seconds=1.2)) == 2  # 2 held: the 2 missing
    assert tokens.ask("g1", NOW + timedelta(seconds=1.3)) == 0  # asked 0.1 s ago
    tokens.granted(_grant(["d"], at=NOW + timedelta(seconds=1.4)), NOW)
    assert tokens.held("g1") == 3
    assert tokens.ask("g1", NOW + timedelta(seconds=1.5)) == 0
    tokens.take("g1", "hi", {}, NOW + timedelta(seconds=1.5))
    # The grant ended the wait: asked at once although the last ask was 0.3 s ago.
    assert tokens.ask("g1", NOW + timedelta(seconds=1.6)) == 2


def test_an_odd_want_asks_at_its_lower_half():
    tokens = _tokens(want=5)
    tokens.granted(_grant(["a", "b", "c"]), NOW)
    assert tokens.ask("g1", NOW) == 0  # 3 > 5 // 2
    tokens.take("g1", "hi", {}, NOW)
    assert tokens.ask("g1", NOW) == 3  # 2 <= 2


def test_expired_tokens_are_returned_and_forgotten_first():
    tokens = _tokens()
    tokens.granted(_grant(["a", "b"], life=10.0), NOW)  # usable to 5 s
    tokens.granted(_grant(["c"], at=NOW + timedelta(seconds=2), life=10.0), NOW)  # to 7 s
    tokens.granted(_grant(["x"], goal="g2", life=20.0), NOW)  # to 10 s
    assert tokens.returns(NOW + timedelta(seconds=4)) == []
    back = tokens.returns(NOW + timedelta(seconds=5))
    assert all(isinstance(e, AdmissionReturned) for e in back)
    assert all(e.occurred_at == NOW + timedelta(seconds=5) for e in back)
    assert _returned(back) == {"g1": ["a", "b"]}
    # Forgotten: never used after the budget is told, never returned twice.
    assert tokens.held("g1") == 1
    taken = tokens.take("g1", "hi", {}, NOW + timedelta(seconds=5))
    assert taken is not None and taken.token == "c"
    assert tokens.returns(NOW + timedelta(seconds=5)) == []
    assert _returned(tokens.returns(NOW + timedelta(seconds=10))) == {"g2": ["x"]}
    assert tokens.held("g2") == 0


def test_everything_is_returned_on_a_stop_in_events_of_at_most_64_tokens():
    tokens = _tokens(want=64)
    first = [f"t{i}" for i in range(64)]
    tokens.granted(_grant(first), NOW)
    tokens.granted(_grant(["t64", "t65", "t66"], at=NOW + timedelta(seconds=1)), NOW)
    tokens.granted(_grant(["y"], goal="g2"), NOW)
    back = tokens.returns(NOW, everything=True)
    assert sorted(len(e.tokens) for e in back) == [1, 3, 64]
    assert all(len(e.tokens) <= 64 for e in back)
    returned = _returned(back)
    assert sorted(returned["g1"]) == sorted([*first, "t64", "t65", "t66"])
    assert returned["g2"] == ["y"]
    # Each event is one the broker takes (the schema's bound, the codec).
    codec = default_codec()
    assert [codec.decode(codec.encode(e)) for e in back] == back
    assert tokens.held("g1") == tokens.held("g2") == 0
    assert tokens.take("g1", "hi", {}, NOW) is None
    assert tokens.returns(NOW, everything=True) == []


def test_zero_turns_tokens_off():
    tokens = _tokens(want=0)
    assert not tokens.enabled
    assert tokens.ask("g1", NOW) == 0
    tokens.granted(_grant(["a"]), NOW)
    assert tokens.held("g1") == 0
    assert tokens.take("g1", "hi", {}, NOW) is None
    assert tokens.returns(NOW, everything=True) == []
    assert not AdmissionTokens(-3, WORST).enabled


def test_a_grant_stamped_years_ahead_still_lapses_a_token_life_after_it_was_read():
    # A valid grant stamped in year 8999 (its bind_by with it) made tokens this router
    # used, and whose tasks could start, for good.
    tokens = _tokens()
    tokens.granted(_grant(["a", "b"], at=datetime(8999, 1, 1, tzinfo=UTC), life=10.0), NOW)
    # Timed from no later than the router's clock plus a minute's skew (the budget's).
    [held, _] = tokens._stock["g1"]
    assert held.use_by == NOW + timedelta(seconds=65)
    assert held.bind_by == NOW + timedelta(seconds=70)
    assert tokens.take("g1", "hi", {}, NOW + timedelta(seconds=1)) is not None
    assert tokens.take("g1", "hi", {}, NOW + timedelta(seconds=65)) is None
    assert _returned(tokens.returns(NOW + timedelta(seconds=65))) == {"g1": ["b"]}


def test_a_grant_naming_a_bind_by_far_ahead_lives_no_longer_than_a_token():
    tokens = AdmissionTokens(4, WORST, holder="me", life_seconds=5.0)
    far = _grant(["a"], life=10.0).model_copy(update={"bind_by": datetime(8999, 1, 1, tzinfo=UTC)})
    tokens.granted(far, NOW)
    [held] = tokens._stock["g1"]
    assert held.use_by == NOW + timedelta(seconds=2.5)
    assert held.bind_by == NOW + timedelta(seconds=5)


def test_a_grant_stamped_a_few_seconds_ahead_keeps_its_own_times():
    tokens = AdmissionTokens(4, WORST, holder="me", life_seconds=5.0)
    grant = _grant(["a"], at=NOW + timedelta(seconds=5), life=5.0)
    tokens.granted(grant, NOW)
    [held] = tokens._stock["g1"]
    assert held.use_by == grant.occurred_at + timedelta(seconds=2.5)
    assert held.bind_by == grant.bind_by


# -- the router ----------------------------------------------------------------------


class OrderedProducer:
    """A producer that records each call and, with ``hold``, keeps a deliver() of a
    ``hold`` event waiting (the broker not acknowledging yet) until ``release``."""

    def __init__(self) -> None:
        self.log: list[tuple[str, list[Event]]] = []
        self.sent: list[Event] = []
        self.hold: type[Event] | None = None
        self.release = asyncio.Event()

    async def deliver(self, events: list[Event], *, what: str = "") -> None:
        events = list(events)
        self.log.append(("deliver", events))
        if self.hold is not None and any(isinstance(e, self.hold) for e in events):
            await self.release.wait()
        self.log.append(("acknowledged", events))
        self.sent.extend(events)

    async def send(self, event: Event) -> None:
        self.log.append(("send", [event]))
        self.sent.append(event)

    async def send_many(self, events: list[Event]) -> None:
        self.log.append(("send_many", list(events)))
        self.sent.extend(events)

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.sent if isinstance(e, kind)]


def _router(monkeypatch, tokens: str = "4") -> tuple[Router, OrderedProducer, FakeClock]:
    monkeypatch.setenv("ORCH_ADMISSION_TOKENS", tokens)
    monkeypatch.setenv("ORCH_ROUTER_RESEND_SECONDS", "5")
    monkeypatch.setenv("ORCH_ROUTER_POLICY", "static")
    producer, clock = OrderedProducer(), FakeClock(NOW)
    router = Router(SimpleNamespace(producer=producer, clock=clock))  # type: ignore[arg-type]
    return router, producer, clock


def _request(
    clock: FakeClock, run: str = "r1", message: str = "why does my python code raise KeyError"
) -> RequestReceived:
    return RequestReceived(
        source="test",
        run_id=run,
        goal_id="g1",
        user_id="u1",
        message=message,
        context={"specialty": "code"},
        occurred_at=clock.now(),
        deadline_at=clock.now() + timedelta(seconds=30),
    )


def _agent() -> AgentSpawned:
    return AgentSpawned(
        source="spawner",
        goal_id="g1",
        agent_id="code_1",
        specialty="code",
        system_prompt="You fix code.",
        temperature=0.2,
    )


def _give(
    router: Router, clock: FakeClock, tokens: list[str], hold: float = 1.0
) -> AdmissionGranted:
    grant = _grant(tokens, holder=router.tokens.holder, hold=hold, at=clock.now(), life=5.0)
    router.learn(grant)
    return grant


def _round_trips(event: Event) -> None:
    codec = default_codec()
    assert codec.decode(codec.encode(event)) == event


async def test_a_task_admitted_with_a_token_reaches_the_budget_before_its_admission(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    grant = _give(router, clock, ["tok-1", "tok-2", "tok-3", "tok-4"])
    clock.advance(1)
    producer.hold = TaskRequested  # the broker has not acknowledged the task yet
    routing = asyncio.create_task(router.handle(_request(clock, "r2"), None))  # type: ignore[arg-type]
    await until(lambda: bool(producer.log), "the task's delivery", 10.0)
    await asyncio.sleep(0.05)  # and time to send more than it should
    assert not routing.done()
    assert producer.of(TaskAdmitted) == []  # the loader is not told before the budget is
    assert [kind for kind, _ in producer.log] == ["deliver"]
    producer.release.set()
    await asyncio.wait_for(routing, 5)

    assert [(kind, [type(e) for e in events]) for kind, events in producer.log] == [
        ("deliver", [TaskRequested, RouteDecided]),
        ("acknowledged", [TaskRequested, RouteDecided]),
        ("deliver", [TaskAdmitted]),
        ("acknowledged", [TaskAdmitted]),
    ]
    [task] = producer.of(TaskRequested)
    [admitted] = producer.of(TaskAdmitted)
    assert isinstance(task, TaskRequested) and isinstance(admitted, TaskAdmitted)
    assert task.token == admitted.token and task.token in grant.tokens
    assert task.event_id == _id("r2", "task") and task.run_id == "r2"
    assert task.want_tokens == 0  # 3 left of 4: nothing asked
    assert admitted.event_id == _id("r2", "admitted")
    assert admitted.start_by == grant.bind_by
    assert (admitted.run_id, admitted.agent_id, admitted.goal_id) == ("r2", "code_1", "g1")
    assert admitted.deadline_at == task.deadline_at and admitted.message == task.message
    assert admitted.source == "router"
    assert router.tokens.held("g1") == 3
    for event in (task, admitted):
        _round_trips(event)
    # Admitted here: nothing to send again to the budget.
    clock.advance(6)
    assert await router.resend_unanswered() == 0


async def test_a_task_with_no_token_asks_for_tokens_and_is_sent_again_until_decided(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    await router.handle(_request(clock), None)  # type: ignore[arg-type]
    assert producer.of(TaskAdmitted) == []
    [task] = producer.of(TaskRequested)
    assert isinstance(task, TaskRequested)
    assert task.token is None and task.want_tokens == 4
    assert task.holder == router.tokens.holder and task.holder
    assert task.event_id == _id("r1", "task")
    _round_trips(task)
    # Within the second, a second task asks for nothing more.
    clock.advance(0.5)
    await router.handle(_request(clock, "r2"), None)  # type: ignore[arg-type]
    second = producer.of(TaskRequested)[-1]
    assert isinstance(second, TaskRequested) and second.run_id == "r2"
    assert second.want_tokens == 0 and second.holder is None and second.token is None
    # Remembered: each sent again, the same event, until the budget decides.
    router.learn(TaskAdmitted.caused_by(second, source="budget"))
    clock.advance(5)
    assert await router.resend_unanswered() == 1
    assert producer.sent[-1] == task


async def test_the_router_asks_for_none_with_tokens_off(monkeypatch):
    router, producer, clock = _router(monkeypatch, tokens="0")
    router.learn(_agent())
    router.learn(_grant(["t"], holder=router.tokens.holder, at=clock.now()))
    await router.handle(_request(clock), None)  # type: ignore[arg-type]
    [task] = producer.of(TaskRequested)
    assert isinstance(task, TaskRequested)
    assert (task.token, task.want_tokens, task.holder) == (None, 0, None)
    assert producer.of(TaskAdmitted) == []


async def test_a_task_too_large_for_the_tokens_goes_to_the_budget(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    request = _request(clock, "r1", message="x" * 4000)
    fits = router.tokens.worst.task(request.message, request.context)
    _give(router, clock, ["t1", "t2", "t3", "t4"], hold=fits * 0.99)
    await router.handle(request, None)  # type: ignore[arg-type]
    [task] = producer.of(TaskRequested)
    assert isinstance(task, TaskRequested) and task.token is None
    assert producer.of(TaskAdmitted) == []
    assert router.tokens.held("g1") == 4


async def test_a_retired_agents_task_never_uses_a_token(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    router.learn(
        AgentRetired(
            source="loader", goal_id="g1", agent_id="code_1", specialty="code", reason="idle"
        )
    )
    _give(router, clock, ["t1", "t2", "t3", "t4"])
    await router.handle(_request(clock), None)  # type: ignore[arg-type]
    [task] = producer.of(TaskRequested)
    assert isinstance(task, TaskRequested)
    assert task.agent_id == "code_1"  # revived by the budget's admission
    assert task.token is None
    assert producer.of(TaskAdmitted) == []
    assert router.tokens.held("g1") == 4
    # Left to the budget: sent again until it decides.
    clock.advance(5.5)
    assert await router.resend_unanswered() == 1


async def test_a_request_routed_again_sends_the_same_task_id(monkeypatch):
    # No token: the same task event, which the budget decides once.
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    request = _request(clock)
    await router.handle(request, None)  # type: ignore[arg-type]
    await router.handle(request, None)  # type: ignore[arg-type]
    first, again = producer.of(TaskRequested)
    assert first.event_id == again.event_id == _id("r1", "task")
    # With a token: the same task id, and the same admission id.
    _give(router, clock, ["t1", "t2", "t3", "t4"])
    request = _request(clock, "r2")
    await router.handle(request, None)  # type: ignore[arg-type]
    await router.handle(request, None)  # type: ignore[arg-type]
    first, again = producer.of(TaskRequested)[2:]
    assert first.event_id == again.event_id == _id("r2", "task")
    one, two = producer.of(TaskAdmitted)
    assert one.event_id == two.event_id == _id("r2", "admitted")


async def test_a_request_routed_again_does_not_take_a_second_token(monkeypatch):
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    _give(router, clock, ["t1", "t2", "t3", "t4"])
    request = _request(clock, "r2")
    await router.handle(request, None)  # type: ignore[arg-type]
    await router.handle(request, None)  # type: ignore[arg-type]
    first, again = producer.of(TaskRequested)
    # The budget decides once per event id: a second token under the same id is never
    # bound to the run nor given back (the router forgot it when it took it).
    assert again == first
    assert router.tokens.held("g1") == 3


class _PartialBroker:
    """AIOKafkaProducer.send for the real EventProducer: records to ``down`` fail (that
    partition's leader is away), every other one is acknowledged."""

    def __init__(self, down: str) -> None:
        self.down = down
        self.acked: list[Event] = []
        self.codec = default_codec()

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if topic == self.down:
            future.set_exception(KafkaConnectionError("leader not available"))
        else:
            self.acked.append(self.codec.decode(value))
            future.set_result(None)
        return future


async def test_an_admission_never_reaches_the_broker_without_its_binding(monkeypatch):
    """Model seeds 134 and 843 (before the loader mirror), 251 (before the clean stop). The
    binding (task_requested) and the admission (task_admitted) go to two partitions in one
    delivery: the broker can acknowledge the admission and not the binding, and a router
    that dies then leaves the loader running a task whose token the budget never sees
    bound. The request, routed again by the next instance (no token: it came before that
    instance started), is a plain task under the binding's id: the budget decides it as
    if nothing ran (it queues it, and fails it at its deadline while the loader answers;
    or admits it again)."""
    _router(monkeypatch)  # the settings
    clock = FakeClock(NOW)
    producer = EventProducer(KafkaSettings("127.0.0.1:1", ""))
    broker = _PartialBroker(TaskRequested.topic)
    producer._producer = broker  # type: ignore[assignment]
    router = Router(SimpleNamespace(producer=producer, clock=clock))  # type: ignore[arg-type]
    router.learn(_agent())
    _give(router, clock, ["t1", "t2", "t3", "t4"])
    clock.advance(1)
    routing = asyncio.create_task(router.handle(_request(clock, "r2"), None))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    routing.cancel()  # the process dies
    with contextlib.suppress(asyncio.CancelledError):
        await routing
    admitted = [e for e in broker.acked if isinstance(e, TaskAdmitted)]
    bindings = [e for e in broker.acked if isinstance(e, TaskRequested)]
    assert bindings or not admitted, (
        f"the loader has r2's admission with token {admitted[0].token}; the budget never"
        " reads its binding"
    )


async def test_a_request_another_instance_sent_takes_no_token_at_an_older_instance(monkeypatch):
    """Two routers in one consumer group (docs/performance.md runs two): the first admits
    r2 with its token and dies before committing; r2's partition goes to the other, which
    started before r2 came, so _may_use_token lets it use a token of its own. The budget
    reads the second binding (same task id) as a replay: the second token is never bound
    (held until it lapses), and the loader gets two admissions of r2 with two tokens and
    two start deadlines (with two agents if the routing changed meanwhile): it may give
    one back and run the other, or two loaders run it twice."""
    older, older_sent, older_clock = _router(monkeypatch)  # running since NOW
    first, first_sent, first_clock = _router(monkeypatch)
    for router, clock in ((older, older_clock), (first, first_clock)):
        router.learn(_agent())
        _give(router, clock, [f"{router.tokens.holder}-{i}" for i in range(4)])
        clock.advance(1)
    request = _request(first_clock, "r2")
    await first.handle(request, None)  # type: ignore[arg-type]
    [by_first] = first_sent.of(TaskAdmitted)
    assert isinstance(by_first, TaskAdmitted) and by_first.token is not None
    older_clock.advance(1)
    older.assigned()  # the group gives r2's partition to this instance
    await older.handle(request, None)  # type: ignore[arg-type]
    assert older_sent.of(TaskAdmitted) == [], (
        "r2, sent by another instance with its token, admitted here with a second token"
    )
    [task] = older_sent.of(TaskRequested)
    assert isinstance(task, TaskRequested) and task.token is None


async def test_a_task_admitted_with_a_token_of_a_grant_stamped_ahead_starts_by_a_near_deadline(
    monkeypatch,
):
    # The loader gives a task back by its admission's start_by: a token of a grant stamped
    # a day ahead made one that could start for a day, and the token was never returned.
    monkeypatch.setenv("ORCH_ADMISSION_TOKEN_SECONDS", "5")
    router, producer, clock = _router(monkeypatch)
    router.learn(_agent())
    ahead = clock.now() + timedelta(days=1)
    router.learn(_grant(["t1", "t2"], holder=router.tokens.holder, at=ahead, life=5.0))
    await router.handle(_request(clock, "r2"), None)  # type: ignore[arg-type]
    [admitted] = producer.of(TaskAdmitted)
    assert isinstance(admitted, TaskAdmitted) and admitted.token in {"t1", "t2"}
    assert admitted.start_by is not None
    assert admitted.start_by <= clock.now() + timedelta(seconds=65)
    clock.advance(63)
    [back] = router.tokens.returns(clock.now())
    assert back.tokens == [{"t1", "t2"}.difference({admitted.token}).pop()]
