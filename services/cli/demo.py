"""`orchestrator demo`: watch the platform learn a simulated world live, then keep the picture."""

from __future__ import annotations

import logging
import math
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from local.world import World
from services.cli.bench import on_bench_path
from streams.config import ROOT, data_root

if TYPE_CHECKING:
    from bench.learning import Outcome

__all__ = ["DEFAULT_WORLD", "Baselines", "baselines", "demo_command", "run_demo"]

DEFAULT_WORLD = ROOT / "bench" / "worlds" / "support-desk.json"
# Each a run of the learning benchmark (bench/learning.py): its name and routing policy.
_RUNS = ("learned", "static")


@dataclass(frozen=True)
class Baselines:
    """Per request, what no run is needed for: the oracle's reward (of the same objective,
    quality - cost_weight x cost), and on a world with models "always the strong model"
    (the type's best specialty on the dearest model): its reward and its cost in USD."""

    oracle: list[float]
    strong_reward: list[float]
    strong_cost: list[float]


def baselines(world: World, requests: int, seed: int, cost_weight: float = 0.0) -> Baselines:
    """The lines the picture draws beside the runs, from the world alone (the same requests,
    the same noise draws as the runs)."""
    sample = world.sample_requests(requests, seed)
    oracle = [
        world.oracle_score(r, seed, cost_weight=cost_weight, request_index=i)
        for i, r in enumerate(sample)
    ]
    if not world.models:
        return Baselines(oracle, [], [])
    strong = [world.strong_arm(r, seed, request_index=i) for i, r in enumerate(sample)]
    return Baselines(oracle, [a.reward(cost_weight) for a in strong], [a.cost_usd for a in strong])


def _means(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[i : i + window]) for i in range(0, len(values), window)]


@dataclass
class _Watch:
    """What the live table shows; the runs' observers write it, the display reads it."""

    world: World
    requests: int
    window: int
    oracle: list[float]
    strong_reward: list[float] = field(default_factory=list)
    strong_cost: list[float] = field(default_factory=list)
    cost_weight: float = 0.0
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)
    automations: dict[str, int] = field(default_factory=dict)
    # run -> (requests answered, automations created by then), for the picture
    trace: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def see(self, run: str, outcome: Outcome, automations: int) -> None:
        with self.lock:
            done = self.outcomes.setdefault(run, [])
            done.append(outcome)
            self.automations[run] = automations
            self.trace.setdefault(run, []).append((len(done), automations))

    def _windows(self, run: str) -> list[list[Outcome]]:
        done = sorted(self.outcomes.get(run, []), key=lambda o: o.index)
        return [done[i : i + self.window] for i in range(0, len(done), self.window)]

    def render(self) -> Group:
        with self.lock:
            table = Table(
                title=f"the platform learns [bold]{self.world.name}[/]: mean reward per "
                f"{self.window} requests",
                caption="oracle: the world's best specialty for each request (hidden from the "
                "router); static: keyword routing",
            )
            table.add_column("requests", justify="right")
            for run in _RUNS:
                table.add_column(run, justify="right")
            table.add_column("oracle", justify="right")
            table.add_column("learned/oracle", justify="right")
            windows = {run: self._windows(run) for run in _RUNS}
            rows = max(len(w) for w in windows.values())
            for i in range(rows):
                span = self.oracle[i * self.window : (i + 1) * self.window]
                cells = []
                for run in windows:
                    chunk = windows[run][i] if i < len(windows[run]) else []
                    cells.append(
                        f"{statistics.fmean(o.reward for o in chunk):.3f}" if chunk else ""
                    )
                learned = windows["learned"][i] if i < len(windows["learned"]) else []
                oracle = statistics.fmean(span[: len(learned)] or span)
                ratio = statistics.fmean(o.reward for o in learned) / oracle if learned else None
                table.add_row(
                    f"{i * self.window + 1}-{min(self.requests, (i + 1) * self.window)}",
                    *cells,
                    f"{oracle:.3f}",
                    f"{ratio * 100:.0f}%" if ratio is not None else "",
                )
            lines = []
            for run in _RUNS:
                done = self.outcomes.get(run, [])
                cost = statistics.fmean(o.cost_usd for o in done) * 1000 if done else 0.0
                cached = sum(o.automation == "cache" for o in done)
                lines.append(
                    f"{run:>8}: {len(done):4d}/{self.requests} answered, "
                    f"{self.automations.get(run, 0):3d} automations created, "
                    f"{cached:4d} answers from the cache, ${cost:.4f} per 1k requests"
                )
            return Group(table, Text("\n".join(lines)))


