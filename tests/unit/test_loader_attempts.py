"""The loader's LLM call is paid only once its attempt is on Kafka, and every call an
attempt may have paid is counted: by the attempt, or by the attempt that repeats it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from services.loader.service import MAX_ANSWER_BYTES, Loader, _cost_id
from streams.clock import SystemClock
from streams.codec import default_codec
from streams.ended import EndedRuns, failed_call_id
from streams.events import (
    AgentSpawned,
    Event,
    GoalAgentsChanged,
    LlmCallCompleted,
    TaskAdmitted,
    WorkflowCompleted,
    WorkflowStarted,
)
from streams.kafka import EventProducer, KafkaSettings
from streams.llm import (
    InMemoryLLM,
    LLMSettings,
    ModelPrice,
    PriceTable,
    worst_case_usd,
)
from streams.runtime import ServiceContext
from tests.integration.waiting import until
from tests.samples import GivenUpLLM

PRICES = PriceTable({}, ModelPrice(1.0, 2.0))


class _Broker:
    """What AIOKafkaProducer.send gives the real EventProducer: a future per record,
    failing while the broker is down; what it acknowledged, decoded."""

    def __init__(self) -> None:
        self.down = False
        self.refuse_once: type | None = None  # the first record of this type fails
        self.acked: list[Event] = []
        self.codec = default_codec()
        self.max_bytes: int | None = None  # the broker's largest record

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused = self.refuse_once is not None and isinstance(
            self.codec.decode(value), self.refuse_once
        )
        if self.max_bytes is not None and len(value) > self.max_bytes:
            future.set_exception(MessageSizeTooLargeError(f"{len(value)} bytes"))
        elif self.down or refused:
            self.refuse_once = None if refused else self.refuse_once
            future.set_exception(KafkaConnectionError("broker down"))
        else:
            self.acked.append(self.codec.decode(value))
            future.set_result(None)
        return future

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        return await (await self.send(topic, value, key))


def _loader(llm: InMemoryLLM, max_tokens: int | None = None) -> tuple[Loader, _Broker]:
    settings = KafkaSettings("127.0.0.1:1", "")
    producer = EventProducer(settings)
    broker = _Broker()
    producer._producer = broker  # type: ignore[assignment]
    ctx = ServiceContext("loader", settings, SystemClock(), producer)
    tokens = {} if max_tokens is None else {"max_tokens": max_tokens}
    llm_settings = LLMSettings(base_url="http://x", prices=PRICES, **tokens)
    loader = Loader(ctx, llm, llm_settings, capacity=4)
    loader.learn(
        AgentSpawned(
            source="spawner",
            goal_id="g1",
            agent_id="a1",
            specialty="code",
            system_prompt="You are a coder.",
            temperature=0.2,
        )
    )
    return loader, broker


def _learn_g2s_agent(loader: Loader) -> None:
    """Goal g2's agent a2, of the same specialty as g1's a1."""
    loader.learn(
        AgentSpawned(
            source="spawner",
            goal_id="g2",
            agent_id="a2",
            specialty="code",
            system_prompt="You are a coder.",
            temperature=0.2,
        )
    )


def _task(run: str = "r1") -> TaskAdmitted:
    now = datetime.now(UTC)
    return TaskAdmitted(
        source="budget",
        run_id=run,
        goal_id="g1",
        user_id="u1",
        agent_id="a1",
        specialty="code",
        message="a question",
        requested_at=now,
        deadline_at=now + timedelta(seconds=60),
    )


async def test_no_call_is_made_before_the_attempt_is_on_kafka():
    # seed 3's two uncounted calls: the loader called the LLM while its workflow_started
    # waited for a broker that was down, and was killed; the repeat saw no earlier attempt.
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    broker.down = True
    running = asyncio.create_task(loader.handle(_task()))
    await asyncio.sleep(1.0)
    assert llm.calls == [] and not running.done()
    broker.down = False
    await asyncio.wait_for(running, 10)
    assert len(llm.calls) == 1
    kinds = [type(e) for e in broker.acked]
    assert kinds.index(WorkflowStarted) < kinds.index(LlmCallCompleted)
    assert WorkflowCompleted in kinds


async def test_an_earlier_attempt_is_counted_at_the_repeats_cost_or_its_worst_case():
    cut_off = WorkflowStarted(
        source="loader", run_id="r1", goal_id="g1", agent_id="a1", specialty="code"
    )
    # The repeat pays for a call: the earlier attempt is counted at that cost.
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    loader.ended.apply(cut_off)
    await loader.handle(_task())
    costs = [e for e in broker.acked if isinstance(e, LlmCallCompleted)]
    assert len(costs) == 2 and len({c.event_id for c in costs}) == 2
    assert costs[0].cost_usd == costs[1].cost_usd > 0
    # The repeat's call fails (a degraded answer, no cost): the earlier attempt may still
    # have paid for its call, which is counted at the call's worst case.
    failing = InMemoryLLM(prices=PRICES, fail_times=10)
    loader, broker = _loader(failing)
    loader.ended.apply(cut_off)
    await loader.handle(_task())
    paid = [e for e in broker.acked if isinstance(e, LlmCallCompleted) and e.cost_usd > 0]
    assert len(paid) == 1 and "worst case" in (paid[0].error or "")
    assert paid[0].event_id == costs[1].event_id  # the earlier attempt's own cost id
    assert paid[0].cost_usd > costs[0].cost_usd


async def test_the_loader_tells_the_goal_of_a_retirement_and_a_revival():
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    loader.idle_seconds = 0.0
    (retired,) = await loader.retire_idle()
    notices = [e for e in broker.acked if isinstance(e, GoalAgentsChanged)]
    assert [(n.goal_id, n.agent_id, n.change) for n in notices] == [("g1", "a1", "retired")]
    assert notices[0].key() == b"g1"  # on the goal's partition, where the budget counts
    loader.learn(retired)
    await loader.handle(_task())
    notices = [e for e in broker.acked if isinstance(e, GoalAgentsChanged)]
    assert [n.change for n in notices] == ["retired", "revived"]


async def test_an_agent_spawned_with_a_stamp_from_the_future_is_retired_when_idle():
    # A valid agent_spawned stamped in year 8999 was never idle: never used, it held a
    # place under its goal's max_agents for good.
    loader, broker = _loader(InMemoryLLM(prices=PRICES))
    loader.learn(
        AgentSpawned(
            source="spawner", goal_id="g1", agent_id="a9", specialty="code",
            system_prompt="p", temperature=0.2, occurred_at=datetime(8999, 1, 1, tzinfo=UTC),
        )
    )  # fmt: skip
    assert [r.agent_id for r in await loader.retire_idle()] == ["a9"]
    assert loader.registry.get("a9").retired and not loader.registry.get("a1").retired


async def _sweep_in_an_outage() -> tuple[Loader, _Broker]:
    """A loader whose idle sweep met a broker outage, the broker back since."""
    loader, broker = _loader(InMemoryLLM(prices=PRICES))
    loader.idle_seconds = 0.0
    broker.down = True
    with pytest.raises(KafkaConnectionError):
        await loader.retire_idle()
    broker.down = False
    return loader, broker


def _notices(broker: _Broker) -> list[tuple[str, str]]:
    return [(e.agent_id, e.change) for e in broker.acked if isinstance(e, GoalAgentsChanged)]


async def test_a_retirement_the_broker_refused_is_sent_again_by_the_next_sweep():
    # The agent was marked retired before the send; when the send failed, no later sweep
    # saw it live again, and the budget counted it under max_agents until a restart.
    loader, broker = await _sweep_in_an_outage()
    await loader.retire_idle()
    assert _notices(broker) == [("a1", "retired")]
    assert loader.registry.get("a1").retired
    await loader.retire_idle()  # told once: nothing more to send
    assert _notices(broker) == [("a1", "retired")]


async def test_an_agent_revived_before_the_retirement_was_told_again_stays_live():
    # A failed send may have reached the budget in part: the agent stays retired here, so
    # the task that uses it next says it revived it (undoing the mark, the budget could
    # count one agent too few), and the retirement is not sent after the revival.
    loader, broker = await _sweep_in_an_outage()
    loader.idle_seconds = 3600.0
    await loader.handle(_task())
    await loader.retire_idle()
    assert _notices(broker) == [("a1", "revived")]
    assert not loader.registry.get("a1").retired


async def test_a_restarted_loader_estimates_an_unreported_call_from_the_agents_last_answer():
    # Chaos seed 6: the repeat ran in a loader just restarted, which had been paid for no
    # answer yet, so the earlier attempt was counted at the call's worst case.
    cut_off = WorkflowStarted(
        source="loader", run_id="r1", goal_id="g1", agent_id="a1", specialty="code"
    )
    earlier_answer = WorkflowCompleted(
        source="loader",
        run_id="r0",
        goal_id="g1",
        agent_id="a1",
        specialty="code",
        text="ok",
        cost_usd=0.0005,  # under this call's worst case (0.001076): an estimate is never more
    )
    loader, broker = _loader(InMemoryLLM(prices=PRICES, fail_times=10))
    loader.ended.apply(earlier_answer)  # read from the terminal topics at start
    loader.ended.apply(cut_off)
    await loader.handle(_task())
    (counted,) = [e for e in broker.acked if isinstance(e, LlmCallCompleted) and e.cost_usd > 0]
    assert counted.cost_usd == 0.0005 and "last answer" in (counted.error or "")


async def test_an_admission_sent_again_while_the_task_runs_makes_no_second_call():
    # The router sends a task again while it has seen no decision; the budget then sends
    # its admission again, which may reach the loader while the first is being answered.
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    broker.down = True  # the first attempt waits for its start to be on Kafka
    first = asyncio.create_task(loader.handle(_task()))
    await asyncio.sleep(0.2)
    await asyncio.wait_for(loader.handle(_task()), 5)  # the same admission, again
    broker.down = False
    await asyncio.wait_for(first, 10)
    assert len(llm.calls) == 1
    assert [type(e) for e in broker.acked].count(WorkflowCompleted) == 1


async def test_the_answer_goes_out_only_once_the_broker_has_its_cost():
    # Chaos seed 8: a call paid once and never counted. The cost's first send failed and
    # was sent again after the answer had been acknowledged; a kill in between lost it,
    # and no later owner counts the call of a run that has its answer.
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    broker.refuse_once = LlmCallCompleted
    await asyncio.wait_for(loader.handle(_task()), 10)
    kinds = [type(e) for e in broker.acked]
    assert kinds.count(LlmCallCompleted) == 1
    assert kinds.index(LlmCallCompleted) < kinds.index(WorkflowCompleted)


def _late_reports(broker: _Broker, ok: bool = True) -> int:
    """How many call reports with ``ok`` the broker has: a call given up on at the
    timeout reports once it ends, a moment after the run's answer (polled for, not slept
    for: the moment can be long on a loaded machine)."""
    return sum(1 for e in broker.acked if isinstance(e, LlmCallCompleted) and e.ok is ok)


def llm_tokens(llm: InMemoryLLM) -> int:
    from streams.llm import _estimate_prompt

    return _estimate_prompt(llm.calls[0].messages)


async def test_a_call_given_up_on_at_the_timeout_is_counted_when_it_answers():
    # chaos seed 8: two answer calls the endpoint billed were given up on at the loader's
    # timeout and never counted. The run gets its lower-tier answer at once; the budget is
    # told a cost is pending, and the call's cost comes under the attempt's cost id.
    llm = GivenUpLLM(PRICES)
    loader, broker = _loader(llm)
    await loader.handle(_task())
    (answer,) = [e for e in broker.acked if isinstance(e, WorkflowCompleted)]
    assert answer.degradation_tier in ("keyword", "static_fallback")
    assert answer.meta["cost_pending"] == "true"
    assert [e.ok for e in broker.acked if isinstance(e, LlmCallCompleted)] == [False]
    await until(lambda: _late_reports(broker) > 0, "the late call's report", 10.0)
    late = [e for e in broker.acked if isinstance(e, LlmCallCompleted) and e.ok]
    (started,) = [e for e in broker.acked if isinstance(e, WorkflowStarted)]
    assert len(late) == 1 and late[0].cost_usd > 0
    assert late[0].prompt_tokens == llm_tokens(llm) and late[0].completion_tokens > 0
    assert late[0].event_id == _cost_id(started.event_id, False)
    # ... the id the call itself carried to the endpoint (X-Client-Request-Id)
    assert llm.calls[0].request_id == late[0].event_id
    assert loader._settling == {}
    # The answer named that id and the model, for the budget to count the hold under
    # them if no report ever came (a loader killed while the call ran).
    assert answer.meta["cost_id"] == late[0].event_id
    assert answer.meta["cost_model"] == late[0].model


async def test_a_call_that_never_settles_is_counted_at_its_worst_case():
    llm = GivenUpLLM(PRICES, outcome="unsettled")
    loader, broker = _loader(llm)
    await loader.handle(_task())
    await until(lambda: _late_reports(broker) > 0, "the unsettled call's report", 10.0)
    (late,) = [e for e in broker.acked if isinstance(e, LlmCallCompleted) and e.ok]
    assert late.cost_usd == worst_case_usd(PRICES, "gpt-4o-mini", llm.calls[0].messages, 512)
    assert "worst case" in (late.error or "")


async def test_a_call_given_up_on_that_then_fails_says_so_under_the_answers_cost_id():
    # The budget keeps the hold of a pending call until a report under the id the answer
    # named; a call that fails in the end billed nothing, and says so, so the hold goes
    # without a cost rather than being counted at the lapse.
    llm = GivenUpLLM(PRICES, outcome="failed")
    loader, broker = _loader(llm)
    await loader.handle(_task())
    (answer,) = [e for e in broker.acked if isinstance(e, WorkflowCompleted)]
    await until(lambda: _late_reports(broker, ok=False) > 1, "the failed call's report", 10.0)
    reports = [e for e in broker.acked if isinstance(e, LlmCallCompleted)]
    assert len(reports) == 2 and not any(r.ok or r.cost_usd for r in reports)
    assert reports[-1].event_id == answer.meta["cost_id"]
    assert "nothing billed" in (reports[-1].error or "")
    assert loader._settling == {}


async def test_an_earlier_attempt_whose_call_failed_is_not_counted_again():
    # Chaos seed 14: an attempt's call failed (nothing billed; its report said ok=False),
    # then its loader was killed before the answer; the next owner counted that attempt's
    # call at an estimate. The failure report's id now names the attempt.
    cut_off = WorkflowStarted(
        source="loader", run_id="r1", goal_id="g1", agent_id="a1", specialty="code"
    )
    failed = LlmCallCompleted(
        event_id=failed_call_id(cut_off.event_id, False),
        source="loader",
        run_id="r1",
        goal_id="g1",
        model="gpt-4o-mini",
        ok=False,
        error="LLMUnavailable: LLM endpoint answered HTTP 503",
    )
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    loader.ended.apply(cut_off)
    loader.ended.apply(failed)
    assert loader.ended.unbilled("r1", cut_off.event_id, goal_id="g1")
    copy = EndedRuns(loader.ended.clock)
    copy.restore(loader.ended.dump())
    assert copy.unbilled("r1", cut_off.event_id, goal_id="g1")
    await loader.handle(_task())
    costs = [e for e in broker.acked if isinstance(e, LlmCallCompleted)]
    assert len(costs) == 1 and costs[0].cost_usd > 0  # this attempt's own call, alone
    # A call of this loader that fails for good reports under its attempt's failure id.
    llm2 = InMemoryLLM(prices=PRICES, fail_times=1)
    loader2, broker2 = _loader(llm2)
    await loader2.handle(_task("r2"))
    (report,) = [e for e in broker2.acked if isinstance(e, LlmCallCompleted)]
    (started,) = [e for e in broker2.acked if isinstance(e, WorkflowStarted)]
    assert not report.ok and report.event_id == failed_call_id(started.event_id, False)


async def test_an_answer_too_large_for_the_log_ends_the_run_cut_to_fit():
    # An endpoint that ignores max_tokens can answer more than a Kafka record holds (1 MB
    # by default): the broker refuses the record for good, so the run would never end.
    huge = "é" * 600_000 + "THE END"  # 1.2 MB of UTF-8
    llm = InMemoryLLM([huge], prices=PRICES)
    loader, broker = _loader(llm, max_tokens=1_000_000)
    broker.max_bytes = 1_000_000
    await asyncio.wait_for(loader.handle(_task()), 10)
    [done] = [e for e in broker.acked if isinstance(e, WorkflowCompleted)]
    kept = len(done.text.encode("utf-8"))
    assert kept <= MAX_ANSWER_BYTES < 1_000_000
    assert huge.startswith(done.text) and len(done.text) > 100_000
    assert done.meta["truncated"] == f"{len(huge.encode('utf-8'))} bytes, kept {kept}"
    assert done.degradation_tier == "llm"


async def test_another_goals_dear_answers_never_set_what_a_goals_lost_call_is_counted_at():
    # The estimate of a call whose report was lost was the last answer of the model,
    # whichever goal paid it: goal g2's long answers raised what goal g1 was charged.
    llm = InMemoryLLM(prices=PRICES)
    loader, broker = _loader(llm)
    _learn_g2s_agent(loader)
    dear = _task("r0").model_copy(
        update={"goal_id": "g2", "agent_id": "a2", "message": "why " * 5_000}
    )
    await loader.handle(dear)
    (g2_paid,) = [e for e in broker.acked if isinstance(e, LlmCallCompleted)]
    broker.acked.clear()
    loader.ended.apply(
        WorkflowStarted(source="loader", run_id="r1", goal_id="g1", agent_id="a1", specialty="code")
    )
    llm.fail_next(10)  # g1's repeat makes no call to compare with
    await loader.handle(_task("r1"))
    (counted,) = [e for e in broker.acked if isinstance(e, LlmCallCompleted) and e.cost_usd > 0]
    assert "worst case" in (counted.error or "")
    assert counted.cost_usd < g2_paid.cost_usd  # g1's own short call's worst case


async def test_an_answer_of_another_goal_or_past_the_worst_case_never_sets_the_estimate():
    # Any goal's answer naming an agent set what the agent's goal was charged for an
    # unreported call, at any amount: 1.7e308 USD took g1's whole budget.
    cut_off = WorkflowStarted(
        source="loader", run_id="r1", goal_id="g1", agent_id="a1", specialty="code"
    )
    for forged in (
        {"goal_id": "g2", "cost_usd": 0.01},  # another goal's answer naming g1's agent
        {"goal_id": "g1", "cost_usd": 1.7e308},  # g1's, past anything the call can cost
    ):
        loader, broker = _loader(InMemoryLLM(prices=PRICES, fail_times=10))
        loader.ended.apply(
            WorkflowCompleted(
                source="loader", run_id="r0", agent_id="a1", specialty="code", text="ok",
                **forged,
            )
        )  # fmt: skip
        loader.ended.apply(cut_off)
        await loader.handle(_task())
        (counted,) = [e for e in broker.acked if isinstance(e, LlmCallCompleted) and e.cost_usd > 0]
        assert "worst case" in (counted.error or "") and counted.cost_usd < 1.0
