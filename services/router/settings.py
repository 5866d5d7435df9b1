"""The router's settings: which policy routes, how it explores, how agents are ranked."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import ClassVar

from pydantic import field_validator

from services.router.scoring import CRITERIA, Weights
from streams.settings import EnvSettings, comma_list, parsed, setting

__all__ = ["EVENT_TIME_AHEAD", "RouterSettings", "not_ahead"]

# How far ahead of the router's clock an event's own stamp may reach, as in the budget
# (services/budget/state.py): a few seconds of skew count as they are, a stamp years
# ahead (a valid event) does not make what it starts last for years more.
EVENT_TIME_AHEAD = timedelta(seconds=60)


def not_ahead(stamp: datetime, now: datetime) -> datetime:
    """``stamp``, or ``now`` plus :data:`EVENT_TIME_AHEAD` if it is further ahead."""
    return min(stamp, now + EVENT_TIME_AHEAD)


class RouterSettings(EnvSettings):
    title: ClassVar[str] = "Router and learned policy"

    policy: str = setting(
        "ORCH_ROUTER_POLICY",
        "learned",
        "`learned` (epsilon-greedy, learns from assessed outcomes) or `static` (the keyword "
        "classifier), case ignored. Set but empty means the default; anything else is refused "
        "with an error naming the variable.",
        read_by="router",
    )
    epsilon: float = setting(
        "ORCH_ROUTER_EPSILON",
        0.2,
        "Starting exploration rate of the learned policy. It decays as "
        "`epsilon / sqrt(1 + updates / 50)` and never goes below 0.03, even when set to 0. "
        ">= 0.",
        read_by="router",
        shown="`0.2` (`LearnedPolicy.epsilon0`)",
        ge=0,
    )
    half_life: float = setting(
        "ORCH_ROUTER_HALF_LIFE",
        0.0,
        "Policy updates after which an outcome the learned policy saw weighs half: what it "
        "learned fades so that a workload whose best choices change is followed. 0 (the "
        'default) never forgets; measured trade-off in docs/performance.md, "Drift". >= 0.',
        read_by="router",
        ge=0,
    )
    change_threshold: float = setting(
        "ORCH_ROUTER_CHANGE_THRESHOLD",
        12.0,
        "How surprising the learned policy's recent outcomes on a request's words must be "
        "(summed distances from its estimate, in standard deviations) before it takes the "
        "workload to have changed there: every arm is then tried again on those words and "
        "its next outcome replaces what it had learned. Lower follows changes sooner and "
        "mistakes noise for change more often; 0 turns it off. Measured in "
        'docs/performance.md, "Drift". >= 0.',
        read_by="router",
        ge=0,
    )
    form_weight: float = setting(
        "ORCH_ROUTER_FORM_WEIGHT",
        2.0,
        "How many outcomes the learned policy's estimate from a request's words counts as "
        "against the outcomes of earlier requests of the same form (the same words in the "
        "same order, numbers aside): the form's own outcomes take over as they come, so "
        "words that several kinds of request share no longer pull it toward choices that "
        'serve the other kinds. 0 leaves forms out. Measured in docs/performance.md, "Request '
        'forms". >= 0.',
        read_by="router",
        ge=0,
    )
    max_word_stats: int = setting(
        "ORCH_ROUTER_MAX_WORD_STATS",
        200_000,
        "Most (word, specialty) statistics the learned policy keeps, all goals together: each "
        "distinct word a request brings makes one per specialty that answered it, about 400 "
        "bytes each (80 MB at the default), so made-up words would otherwise grow the router's "
        "memory and snapshot without end. Past it the goal holding the most lets one of its "
        "own go: words seen once first (oldest first), then the least recently taught. "
        ">= 1000.",
        read_by="router",
        ge=1000,
    )
    max_goals: int = setting(
        "ORCH_ROUTER_MAX_GOALS",
        10_000,
        "Most goals the learned policy keeps what it learned for. Each goal learns on its own "
        "(one goal's outcomes never move another goal's routing); past this many the goal "
        "taught least recently is forgotten and starts again from the keyword guess. About "
        "1 KB a goal besides its word statistics. >= 1.",
        read_by="router",
        ge=1,
    )
    promote_goals: int = setting(
        "ORCH_ROUTER_PROMOTE_GOALS",
        3,
        "Goals that must have learned a request word with an arm (two outcomes or more each) "
        "before what they learned becomes a prior for other goals: the median of their mean "
        "rewards, which a goal's own outcomes then replace (a goal asks only until it has "
        "learned 500 outcomes). One goal's scores never move "
        "another goal's routing below this many; 0 never promotes (each goal learns alone). "
        'Measured in docs/performance.md, "Routing knowledge across goals". 0, or 3 and more '
        "(with two, one of them would move their median half-way).",
        read_by="router",
        ge=0,
    )
    cache_per_goal: int = setting(
        "ORCH_ROUTER_CACHE_PER_GOAL",
        1_000,
        "Most cached answers (response-cache automations) the router keeps for one goal, of "
        "20,000 for all goals: a goal's new answers push out only its own oldest, and past "
        "20,000 (or `ORCH_ROUTER_CACHE_BYTES`) the goal holding the most loses its oldest, so "
        "one goal's distinct requests never make another goal's cache miss. An answer is kept "
        "only for a (goal, signature) with a response cache in force; a tenth as many wait as "
        "candidates for one still to be earned. >= 1.",
        read_by="router",
        ge=1,
    )
    cache_bytes: int = setting(
        "ORCH_ROUTER_CACHE_BYTES",
        64 * 1024 * 1024,
        "Most bytes of answer text the router's answer cache keeps for all goals (in memory "
        "and in each router snapshot), the goal holding the most losing its oldest past it; "
        "candidates take at most a tenth more, and answers of runs still waiting for their "
        "assessment a quarter more (one goal's at most a quarter of that). >= 65536.",
        read_by="router",
        ge=65536,
    )
    cache_answer_bytes: int = setting(
        "ORCH_ROUTER_CACHE_ANSWER_BYTES",
        16 * 1024,
        "Largest answer (UTF-8 bytes of text and meta) the router caches; a larger one is "
        "answered by the LLM every time, so an endpoint that ignores `max_tokens` cannot fill "
        "the cache. >= 1024.",
        read_by="router",
        ge=1024,
    )
    seed: int | None = setting(
        "ORCH_ROUTER_SEED",
        None,
        "Whole number seeding the learned policy's exploration, for repeatable runs; unset, "
        "the seed comes from the system.",
        read_by="router",
    )
    arms: tuple[str, ...] = setting(
        "ORCH_ROUTER_ARMS",
        (),
        "Comma-separated specialties the policy chooses from. The built-in ones are `code`, "
        "`data_analysis`, `math`, `writing`, `research`, `customer_support`, `general`; names "
        "are not checked.",
        read_by="router",
        shown="empty: all built-in specialties",
    )
    model_busy: int = setting(
        "ORCH_ROUTER_MODEL_BUSY",
        0,
        "With several models (`ORCH_LLM_MODELS`): answers in flight on one model, sent by "
        "this router instance, at which the policy chooses among the other models' arms "
        "instead (a slow or saturated model is left out while it is busy; when every model "
        "is, all are offered). The decision's scores name each model left out as "
        "`busy:<model>` with its count. 0 (the default) never leaves one out. Whole number "
        ">= 0.",
        read_by="router",
        ge=0,
    )
    busy_margin: float = setting(
        "ORCH_ROUTER_BUSY_MARGIN",
        1.0,
        "With `ORCH_ROUTER_MODEL_BUSY`: how much of the learned policy's estimated reward a "
        "request may give up to stay off a busy model. The busy model's arms are left out "
        "only when the best arm of a model that is not busy scores within this of the best "
        "busy one on the request (so a request the busy model serves much better still "
        "waits for it); 1 (the default) leaves them out whenever another model is free. "
        'Measured in docs/performance.md, "Load as a signal". >= 0.',
        read_by="router",
        ge=0,
    )
    weights: Weights = setting(
        "ORCH_ROUTER_WEIGHTS",
        Weights(),
        "JSON object of weights that rank agents within the chosen specialty: "
        "`specialty_match` 0.35, `context_relevance` 0.15, `past_performance` 0.2, "
        "`resource_availability` 0.1, `cost_efficiency` 0.1, `user_preference` 0.1. A "
        "criterion left out keeps its weight; unknown criteria and non-numbers are refused.",
        read_by="router",
        shown="unset (the weights below)",
    )
    spawn_timeout: float = setting(
        "ORCH_SPAWN_TIMEOUT",
        30.0,
        "Seconds a request waits for a spawned agent (or the denial) before it fails with "
        "`no_agent`; >= 0.",
        read_by="router",
        ge=0,
    )

    resend_seconds: float = setting(
        "ORCH_ROUTER_RESEND_SECONDS",
        5.0,
        "Seconds after which the router sends a task (or a spawn request) again, under the "
        "same event id, while it has seen neither the budget's decision nor an outcome; "
        "the next sends follow 1, 2, 4, 8, then every 16 times as many seconds later, and "
        "once more right after its deadline. 0 turns it off.",
        read_by="router",
        ge=0,
    )

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        chosen = value.strip().lower()
        if chosen not in ("learned", "static"):
            raise ValueError(f"ORCH_ROUTER_POLICY must be learned or static, got {chosen!r}")
        return chosen

    @field_validator("promote_goals")
    @classmethod
    def _promote_goals(cls, value: int) -> int:
        # Two goals' median is their mean: one of them alone would move it half-way.
        if value in (1, 2):
            raise ValueError(
                f"ORCH_ROUTER_PROMOTE_GOALS must be 0 (never) or at least 3, got {value}"
            )
        return value

    _arms = parsed("arms", comma_list)
    _weights = parsed("weights", lambda text: _weights(text))


def _weights(raw: str) -> Weights:
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ORCH_ROUTER_WEIGHTS is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"ORCH_ROUTER_WEIGHTS must be a JSON object, got {raw!r}")
    unknown = set(values) - set(CRITERIA)
    if unknown:
        raise ValueError(f"ORCH_ROUTER_WEIGHTS: unknown criteria {sorted(unknown)}")
    weights: dict[str, float] = {}
    for k, v in values.items():
        try:
            weights[k] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"ORCH_ROUTER_WEIGHTS[{k!r}] must be a number, got {v!r}") from None
    return Weights(**weights)
