"""The demo's picture: the lines drawn beside the runs, from the world alone."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure

from bench.learning import Outcome
from local.world import World
from services.cli.demo import _plot, _Watch, baselines
from streams.config import ROOT

TWO_MODELS = ROOT / "bench" / "worlds" / "support-desk-two-models.json"


def test_a_world_without_models_has_the_oracle_and_no_strong_line() -> None:
    world = World.load(ROOT / "bench" / "worlds" / "support-desk.json")
    lines = baselines(world, 60, seed=2)
    sample = world.sample_requests(60, 2)
    assert lines.oracle == [world.oracle_quality(r, 2) for r in sample]
    assert lines.strong_reward == lines.strong_cost == []


def test_with_models_the_strong_line_is_the_dearest_model_and_the_oracle_weighs_cost() -> None:
    world = World.load(TWO_MODELS)
    free, weighed = baselines(world, 300, seed=1), baselines(world, 300, seed=1, cost_weight=100)
    sample = world.sample_requests(300, 1)
    strong = [world.strong_arm(r, 1, request_index=i) for i, r in enumerate(sample)]
    assert weighed.strong_cost == [a.cost_usd for a in strong] and min(weighed.strong_cost) > 0
    assert weighed.strong_reward == pytest.approx([a.quality - 100 * a.cost_usd for a in strong])
    assert free.strong_reward == pytest.approx([a.quality for a in strong])
    # The oracle of a costly objective gives up some quality for money, and beats the
    # strong model on that objective.
    assert statistics.fmean(weighed.oracle) > statistics.fmean(weighed.strong_reward)
    assert statistics.fmean(weighed.oracle) < statistics.fmean(free.oracle)


def _outcome(i: int, reward: float, cost: float) -> Outcome:
    return Outcome(i, f"r{i}", "t", False, "code", reward, 0.9, cost, "llm", "", False, 40.0)


def test_the_picture_draws_the_strong_model_on_both_panels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World.load(TWO_MODELS)
    lines = baselines(world, 100, seed=1, cost_weight=30)
    watch = _Watch(
        world, 100, 25, lines.oracle, lines.strong_reward, lines.strong_cost, cost_weight=30
    )
    for i in range(100):
        watch.see("learned", _outcome(i, 0.7, 0.001), 0)
        watch.see("static", _outcome(i, 0.5, 0.002), 0)
    drawn: dict[str, Any] = {}
    save = Figure.savefig

    def looking(fig: Figure, *args: Any, **kwargs: Any) -> None:
        top, bottom = fig.axes[:2]
        drawn["legend"] = [t.get_text() for t in top.get_legend().get_texts()]
        drawn["top"] = [list(line.get_ydata()) for line in top.get_lines()]
        drawn["bottom"] = [list(line.get_ydata()) for line in bottom.get_lines()]
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", looking)
    path = _plot(watch, tmp_path / "demo.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["legend"][-1] == f"always {world.strongest_model()}"
    # learned, static, oracle, strong: the strong line's windows are the baselines' means.
    strong = drawn["top"][3]
    assert strong == pytest.approx(
        [statistics.fmean(lines.strong_reward[i : i + 25]) for i in range(0, 100, 25)]
    )
    assert drawn["bottom"][2] == pytest.approx(
        [statistics.fmean(lines.strong_cost[i : i + 25]) * 1000 for i in range(0, 100, 25)]
    )


def test_with_one_window_every_line_in_the_legend_shows_a_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short demo has one window: a line of one point is drawn only through its marker,
    and the legend named an oracle that was nowhere on the picture."""
    world = World.load(TWO_MODELS)
    lines = baselines(world, 25, seed=1)
    watch = _Watch(world, 25, 25, lines.oracle, lines.strong_reward, lines.strong_cost)
    for i in range(25):
        watch.see("learned", _outcome(i, 0.7, 0.001), 0)
        watch.see("static", _outcome(i, 0.5, 0.002), 0)
    seen: dict[str, list[tuple[int, str]]] = {}
    save = Figure.savefig

    def looking(fig: Figure, *args: Any, **kwargs: Any) -> None:
        top, bottom = fig.axes[:2]
        for name, axis in (("top", top), ("bottom", bottom)):
            seen[name] = [
                (len(line.get_xdata()), str(line.get_marker())) for line in axis.get_lines()
            ]
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", looking)
    _plot(watch, tmp_path / "demo.png")
    # learned, static, oracle, strong model: one point each, each with a marker.
    assert len(seen["top"]) == 4 and len(seen["bottom"]) == 3
    for points, marker in seen["top"] + seen["bottom"]:
        assert points == 1 and marker not in ("None", "", " "), seen
