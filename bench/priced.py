"""Quality per dollar: the routing policy choosing (specialty, model) for a goal's cost weight.

    python -m bench.priced                                  # shipped two-model worlds + 3 random
    python -m bench.priced --cost-weight 30 --requests 2000 --random 201 202 203
    python -m bench.priced --hide-truth --judge-sample 0.05,0.1,0.2 --judge-rule uncertain,uniform

A world with ``models`` (docs/worlds.md) prices each model and says how good each is per
request type. The policy (the router's own, ``services/router/policy.py``) sees every
arm ``specialty@model`` and learns, per arm, the quality an answer got and what it cost;
it maximises ``quality - W x cost`` where W (``--cost-weight``) is the quality a goal gives
up per USD of an answer (``orchestrator budget set G --cost-weight W``).

Reported per world, over the last 500 of the requests (the same requests for every row):

- reward (``quality - W x cost``) of the learned policy against the oracle of the same
  objective (each request served by its type's best arm for W, on the same noise draw);
- the RouteLLM comparison: the learned policy's quality and cost as shares of "always the
  strongest model" (each request answered by its type's best specialty on the dearest
  model: a perfect specialty router that never saves);
- static routing (the keyword specialty on the strongest model) and the quality-only
  learned policy (W = 0) as baselines, from the same run.

This is the policy alone (no Kafka), like ``bench/learning.py --offline``: what the
platform adds around it is measured there.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._console import console as bench_console  # noqa: E402
from local.world import Request, World  # noqa: E402
from services.improvement.assess import judge_messages  # noqa: E402
from services.router.policy import (  # noqa: E402
    Features,
    LearnedPolicy,
    Policy,
    StaticPolicy,
    arm_name,
    features_of,
    split_arm,
)
from streams.config import ROOT  # noqa: E402
from streams.judging import DEFAULT_JUDGE_RULE, JUDGE_RULES, JudgeRule  # noqa: E402
from streams.llm import estimate_tokens  # noqa: E402

__all__ = [
    "DEFAULT_JUDGE_RULE",
    "JUDGE_RULES",
    "JudgeSampler",
    "PricedRun",
    "judge_cost_usd",
    "judged_world",
    "main",
    "priced_arms",
    "priced_world",
    "simulate_priced",
]

# The goal's cost weight unless told: a cent of an answer's cost is worth 0.3 quality.
DEFAULT_COST_WEIGHT = 30.0
# Seeds of unseen two-model worlds: nothing was tuned on them.
RANDOM_SEEDS = (201, 202, 203)
QUALITY_KEPT = 0.95  # of always-strongest's quality ...
COST_PAID = 0.50  # ... at no more than this share of its cost
REWARD_TARGET = 0.90  # of the oracle's reward
# Cost weights the learned policy is run at, to draw its quality-cost curve.
SWEEP = (0.0, 10.0, 20.0, 30.0, 50.0, 70.0, 100.0)
# Shares of answers the judge grades when the truth is hidden (--hide-truth).
JUDGE_SWEEP = (0.02, 0.05, 0.1, 0.2, 0.5)
# A grade is one number: about this many output tokens.
_GRADE_TOKENS = 2


@dataclass
class PricedRun:
    """What each request got: the arm that answered, its quality and its cost."""

    arms: list[str] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    judged: list[bool] = field(default_factory=list)  # the judge graded it (truth hidden)

    def add(self, arm: str, quality: float, cost: float, *, judged: bool = False) -> None:
        self.arms.append(arm)
        self.quality.append(quality)
        self.cost.append(cost)
        self.judged.append(judged)

    def final(self, window: int, cost_weight: float) -> dict[str, float]:
        quality = statistics.fmean(self.quality[-window:])
        cost = statistics.fmean(self.cost[-window:])
        return {
            "quality": round(quality, 4),
            "cost_per_1k_usd": round(cost * 1000, 5),
            "reward": round(quality - cost_weight * cost, 4),
        }


@dataclass
class JudgeSampler:
    """Which answers the judge grades, about ``share`` of them: the router's own
    :class:`~streams.judging.JudgeRule`. ``n`` is what the router reads, the learned
    policy's :meth:`~services.router.policy.LearnedPolicy.known` when ``policy`` is one;
    else counted here (the outcomes the policy learned with the chosen arm on the
    request's words, graded or rated, through :meth:`learned`; the mean over the words,
    the arm's own count for a request without words)."""

    share: float
    rule: str = DEFAULT_JUDGE_RULE
    policy: LearnedPolicy | None = None
    _rule: JudgeRule = field(init=False)
    _words: dict[tuple[str, str], int] = field(default_factory=dict)
    _arms: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rule = JudgeRule(self.share, self.rule)

    @property
    def seen(self) -> int:
        return self._rule.seen

    @property
    def judged(self) -> int:
        return self._rule.judged

    @property
    def realised(self) -> float:
        return self._rule.realised

    def outcomes(self, features: Features, arm: str) -> float:
        """``n``: graded outcomes the policy learned with ``arm`` on these words."""
        if self.policy is not None:
            return self.policy.known(features, arm)
        if not features.words:
            return float(self._arms.get(arm, 0))
        return statistics.fmean(self._words.get((w, arm), 0) for w in features.words)

    def weight(self, features: Features, arm: str, explored: bool = False) -> float:
        return self._rule.weight(self.outcomes(features, arm), explored)

    def probability(self, features: Features, arm: str, explored: bool = False) -> float:
        """The chance of judging this answer before the share's cap (moves the mean)."""
        return self._rule.probability(self.outcomes(features, arm), explored)

    def decide(self, features: Features, arm: str, draw: float, explored: bool = False) -> bool:
        """Whether the judge grades this answer; ``draw`` uniform in [0, 1)."""
        return self._rule.decide(self.outcomes(features, arm), draw, explored)[0]

    def learned(self, features: Features, arm: str) -> None:
        """The policy learned an outcome of ``arm`` on these words (a grade or feedback)."""
        self._arms[arm] = self._arms.get(arm, 0) + 1
        for w in features.words:
            self._words[(w, arm)] = self._words.get((w, arm), 0) + 1


def priced_arms(world: World) -> list[str]:
    """Every (specialty, model) arm, the strongest model first (the platform's own model);
    the specialties alone for a world of one unnamed model."""
    if not world.models:
        return list(world.specialties)
    strong = world.strongest_model()
    models = [strong, *sorted(m for m in world.models if m != strong)]
    return [arm_name(s, m) for s in world.specialties for m in models]


def _answer(world: World, request: Request, arm: str, seed: int, index: int) -> tuple[float, float]:
    specialty, model = split_arm(arm)
    judged = world.quality_of(request.message, specialty, seed, model=model, request_index=index)
    cost = world.answer_cost_usd(request.message, specialty, model=model)
    return (judged[1] if judged else 0.0), cost


def _of_oracle(reward: float, oracle_reward: float) -> float:
    return round(reward / oracle_reward, 4) if oracle_reward > 0 else 0.0


def judge_cost_usd(world: World, request: Request, arm: str) -> float:
    """One judge call on an answer, at the strongest model's price: the judge's prompt
    (services/improvement/assess.py) around the request and the answer, and a grade
    (nothing in a world that prices no model)."""
    if not world.models:
        return 0.0
    specialty, model = split_arm(arm)
    price = world.models[world.strongest_model()]
    frame = sum(estimate_tokens(m["content"]) for m in judge_messages("", ""))
    prompt = frame + estimate_tokens(request.message) + world.answer_tokens(specialty, model=model)
    return (prompt * price.input_per_m + _GRADE_TOKENS * price.output_per_m) / 1e6


def simulate_priced(
    world: World,
    policy: Policy,
    sample: list[Request],
    seed: int,
    cost_weight: float,
    *,
    judge_sample: float | None = None,
    judge_rule: str = DEFAULT_JUDGE_RULE,
    sampler: JudgeSampler | None = None,
) -> PricedRun:
    """The policy choosing an arm per request and learning each answer's quality and cost.

    With ``judge_sample`` the world's truth is hidden: the policy learns from a sampled
    share of answers graded by the world's judge (noisy, biased as the world says; each
    call paid at the strongest model's price and counted in that request's cost) and from
    the users' feedback at the world's rate; an answer with neither teaches it nothing.
    Which answers are judged: ``judge_rule`` (see :class:`JudgeSampler`), or ``sampler``.
    """
    arms = priced_arms(world)
    run = PricedRun()
    draws = random.Random(f"{world.name}/{seed}/judge-sample")
    if judge_sample is not None and sampler is None:
        learned = policy if isinstance(policy, LearnedPolicy) else None
        sampler = JudgeSampler(judge_sample, judge_rule, policy=learned)
    for index, request in enumerate(sample):
        features = features_of(request.message)
        choice = policy.choose(features, arms, cost_weight)
        arm = choice.specialty
        quality, cost = _answer(world, request, arm, seed, index)
        if sampler is None:
            policy.update(features, arm, quality, cost)
            run.add(arm, quality, cost)
            continue
        seen: float | None = None
        paid = cost
        specialty, model = split_arm(arm)
        judge = sampler.decide(features, arm, draws.random(), choice.explored)
        if judge:
            grade = world.judge_grade(
                request.message, specialty, seed, model=model, request_index=index
            )
            paid += judge_cost_usd(world, request, arm)
            seen = None if grade is None else (grade - 1) / 9
        judged = seen is not None
        if seen is None:
            score = world.feedback_score(f"{seed}/{index}", quality, seed)
            seen = None if score is None else (score - 1) / 4
        if seen is not None:
            # As the router: a user's score raises no change (services/router/service.py).
            policy.update(features, arm, seen, cost, detect=judged)
            sampler.learned(features, arm)
        run.add(arm, quality, paid, judged=judge)
    return run


def _always_strong(world: World, sample: list[Request], seed: int) -> PricedRun:
    run = PricedRun()
    for index, request in enumerate(sample):
        arm = world.strong_arm(request, seed, request_index=index)
        run.add(arm_name(arm.specialty, arm.model), arm.quality, arm.cost_usd)
    return run


def _oracle(world: World, sample: list[Request], seed: int, cost_weight: float) -> PricedRun:
    run = PricedRun()
    for index, request in enumerate(sample):
        arm = world.oracle_arm(request, seed, cost_weight=cost_weight, request_index=index)
        run.add(arm_name(arm.specialty, arm.model), arm.quality, arm.cost_usd)
    return run


def cheap_enough_share(world: World, sample: list[Request], seed: int) -> float:
    """Share of requests whose type the cheapest model serves within 0.05 of the strongest
    (each at its own best specialty): where the 95%-at-half-the-cost target applies."""
    strong, cheap = world.strongest_model(), world.cheapest_model()
    good = 0
    for request in sample:
        kind = request.request_type
        best_strong = world.mean_quality(
            kind, world.best_specialty(kind, model=strong), model=strong
        )
        best_cheap = world.mean_quality(kind, world.best_specialty(kind, model=cheap), model=cheap)
        good += best_cheap >= best_strong - 0.05
    return good / len(sample) if sample else 0.0


def priced_world(
    world: World,
    requests: int,
    seed: int,
    cost_weight: float = DEFAULT_COST_WEIGHT,
    sweep: tuple[float, ...] = SWEEP,
) -> dict[str, Any]:
    """Every row of the comparison for one world (see the module's docstring), and the
    learned policy at each cost weight of ``sweep`` (its quality and cost as shares of
    always-strongest, beside the oracle's at the same weight)."""
    window = min(500, max(1, requests // 4))
    sample = world.sample_requests(requests, seed)
    strong = _always_strong(world, sample, seed).final(window, 0.0)

    def shares(row: dict[str, float], oracle: dict[str, float] | None) -> dict[str, float]:
        row["quality_of_strong"] = round(row["quality"] / strong["quality"], 4)
        row["cost_of_strong"] = round(row["cost_per_1k_usd"] / strong["cost_per_1k_usd"], 4)
        if oracle is not None:
            row["vs_oracle_reward"] = _of_oracle(row["reward"], oracle["reward"])
        return row

    def learned(weight: float) -> PricedRun:
        policy = LearnedPolicy(rng=random.Random(seed))
        return simulate_priced(world, policy, sample, seed, weight)

    oracle_run = _oracle(world, sample, seed, cost_weight)
    oracle = oracle_run.final(window, cost_weight)
    runs = {
        "learned": learned(cost_weight),
        "learned_quality_only": learned(0.0),
        "static_strong": simulate_priced(world, StaticPolicy(), sample, seed, cost_weight),
        "always_strong": _always_strong(world, sample, seed),
        "oracle": oracle_run,
    }
    finals = {name: shares(run.final(window, cost_weight), oracle) for name, run in runs.items()}
    curve: list[dict[str, Any]] = []
    for weight in sweep:
        point_oracle = _oracle(world, sample, seed, weight).final(window, weight)
        point = shares(learned(weight).final(window, weight), point_oracle)
        curve.append(
            {
                "cost_weight": weight,
                "learned": point,
                "oracle": shares(point_oracle, None),
            }
        )
    # The RouteLLM-style point: the cheapest weight that keeps 95% of strong's quality.
    kept = [p for p in curve if p["learned"]["quality_of_strong"] >= QUALITY_KEPT]
    best: dict[str, Any] | None = min(
        kept, key=lambda p: p["learned"]["cost_of_strong"], default=None
    )
    share = cheap_enough_share(world, sample, seed)
    cheapest_arms = runs["learned"].arms[-window:]
    strongest = world.strongest_model()
    return {
        "world": world.name,
        "requests": requests,
        "window": window,
        "cost_weight": cost_weight,
        "cheap_good_enough_share": round(share, 3),
        "cheap_share_learned": round(
            sum(1 for a in cheapest_arms if split_arm(a)[1] != strongest) / window, 3
        ),
        "runs": finals,
        "curve": curve,
        "best_at_95": best,
        "targets": {
            "reward >= 90% of the oracle's": finals["learned"]["vs_oracle_reward"] >= REWARD_TARGET,
            "95% of strong's quality at <= 50% of its cost (some weight)": (
                best is not None and best["learned"]["cost_of_strong"] <= COST_PAID
            )
            if share >= 0.5
            else None,
        },
    }


def judged_world(
    world: World,
    requests: int,
    seed: int,
    cost_weight: float = DEFAULT_COST_WEIGHT,
    samples: tuple[float, ...] = JUDGE_SWEEP,
    rules: tuple[str, ...] = JUDGE_RULES,
) -> dict[str, Any]:
    """The learned policy with the truth hidden, at each judge sampling share and with each
    judge rule (``rules``): its reward (the judge's calls paid in it) against the oracle of
    the same objective (which knows the truth and pays no judge), what share of the money
    went to the judge, and the share of answers judged over the run (``judged_share``)."""
    window = min(500, max(1, requests // 4))
    sample = world.sample_requests(requests, seed)
    oracle = _oracle(world, sample, seed, cost_weight).final(window, cost_weight)
    seen = LearnedPolicy(rng=random.Random(seed))
    truth = simulate_priced(world, seen, sample, seed, cost_weight).final(window, cost_weight)
    points: list[dict[str, Any]] = []
    for share in samples:
        for rule in rules:
            policy = LearnedPolicy(rng=random.Random(seed))
            run = simulate_priced(
                world, policy, sample, seed, cost_weight, judge_sample=share, judge_rule=rule
            )
            row: dict[str, Any] = dict(run.final(window, cost_weight))
            answers = [
                _answer(world, r, a, seed, i)[1]
                for i, (r, a) in enumerate(zip(sample, run.arms, strict=True))
            ]
            judged = sum(run.cost[-window:]) - sum(answers[-window:])
            row["judge_cost_share"] = round(judged / sum(run.cost[-window:]), 4)
            row["judged_share"] = round(sum(run.judged) / len(run.judged), 4)
            row["judged_share_window"] = round(sum(run.judged[-window:]) / window, 4)
            row["vs_oracle_reward"] = _of_oracle(row["reward"], oracle["reward"])
            points.append({"judge_sample": share, "rule": rule, **row})
    return {
        "world": world.name,
        "requests": requests,
        "window": window,
        "cost_weight": cost_weight,
        "feedback_probability": world.feedback_probability,
        "judge": {"noise": world.judge_noise, "bias": world.judge_bias},
        "oracle": oracle,
        "truth_visible": {
            **truth,
            "vs_oracle_reward": _of_oracle(truth["reward"], oracle["reward"]),
        },
        "points": points,
    }


def _judge_table(results: list[dict[str, Any]]) -> Table:
    first = results[0]
    table = Table(
        title=f"truth hidden: learned reward (judge paid) / the oracle's (the judge's share of"
        f" the money; share of answers judged over the run), last {first['window']} of"
        f" {first['requests']}, W={first['cost_weight']:g}"
    )
    table.add_column("world")
    table.add_column("judge rule")
    table.add_column("truth seen", justify="right")
    shares = list(dict.fromkeys(p["judge_sample"] for p in first["points"]))
    rules = list(dict.fromkeys(p["rule"] for p in first["points"]))
    for share in shares:
        table.add_column(f"judge {share * 100:g}%", justify="right")
    for r in results:
        for i, rule in enumerate(rules):
            cells = [
                f"{p['vs_oracle_reward'] * 100:.1f}% ({p['judge_cost_share'] * 100:.0f}%;"
                f" {p['judged_share'] * 100:.1f}%)"
                for p in r["points"]
                if p["rule"] == rule
            ]
            table.add_row(
                f"{r['world']} (feedback {r['feedback_probability'] * 100:g}%)" if i == 0 else "",
                rule,
                f"{r['truth_visible']['vs_oracle_reward'] * 100:.1f}%" if i == 0 else "",
                *cells,
            )
        table.add_section()
    return table


def _table(results: list[dict[str, Any]]) -> Table:
    first = results[0]
    table = Table(
        title=f"quality per dollar: last {first['window']} of {first['requests']} requests,"
        f" cost weight {first['cost_weight']:g} quality per USD (policy alone)"
    )
    for column in (
        "world",
        "run",
        "quality",
        "$ / 1k answers",
        "reward",
        "of oracle reward",
        "of strong's quality",
        "of strong's cost",
    ):
        table.add_column(column, justify="left" if column in ("world", "run") else "right")
    for result in results:
        for i, (name, row) in enumerate(result["runs"].items()):
            table.add_row(
                result["world"] if i == 0 else "",
                name,
                f"{row['quality']:.3f}",
                f"{row['cost_per_1k_usd']:.3f}",
                f"{row['reward']:.3f}",
                f"{row['vs_oracle_reward'] * 100:.1f}%",
                f"{row['quality_of_strong'] * 100:.1f}%",
                f"{row['cost_of_strong'] * 100:.1f}%",
            )
        table.add_section()
    return table


def _pair(row: dict[str, float]) -> str:
    return f"{row['quality_of_strong'] * 100:.0f}% / {row['cost_of_strong'] * 100:.0f}%"


def _curve_table(results: list[dict[str, Any]]) -> Table:
    weights = [p["cost_weight"] for p in results[0]["curve"]]
    table = Table(
        title="learned (oracle) quality / cost as shares of always-strongest, by cost weight"
    )
    table.add_column("world")
    for weight in weights:
        table.add_column(f"W={weight:g}", justify="right")
    table.add_column("cheap ok", justify="right")
    table.add_column("95% at <= 50% cost", justify="center")
    for result in results:
        cells = [f"{_pair(p['learned'])}\n({_pair(p['oracle'])})" for p in result["curve"]]
        ok = list(result["targets"].values())[1]
        table.add_row(
            result["world"],
            *cells,
            f"{result['cheap_good_enough_share'] * 100:.0f}%",
            "n/a" if ok is None else "met" if ok else "MISSED",
        )
    return table


def _worlds(paths: list[str], random_seeds: list[int]) -> list[World]:
    files = paths or sorted(str(p) for p in (ROOT / "bench" / "worlds").glob("*.json"))
    shipped = [w for w in (World.load(p) for p in files) if len(w.models) >= 2]
    return shipped + [World.random(s, models=2) for s in random_seeds]


def _shares(text: str) -> tuple[float, ...]:
    """``--judge-sample``: comma-separated shares, each a number from 0 to 1."""
    out: list[float] = []
    for item in text.split(","):
        try:
            share = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
        if not 0.0 <= share <= 1.0:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"{item!r} is not a share between 0 and 1")
        out.append(share)
    return tuple(out)


def _rules(text: str) -> tuple[str, ...]:
    """``--judge-rule``: comma-separated rules of :data:`JUDGE_RULES`, none twice."""
    out = tuple(item.strip().lower() for item in text.split(","))
    for rule in out:
        if rule not in JUDGE_RULES:
            raise argparse.ArgumentTypeError(
                f"{rule!r} is not a judge rule (one of {', '.join(JUDGE_RULES)})"
            )
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"a rule named twice: {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cost-weight", type=float, default=DEFAULT_COST_WEIGHT)
    parser.add_argument("--worlds", nargs="*", default=[], help="world files (default: shipped)")
    parser.add_argument("--random", type=int, nargs="*", default=list(RANDOM_SEEDS))
    parser.add_argument("--json", action="store_true", help="machine-readable results only")
    parser.add_argument(
        "--hide-truth",
        action="store_true",
        help="learn only from a sampled judge and the users' feedback, at each share of"
        " --judge-sample (the judge's calls paid)",
    )
    parser.add_argument(
        "--judge-sample",
        type=_shares,
        default=JUDGE_SWEEP,
        help="shares of answers the judge grades, comma separated (with --hide-truth)",
    )
    parser.add_argument(
        "--judge-rule",
        type=_rules,
        default=JUDGE_RULES,
        help="which answers the judge grades (with --hide-truth): uniform (a draw at the"
        " share) or uncertain (more where the chosen arm is little known, the share kept);"
        " comma separated to compare, the first is the rule (default: uncertain,uniform)",
    )
    args = parser.parse_args(argv)
    if args.cost_weight < 0:
        parser.error("--cost-weight must be >= 0")
    if args.hide_truth:
        judged = [
            judged_world(
                world,
                args.requests,
                args.seed,
                args.cost_weight,
                args.judge_sample,
                args.judge_rule,
            )
            for world in _worlds(args.worlds, args.random)
        ]
        if args.json:
            sys.stdout.write(json.dumps(judged, indent=2) + "\n")
        else:
            bench_console().print(_judge_table(judged))
        return 0
    results = [
        priced_world(world, args.requests, args.seed, args.cost_weight)
        for world in _worlds(args.worlds, args.random)
    ]
    if not results:
        parser.error("no world with two or more models")
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        console = bench_console()
        console.print(_table(results))
        console.print(_curve_table(results))
    met = [ok for r in results for ok in r["targets"].values() if ok is not None]
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
