"""`orchestrator bench`: thin commands over the benchmarks in bench/ (learning, chaos)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from streams.config import ROOT

__all__ = ["bench_app", "chaos_command", "learning_command", "on_bench_path"]


def on_bench_path() -> None:
    """Make ``bench`` importable: it lives in the checkout beside the installed packages."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


bench_app = typer.Typer(help="Benchmarks that run the whole platform.", no_args_is_help=True)


@bench_app.command("learning")
def learning_command(
    world: Annotated[
        Path, typer.Option("--world", help="A world file (see docs/worlds.md).", exists=True)
    ],
    requests: Annotated[int, typer.Option("--requests", min=1, help="Requests per run.")],
    seed: Annotated[int, typer.Option("--seed", help="Traffic, noise and exploration.")] = 0,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=16, help="Requests in flight.")
    ] = 1,
    baseline: Annotated[
        bool,
        typer.Option(
            "--automation-baseline/--no-automation-baseline",
            help="Also run learned routing without automations, to measure what they save.",
        ),
    ] = True,
    previous_router: Annotated[
        bool,
        typer.Option(
            "--previous-router",
            help="Also run the learned router as it was before issue 12 (quality only, the"
            " goal's cost weight left at 0, and no change detector), its rewards measured alike.",
        ),
    ] = False,
    cost_weight: Annotated[
        float,
        typer.Option(
            "--cost-weight",
            min=0.0,
            max=1_000_000.0,
            help="The goal's quality given up per USD of an answer: rewards are quality - W x"
            " cost, and on a world with models the router weighs them so (0: quality only).",
        ),
    ] = 0.0,
    hide_truth: Annotated[
        bool,
        typer.Option(
            "--hide-truth",
            help="Answers do not reveal their quality: the platform's judge grades them (the"
            " world plays it, its calls paid and counted) and the users' feedback teaches the"
            " rest.",
        ),
    ] = False,
    judge_sample: Annotated[
        float | None,
        typer.Option(
            "--judge-sample",
            min=0.0,
            max=1.0,
            help="With --hide-truth: the share of answers the judge grades (ORCH_JUDGE_SAMPLE).",
        ),
    ] = None,
    judge_rule: Annotated[
        str | None,
        typer.Option(
            "--judge-rule",
            help="With --hide-truth: which answers the judge grades, uniform or uncertain"
            " (ORCH_JUDGE_RULE; default: the platform's).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON only.")] = False,
) -> None:
    """Learned vs static routing vs the oracle on a simulated world: the learning curve."""
    if judge_sample is not None and not hide_truth:
        raise typer.BadParameter(
            "needs --hide-truth (the world's truth is free)", param_hint="--judge-sample"
        )
    if judge_rule is not None and not hide_truth:
        raise typer.BadParameter(
            "needs --hide-truth (the world's truth is free)", param_hint="--judge-rule"
        )
    if judge_rule is not None and judge_rule not in ("uniform", "uncertain"):
        raise typer.BadParameter("uniform or uncertain", param_hint="--judge-rule")
    on_bench_path()
    from bench.learning import bench_world

    bench_world(
        world,
        requests,
        seed,
        concurrency=concurrency,
        automation_baseline=baseline,
        as_json=as_json,
        cost_weight=cost_weight,
        hide_truth=hide_truth,
        judge_sample=judge_sample,
        previous_router=previous_router,
        judge_rule=judge_rule,
    )


@bench_app.command("chaos")
def chaos_command(
    minutes: Annotated[float, typer.Option("--minutes", min=0.1, help="Traffic time.")] = 3.0,
    seed: Annotated[int, typer.Option("--seed", help="Fault schedule and LLM weather.")] = 1,
    rate: Annotated[float, typer.Option("--rate", min=0.1, help="Requests per second.")] = 3.0,
    faults_per_target: Annotated[
        int, typer.Option("--faults-per-target", min=0, help="0: max(2, minutes / 2).")
    ] = 0,
    settle: Annotated[float, typer.Option("--settle", help="Seconds to wait for outcomes.")] = 90.0,
    broker_faults: Annotated[
        bool | None,
        typer.Option(
            "--broker-faults/--no-broker-faults",
            help="Kill and pause the broker too (default: yes, on the bench's own broker).",
        ),
    ] = None,
    shared_broker: Annotated[
        bool, typer.Option("--shared-broker", help="Use the shared broker; no broker faults.")
    ] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the Kafka and ClickHouse data.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON only.")] = False,
) -> None:
    """Invariants 1-3 under kills, pauses and broker outages (runs bench/chaos.py)."""
    on_bench_path()
    from bench.chaos import main as chaos_main

    argv = [f"--minutes={minutes}", f"--seed={seed}", f"--rate={rate}", f"--settle={settle}"]
    argv.append(f"--faults-per-target={faults_per_target}")
    if broker_faults is not None:
        argv.append("--broker-faults" if broker_faults else "--no-broker-faults")
    argv += ["--shared-broker"] * shared_broker + ["--keep"] * keep + ["--json"] * as_json
    raise typer.Exit(chaos_main(argv))
