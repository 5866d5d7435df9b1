"""The judge aimed where the router knows least (ORCH_JUDGE_RULE): the router decides each
run's chance of a judge with its decision and logs it; the improvement service judges
exactly the runs whose draw falls under the logged chance."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest

from services.improvement.assess import Assessor
from services.improvement.patterns import PatternSettings
from services.improvement.service import ImprovementConfig, ImprovementService
from services.improvement.state import ImprovementState, state_from_v1
from services.router.policy import Features, LearnedPolicy
from streams.clock import FakeClock, SystemClock
from streams.config import JudgeSettings
from streams.errors import InvalidSetting
from streams.events import RouteDecided, WorkflowAssessed
from streams.judging import JudgeRule, judge_draw, judged
from streams.llm import InMemoryLLM
from tests.unit.test_improvement_assess import _Budget
from tests.unit.test_judge_sample import RUNS, _done
from tests.unit.test_router_busy_model import _route as _routed
from tests.unit.test_router_models import _request, _router, _spawned

FEATURES = Features(frozenset({"refund", "order", "want"}), "customer_support")


def test_the_rule_is_read_and_hostile_values_are_refused_naming_it():
    assert JudgeSettings.from_env({}).rule == "uncertain"
    assert JudgeSettings.from_env({"ORCH_JUDGE_RULE": " Uniform "}).rule == "uniform"
    assert JudgeSettings.from_env({"ORCH_JUDGE_RULE": ""}).rule == "uncertain"
    for raw in ("random", "uncertain; rm -rf /", "0.2", "\x00"):
        with pytest.raises(InvalidSetting, match="ORCH_JUDGE_RULE"):
            JudgeSettings.from_env({"ORCH_JUDGE_RULE": raw})


def test_the_rule_logs_zero_once_the_share_is_spent_and_never_passes_it():
    rule = JudgeRule(0.2, "uncertain")
    judged_so_far = 0
    for i, run in enumerate(RUNS[:1000]):
        judge, p = rule.decide(0.0 if i % 3 else 50.0, judge_draw(run))
        assert 0.0 <= p <= 1.0
        # The probability alone says the decision: the improvement service draws the same.
        assert judge == judged(run, p)
        judged_so_far += judge
        assert judged_so_far <= 0.2 * (i + 1) + 1e-9
    assert 0.18 <= rule.realised <= 0.2
    # Uniform is the share, whatever is known.
    assert JudgeRule(0.2, "uniform").decide(50.0, 0.5) == (False, 0.2)
    with pytest.raises(ValueError, match="judge rule"):
        JudgeRule(0.2, "sometimes")
    with pytest.raises(ValueError, match="between 0 and 1"):
        JudgeRule(math.nan)


async def _decisions(router, producer, clock, runs: list[tuple[str, str]]) -> list[RouteDecided]:  # type: ignore[no-untyped-def]
    return [await _routed(router, producer, clock, run, message) for run, message in runs]


async def test_the_router_logs_more_judging_where_its_policy_knows_less(monkeypatch) -> None:
    monkeypatch.setenv("ORCH_JUDGE_SAMPLE", "0.2")
    monkeypatch.setenv("ORCH_JUDGE_RULE", "uncertain")
    router, producer, clock = _router(monkeypatch)
    assert isinstance(router.policy.template, LearnedPolicy)
    router.policy.template.epsilon0 = router.policy.template.epsilon_min = 0.0
    router.learn(_spawned("cs_strong", "strong"))
    router.learn(_spawned("cs_cheap", "cheap"))
    for _ in range(200):  # much is known of both arms on a refund's words
        router.policy.update("g1", FEATURES, "customer_support@strong", 0.9)
        router.policy.update("g1", FEATURES, "customer_support@cheap", 0.5)
    refund, invoice = "I want a refund for my order", "Invoice shows wrong charge"
    runs = [(f"r{i}", refund if i % 2 else invoice) for i in range(400)]
    decided = await _decisions(router, producer, clock, runs)
    assert all(d.judge_probability is not None and d.model == "strong" for d in decided)
    # The same arm, at the same time: nothing learned of it on an invoice's words, 200
    # outcomes on a refund's. The invoices get the larger chance of a judge.
    known = [d.judge_probability or 0.0 for d in decided[1::2]]
    unknown = [d.judge_probability or 0.0 for d in decided[0::2]]
    assert sum(unknown) > 3 * sum(known) > 0.0
    # The router's own count of judged runs is what the draws under its chances give,
    # and stays within the share.
    drawn = sum(judged(d.run_id, d.judge_probability or 0.0) for d in decided)
    assert drawn == router.judge_of("g1").judged <= 0.2 * len(decided) + 1e-9
    assert drawn >= 0.15 * len(decided)


async def test_a_forced_specialty_and_the_default_log_what_the_sample_says(monkeypatch) -> None:
    router, producer, clock = _router(monkeypatch)
    assert isinstance(router.policy.template, LearnedPolicy)
    router.policy.template.epsilon0 = router.policy.template.epsilon_min = 0.0
    router.learn(_spawned("cs_strong", "strong"))
    router.learn(_spawned("cs_cheap", "cheap"))
    (decided,) = await _decisions(router, producer, clock, [("r1", "I want a refund")])
    # ORCH_JUDGE_SAMPLE's default, 0.2, aimed: judging the very first answer would make the
    # realised share 1 of 1, over the share, so its logged chance is 0.
    assert decided.judge_probability == 0.0
    producer.sent.clear()
    forced = _request(clock, "r2").model_copy(update={"context": {"specialty": "customer_support"}})
    await asyncio.wait_for(router.handle(forced, None), 2)
    (decided,) = producer.of(RouteDecided)
    assert decided.policy == "forced" and decided.judge_probability is None


def _route(run: str, p: float | None) -> RouteDecided:
    return RouteDecided(
        source="router",
        run_id=run,
        goal_id="g1",
        user_id="u1",
        specialty="code",
        action="reuse",
        judge_probability=p,
    )


def test_the_first_decision_s_chance_is_the_one_kept():
    state = ImprovementState(PatternSettings(), FakeClock())
    state.apply(_route("r1", 0.7))
    state.apply(_route("r1", 0.1))  # a redelivered request decided again: not believed
    run = state.run("r1")
    assert run is not None and run.judge_probability == 0.7
    # A version 1 snapshot's row, from before the chance (and the platform's version under
    # a goal's own) was kept, reads back without it.
    state.apply(_route("r2", None))
    row = state.dump()["runs"]
    again = ImprovementState(PatternSettings(), FakeClock())
    again.restore(state_from_v1({**state.dump(), "runs": [r[:-2] for r in row]}))
    assert again.run("r1") is not None and again.run("r1").judge_probability is None  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf])
def test_a_chance_outside_0_1_is_refused_on_the_event(bad: float):
    with pytest.raises(ValueError):
        _route("r1", bad)


def test_the_assessor_draws_at_the_logged_chance_else_the_sample():
    assessor = Assessor(None, sample=0.3)
    for run in RUNS[:300]:
        assert assessor.in_sample(_done(run), 1.0)
        assert not assessor.in_sample(_done(run), 0.0)
        assert assessor.in_sample(_done(run), None) == judged(run, 0.3)
        assert assessor.in_sample(_done(run), 0.6) == judged(run, 0.6)


async def test_the_service_judges_exactly_the_runs_drawn_under_the_router_s_chance():
    budget = _Budget()
    llm = InMemoryLLM(lambda messages: "Grade: 8")
    ctx = SimpleNamespace(producer=budget, clock=SystemClock())
    service = ImprovementService(ctx, ImprovementConfig(http_port=None, judge_sample=0.25), llm)  # type: ignore[arg-type]
    budget.service = service
    chances = [0.0, 0.05, 0.5, 0.95, 1.0]
    runs = RUNS[:60]
    for i, run in enumerate(runs):
        service.state.apply(_request(FakeClock(), run))
        service.state.apply(_route(run, chances[i % len(chances)]))
    methods = {}
    for run in runs:
        out = await service.assess(_done(run))
        [assessed] = [e for e in out if isinstance(e, WorkflowAssessed)]
        methods[run] = assessed.method
    expected = {
        r: "judge" if judged(r, chances[i % len(chances)]) else "unjudged"
        for i, r in enumerate(runs)
    }
    assert methods == expected
    assert len(llm.calls) == sum(m == "judge" for m in methods.values())
    # Every run logged at 1 was judged and none logged at 0.
    assert all(methods[r] == "judge" for i, r in enumerate(runs) if i % 5 == 4)
    assert all(methods[r] == "unjudged" for i, r in enumerate(runs) if i % 5 == 0)
