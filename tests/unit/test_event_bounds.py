"""Numbers and times a hostile or broken producer may put in an event, and what they would
have done to a goal's budget: each is refused where the event is made or read (so it goes
to dead_letter with the reason), and the budget holds where one slips past."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka.errors import MessageSizeTooLargeError
from pydantic import ValidationError
from typer.testing import CliRunner

from services.budget.state import BudgetDefaults, BudgetState, RunStore
from services.cli import admin
from services.cli.main import app
from streams.client import OrchestratorClient
from streams.clock import SystemClock
from streams.codec import default_codec
from streams.errors import DecodeError, InvalidRequest
from streams.events import (
    MAX_CONTEXT_BYTES,
    MAX_FEEDBACK_CHARS,
    MAX_RUN_ID_CHARS,
    MAX_VERSION,
    MAX_WAIT_SECONDS,
    AutomationCreated,
    BudgetTicked,
    BudgetUpdateRequested,
    Event,
    FeedbackReceived,
    ImprovementApplied,
    ImprovementRolledBack,
    LlmCallCompleted,
    RequestReceived,
    RollbackRequested,
    RouteDecided,
    SpendRequested,
    TaskAdmitted,
    TaskRequested,
    WorkflowAssessed,
    WorkflowCompleted,
    WorkflowVersionSaved,
)
from streams.kafka import EventProducer, KafkaSettings
from streams.llm import ModelPrice, PriceTable
from tests.unit.test_budget_state import _task as budget_task

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
NAN, INF = float("nan"), float("inf")


def _cost(usd: float, **fields: Any) -> dict[str, Any]:
    return {"source": "loader", "goal_id": "g1", "model": "m", "cost_usd": usd, **fields}


def _task(i: int, at: datetime = NOW, **fields: Any) -> TaskRequested:
    base = budget_task(i).model_dump()
    return TaskRequested.model_validate(base | {"occurred_at": at, **fields})


HOSTILE: list[tuple[type[Event], dict[str, Any], str]] = [
    (LlmCallCompleted, _cost(-1000.0), "greater than or equal to 0"),
    (LlmCallCompleted, _cost(NAN), "finite number"),
    (LlmCallCompleted, _cost(INF), "finite number"),
    (LlmCallCompleted, _cost(0.01, prompt_tokens=-5), "greater than or equal to 0"),
    (LlmCallCompleted, _cost(0.01, latency_ms=-1.0), "greater than or equal to 0"),
    (
        WorkflowCompleted,
        {"source": "loader", "goal_id": "g1", "run_id": "r", "specialty": "s", "text": "t",
         "cost_usd": -0.5},
        "greater than or equal to 0",
    ),
    (
        WorkflowAssessed,
        {"source": "improvement", "run_id": "r", "specialty": "s", "quality": NAN},
        "finite number",
    ),
    (
        WorkflowAssessed,
        {"source": "improvement", "run_id": "r", "specialty": "s", "quality": 0.5,
         "cost_usd": -INF},
        "finite number",
    ),
    (
        RouteDecided,
        {"source": "router", "run_id": "r", "specialty": "s", "action": "reuse",
         "scores": {"code": INF}},
        "finite number",
    ),
    (BudgetUpdateRequested, {"source": "cli", "goal_id": "g1", "max_daily_cost": INF},
     "finite number"),
    (BudgetUpdateRequested, {"source": "cli", "goal_id": "g1", "cost_weight": NAN},
     "finite number"),
    (
        TaskRequested,
        {"source": "router", "run_id": "r", "goal_id": "g1", "agent_id": "a", "specialty": "s",
         "message": "hi", "occurred_at": NOW,
         "deadline_at": datetime(9999, 12, 31, 23, 59, tzinfo=UTC)},
        "a time after 9000",
    ),
    (
        RequestReceived,
        {"source": "sdk", "run_id": "r", "goal_id": "g1", "user_id": "u1", "message": "hi",
         "occurred_at": NOW, "deadline_at": NOW + timedelta(days=30)},
        "at most 86400 s",
    ),
    (LlmCallCompleted, _cost(0.01, occurred_at=datetime(9000, 1, 1, tzinfo=UTC)),
     "a time after 9000"),
    # A made-up run id of a megabyte was kept whole by every run-keyed table and snapshot,
    # and three of them in spend holds pushed a goal's budget record over a Kafka record.
    (FeedbackReceived, {"source": "sdk", "run_id": "r" * 900_000, "user_id": "u1"},
     "invalid run id"),
    (FeedbackReceived, {"source": "sdk", "run_id": "r" * (MAX_RUN_ID_CHARS + 1),
     "user_id": "u1"}, "invalid run id"),
    (FeedbackReceived, {"source": "sdk", "run_id": "run\n1", "user_id": "u1"},
     "invalid run id"),
    (SpendRequested, {"source": "improvement", "run_id": "x" * 400_000, "goal_id": "g1",
     "purpose": "judge", "amount_usd": 0.01}, "invalid run id"),
    (RequestReceived, {"source": "sdk", "run_id": " ", "goal_id": "g1", "user_id": "u1",
     "message": "hi"}, "invalid run id"),
    # A megabyte of feedback held the improvement service's loop for seconds.
    (FeedbackReceived, {"source": "sdk", "run_id": "r1", "user_id": "u1",
     "text": "x" * (MAX_FEEDBACK_CHARS + 1)}, "at most 4000 characters"),
    # One version at 2**63 - 1 made the workflow's next version unencodable for good.
    (WorkflowVersionSaved, {"source": "improvement", "workflow_id": "g1/code",
     "version": 2**63 - 1}, "less than or equal to 2147483647"),
    (WorkflowVersionSaved, {"source": "improvement", "workflow_id": "g1/code", "version": 2,
     "parent_version": -1}, "greater than or equal to 0"),
    (ImprovementApplied, {"source": "improvement", "improvement_id": "i", "workflow_id": "w",
     "version": MAX_VERSION + 1}, "less than or equal to 2147483647"),
    (ImprovementRolledBack, {"source": "improvement", "workflow_id": "w", "from_version": 2,
     "to_version": 2**40, "reason": ""}, "less than or equal to 2147483647"),
    (RollbackRequested, {"source": "cli", "workflow_id": "w", "to_version": -3},
     "greater than or equal to 0"),
    # 2**63 - 1 seconds overflowed the router's timedelta where it learned the automation.
    (AutomationCreated, {"source": "improvement", "automation_id": "a", "signature": "s",
     "kind": "response_cache", "specialty": "code", "ttl_seconds": 2**63 - 1},
     "less than or equal to 315360000"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "fields", "named"), HOSTILE)
def test_a_hostile_number_or_time_is_refused_where_the_event_is_made(
    model: type[Event], fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        model.model_validate(fields)


@pytest.mark.parametrize(("model", "fields", "named"), HOSTILE)
def test_and_where_it_is_read_off_a_topic_with_the_reason(
    model: type[Event], fields: dict[str, Any], named: str
) -> None:
    # What a producer without our models would write: the same record, unchecked.
    codec = default_codec()
    data = codec.encode(model.model_construct(**(model.model_construct().__dict__ | fields)))
    with pytest.raises(DecodeError, match=named) as refused:
        codec.decode(data, topic=model.topic)
    assert refused.value.reason.startswith(f"invalid {model.topic}: ")


def test_a_deadline_a_day_away_is_still_a_request() -> None:
    at_most = NOW + timedelta(seconds=MAX_WAIT_SECONDS)
    request = RequestReceived(
        source="sdk", run_id="r", goal_id="g1", user_id="u1", message="hi",
        occurred_at=NOW, deadline_at=at_most,
    )  # fmt: skip
    assert request.deadline_at == at_most
    # A task carries its request's deadline beside the time of the service that made it,
    # on another clock: a client's clock a day ahead of the router's is no reason to fail.
    assert _task(1, at=NOW, deadline_at=NOW + timedelta(days=2)).deadline_at
    assert _task(2, at=NOW + timedelta(hours=3), deadline_at=NOW).deadline_at == NOW


def test_the_client_refuses_a_timeout_beyond_a_day_before_anything_is_sent() -> None:
    client = OrchestratorClient.__new__(OrchestratorClient)
    client.clock = SystemClock()
    client.source = "sdk"
    for timeout in (2 * 86400, 2.5e11, 1e300, INF, NAN, 0, -1):
        with pytest.raises(InvalidRequest, match="at most 86400 s"):
            client.request("hi", goal_id="g1", user_id="u1", timeout=timeout)
    assert client.request("hi", goal_id="g1", user_id="u1", timeout=86400).deadline_at


def test_budget_set_refuses_an_infinite_cap_and_sends_nothing(monkeypatch) -> None:
    sent: list[object] = []
    monkeypatch.setattr(admin, "run", lambda coro, *a, **k: sent.append(coro) or coro.close())
    for value in ("inf", "nan", "-1"):
        result = CliRunner().invoke(app, ["budget", "set", "g1", "--max-daily-cost", value])
        assert result.exit_code == 2, result.output
        assert "--max-daily-cost must be a finite number >= 0" in result.output
    assert sent == []


def test_an_event_stamped_years_ahead_does_not_switch_off_the_lease() -> None:
    # Lease time is the earlier of the budget's clock and the goal's event time, so a
    # budget whose clock jumps (an outage) takes back no slot of a run still running.
    defaults = BudgetDefaults(
        max_daily_cost=100.0, max_concurrent=1, prices=PriceTable({}, ModelPrice(1.0, 2.0))
    )
    for stamp in (NOW, datetime(8999, 1, 1, tzinfo=UTC)):
        state = BudgetState.new("g1", defaults)
        state.handle(_task(1), NOW, defaults)
        state.handle(LlmCallCompleted(**_cost(0.0, occurred_at=stamp)), NOW, defaults)
        later = NOW + timedelta(hours=1)
        decided = state.handle(_task(2), later, defaults).events
        decided += state.handle(BudgetTicked(source="budget", goal_id="g1"), later, defaults).events
        assert list(state.in_flight) == ["r1"], stamp
        assert not any(isinstance(e, TaskAdmitted) for e in decided), stamp
        assert datetime.fromisoformat(state.event_time) <= NOW + timedelta(minutes=1)


def test_a_record_left_with_a_null_cap_reads_back_closed_and_a_budget_set_reopens_it() -> None:
    # Faust keeps the goal's record as JSON, where an infinite cap or NaN spend of a record
    # written before events refused them became null: reading it failed on every event of
    # the goal from then on. Now it reads as "nothing more to spend".
    defaults = BudgetDefaults(prices=PriceTable({}, ModelPrice(1.0, 2.0)))
    record = BudgetState.new("g1", defaults).to_dict()
    record["max_daily_cost"] = None
    record["spend"] = {NOW.date().isoformat(): None}
    state = BudgetState.from_dict(orjson.loads(orjson.dumps(record)), RunStore(), defaults)
    assert state.max_daily_cost == 0.0
    refused = state.handle(_task(1), NOW, defaults).events
    assert not any(isinstance(e, TaskAdmitted) for e in refused)
    state.handle(
        BudgetUpdateRequested(source="cli", goal_id="g1", max_daily_cost=5.0), NOW, defaults
    )
    state.spend.clear()
    admitted = state.handle(_task(2), NOW, defaults).events
    assert any(isinstance(e, TaskAdmitted) for e in admitted)


def test_a_request_context_too_large_for_its_task_is_refused_before_it_is_sent() -> None:
    # The router's task carries the message and the context on: a request of almost a
    # megabyte made a task over Kafka's record limit, and the router retried it for ever.
    client = OrchestratorClient.__new__(OrchestratorClient)
    client.clock = SystemClock()
    client.source = "sdk"
    fits = {"system": "s" * (MAX_CONTEXT_BYTES - 100), "k": "v"}
    assert client.request("hi", goal_id="g1", user_id="u1", context=fits).context == fits
    for context in ({"blob": "x" * MAX_CONTEXT_BYTES}, {str(i): "é" * 20 for i in range(2000)}):
        with pytest.raises(InvalidRequest, match=f"context is .* the limit is {MAX_CONTEXT_BYTES}"):
            client.request("hi", goal_id="g1", user_id="u1", context=context)


async def test_a_record_too_large_is_not_retried_for_ever() -> None:
    # No retry makes a record smaller: the caller's error path (a failed run) must act.
    from tests.unit.test_loader_attempts import _Broker

    broker = _Broker()
    broker.max_bytes = 1000
    producer = EventProducer(KafkaSettings("127.0.0.1:1", ""))
    producer._producer = broker  # type: ignore[assignment]
    big = budget_task(1).model_copy(update={"message": "x" * 2000})
    with pytest.raises(MessageSizeTooLargeError):
        await asyncio.wait_for(producer.deliver([big], what="a task"), 2.0)
    assert broker.acked == []


def test_context_keys_that_collide_as_text_are_refused_not_merged() -> None:
    client = OrchestratorClient.__new__(OrchestratorClient)
    client.clock = SystemClock()
    client.source = "sdk"
    colliding: dict[Any, str] = {1: "a", "1": "b"}
    with pytest.raises(InvalidRequest, match="context: keys that are the same as text"):
        client.request("hi", goal_id="g1", user_id="u1", context=colliding)
    assert client.request("hi", goal_id="g1", user_id="u1", context={2: 3}).context == {"2": "3"}  # type: ignore[dict-item]


def test_the_longest_run_id_is_kept_by_its_digest_in_every_budget_hold() -> None:
    # Spend holds were keyed by the whole run id: 400 KB ids made a 1.2 MB goal record.
    defaults = BudgetDefaults()
    state = BudgetState.new("g1", defaults)
    run_id = "r" * MAX_RUN_ID_CHARS
    for i in range(3):
        state.handle(
            SpendRequested(
                source="improvement", run_id=f"{run_id[:-1]}{i}", goal_id="g1",
                purpose="judge", amount_usd=0.01, occurred_at=NOW,
            ),
            NOW, defaults,
        )  # fmt: skip
    assert len(state.spawn_holds) == 3
    assert all(len(key) <= 64 for key in state.spawn_holds)
    assert len(orjson.dumps(state.to_dict())) < 4_000
