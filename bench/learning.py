"""Learning benchmark: learned vs static routing vs the oracle, on shipped and unseen worlds.

    python bench/learning.py                      # the whole platform, 2,000 requests a world
    python bench/learning.py --offline            # the routing policy alone, no Kafka (seconds)
    python bench/learning.py --worlds bench/worlds/support-desk.json --random 0 --requests 400
    python bench/learning.py --worlds --random 401 402 --random-models 2 --previous-router
    orchestrator bench learning --world bench/worlds/support-desk.json --requests 400

Target (issue 5): after 2,000 requests the learned router's mean reward over the last
500 is at least 90% of the oracle's on every world, shipped or unseen.

On the whole platform, each run (learned, static, learned without automations) gets its
own platform, started by the platform launcher: every service a process, a fresh topic
prefix and data dir, the real broker. All runs get the same requests, sent by the SDK one
at a time by default. An answer's reward is the quality the world gave it
(``meta["quality"]`` on ``workflow_completed``); the oracle's is what the world's best
specialty scores on the same message, read from the world with no run at all.

``--hide-truth`` keeps the quality out of the answers (``World.responder(seed,
reveal_quality=False)``): the improvement service must judge them (the world plays its
judge, on the platform's own model), and the router learns only from its grades and the
simulated users' feedback. ``--judge-sample S`` (with ``--hide-truth`` only) sets
``ORCH_JUDGE_SAMPLE``: the judge grades that share of answers, the rest teach through
feedback or not at all. The judge's calls (``llm_call_completed``, purpose ``judge``) are
paid by the goal: each is added to its run's cost, and so to its reward at a cost weight,
and the summary shows the judge's share of the money and how many answers the policy
learned from (read from the router's ``policy_version`` on one probe request at the end).

``--previous-router`` adds a run of the learned router as it was before issue 12's learning
changes (``learned_previous``): its goal keeps cost weight 0, so it learns quality only, and
its change detector is off (ORCH_ROUTER_CHANGE_THRESHOLD=0); its rewards are measured with
the bench's cost weight like every run's. ``--random-models 2`` makes the random worlds two-
model ones (``World.random(seed, models=2)``, named ``random-SEED-2m`` as in bench.priced).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._console import console as bench_console  # noqa: E402
from local.fake_openai import FakeOpenAIServer, Responder, parse_model_latencies  # noqa: E402
from local.localkafka import ensure_broker  # noqa: E402
from local.platform import Launcher, available_services  # noqa: E402
from local.world import Request, World  # noqa: E402
from services.router.policy import LearnedPolicy, Policy, StaticPolicy, features_of  # noqa: E402
from streams.budgets import read_budget  # noqa: E402
from streams.client import OrchestratorClient  # noqa: E402
from streams.config import ROOT, JudgeSettings, data_root  # noqa: E402
from streams.errors import NoVerdict, OrchestratorError, Refused  # noqa: E402
from streams.events import (  # noqa: E402
    AutomationCreated,
    Event,
    LlmCallCompleted,
    RouteDecided,
    WorkflowAssessed,
    WorkflowCompleted,
)
from streams.judging import JUDGE_RULES, judged  # noqa: E402
from streams.kafka import KafkaSettings  # noqa: E402
from streams.signatures import signature_of  # noqa: E402
from streams.topics import create_topics, delete_prefixed_topics  # noqa: E402
from streams.views import TopicView  # noqa: E402

log = logging.getLogger(__name__)
__all__ = [
    "BASELINE",
    "POLICIES",
    "PREVIOUS",
    "Outcome",
    "RunSpec",
    "bench_world",
    "default_runs",
    "main",
    "print_report",
    "run_learning",
    "simulate",
    "simulate_world",
    "summarize",
]

TARGET = 0.90
# Seeds of the unseen worlds: nothing in the router was tuned on them.
RANDOM_SEEDS = (101, 102)
POLICIES = ("learned", "static")
BASELINE = "learned_no_automations"
# The learned router as it was before issue 12's learning changes: quality only (the goal's
# cost weight left at 0) and no change detector. Its rewards are measured like every run's.
PREVIOUS = "learned_previous"
# The request path plus the service that turns answers into assessments to learn from.
_SERVICES = ("budget", "spawner", "loader", "router", "improvement")
_GOAL = "bench"
_USERS = 8
# Answers from these tiers never reached the world's LLM: the world gives them nothing.
_DEGRADED = frozenset({"keyword", "static_fallback"})

Observer = Callable[[str, "Outcome", int], None]
"""``observer(run_name, outcome, automations_created_so_far)``, called as each answer comes."""


@dataclass(frozen=True)
class RunSpec:
    """One platform run: its name in the results, the routing policy, automations on or off,
    the router's busy-model threshold (ORCH_ROUTER_MODEL_BUSY; 0: off), its change detector's
    threshold (ORCH_ROUTER_CHANGE_THRESHOLD; None: the router's default), whether the
    router learns quality only (the goal's cost weight left at 0, whatever the bench's; the
    run's rewards are still quality - the bench's weight x cost), and its judge rule
    (ORCH_JUDGE_RULE; None: the bench's)."""

    name: str
    policy: str
    automations: bool = True
    model_busy: int = 0
    change_threshold: float | None = None
    quality_only: bool = False
    judge_rule: str | None = None
    busy_margin: float | None = None  # ORCH_ROUTER_BUSY_MARGIN (None: the router's default)

    def env(self) -> dict[str, str]:
        """This run's own settings for the platform's services."""
        env = {"ORCH_ROUTER_POLICY": self.policy}
        if not self.automations:
            env["ORCH_AUTOMATION_KINDS"] = ""  # the improvement service then creates none
        if self.model_busy:
            env["ORCH_ROUTER_MODEL_BUSY"] = str(self.model_busy)
        if self.change_threshold is not None:
            env["ORCH_ROUTER_CHANGE_THRESHOLD"] = repr(self.change_threshold)
        if self.judge_rule is not None:
            env["ORCH_JUDGE_RULE"] = self.judge_rule
        if self.busy_margin is not None:
            env["ORCH_ROUTER_BUSY_MARGIN"] = repr(self.busy_margin)
        return env

    def goal_cost_weight(self, cost_weight: float) -> float:
        """The cost weight this run's goal is given (what its router weighs cost by)."""
        return 0.0 if self.quality_only else cost_weight


def default_runs(automation_baseline: bool = True, previous: bool = False) -> list[RunSpec]:
    """Learned and static; learned without automations unless told not to; and, if asked,
    the previous router (``PREVIOUS``: quality only, no change detector, the judge's
    sample drawn uniformly)."""
    runs = [RunSpec(p, p) for p in POLICIES]
    if automation_baseline:
        runs.append(RunSpec(BASELINE, "learned", automations=False))
    if previous:
        runs.append(
            RunSpec(
                PREVIOUS, "learned", change_threshold=0.0, quality_only=True, judge_rule="uniform"
            )
        )
    return runs


@dataclass(frozen=True)
class Outcome:
    """What one request got: its reward, what the oracle would have got, and what it cost."""

    index: int
    run_id: str
    request_type: str
    repeat: bool
    specialty: str
    reward: float
    oracle: float
    cost_usd: float
    tier: str
    automation: str  # "" (the policy routed it), "cache" (a cached answer) or "route" (pinned)
    failed: bool
    latency_ms: float
    quality: float = 0.0  # what the world gave the answer (the reward without its cost)
    model: str = ""  # the model that answered, on a world with models
    judge_usd: float = 0.0  # what judging it cost (already in cost_usd and the reward)
    method: str = ""  # how the platform assessed it (workflow_assessed.method)
    feedback: int | None = None  # the score its simulated user gave, if any


# -- processes ------------------------------------------------------------------------------


class _JudgeCount:
    """The world's responder, counting the judge calls it serves (every run's together)."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.calls = 0

    def __call__(self, request: dict[str, Any]) -> Any:
        raw = request.get("messages")
        messages = raw if isinstance(raw, list) else []
        if any(
            isinstance(m, dict)
            and m.get("role") == "system"
            and str(m.get("content") or "").startswith("You grade answers")
            for m in messages
        ):
            self.calls += 1  # one thread serves them: no lock needed for a count
        return self.responder(request)


@contextlib.contextmanager
def _world_llm(
    world: World,
    seed: int,
    *,
    reveal_quality: bool = True,
    request_index: Callable[[], int] | None = None,
) -> Iterator[tuple[FakeOpenAIServer, _JudgeCount]]:
    counted = _JudgeCount(
        world.responder(seed, reveal_quality=reveal_quality, request_index=request_index)
    )
    server = FakeOpenAIServer(responder=counted).start_in_thread()
    try:
        yield server, counted
    finally:
        server.stop()


# -- one run ----------------------------------------------------------------------------------


class _Tracker:
    """Follows the run's answers, assessments and automations as they happen."""

    def __init__(self, settings: KafkaSettings) -> None:
        topics = [
            RouteDecided.topic,
            WorkflowCompleted.topic,
            WorkflowAssessed.topic,
            AutomationCreated.topic,
            LlmCallCompleted.topic,
        ]
        self.view = TopicView(settings, topics, self._apply, source="bench")
        self.completed: dict[str, WorkflowCompleted] = {}
        self.assessed: dict[str, WorkflowAssessed] = {}
        self.automations: list[AutomationCreated] = []
        self.automated_runs: set[str] = set()  # routed by an automation, not by the policy
        self.decided: dict[str, RouteDecided] = {}  # each run's last routing decision
        self.judge_usd: dict[str, float] = defaultdict(float)  # run -> its judge calls' cost
        self.judge_calls: dict[str, int] = defaultdict(int)
        self._costs: set[str] = set()  # cost reports seen (a resent one counts once)

    async def start(self) -> None:
        await self.view.start()

    async def stop(self) -> None:
        await self.view.stop()

    def _apply(self, event: Event) -> None:
        if isinstance(event, WorkflowCompleted):
            self.completed[event.run_id] = event
        elif isinstance(event, WorkflowAssessed):
            self.assessed[event.run_id] = event
        elif isinstance(event, AutomationCreated):
            self.automations.append(event)
        elif isinstance(event, RouteDecided):
            self.decided[event.run_id] = event
            if event.action == "automation":
                self.automated_runs.add(event.run_id)
        elif (
            isinstance(event, LlmCallCompleted)
            and event.purpose == "judge"
            and event.run_id
            and event.event_id not in self._costs
        ):
            self._costs.add(event.event_id)
            self.judge_usd[event.run_id] += event.cost_usd
            self.judge_calls[event.run_id] += 1

    async def completion(self, run_id: str, timeout: float = 10.0) -> WorkflowCompleted:
        event = await self.view.wait_for(lambda: self.completed.get(run_id), timeout)
        if event is None:
            raise TimeoutError(f"no workflow_completed for {run_id} within {timeout:g}s")
        return event


def _quality(
    world: World, seed: int, request: Request, event: WorkflowCompleted, index: int
) -> float:
    if "quality" in event.meta:
        return float(event.meta["quality"])
    if event.degradation_tier in _DEGRADED:
        return 0.0
    # An automation's answer (e.g. a cached one) is the answer that specialty gave this
    # very message before: the world scores it the same, deterministically. With the
    # truth hidden, a fresh answer is scored as the world scored it (in the phase of its
    # request, on a world that drifts).
    model = event.meta.get("model") or None
    at = None if event.degradation_tier == "automation_cache" else index
    judged = world.quality_of(request.message, event.specialty, seed, model=model, request_index=at)
    return judged[1] if judged else 0.0


async def _warm_up(
    launcher: Launcher, settings: KafkaSettings, tracker: _Tracker, world: World
) -> None:
    """Until one request goes all the way round (answer, then its assessment)."""
    # A forced specialty: the policy does not learn from the warm-up.
    (answer,) = await launcher.warm_up(
        settings,
        [("warm up", f"{_GOAL}-warmup")],
        context={"specialty": world.specialties[0]},
        timeout=120,
    )
    if launcher.alive("improvement"):
        assessed = await tracker.view.wait_for(lambda: tracker.assessed.get(answer.run_id), 60)
        if assessed is None:
            raise RuntimeError("no workflow_assessed came for the warm-up request")


async def _run_one(
    world: World,
    requests: list[Request],
    oracle: list[float],
    spec: RunSpec,
    *,
    seed: int,
    cost_weight: float = 0.0,
    concurrency: int,
    bootstrap: str,
    llm_url: str,
    run_dir: Path,
    keep: bool,
    observer: Observer | None,
    judge_sample: float | None = None,
    judge_rule: str | None = None,
    asking: list[int] | None = None,
) -> dict[str, Any]:
    """``asking``, if given, is set to each request's index before it is sent (the world's
    LLM reads its drift phase from it)."""
    prefix = f"learn{uuid.uuid4().hex[:8]}."
    settings = KafkaSettings(bootstrap, prefix)
    await create_topics(bootstrap, prefix=prefix)
    names = [n for n in _SERVICES if n in available_services()]
    env = {
        "OPENAI_BASE_URL": llm_url,
        "OPENAI_API_KEY": "simulated-world",
        **spec.env(),
        "ORCH_ROUTER_ARMS": ",".join(world.specialties),
        "ORCH_ROUTER_SEED": str(seed),
        # Simulated users give feedback far faster than people: no per-user rate limit here.
        "ORCH_FEEDBACK_PER_WINDOW": "1000000000",
        "ORCH_LOG_LEVEL": os.environ.get("ORCH_LOG_LEVEL", "WARNING"),
    }
    if judge_sample is not None:
        env["ORCH_JUDGE_SAMPLE"] = repr(judge_sample)
    if judge_rule is not None:
        env.setdefault("ORCH_JUDGE_RULE", judge_rule)  # a run's own rule first
    if world.models:
        # The world's models at the world's prices; the dearest is the platform's own.
        env["ORCH_LLM_MODELS"] = ",".join(
            f"{name}={m.input_per_m:g}/{m.output_per_m:g}" for name, m in world.models.items()
        )
        env["ORCH_LLM_MODEL"] = world.strongest_model()
    # Started from the main thread: a killed bench takes its services along (Linux).
    launcher = Launcher(
        run_dir / "logs", settings=settings, data_dir=run_dir, env=env, die_with_parent=True
    )
    tracker = _Tracker(settings)
    outcomes: list[Outcome | None] = [None] * len(requests)
    started = time.monotonic()
    wall = 0.0
    updates: int | None = None
    try:
        launcher.start_all(names)
        await tracker.start()
        async with OrchestratorClient(settings, source="bench") as client:
            await _warm_up(launcher, settings, tracker, world)
            if spec.goal_cost_weight(cost_weight):
                await _set_cost_weight(client, settings, spec.goal_cost_weight(cost_weight))
            began = time.monotonic()
            pending = iter(range(len(requests)))

            async def worker() -> None:
                for i in pending:
                    if asking is not None:
                        asking[0] = i
                    outcome = await _one(
                        client, tracker, world, seed, i, requests[i], oracle[i], cost_weight
                    )
                    outcomes[i] = outcome
                    if observer is not None:
                        observer(spec.name, outcome, len(tracker.automations))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.monotonic() - began
            # Assessments trail the answers (a judge call each, with the truth hidden): wait
            # for them, then a moment for the judge's cost reports that go with them.
            runs = [o.run_id for o in outcomes if o is not None and not o.failed]
            await tracker.view.wait_for(
                lambda: True if all(r in tracker.assessed for r in runs) else None, 30.0
            )
            await asyncio.sleep(1.0)
            if spec.policy == "learned" and "improvement" in names:
                updates = await _policy_updates(client, tracker, requests[0])
    finally:
        await tracker.stop()
        await asyncio.to_thread(launcher.stop_all)
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
            # Every run makes a full set of topics; a long benchmark would pile them up.
            with contextlib.suppress(Exception):
                await delete_prefixed_topics(bootstrap, prefix)
    kinds: dict[str, int] = defaultdict(int)
    for automation in tracker.automations:
        kinds[automation.kind] += 1
    done = [_settled(o, tracker, cost_weight) for o in outcomes if o is not None]
    decided = [tracker.decided.get(o.run_id) for o in done if not o.failed]
    # Answers the policy chose (not forced, not an automation's) teach it: a judged one from
    # its assessment, an unjudged one from its user's feedback, if any.
    chosen = [
        o
        for o, d in zip([o for o in done if not o.failed], decided, strict=True)
        if d is not None and d.features and d.policy not in ("forced", "automation")
    ]
    teaching = {
        "judged": sum(1 for o in chosen if o.method not in ("", "unjudged")),
        "feedback": sum(1 for o in chosen if o.method == "unjudged" and o.feedback is not None),
    }
    # A self-check: each answer was judged exactly when its run id's draw fell under the
    # probability the router logged with its decision (the sample, where it logged none).
    # (Unset: the platform's own setting, which its services read from this environment.)
    share = JudgeSettings.from_env().sample if judge_sample is None else judge_sample

    def drawn_at(run_id: str) -> float:
        logged = _logged_probability(tracker, run_id)
        return share if logged is None else logged

    mismatches = sum(
        1
        for o in done
        if o.method in ("judge", "unjudged")
        and (o.method == "judge") != judged(o.run_id, drawn_at(o.run_id))
    )
    return {
        "outcomes": done,
        "services": names,
        "assessed": sum(1 for o in done if o.method == "world"),  # of the benchmark's requests
        "assessed_by": dict(
            sorted(Counter(o.method or "none" for o in done if not o.failed).items())
        ),
        "judge_calls": sum(tracker.judge_calls.get(o.run_id, 0) for o in done),
        "policy_updates": updates,
        "teaching": teaching,
        "sample_mismatches": mismatches,
        "judge_probability": _spread(
            [p for o in done if (p := _logged_probability(tracker, o.run_id)) is not None]
        ),
        "automations_created": len(tracker.automations),
        "automation_kinds": dict(sorted(kinds.items())),
        "wall_s": round(wall, 2),
        "setup_s": round(time.monotonic() - started - wall, 2),
    }


def _logged_probability(tracker: _Tracker, run_id: str) -> float | None:
    """The chance of a judge the router logged with the run's decision, if any."""
    decision = tracker.decided.get(run_id)
    return decision.judge_probability if decision is not None else None


def _spread(values: list[float]) -> dict[str, float]:
    """Least, mean and most of ``values`` (empty: nothing)."""
    if not values:
        return {}
    return {
        "min": round(min(values), 4),
        "mean": round(statistics.fmean(values), 4),
        "max": round(max(values), 4),
    }


def _settled(o: Outcome, tracker: _Tracker, cost_weight: float) -> Outcome:
    """The outcome once its run is over: how it was routed and assessed, and its judge's
    cost added to its cost and taken from its reward."""
    if o.failed:
        return o
    judge = tracker.judge_usd.get(o.run_id, 0.0)
    assessed = tracker.assessed.get(o.run_id)
    routed = o.automation or ("route" if o.run_id in tracker.automated_runs else "")
    return replace(
        o,
        automation=routed,
        cost_usd=o.cost_usd + judge,
        reward=o.reward - cost_weight * judge,
        judge_usd=judge,
        method=assessed.method if assessed is not None else "",
    )


async def _policy_updates(
    client: OrchestratorClient, tracker: _Tracker, request: Request
) -> int | None:
    """How many answers the router's policy has learned from: one more request's decision
    carries ``policy_version`` = 1 + updates (a moment after the last signal, so the
    router's view has read it; a cached answer's decision, policy ``automation``, carries
    it too). None when the probe's decision is not the learned policy's."""
    await asyncio.sleep(2.0)
    try:
        answer = await client.ask(request.message, goal_id=_GOAL, user_id="probe", timeout=60)
    except OrchestratorError:
        return None
    decided = await tracker.view.wait_for(lambda: tracker.decided.get(answer.run_id), 10.0)
    if decided is None or decided.policy not in ("learned", "automation"):
        return None
    return decided.policy_version - 1


async def _set_cost_weight(
    client: OrchestratorClient, settings: KafkaSettings, cost_weight: float
) -> None:
    """The goal's cost weight, set as an operator would, and seen in the budget's report
    (which is what the router reads) before any request goes."""
    await client.set_budget(_GOAL, cost_weight=cost_weight)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = await read_budget(settings, _GOAL)
        if view is not None and view.get("cost_weight") == cost_weight:
            await asyncio.sleep(1.0)  # the router's view follows the same topic
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the budget never reported goal {_GOAL}'s cost weight {cost_weight:g}")


async def _one(
    client: OrchestratorClient,
    tracker: _Tracker,
    world: World,
    seed: int,
    index: int,
    request: Request,
    oracle: float,
    cost_weight: float = 0.0,
) -> Outcome:
    user = f"user{index % _USERS}"
    t0 = time.monotonic()
    try:
        answer = await client.ask(request.message, goal_id=_GOAL, user_id=user, timeout=60)
        event = await tracker.completion(answer.run_id)
    except (OrchestratorError, TimeoutError):
        return Outcome(
            index=index,
            run_id="",
            request_type=request.request_type,
            repeat=request.repeat,
            specialty="",
            reward=0.0,
            oracle=oracle,
            cost_usd=0.0,
            tier="failed",
            automation="",
            failed=True,
            latency_ms=(time.monotonic() - t0) * 1000.0,
        )
    quality = _quality(world, seed, request, event, index)
    reward = quality - cost_weight * event.cost_usd
    score = world.feedback_score(f"{index}", quality, seed)
    if score is not None:
        try:
            await client.feedback(answer.run_id, user_id=user, score=score, channel="sdk")
        except (Refused, NoVerdict) as exc:  # the answer still counts; its feedback did not
            log.warning("feedback on %s not taken: %s", answer.run_id, exc)
    return Outcome(
        index=index,
        run_id=answer.run_id,
        request_type=request.request_type,
        repeat=request.repeat,
        specialty=event.specialty,
        reward=reward,
        oracle=oracle,
        cost_usd=event.cost_usd,
        tier=event.degradation_tier,
        # A direct route shows on route_decided, read once the run is over.
        automation="cache" if event.degradation_tier == "automation_cache" else "",
        failed=False,
        latency_ms=answer.latency_ms,
        quality=quality,
        model=event.meta.get("model", ""),
        feedback=score,
    )


# -- the numbers ------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _curve(values: list[float], window: int) -> list[float]:
    return [round(_mean(values[i : i + window]), 4) for i in range(0, len(values), window)]


def summarize(
    world: World,
    requests: list[Request],
    oracle: list[float],
    runs: dict[str, dict[str, Any]],
    *,
    seed: int,
    window: int,
    final_window: int,
    upper: list[float] | None = None,
    cost_weight: float = 0.0,
) -> dict[str, Any]:
    """The machine-readable result: curves, final means, costs, and what was measured how.

    ``upper``: per request, the best any choice would have scored (the upper bound); each
    run's ``vs_upper`` is its final mean against that one's."""
    final_oracle = _mean(oracle[-final_window:])
    final_upper = _mean(upper[-final_window:]) if upper else 0.0
    result: dict[str, Any] = {
        "world": world.name,
        "requests": len(requests),
        "seed": seed,
        "window": window,
        "final_window": final_window,
        "repeats": sum(r.repeat for r in requests),
        "oracle": {
            "curve": _curve(oracle, window),
            "final": round(final_oracle, 4),
            "expected": round(world.oracle_reward(), 4),
        },
        "runs": {},
        "notes": [],
    }
    if upper:
        result["upper_bound"] = {"curve": _curve(upper, window), "final": round(final_upper, 4)}
    strong = _always_strong(world, requests, seed, final_window) if world.models else None
    if strong is not None:
        result["cost_weight"] = cost_weight
        result["always_strong"] = strong
    for name, run in runs.items():
        outcomes: list[Outcome] = run["outcomes"]
        rewards = [o.reward for o in outcomes]
        last = outcomes[-final_window:]
        final = _mean([o.reward for o in last])
        result["runs"][name] = {
            "curve": _curve(rewards, window),
            "final": round(final, 4),
            "vs_oracle": round(final / final_oracle, 4) if final_oracle else 0.0,
            "vs_upper": round(final / final_upper, 4) if final_upper else 0.0,
            "mean": round(_mean(rewards), 4),
            "cost_per_request_usd": round(_mean([o.cost_usd for o in outcomes]), 8),
            "by_route": _by_route(outcomes),
            "cached_answers": sum(o.automation == "cache" for o in outcomes),
            "direct_routed": sum(o.automation == "route" for o in outcomes),
            "automations_created": run["automations_created"],
            "automation_kinds": run["automation_kinds"],
            "assessed_by_world": run["assessed"],
            "assessed_by": run.get("assessed_by", {}),
            "judge_calls": run.get("judge_calls", 0),
            "judge_cost_share": _share(
                sum(o.judge_usd for o in outcomes), sum(o.cost_usd for o in outcomes)
            ),
            "judge_cost_share_final": _share(
                sum(o.judge_usd for o in last), sum(o.cost_usd for o in last)
            ),
            "policy_updates": run.get("policy_updates"),
            "taught_by": run.get("teaching", {}),
            "sample_mismatches": run.get("sample_mismatches", 0),
            "judge_probability": run.get("judge_probability", {}),
            "failed": sum(o.failed for o in outcomes),
            "degraded": sum(o.tier in _DEGRADED for o in outcomes),
            "p50_latency_ms": round(statistics.median([o.latency_ms for o in outcomes]), 1)
            if outcomes
            else 0.0,
            "latency_final_ms": _percentiles([o.latency_ms for o in last]),
            "wall_s": run["wall_s"],
            "setup_s": run["setup_s"],
            "services": run["services"],
            "specialty_share": {
                s: round(sum(o.specialty == s for o in last) / max(1, len(last)), 3)
                for s in world.specialties
            },
        }
        if strong is not None:
            row = result["runs"][name]
            quality = _mean([o.quality for o in last])
            cost = _mean([o.cost_usd for o in last])
            row["quality"] = round(quality, 4)
            row["model_share"] = {
                m: round(sum(o.model == m for o in last) / max(1, len(last)), 3)
                for m in world.models
            }
            row["latency_by_model_ms"] = {
                m: _percentiles([o.latency_ms for o in last if o.model == m]) for m in world.models
            }
            row["quality_of_strong"] = round(quality / strong["quality"], 4)
            row["cost_of_strong"] = (
                round(cost / strong["cost_per_request_usd"], 4)
                if strong["cost_per_request_usd"]
                else 0.0
            )
        if "improvement" not in run["services"]:
            result["notes"].append(
                f"{name}: the improvement service is not installed, so no answer was assessed"
                " and the router had nothing to learn from"
            )
    result["automations"] = _automation_effect(result["runs"], result["notes"])
    if world.drift:
        result["drift"] = _drift(world, requests, oracle, runs)
    return result


def _drift(
    world: World, requests: list[Request], oracle: list[float], runs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per run and drift point: requests until the run's reward (windows of 100) is back to
    90% of the new oracle's, and the same on the types whose best choice changed there
    (windows of 25); None where it never is within the run (see bench/drift.py)."""
    from bench.drift import TARGET_AFTER, recoveries

    points = [d.after for d in world.drift if d.after < len(requests)]
    kinds = [r.request_type for r in requests]
    out: dict[str, Any] = {"at": points, "target": TARGET_AFTER, "runs": {}}
    for name, run in runs.items():
        got = [0.0] * len(requests)  # a failed request scores nothing
        for o in run["outcomes"]:
            got[o.index] = o.reward
        out["runs"][name] = recoveries(world, got, oracle, kinds)
    return out


def _latency_cell(latency: dict[str, float] | None) -> str:
    return f"{latency['p50']:.0f} / {latency['p95']:.0f}" if latency else "-"


def _percentiles(values: list[float]) -> dict[str, float]:
    """Mean, p50 and p95 of ``values`` (0 when there are none)."""
    if len(values) < 2:
        only = round(values[0], 1) if values else 0.0
        return {"mean": only, "p50": only, "p95": 0.0}
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {
        "mean": round(statistics.fmean(values), 1),
        "p50": round(statistics.median(values), 1),
        "p95": round(cuts[18], 1),
    }


def _share(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole else 0.0


def _always_strong(
    world: World, requests: list[Request], seed: int, final_window: int
) -> dict[str, Any]:
    """Every request answered by its type's best specialty on the dearest model, from the
    world (no run): the RouteLLM comparison's "always the strong model"."""
    first = len(requests) - final_window
    arms = [
        world.strong_arm(r, seed, request_index=i)
        for i, r in enumerate(requests[-final_window:], start=first)
    ]
    quality, cost = [a.quality for a in arms], [a.cost_usd for a in arms]
    return {
        "model": world.strongest_model(),
        "quality": round(_mean(quality), 4),
        "cost_per_request_usd": round(_mean(cost), 8),
    }


_ROUTES = {"": "policy", "cache": "response_cache", "route": "direct_route"}


def _by_route(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    """What each way of answering cost, took and scored: the policy's LLM runs and each
    automation kind, side by side in the same run, so each kind's saving is measured."""
    out: dict[str, dict[str, float]] = {}
    for mark, name in _ROUTES.items():
        group = [o for o in outcomes if o.automation == mark and not o.failed]
        if not group:
            continue
        out[name] = {
            "requests": len(group),
            "cost_per_request_usd": round(_mean([o.cost_usd for o in group]), 8),
            "p50_latency_ms": round(statistics.median([o.latency_ms for o in group]), 1),
            "mean_reward": round(_mean([o.reward for o in group]), 4),
        }
    return out


def _automation_effect(runs: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Learned routing with automations against the same without them: both measured."""
    with_, without = runs.get("learned"), runs.get(BASELINE)
    if with_ is None or without is None:
        notes.append("cost without automations was not measured (no run without automations)")
        return {}
    if with_["cached_answers"] + with_["direct_routed"] == 0:
        notes.append(
            "no answer came from an automation in the learned run: automations saved nothing here"
        )
    cost, base = with_["cost_per_request_usd"], without["cost_per_request_usd"]
    return {
        "cost_per_request_usd": {"with": cost, "without": base},
        "cost_saving": round(1 - cost / base, 4) if base else 0.0,
        "final_reward": {"with": with_["final"], "without": without["final"]},
    }


def run_learning(
    world_path: str | Path | World,
    requests: int,
    seed: int = 0,
    *,
    runs: list[RunSpec] | None = None,
    concurrency: int = 1,
    window: int = 100,
    final_window: int | None = None,
    observer: Observer | None = None,
    parallel: bool = False,
    progress: bool = False,
    keep: bool = False,
    console: Console | None = None,
    cost_weight: float = 0.0,
    hide_truth: bool = False,
    judge_sample: float | None = None,
    judge_rule: str | None = None,
    model_latency_ms: dict[str, float] | None = None,
    outcomes_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the whole platform once per run spec on the world's requests; see :func:`summarize`.

    ``runs`` defaults to learned, static and learned without automations. ``final_window``:
    the last requests the final mean is taken over (default: the last quarter, at most
    500). ``parallel`` runs the platforms at the same time instead of one after another.
    ``keep`` leaves each run's topics and data dir behind for a post-mortem.
    ``cost_weight``: the goal's quality given up per USD; a reward is then the answer's
    quality minus that times its cost, and the oracle is the best arm for that objective.
    ``hide_truth``: the answers do not carry their quality, the platform judges them.
    ``judge_sample`` (with ``hide_truth`` only): the share of answers the judge grades;
    ``judge_rule`` which ones (``ORCH_JUDGE_RULE``: uniform or uncertain; None: the default).
    ``model_latency_ms``: the world's LLM answers these models that much later (a slow
    model, for the router's busy-model signal).
    """
    world = world_path if isinstance(world_path, World) else World.load(world_path)
    if requests < 1:
        raise ValueError("requests must be at least 1")
    if judge_sample is not None and not hide_truth:
        raise ValueError("a judge sample needs the truth hidden: the world's truth is free")
    if judge_sample is not None and not 0.0 <= judge_sample <= 1.0:
        raise ValueError(f"the judge sample is a share between 0 and 1, got {judge_sample!r}")
    if judge_rule is not None and judge_rule not in JUDGE_RULES:
        raise ValueError(f"the judge rule is one of {', '.join(JUDGE_RULES)}, got {judge_rule!r}")
    specs = runs if runs is not None else default_runs()
    final_window = final_window or min(500, max(1, requests // 4))
    sample = world.sample_requests(requests, seed)
    oracle = [
        world.oracle_score(r, seed, cost_weight=cost_weight, request_index=i)
        for i, r in enumerate(sample)
    ]
    upper = [world.upper_bound_quality(r, seed, request_index=i) for i, r in enumerate(sample)]
    bootstrap = ensure_broker()
    root = data_root() / "bench" / "learning"
    bar = _progress(console) if progress else None
    watch = observer
    if bar is not None:
        tasks = {
            spec.name: bar.add_task(f"{world.name} {spec.name}", total=requests) for spec in specs
        }

        def watch(name: str, outcome: Outcome, automations: int) -> None:
            assert bar is not None
            bar.advance(tasks[name])
            if observer is not None:
                observer(name, outcome, automations)

    async def one(spec: RunSpec) -> dict[str, Any]:
        # Each run its own world LLM: a world that drifts keeps its own clock per run. One
        # request at a time, that clock is the request being answered (answers from the
        # response cache never reach the LLM and would otherwise hold it back).
        asking = [0]
        clock = (lambda: asking[0]) if concurrency == 1 else None
        served = _world_llm(world, seed, reveal_quality=not hide_truth, request_index=clock)
        with served as (llm, judged):
            if model_latency_ms:
                llm.configure(model_latency_ms=model_latency_ms)
            out = await _run_one(
                world,
                sample,
                oracle,
                spec,
                seed=seed,
                cost_weight=cost_weight,
                concurrency=concurrency,
                bootstrap=bootstrap,
                llm_url=llm.base_url,
                run_dir=root / f"{world.name}-{spec.name}-{uuid.uuid4().hex[:6]}",
                keep=keep,
                observer=watch,
                judge_sample=judge_sample,
                judge_rule=judge_rule,
                asking=asking,
            )
            out["judge_calls_served"] = judged.calls
            return out

    async def together() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(spec) for spec in specs)))

    with bar or contextlib.nullcontext():
        if parallel:
            outputs = asyncio.run(together())
        else:
            outputs = [asyncio.run(one(spec)) for spec in specs]
    served_judge_calls = sum(out.pop("judge_calls_served") for out in outputs)
    results = {spec.name: out for spec, out in zip(specs, outputs, strict=True)}
    if outcomes_dir is not None:
        _write_outcomes(outcomes_dir, world, sample, seed, results)
    result = summarize(
        world,
        sample,
        oracle,
        results,
        seed=seed,
        window=window,
        final_window=final_window,
        upper=upper,
        cost_weight=cost_weight,
    )
    result["truth"] = {
        "hidden": hide_truth,
        "judge_sample": judge_sample,
        "judge_rule": judge_rule or JudgeSettings.read("rule"),
        # Every run's, warm-ups and probes included: what the world's LLM served as judge.
        "judge_calls_served": served_judge_calls,
    }
    return result


def _write_outcomes(
    where: Path, world: World, sample: list[Request], seed: int, results: dict[str, Any]
) -> None:
    """Every request's outcome, a JSON line each, one file per world, seed and run: what a
    post-mortem needs (beside the outcome, the message and what always-strong scores it)."""
    where.mkdir(parents=True, exist_ok=True)
    for name, out in results.items():
        path = where / f"{world.name}-seed{seed}-{name}.jsonl"
        with path.open("w") as file:
            for o in out["outcomes"]:
                request = sample[o.index]
                row = {**asdict(o), "message": request.message}
                if world.models:
                    arm = world.strong_arm(request, seed, request_index=o.index)
                    row["strong_quality"], row["strong_usd"] = arm.quality, arm.cost_usd
                file.write(json.dumps(row) + "\n")


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or bench_console(stderr=True),
    )


# -- output -----------------------------------------------------------------------------------


def _per_1k(value: float) -> str:
    return f"${value * 1000:.4f}"


def _curve_table(result: dict[str, Any]) -> Table:
    runs = result["runs"]
    window = result["window"]
    curve = Table(title=f"{result['world']}: mean reward per {window} requests")
    curve.add_column("requests", justify="right")
    for name in runs:
        curve.add_column(name.replace("_", " "), justify="right")
    curve.add_column("oracle", justify="right")
    for i, value in enumerate(result["oracle"]["curve"]):
        span = f"{i * window + 1}-{min(result['requests'], (i + 1) * window)}"
        cells = [f"{r['curve'][i]:.3f}" if i < len(r["curve"]) else "-" for r in runs.values()]
        curve.add_row(span, *cells, f"{value:.3f}")
    return curve


def print_report(
    result: dict[str, Any], console: Console | None = None, *, curve: bool = True
) -> None:
    """The learning curve (unless ``curve`` is false) and the summary, as tables."""
    out = console or bench_console()
    runs = result["runs"]
    if curve:
        out.print(_curve_table(result))
    summary = Table(title=f"last {result['final_window']} requests (seed {result['seed']})")
    columns = [
        "run",
        "reward",
        "of oracle",
        "of upper bound",
        "$ per 1k req",
        "automations",
        "cached",
        "routed",
        "p50 / p95 ms",
    ]
    strong = result.get("always_strong")
    if strong:  # a world with models: the RouteLLM comparison
        columns[4:4] = ["quality of strong", "cost of strong"]
    for column in columns:
        summary.add_column(column, justify="left" if column == "run" else "right")
    for name, stats in runs.items():
        cells = [
            name.replace("_", " "),
            f"{stats['final']:.3f}",
            f"{stats['vs_oracle'] * 100:.1f}%",
            f"{stats['vs_upper'] * 100:.1f}%" if "vs_upper" in stats else "-",
            _per_1k(stats["cost_per_request_usd"]),
            str(stats["automations_created"]),
            str(stats["cached_answers"]),
            str(stats["direct_routed"]),
            _latency_cell(stats.get("latency_final_ms")),
        ]
        if strong:
            cells[4:4] = [
                f"{stats['quality_of_strong'] * 100:.1f}%" if "quality_of_strong" in stats else "-",
                f"{stats['cost_of_strong'] * 100:.1f}%" if "cost_of_strong" in stats else "-",
            ]
        summary.add_row(*cells)
    bound = result.get("upper_bound")
    of_bound = f"{result['oracle']['final'] / bound['final'] * 100:.1f}%" if bound else "-"
    blank = [""] * (len(columns) - 4)
    summary.add_row("oracle", f"{result['oracle']['final']:.3f}", "100.0%", of_bound, *blank)
    if bound:
        summary.add_row("upper bound", f"{bound['final']:.3f}", "", "100.0%", *blank)
    out.print(summary)
    effect = result.get("automations") or {}
    if effect:
        cost = effect["cost_per_request_usd"]
        out.print(
            f"automations: cost per request {_per_1k(cost['with'])} vs {_per_1k(cost['without'])}"
            f" per 1k without ({effect['cost_saving'] * 100:.1f}% saved); final reward"
            f" {effect['final_reward']['with']:.3f} vs {effect['final_reward']['without']:.3f}"
        )
    routes = (runs.get("learned") or {}).get("by_route") or {}
    if len(routes) > 1:
        kinds = Table(title="learned run: each way of answering, measured side by side")
        for column in ("answered by", "requests", "$ per 1k req", "p50 ms", "reward"):
            kinds.add_column(column, justify="left" if column == "answered by" else "right")
        for name, row in routes.items():
            kinds.add_row(
                name.replace("_", " "),
                str(row["requests"]),
                _per_1k(row["cost_per_request_usd"]),
                f"{row['p50_latency_ms']:.1f}",
                f"{row['mean_reward']:.3f}",
            )
        out.print(kinds)
    drift = result.get("drift")
    if drift and drift["at"]:
        for name, row in drift["runs"].items():
            back = ", ".join(
                f"{'never' if a is None else a} / {'never' if b is None else b}"
                for a, b in zip(row["recovery"], row["recovery_changed_types"], strict=True)
            )
            out.print(
                f"drift at {', '.join(map(str, drift['at']))}: {name.replace('_', ' ')} back to"
                f" 90% of the new oracle after {back} requests (all / the changed types;"
                f" target {drift['target']})"
            )
    truth = result.get("truth") or {}
    if truth.get("hidden"):
        out.print(_truth_hidden(result))
    failed = {n: r["failed"] for n, r in runs.items() if r["failed"]}
    if failed:
        out.print(f"[red]failed requests (reward 0):[/] {failed}")
    for note in result["notes"]:
        out.print(f"[yellow]note:[/] {note}")


def _truth_hidden(result: dict[str, Any]) -> Table:
    """With the truth hidden: how each run's answers were assessed, what the judge cost,
    and how many answers the learned policy was taught by."""
    sample = result["truth"]["judge_sample"]
    share = "every answer" if sample is None else f"{sample * 100:g}% of answers"
    table = Table(title=f"truth hidden: the platform's judge on {share}")
    columns = ("run", "judged", "unjudged", "judge calls", "judge $ share", "taught by")
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, stats in result["runs"].items():
        methods = stats.get("assessed_by") or {}
        taught = stats.get("taught_by") or {}
        updates = stats.get("policy_updates")
        learned = (
            f"{updates} (judge {taught.get('judged', 0)} + feedback {taught.get('feedback', 0)})"
            if updates is not None
            else "-"
        )
        judged = sum(n for m, n in methods.items() if m not in ("unjudged", "none"))
        table.add_row(
            name.replace("_", " "),
            str(judged),
            str(methods.get("unjudged", 0)),
            str(stats.get("judge_calls", 0)),
            f"{stats.get('judge_cost_share', 0.0) * 100:.1f}%",
            learned,
        )
    return table


# -- the policy alone, and every world -------------------------------------------------------


def simulate(world: World, policy: Policy, requests: int, seed: int) -> tuple[list[float], float]:
    """Rewards of a policy that learns from every answer at once, with no platform; and the
    share of completion tokens a response cache consulted *after* the policy's choice would
    save (an identical message answered before by the chosen specialty, whose signature has
    the improvement service's default pattern: 3 runs, mean quality >= 0.6)."""
    arms = list(world.specialties)
    rewards = []
    answered: set[tuple[str, str]] = set()
    runs: dict[str, list[float]] = defaultdict(list)
    tokens = saved = 0
    for request in world.sample_requests(requests, seed):
        features = features_of(request.message)
        arm = policy.choose(features, arms).specialty
        judged = world.quality_of(request.message, arm, seed)
        reward = judged[1] if judged else 0.0
        policy.update(features, arm, reward)
        rewards.append(reward)
        signature = signature_of(request.message, arm)
        past = runs[signature]
        tokens += world.cost[arm]
        if (request.message, arm) in answered and len(past) >= 3 and statistics.fmean(past) >= 0.6:
            saved += world.cost[arm]
        answered.add((request.message, arm))
        past.append(reward)
    return rewards, saved / tokens if tokens else 0.0


def simulate_world(world: World, requests: int, seed: int, **policy_args: Any) -> dict[str, Any]:
    """Offline counterpart of ``run_learning``'s result: final means over the last quarter."""
    final = min(500, max(1, requests // 4))
    sample = world.sample_requests(requests, seed)
    oracle = [world.oracle_quality(r, seed) for r in sample]
    upper = [world.upper_bound_quality(r, seed) for r in sample]
    policy = LearnedPolicy(rng=random.Random(seed), **policy_args)
    learned, cache_saving = simulate(world, policy, requests, seed)
    static, _ = simulate(world, StaticPolicy(), requests, seed)
    best = statistics.fmean(oracle[-final:])
    bound = statistics.fmean(upper[-final:])
    runs = {
        name: {"final": statistics.fmean(values[-final:])}
        for name, values in (("learned", learned), ("static", static))
    }
    for stats in runs.values():
        stats["vs_oracle"] = stats["final"] / best
        stats["vs_upper"] = stats["final"] / bound
    return {
        "world": world.name,
        "oracle": {"final": best},
        "upper_bound": {"final": bound},
        "runs": runs,
        "automations": {"cache_after_policy_token_saving": cache_saving},
    }


def _worlds(
    paths: list[str] | None, random_seeds: list[int], random_models: int = 0
) -> list[World]:
    """The world files (None: the shipped ones; none at all: only the random ones), then a
    random world per seed (with ``random_models`` models: 0, or 2 for a cheap and a strong
    one, named ``random-S-2m``)."""
    files = sorted(str(p) for p in (ROOT / "bench" / "worlds").glob("*.json"))
    files = files if paths is None else paths
    randoms = [World.random(s, models=random_models) for s in random_seeds]
    return [World.load(p) for p in files] + randoms


def _table(results: list[dict[str, Any]], requests: int, offline: bool) -> Table:
    final = min(500, max(1, requests // 4))
    how = "policy alone, offline" if offline else "whole platform"
    table = Table(title=f"learning: mean reward over the last {final} of {requests} ({how})")
    previous = any(PREVIOUS in r["runs"] for r in results)
    columns = ["world", "learned", "static", "oracle", "learned/oracle", "static/oracle"]
    if previous:
        columns[3:3] = ["previous"]
        columns.append("previous/oracle")
    for column in (*columns, "upper bound", "learned/upper"):
        table.add_column(column, justify="left" if column == "world" else "right")
    if offline:
        table.add_column("cache after policy saves", justify="right")
    else:
        table.add_column("$/1k req", justify="right")
        table.add_column("$/1k w/o autom.", justify="right")
        table.add_column("saved", justify="right")
    table.add_column("target", justify="center")
    for r in results:
        learned, static = r["runs"]["learned"], r["runs"]["static"]
        row = [
            r["world"],
            f"{learned['final']:.3f}",
            f"{static['final']:.3f}",
            f"{r['oracle']['final']:.3f}",
            f"{learned['vs_oracle'] * 100:.1f}%",
            f"{static['vs_oracle'] * 100:.1f}%",
        ]
        if previous:
            before = r["runs"].get(PREVIOUS)
            row[3:3] = [f"{before['final']:.3f}" if before else "-"]
            row.append(f"{before['vs_oracle'] * 100:.1f}%" if before else "-")
        bound = r.get("upper_bound")
        row += (
            [f"{bound['final']:.3f}", f"{learned['vs_upper'] * 100:.1f}%"] if bound else ["-", "-"]
        )
        if offline:
            row.append(f"{r['automations']['cache_after_policy_token_saving'] * 100:.1f}%")
        else:
            effect = r.get("automations") or {}
            cost = effect.get("cost_per_request_usd", {})
            row += [
                f"{learned['cost_per_request_usd'] * 1000:.4f}",
                f"{cost['without'] * 1000:.4f}" if cost else "not run",
                f"{effect['cost_saving'] * 100:.1f}%" if effect else "-",
            ]
        row.append("met" if learned["vs_oracle"] >= TARGET else "MISSED")
        table.add_row(*row)
    return table


def bench_world(
    world: Path,
    requests: int,
    seed: int = 0,
    *,
    concurrency: int = 1,
    automation_baseline: bool = True,
    as_json: bool = False,
    cost_weight: float = 0.0,
    hide_truth: bool = False,
    judge_sample: float | None = None,
    previous_router: bool = False,
    judge_rule: str | None = None,
) -> None:
    """One world on the whole platform: the report, or JSON only (`orchestrator bench learning`)."""
    for name in ("aiokafka", "kafka"):
        # A new topic's first offset lookups fail for a moment; aiokafka logs each retry.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    result = run_learning(
        world,
        requests,
        seed,
        runs=default_runs(automation_baseline, previous_router),
        concurrency=concurrency,
        progress=not as_json,
        cost_weight=cost_weight,
        hide_truth=hide_truth,
        judge_sample=judge_sample,
        judge_rule=judge_rule,
    )
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        print_report(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--worlds",
        nargs="*",
        help="world files (default: the shipped ones; --worlds with no file: only the random ones)",
    )
    parser.add_argument(
        "--random", type=int, nargs="*", default=list(RANDOM_SEEDS), help="seeds of unseen worlds"
    )
    parser.add_argument(
        "--random-models",
        type=int,
        choices=(0, 2),
        default=0,
        help="models of each random world: 0 (one for every agent) or 2 (a cheap and a strong"
        " one; the world is named random-SEED-2m)",
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--offline", action="store_true", help="the policy alone, no platform")
    parser.add_argument("--no-automation-baseline", action="store_true")
    parser.add_argument(
        "--previous-router",
        action="store_true",
        help=f"also run the learned router as it was before issue 12 ({PREVIOUS}: quality only,"
        " the goal's cost weight left at 0, and no change detector), rewards measured alike",
    )
    parser.add_argument(
        "--cost-weight", type=float, default=0.0, help="quality given up per USD (reward)"
    )
    parser.add_argument(
        "--hide-truth",
        action="store_true",
        help="answers do not reveal their quality: the platform's judge grades them (the world"
        " plays it) and the users' feedback teaches the rest",
    )
    parser.add_argument(
        "--judge-sample",
        type=float,
        help="with --hide-truth: the share of answers the judge grades (ORCH_JUDGE_SAMPLE)",
    )
    parser.add_argument(
        "--judge-rule",
        choices=JUDGE_RULES,
        help="with --hide-truth: which answers the judge grades (ORCH_JUDGE_RULE; default:"
        " the platform's)",
    )
    parser.add_argument(
        "--slow-model",
        metavar="NAME=MS[,NAME=MS]",
        help="the world's LLM answers these models MS milliseconds later (a slow model)",
    )
    parser.add_argument(
        "--model-busy",
        type=int,
        default=0,
        help="also run the learned router with ORCH_ROUTER_MODEL_BUSY at this many answers"
        " in flight per model, beside the runs without it",
    )
    parser.add_argument(
        "--busy-margin",
        type=float,
        action="append",
        default=[],
        help="with --model-busy: also a run with ORCH_ROUTER_BUSY_MARGIN at this value (the"
        " reward a request may give up to stay off a busy model); repeat for several",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable results only")
    parser.add_argument("--save", type=Path, help="also write the full results as JSON here")
    parser.add_argument(
        "--outcomes",
        type=Path,
        metavar="DIR",
        help="also write every request's outcome, a JSON line each, to DIR (a file per world,"
        " seed and run)",
    )
    args = parser.parse_args(argv)
    try:
        slow = parse_model_latencies(args.slow_model or "")
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--slow-model: {exc}")
    if args.model_busy < 0:
        parser.error("--model-busy takes a whole number >= 0")
    runs = default_runs(not args.no_automation_baseline, args.previous_router)
    if args.busy_margin and not args.model_busy:
        parser.error("--busy-margin needs --model-busy")
    if any(not 0.0 <= m <= 1.0 for m in args.busy_margin):
        parser.error("--busy-margin takes a reward between 0 and 1")
    if args.model_busy:
        runs.append(RunSpec(f"learned_busy_{args.model_busy}", "learned", True, args.model_busy))
        runs += [
            RunSpec(
                f"learned_busy_{args.model_busy}_margin_{m:g}",
                "learned",
                True,
                args.model_busy,
                busy_margin=m,
            )
            for m in args.busy_margin
        ]
    if args.judge_sample is not None and not args.hide_truth:
        parser.error("--judge-sample needs --hide-truth (the world's truth is free)")
    if args.judge_sample is not None and not 0.0 <= args.judge_sample <= 1.0:
        parser.error("--judge-sample takes a share between 0 and 1")
    if args.offline and args.previous_router:
        parser.error("--previous-router is a run of the platform's router: not with --offline")
    if args.judge_rule is not None and not args.hide_truth:
        parser.error("--judge-rule needs --hide-truth (the world's truth is free)")
    if args.offline and args.hide_truth:
        parser.error(
            "--hide-truth runs the platform's judge: not with --offline"
            " (python -m bench.priced --hide-truth is the offline counterpart)"
        )
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    console = bench_console(stderr=args.json)
    results = []
    for world in _worlds(args.worlds, args.random, args.random_models):
        if args.offline:
            result = simulate_world(world, args.requests, args.seed)
        else:
            result = run_learning(
                world,
                args.requests,
                args.seed,
                runs=runs,
                concurrency=args.concurrency,
                progress=not args.json,
                cost_weight=args.cost_weight,
                hide_truth=args.hide_truth,
                judge_sample=args.judge_sample,
                judge_rule=args.judge_rule,
                model_latency_ms=slow or None,
                outcomes_dir=args.outcomes,
            )
            if not args.json:
                print_report(result, console)
        results.append(result)
    if args.save:
        args.save.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        console.print(_table(results, args.requests, args.offline))
    return 0 if all(r["runs"]["learned"]["vs_oracle"] >= TARGET for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
