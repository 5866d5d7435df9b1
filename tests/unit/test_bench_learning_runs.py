"""The learning benchmark's runs and worlds: the previous router as a baseline, and random
worlds of the new format (with models)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

import bench.learning
from bench.learning import BASELINE, PREVIOUS, RunSpec, _table, _worlds, default_runs, main
from services.cli.main import app


def test_the_previous_router_is_opt_in_and_runs_quality_only_without_the_change_detector():
    assert [r.name for r in default_runs()] == ["learned", "static", BASELINE]
    assert [r.name for r in default_runs(False)] == ["learned", "static"]
    runs = default_runs(False, previous=True)
    assert [r.name for r in runs] == ["learned", "static", PREVIOUS]
    previous = runs[-1]
    assert previous.policy == "learned" and previous.automations
    assert previous.env() == {
        "ORCH_ROUTER_POLICY": "learned",
        "ORCH_ROUTER_CHANGE_THRESHOLD": "0.0",
        "ORCH_JUDGE_RULE": "uniform",  # the judge's sample as it was drawn before
    }
    # Its goal keeps cost weight 0 whatever the bench's (its rewards still pay for cost).
    assert previous.goal_cost_weight(30.0) == 0.0
    assert runs[0].goal_cost_weight(30.0) == 30.0
    assert "ORCH_ROUTER_CHANGE_THRESHOLD" not in runs[0].env()


def test_a_runs_own_settings_reach_the_platform_as_environment():
    spec = RunSpec("busy", "learned", automations=False, model_busy=2, change_threshold=8.0)
    assert spec.env() == {
        "ORCH_ROUTER_POLICY": "learned",
        "ORCH_AUTOMATION_KINDS": "",
        "ORCH_ROUTER_MODEL_BUSY": "2",
        "ORCH_ROUTER_CHANGE_THRESHOLD": "8.0",
    }
    assert RunSpec("static", "static").env() == {"ORCH_ROUTER_POLICY": "static"}
    margin = RunSpec("m", "learned", model_busy=1, busy_margin=0.05, judge_rule="uncertain")
    assert margin.env() == {
        "ORCH_ROUTER_POLICY": "learned",
        "ORCH_ROUTER_MODEL_BUSY": "1",
        "ORCH_JUDGE_RULE": "uncertain",
        "ORCH_ROUTER_BUSY_MARGIN": "0.05",
    }


def test_random_worlds_of_the_new_format_have_two_models_and_are_named_so():
    (plain,) = _worlds(["bench/worlds/support-desk.json"], [401])[1:]
    assert plain.name == "random-401" and not plain.models
    worlds = _worlds(["bench/worlds/support-desk.json"], [401, 402], random_models=2)
    assert [w.name for w in worlds] == ["support-desk", "random-401-2m", "random-402-2m"]
    assert all(sorted(w.models) == ["large", "small"] for w in worlds[1:])
    # --worlds with no file: the random worlds alone; no --worlds: the shipped ones first.
    assert [w.name for w in _worlds([], [403], random_models=2)] == ["random-403-2m"]
    shipped = _worlds(None, [])
    assert "support-desk" in {w.name for w in shipped} and len(shipped) >= 5


def test_bad_combinations_are_refused():
    with pytest.raises(SystemExit):
        main(["--random-models", "3"])
    with pytest.raises(SystemExit):
        main(["--offline", "--previous-router"])
    with pytest.raises(SystemExit):
        main(["--busy-margin", "0.05"])  # a margin needs a busy threshold
    with pytest.raises(SystemExit):
        main(["--model-busy", "1", "--busy-margin", "-0.1"])
    with pytest.raises(SystemExit):
        main(["--judge-rule", "uncertain"])  # a rule needs the truth hidden


def _result(world: str, runs: dict[str, float]) -> dict:
    return {
        "world": world,
        "oracle": {"final": 0.8},
        "runs": {
            name: {"final": value, "vs_oracle": value / 0.8, "cost_per_request_usd": 0.001}
            for name, value in runs.items()
        },
    }


def test_the_summary_table_shows_the_previous_router_beside_learned_and_static():
    results = [
        _result("a", {"learned": 0.76, "static": 0.6, PREVIOUS: 0.7}),
        _result("b", {"learned": 0.78, "static": 0.5}),
    ]
    buffer = io.StringIO()
    Console(file=buffer, width=300).print(_table(results, 2000, offline=False))
    text = buffer.getvalue()
    assert "previous/oracle" in text and "87.5%" in text and "0.700" in text
    buffer = io.StringIO()
    Console(file=buffer, width=300).print(_table(results[1:], 2000, offline=False))
    assert "previous" not in buffer.getvalue()


def test_the_cli_asks_for_the_previous_router(monkeypatch: pytest.MonkeyPatch):
    seen: dict = {}
    monkeypatch.setattr(bench.learning, "bench_world", lambda *a, **k: seen.update(k))
    args = ["bench", "learning", "--world", "bench/worlds/support-desk.json", "--requests", "5"]
    out = CliRunner().invoke(app, [*args, "--previous-router"])
    assert out.exit_code == 0, out.output
    assert seen["previous_router"] is True
    CliRunner().invoke(app, args)
    assert seen["previous_router"] is False


def test_on_a_world_with_models_the_report_shows_quality_and_cost_as_shares_of_strong():
    result = _result("w", {"learned": 0.76})
    result.update(window=2, final_window=2, seed=1, requests=2, notes=[], truth={})
    result["oracle"]["curve"] = [0.8]
    result["always_strong"] = {"model": "large", "quality": 0.9, "cost_per_request_usd": 0.004}
    result["runs"]["learned"].update(
        curve=[0.76],
        automations_created=0,
        cached_answers=0,
        direct_routed=0,
        failed=0,
        quality_of_strong=0.964,
        cost_of_strong=0.412,
    )
    buffer = io.StringIO()
    bench.learning.print_report(result, Console(file=buffer, width=300))
    text = buffer.getvalue()
    assert "quality of strong" in text and "96.4%" in text and "41.2%" in text
