"""The judge's sample (ORCH_JUDGE_SAMPLE): which runs are graded, and what the rest say."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from services.improvement.assess import Assessor
from services.improvement.patterns import PatternSettings
from services.improvement.service import ImprovementConfig, ImprovementService
from services.improvement.state import ImprovementState
from streams.clock import FakeClock, SystemClock
from streams.config import JudgeSettings
from streams.errors import InvalidSetting
from streams.events import (
    LlmCallCompleted,
    SpendRequested,
    WorkflowAssessed,
)
from streams.judging import judge_draw, judged
from streams.llm import InMemoryLLM
from tests.unit.test_improvement_assess import _Budget
from tests.unit.test_improvement_assess import _done as done

RUNS = [str(uuid.UUID(int=i * 7919 + 13, version=4)) for i in range(2000)]


def _done(run_id: str, text: str = "an answer", tier: str = "llm", **meta: str):
    return done(text, tier, **meta).model_copy(update={"run_id": run_id})


def test_the_draw_depends_on_the_run_id_alone():
    draws = [judge_draw(r) for r in RUNS]
    assert draws == [judge_draw(r) for r in RUNS]  # a redelivery or a restart draws the same
    assert all(0.0 <= d < 1.0 for d in draws)
    assert len(set(draws)) == len(RUNS)


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5, 0.9])
def test_the_sample_is_about_its_share(share: float):
    # Binomial over 2,000 runs: 4 standard deviations at most (0.045 at a share of 0.5).
    taken = sum(judged(r, share) for r in RUNS) / len(RUNS)
    assert abs(taken - share) <= 4 * (share * (1 - share) / len(RUNS)) ** 0.5
    # A larger share keeps every run a smaller one took.
    assert all(judged(r, min(1.0, share + 0.1)) for r in RUNS if judged(r, share))


def test_0_and_1_are_exact():
    assert not any(judged(r, 0.0) for r in RUNS)
    assert all(judged(r, 1.0) for r in RUNS)


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan"), float("inf")])
def test_an_assessor_refuses_a_share_outside_0_1(share: float):
    with pytest.raises(ValueError, match="between 0 and 1"):
        Assessor(None, sample=share)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("nan", "ORCH_JUDGE_SAMPLE must be a finite number between 0.0 and 1.0, got 'nan'"),
        ("-0.1", "ORCH_JUDGE_SAMPLE must be a finite number between 0.0 and 1.0, got '-0.1'"),
        ("1.01", "ORCH_JUDGE_SAMPLE must be a finite number between 0.0 and 1.0, got '1.01'"),
        ("inf", "ORCH_JUDGE_SAMPLE must be a finite number between 0.0 and 1.0, got 'inf'"),
        ("20%", "ORCH_JUDGE_SAMPLE must be a finite number between 0.0 and 1.0, got '20%'"),
        ("half", "ORCH_JUDGE_SAMPLE must be a finite number between 0.0 and 1.0, got 'half'"),
    ],
)
def test_the_setting_refuses_hostile_values_naming_itself(raw: str, message: str):
    with pytest.raises(InvalidSetting) as err:
        JudgeSettings.from_env({"ORCH_JUDGE_SAMPLE": raw})
    assert str(err.value) == message


@pytest.mark.parametrize(("raw", "share"), [("0", 0.0), ("1", 1.0), (" 0.35 ", 0.35), ("", 0.2)])
def test_the_setting_takes_shares_and_defaults_to_a_fifth(raw: str, share: float):
    assert JudgeSettings.from_env({"ORCH_JUDGE_SAMPLE": raw}).sample == share
    assert JudgeSettings.from_env({}).sample == 0.2


async def test_outside_the_sample_the_assessor_calls_no_judge_and_says_unjudged():
    inside = next(r for r in RUNS if judged(r, 0.3))
    outside = next(r for r in RUNS if not judged(r, 0.3))
    llm = InMemoryLLM(["Grade: 10"])
    assessor = Assessor(llm, sample=0.3)
    result = await assessor.assess(_done(outside), "fix my python bug")
    assert result.method == "unjudged" and not llm.calls
    assert (
        result.quality == (await Assessor(None).assess(_done(outside), "fix my python bug")).quality
    )
    assert not assessor.in_sample(_done(outside)) and assessor.in_sample(_done(inside))
    result = await assessor.assess(_done(inside), "fix my python bug")
    assert (result.quality, result.method) == (1.0, "judge") and len(llm.calls) == 1
    # The world's truth is free: it is used whatever the sample, and never sampled for.
    none = Assessor(llm, sample=0.0)
    assert (await none.assess(_done(outside, quality="0.4"), "")).method == "world"
    assert not none.in_sample(_done(outside, quality="0.4"))
    # A degraded answer's worth is known either way.
    degraded = await none.assess(_done(outside, tier="keyword"), "")
    assert (degraded.quality, degraded.method) == (0.3, "heuristic")
    assert len(llm.calls) == 1


async def test_the_service_holds_no_spend_and_pays_no_call_for_an_unsampled_run():
    budget = _Budget()
    llm = InMemoryLLM(lambda messages: "Grade: 8")
    ctx = SimpleNamespace(producer=budget, clock=SystemClock())
    config = ImprovementConfig(http_port=None, judge_sample=0.25)
    service = ImprovementService(ctx, config, llm)  # type: ignore[arg-type]
    budget.service = service
    runs = RUNS[:40]
    methods = {}
    for run_id in runs:
        out = await service.assess(_done(run_id))
        [assessed] = [e for e in out if isinstance(e, WorkflowAssessed)]
        methods[run_id] = assessed.method
        costs = [e for e in out if isinstance(e, LlmCallCompleted)]
        assert len(costs) == (1 if judged(run_id, 0.25) else 0)
        # A redelivery of the completion is not assessed again.
        service.state.apply(assessed)
        assert await service.assess(_done(run_id)) == []
    assert methods == {r: "judge" if judged(r, 0.25) else "unjudged" for r in runs}
    holds = [e for e in budget.sent if isinstance(e, SpendRequested)]
    assert {h.run_id for h in holds} == {r for r in runs if judged(r, 0.25)}
    assert len(llm.calls) == len(holds) == sum(judged(r, 0.25) for r in runs) > 0


def test_canaries_and_patterns_count_judged_runs_only():
    state = ImprovementState(PatternSettings(), FakeClock())
    for i, method in enumerate(["judge", "unjudged", "world", "unjudged"]):
        run_id = f"r{i}"
        state.apply(_done(run_id, workflow_version="1", workflow_id="code"))
        state.apply(
            WorkflowAssessed(
                source="improvement",
                run_id=run_id,
                specialty="code",
                quality=0.9 if method == "unjudged" else 0.2,
                method=method,  # type: ignore[arg-type]
            )
        )
    ledger = state.flow("code")
    assert sorted(o.quality for o in ledger._observations.values()) == [0.2, 0.2]  # noqa: SLF001
    for i in range(4):
        run = state.run(f"r{i}")
        assert run is not None and run.assessed
        assert (run.quality is None) == (i % 2 == 1)
