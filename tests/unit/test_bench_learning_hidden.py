"""The learning benchmark with the truth hidden: the judge's calls are paid, and shown."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bench.learning import Outcome, _settled, _Tracker, main, print_report, run_learning
from services.cli.main import app
from streams.events import LlmCallCompleted, WorkflowAssessed
from streams.kafka import KafkaSettings


def _outcome(run_id: str, cost: float, reward: float) -> Outcome:
    return Outcome(
        index=0,
        run_id=run_id,
        request_type="t",
        repeat=False,
        specialty="code",
        reward=reward,
        oracle=0.9,
        cost_usd=cost,
        tier="llm",
        automation="",
        failed=False,
        latency_ms=10.0,
        quality=0.8,
    )


def _judge_cost(run_id: str, usd: float, event_id: str) -> LlmCallCompleted:
    return LlmCallCompleted(
        event_id=event_id,
        source="improvement",
        run_id=run_id,
        goal_id="bench",
        model="large",
        purpose="judge",
        cost_usd=usd,
    )


async def test_a_runs_judge_calls_are_added_to_its_cost_and_taken_from_its_reward():
    tracker = _Tracker(KafkaSettings("127.0.0.1:1", "t."))
    tracker._apply(_judge_cost("r1", 0.001, "c1"))  # noqa: SLF001
    tracker._apply(_judge_cost("r1", 0.001, "c1"))  # noqa: SLF001  (a resent report: once)
    tracker._apply(  # noqa: SLF001  (the answer's own call is not the judge's)
        _judge_cost("r1", 0.5, "c2").model_copy(update={"purpose": "answer"})
    )
    tracker._apply(  # noqa: SLF001
        WorkflowAssessed(
            source="improvement", run_id="r1", specialty="code", quality=0.7, method="judge"
        )
    )
    settled = _settled(_outcome("r1", 0.004, 0.8 - 10 * 0.004), tracker, cost_weight=10.0)
    assert settled.judge_usd == pytest.approx(0.001)
    assert settled.cost_usd == pytest.approx(0.005)
    assert settled.reward == pytest.approx(0.8 - 10 * 0.005)
    assert settled.method == "judge"
    unjudged = _settled(_outcome("r2", 0.004, 0.76), tracker, cost_weight=10.0)
    assert (unjudged.judge_usd, unjudged.cost_usd, unjudged.method) == (0.0, 0.004, "")
    await tracker.stop()


def test_the_report_shows_how_answers_were_assessed_and_the_judges_share():
    result = {
        "world": "w",
        "window": 2,
        "final_window": 2,
        "seed": 0,
        "requests": 2,
        "oracle": {"curve": [0.9], "final": 0.9},
        "truth": {"hidden": True, "judge_sample": 0.2, "judge_calls_served": 41},
        "runs": {
            "learned": {
                "curve": [0.7],
                "final": 0.7,
                "vs_oracle": 0.7778,
                "cost_per_request_usd": 0.002,
                "automations_created": 0,
                "cached_answers": 0,
                "direct_routed": 0,
                "failed": 0,
                "by_route": {},
                "assessed_by": {"judge": 40, "unjudged": 160},
                "judge_calls": 40,
                "judge_cost_share": 0.071,
                "policy_updates": 55,
                "taught_by": {"judged": 40, "feedback": 15},
            }
        },
        "notes": [],
    }
    buffer = io.StringIO()
    print_report(result, Console(file=buffer, width=160))
    text = buffer.getvalue()
    assert "judge on 20% of answers" in text
    assert "7.1%" in text and "55 (judge 40 + feedback 15)" in text and "160" in text


def test_a_judge_sample_needs_the_truth_hidden():
    with pytest.raises(ValueError, match="truth hidden"):
        run_learning("bench/worlds/support-desk.json", 10, judge_sample=0.2)
    with pytest.raises(SystemExit):
        main(["--judge-sample", "0.2"])
    with pytest.raises(SystemExit):
        main(["--hide-truth", "--judge-sample", "1.5"])
    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "bench",
            "learning",
            "--world",
            "bench/worlds/support-desk.json",
            "--requests",
            "5",
            "--judge-sample",
            "0.2",
        ],
    )
    assert out.exit_code != 0 and "--hide-truth" in out.output