def _plot(watch: _Watch, path: Path) -> Path:
    """Reward per window against the oracle, and cost per request with automations created;
    on a world with models, "always the strong model" on both."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display needed
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ends: list[int] = []
    for run, colour in (("learned", "tab:blue"), ("static", "tab:orange")):
        windows = watch._windows(run)
        ends = [w[-1].index + 1 for w in windows]
        top.plot(ends, [statistics.fmean(o.reward for o in w) for w in windows], "o-", c=colour)
        bottom.plot(
            ends, [statistics.fmean(o.cost_usd for o in w) * 1000 for w in windows], "o-", c=colour
        )
    oracle = _means(watch.oracle, watch.window)
    # Marked points too: a run of one window has one point, which a bare dashed line hides.
    top.plot(ends[: len(oracle)], oracle[: len(ends)], "kx--")
    names = ["learned routing", "static keyword routing", "oracle"]
    if watch.strong_reward:
        strong = _means(watch.strong_reward, watch.window)
        top.plot(ends[: len(strong)], strong[: len(ends)], "x--", c="tab:gray")
        names.append(f"always {watch.world.strongest_model()}")
        cost = [c * 1000 for c in _means(watch.strong_cost, watch.window)]
        bottom.plot(ends[: len(cost)], cost[: len(ends)], "x--", c="tab:gray")
    top.legend(names, loc="lower right")
    weighed = f" - {watch.cost_weight:g} x cost" if watch.cost_weight else ""
    top.set_ylabel(f"mean reward (quality{weighed}) per {watch.window} requests")
    top.set_ylim(min(0.0, top.get_ylim()[0]), 1)
    top.set_title(f"{watch.world.name}: learned and static routing against the oracle")
    bottom.set_ylabel("LLM cost, $ per 1k requests (dashed: always strong)")
    bottom.set_xlabel("requests")
    bottom.set_ylim(bottom=0)
    created = bottom.twinx()
    for run, colour in (("learned", "tab:blue"), ("static", "tab:orange")):
        points = watch.trace.get(run, [])
        created.step([p[0] for p in points], [p[1] for p in points], ":", c=colour, where="post")
    created.set_ylabel("automations created (dotted)")
    created.set_ylim(bottom=0)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(
    world_path: Path = DEFAULT_WORLD,
    requests: int = 400,
    seed: int = 1,
    window: int = 50,
    console: Console | None = None,
    cost_weight: float = 0.0,
) -> tuple[dict[str, Any], Path]:
    """Learned and static routing on two platforms at once, a live table, then the PNG."""
    on_bench_path()
    from bench.learning import RunSpec, run_learning

    console = console or Console()
    world = World.load(world_path)
    lines = baselines(world, requests, seed, cost_weight)
    watch = _Watch(
        world,
        requests,
        window,
        lines.oracle,
        lines.strong_reward,
        lines.strong_cost,
        cost_weight,
    )
    console.print(
        f"starting two platforms (learned and static routing) on [bold]{world.name}[/]: "
        f"{world.description}"
    )
    with Live(console=console, get_renderable=watch.render, refresh_per_second=4):
        result = run_learning(
            world,
            requests,
            seed,
            runs=[RunSpec(run, run) for run in _RUNS],
            window=window,
            observer=watch.see,
            parallel=True,
            cost_weight=cost_weight,
        )
    console.print()
    path = _plot(watch, data_root() / "demo" / "learning.png")
    return result, path


def demo_command(
    world: Annotated[
        Path, typer.Option("--world", exists=True, help="A world file (docs/worlds.md).")
    ] = DEFAULT_WORLD,
    requests: Annotated[int, typer.Option("--requests", min=50, help="Requests per run.")] = 400,
    seed: Annotated[int, typer.Option("--seed")] = 1,
    cost_weight: Annotated[
        float,
        typer.Option(
            "--cost-weight",
            min=0.0,
            help="Quality the goal gives up per USD an answer costs: reward = quality - W x "
            "cost (see `orchestrator budget set --cost-weight`). Matters on worlds with models.",
        ),
    ] = 0.0,
) -> None:
    """Watch the platform learn a simulated world: a live table, then a saved picture
    (reward and cost per window; on a world with models, "always the strong model" too)."""
    for name in ("aiokafka", "kafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    console = Console()
    if not math.isfinite(cost_weight):
        raise typer.BadParameter("must be a finite number", param_hint="--cost-weight")
    result, path = run_demo(world, requests, seed, console=console, cost_weight=cost_weight)
    from bench.learning import print_report  # on the path since run_demo

    print_report(result, console, curve=False)
    console.print(f"picture: {path}")
