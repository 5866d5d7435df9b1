"""The LLM endpoint seam: settings, prices, the OpenAI-compatible adapter and an in-memory fake."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import sys
import unicodedata
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Protocol, Self, cast, runtime_checkable

from pydantic import model_validator

from streams.clock import Clock, SystemClock
from streams.errors import OrchestratorError
from streams.settings import EnvSettings, parsed, setting

# openai is imported where it is used: it takes over a second to import, and the fake
# server, the in-memory fake and degraded services never need it.

__all__ = [
    "CLIENT_REQUEST_ID_HEADER",
    "DEFAULT_PRICES",
    "META_FIELD",
    "Completion",
    "InMemoryLLM",
    "LLMCall",
    "LLMClient",
    "LLMError",
    "LLMRejected",
    "LLMSettings",
    "LLMUnavailable",
    "LLMUnsettled",
    "LastCosts",
    "LateOutcome",
    "MAX_META_ENTRIES",
    "MAX_META_KEY_CHARS",
    "MAX_META_VALUE_CHARS",
    "MAX_MODEL_CHARS",
    "MAX_RESPONSE_BYTES",
    "MAX_USAGE_TOKENS",
    "ModelEndpoints",
    "ModelPrice",
    "ModelSpec",
    "OpenAILLM",
    "REDACTED",
    "PriceTable",
    "Reply",
    "cost_usd",
    "create_llm",
    "default_answer",
    "estimate_tokens",
    "parse_models",
    "redact_secrets",
    "worst_case_usd",
]

log = logging.getLogger(__name__)

CLIENT_REQUEST_ID_HEADER = "X-Client-Request-Id"
"""The header a call's own id travels in (OpenAI's name for a caller-chosen request id)."""

META_FIELD = "x_orchestrator"
"""Top-level response field whose string values become :attr:`Completion.meta`."""

# What an endpoint answers is read within these bounds: its answer, model name and meta go
# into Kafka records (the call's cost, the run's answer), which the broker refuses past its
# size limit, and its token counts into prices and Avro longs.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""The most a response body may be, as sent and once inflated (gzip, deflate); a chat
completion is a few KiB. A longer one is refused (:class:`LLMUnavailable`, or for an error
status the error that status calls for)."""
MAX_META_ENTRIES = 16
"""At most this many entries of ``x_orchestrator`` become :attr:`Completion.meta`."""
MAX_META_KEY_CHARS = 64
MAX_META_VALUE_CHARS = 512
"""An ``x_orchestrator`` entry with a longer key or value is left out."""
MAX_MODEL_CHARS = 128
"""The model name an endpoint reports is cut to this many characters."""
MAX_USAGE_TOKENS = 100_000_000
"""Token counts above this (or not whole numbers) are not believed: the call is counted at
its estimate instead, as when an endpoint reports no usage."""

_OPENAI_URL = "https://api.openai.com/v1"
# Local compatible servers ignore the key, but the openai client refuses to start without one.
_PLACEHOLDER_KEY = "not-needed"
# The most of an endpoint's error text an LLMError's message carries.
_MAX_ERROR_CHARS = 2000
# On a polite stop, how long calls given up on at their timeout may still take to answer.
_SETTLE_AT_CLOSE_S = 10.0


class LLMError(OrchestratorError):
    """The LLM endpoint did not produce an answer (base of the LLM failures)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        self.status_code = status_code
        # True when the call goes on after this error and its outcome goes to ``late``.
        self.settling = False
        super().__init__(message)


class LLMUnavailable(LLMError):
    """Not configured, unreachable, timed out, rate limited or 5xx after the retries."""


class LLMRejected(LLMError):
    """The endpoint refused this request (4xx other than 429): retrying cannot help."""


class LLMUnsettled(LLMUnavailable):
    """A call given up on while the endpoint may still bill it: its cost is not known."""


# ---------------------------------------------------------------------------------------
# Prices


@dataclass(frozen=True)
class ModelPrice:
    """USD per one million input (prompt) and output (completion) tokens."""

    input_per_m: float
    output_per_m: float


DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-4o-mini": ModelPrice(0.15, 0.60),
    "gpt-4o": ModelPrice(2.50, 10.00),
    "gpt-4.1": ModelPrice(2.00, 8.00),
    "gpt-4.1-mini": ModelPrice(0.40, 1.60),
    "gpt-4.1-nano": ModelPrice(0.10, 0.40),
    "o3-mini": ModelPrice(1.10, 4.40),
    "gpt-3.5-turbo": ModelPrice(0.50, 1.50),
}
# Unknown models are priced like a large model: over-counting keeps budgets safe,
# under-counting would let a goal overspend.
_DEFAULT_PRICE = ModelPrice(2.50, 10.00)


@dataclass(frozen=True, eq=False)
class PriceTable:
    """Prices by model name; a dated snapshot (``gpt-4o-2024-08-06``) takes its family's price."""

    prices: Mapping[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    default: ModelPrice = _DEFAULT_PRICE

    @classmethod
    def from_json(cls, text: str) -> PriceTable:
        """The built-in table overridden by ``{"model": [in, out] | {"input": x, "output": y}}``.

        The key ``"default"`` replaces the price of unknown models.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"ORCH_LLM_PRICES is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError("ORCH_LLM_PRICES must be a JSON object of model -> price")
        prices = dict(DEFAULT_PRICES)
        default = _DEFAULT_PRICE
        for name, value in raw.items():
            price = _parse_price(name, value)
            if name == "default":
                default = price
            else:
                prices[name] = price
        return cls(prices, default)

    def price(self, model: str) -> ModelPrice:
        found = self.prices.get(model)
        if found is not None:
            return found
        # Longest prefix wins, so "gpt-4o-mini-2024-07-18" is not priced as "gpt-4o".
        family = max((name for name in self.prices if model.startswith(name)), key=len, default="")
        return self.prices[family] if family else self.default

    def cost_usd(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.price(model)
        return (prompt_tokens * price.input_per_m + completion_tokens * price.output_per_m) / 1e6


@dataclass(frozen=True)
class ModelSpec:
    """A model the platform may route to: its name, price and (optionally) its own endpoint."""

    name: str
    price: ModelPrice
    base_url: str | None = None


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}")


def parse_models(text: str) -> tuple[ModelSpec, ...]:
    """``ORCH_LLM_MODELS``: ``name=input/output`` items separated by commas (USD per 1M
    tokens), each optionally followed by ``@base_url``; or a JSON list of
    ``{"name", "input", "output", "base_url"?}`` objects."""
    where = "ORCH_LLM_MODELS"
    text = text.strip()
    if not text:
        return ()
    items: list[tuple[str, object, str | None]] = []
    if text.startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(raw, list):
            raise ValueError(f"{where} must be a JSON list of models")
        for i, entry in enumerate(raw):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError(f"{where}[{i}] must be an object with a string name")
            url = entry.get("base_url")
            if url is not None and not isinstance(url, str):
                raise ValueError(f"{where}[{i}].base_url must be a string")
            unknown = set(entry) - {"name", "input", "output", "base_url"}
            if unknown:
                raise ValueError(f"{where}[{i}] has unknown fields {sorted(unknown)}")
            items.append((entry["name"], [entry.get("input"), entry.get("output")], url))
    else:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, eq, rest = part.partition("=")
            amounts, at, url = rest.partition("@")
            numbers = amounts.split("/")
            if not eq or len(numbers) != 2:
                raise ValueError(
                    f"{where}: {part!r} is not name=input/output[@base_url]"
                    " (USD per 1M tokens, e.g. gpt-4o-mini=0.15/0.60)"
                )
            try:
                pair: object = [float(n) for n in numbers]
            except ValueError:
                raise ValueError(
                    f"{where}: the price of {name.strip()!r} is not two numbers"
                ) from None
            items.append((name.strip(), pair, url.strip() if at else None))
    specs: list[ModelSpec] = []
    for label, cost, url in items:
        if not _MODEL_NAME.fullmatch(label):
            raise ValueError(f"{where}: {label!r} is not a model name")
        if any(s.name == label for s in specs):
            raise ValueError(f"{where}: {label!r} is listed twice")
        if url is not None and not re.match(r"^https?://\S+$", url):
            raise ValueError(f"{where}: the endpoint of {label!r} is not an http(s) URL")
        specs.append(ModelSpec(label, _parse_price(label, cost, where), url))
    return tuple(specs)


def _parse_price(name: str, value: object, where: str = "ORCH_LLM_PRICES") -> ModelPrice:
    if isinstance(value, dict):
        value = [value.get("input"), value.get("output")]
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return ModelPrice(float(value[0]), float(value[1]))
    raise ValueError(
        f"{where}[{name!r}]: want [input, output] or "
        f'{{"input": x, "output": y}} in USD per 1M tokens, got {value!r}'
    )


@lru_cache(maxsize=8)
def _table_for(text: str) -> PriceTable:
    # Cached by the variable's text: cost_usd runs per call, the JSON changes almost never.
    return PriceTable.from_json(text) if text.strip() else PriceTable()


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """Cost of one call with the built-in prices, overridden by ``ORCH_LLM_PRICES``."""
    prices: PriceTable = LLMSettings.read("prices")
    return prices.cost_usd(model, prompt_tokens, completion_tokens)


# ---------------------------------------------------------------------------------------
# Settings


class LLMSettings(EnvSettings):
    """Where the OpenAI-compatible endpoint is and how patiently to call it.

    ``timeout_s`` bounds a whole call; within it the client retries connection
    errors, 429 and 5xx up to ``max_retries`` times with backoff (honouring
    ``Retry-After``).
    """

    title: ClassVar[str] = "LLM endpoint"

    base_url: str | None = setting(
        "OPENAI_BASE_URL",
        None,
        "Base URL of any OpenAI-compatible endpoint; with only `OPENAI_API_KEY` set, "
        "`https://api.openai.com/v1`. With neither set the platform makes no LLM call and runs "
        "degraded. `orchestrator up --fake-llm` sets both for its services, pointing at the "
        "fake.",
        read_by="spawner, loader, improvement; CLI `up` (only to warn)",
    )
    api_key: str | None = setting(
        "OPENAI_API_KEY",
        None,
        "Key sent to the endpoint; with only `OPENAI_BASE_URL` set, the placeholder "
        "`not-needed` is sent.",
        read_by="as above",
    )
    model: str = setting(
        "ORCH_LLM_MODEL",
        "gpt-4o-mini",
        "The platform's model: the spawner gives it to each new agent, the loader uses it for "
        "an agent without one and for a specialty's default agent, the improvement service "
        "rewrites prompts with it (and judges with it unless `ORCH_JUDGE_MODEL` is set).",
        read_by="spawner, loader, improvement",
    )
    timeout_s: float = setting(
        "ORCH_LLM_TIMEOUT",
        30.0,
        "Seconds one call may take, its retries included; must be more than 0. The budget "
        "takes a task's slot back only past its deadline plus this plus 30 s.",
        read_by="spawner, loader, improvement, budget",
        gt=0,
    )
    models: tuple[ModelSpec, ...] = setting(
        "ORCH_LLM_MODELS",
        (),
        "Models the router may choose between, with their prices: "
        "`name=input/output[@base_url]` separated by commas (USD per 1M tokens; a model with "
        "`@base_url` is called at its own OpenAI-compatible endpoint, with the same key), or a "
        'JSON list of `{"name", "input", "output", "base_url"}`. Their prices override '
        "`ORCH_LLM_PRICES`. With two or more, the router learns which (specialty, model) serves "
        "each request best for its goal's cost weight (`orchestrator budget set --cost-weight`)"
        " and the spawner makes agents on the chosen model; unset or one model: every agent "
        "uses `ORCH_LLM_MODEL`.",
        read_by="router, spawner, loader, budget (prices)",
        shown="unset (one model: `ORCH_LLM_MODEL`)",
    )
    settle_s: float = setting(
        "ORCH_LLM_SETTLE_SECONDS",
        120.0,
        "Seconds a loader's answer call may go on after its caller gave up on it at "
        "`ORCH_LLM_TIMEOUT`: the endpoint bills a call it has taken even when nobody waits "
        "for it, so its usage is read and counted when it comes (the run has already had its "
        "timeout answer). Past this the call is counted at its worst case. 0 ends the call at "
        "the timeout (its cost is then not known); >= 0.",
        read_by="loader",
        ge=0,
    )
    max_retries: int = setting(
        "ORCH_LLM_MAX_RETRIES",
        2,
        "Retries of a call after a connection error, 429 or 5xx, with backoff honouring "
        "`Retry-After`; a whole number >= 0.",
        read_by="spawner, loader, improvement",
        ge=0,
    )
    prices: PriceTable = setting(
        "ORCH_LLM_PRICES",
        _table_for(""),
        'JSON object overriding prices in USD per 1M tokens: `{"model": [input, output]}` or '
        '`{"model": {"input": x, "output": y}}`, numbers >= 0. The key `default` prices unknown '
        "models (built in: 2.50 input, 10.00 output). A dated model name takes the price of its "
        "longest known prefix.",
        read_by="spawner, loader, improvement, budget (its dearest price prices every hold)",
        shown="unset (the built-in table, `DEFAULT_PRICES` in `streams/llm.py`)",
    )
    max_tokens: int = setting(
        "ORCH_LLM_MAX_TOKENS",
        512,
        "`max_tokens` of each answer call; the budget holds this many completion tokens of each "
        "task before admitting it. Set it the same for both (`orchestrator up` does). >= 1.",
        read_by="loader, budget",
        ge=1,
    )
    breaker_cooldown_s: float = setting(
        "ORCH_LLM_BREAKER_COOLDOWN_SECONDS",
        15.0,
        "After 3 calls in a row fail as unavailable (e.g. unreachable, timed out, 429 or 5xx), "
        "the loader makes no LLM call for this many seconds and answers from the lower tiers; "
        ">= 0.",
        read_by="loader",
        ge=0,
    )

    _prices = parsed("prices", _table_for)
    _models = parsed("models", parse_models)

    @model_validator(mode="after")
    def _key_is_one_token(self) -> Self:
        # A key with a line break pasted into it went into the Authorization header, whose
        # error quoted it escaped ("\\n"): the exact key was not found to redact, and its
        # part after the break reached the cost events everyone's SQL can read.
        key = self.api_key
        if key is not None and (key != key.strip() or any(ch.isspace() for ch in key)):
            raise ValueError("OPENAI_API_KEY must be one token, without spaces or line breaks")
        if key is not None and any(unicodedata.category(ch)[0] == "C" for ch in key):
            raise ValueError("OPENAI_API_KEY must not hold control characters")
        return self

    @model_validator(mode="after")
    def _model_prices(self) -> Self:
        if self.models:
            merged = {**self.prices.prices, **{m.name: m.price for m in self.models}}
            object.__setattr__(self, "prices", PriceTable(merged, self.prices.default))
        return self

    @classmethod
    def price_table(cls, environ: Mapping[str, str] | None = None) -> PriceTable:
        """The prices from ``ORCH_LLM_PRICES`` and ``ORCH_LLM_MODELS`` alone."""
        source = os.environ if environ is None else environ
        names = ("ORCH_LLM_PRICES", "ORCH_LLM_MODELS")
        prices: PriceTable = cls.from_env({k: source[k] for k in names if k in source}).prices
        return prices

    @property
    def default_model(self) -> str:
        """An agent's model when nothing chose one: ``ORCH_LLM_MODEL`` if offered, else the
        first of ``ORCH_LLM_MODELS``."""
        names = self.model_names
        return self.model if self.model in names else names[0]

    @property
    def model_names(self) -> tuple[str, ...]:
        """The models agents may use: ``ORCH_LLM_MODELS``, or the one ``ORCH_LLM_MODEL``."""
        return tuple(m.name for m in self.models) or (self.model,)

    @property
    def configured(self) -> bool:
        """False when neither a base URL nor a key is set: the platform then runs degraded."""
        return bool(self.base_url or self.api_key)


# ---------------------------------------------------------------------------------------
# The seam


@dataclass(frozen=True)
class Completion:
    """One answer from the endpoint, with what it cost."""

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    raw_finish_reason: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    """Hidden fields a simulated endpoint sends in the response's ``x_orchestrator`` object."""

    def __post_init__(self) -> None:
        # Whichever client made it, what the endpoint said of itself stays small: the model
        # and the meta go on in Kafka records, which have a size limit.
        if len(self.model) > MAX_MODEL_CHARS:
            object.__setattr__(self, "model", self.model[:MAX_MODEL_CHARS])
        object.__setattr__(self, "meta", _bounded_meta(self.meta))


LateOutcome = Callable[["Completion | LLMError"], Awaitable[None]]
"""Told how a call ended that its caller stopped waiting for (see :meth:`LLMClient.complete`)."""


@runtime_checkable
class LLMClient(Protocol):
    """A chat-completion endpoint.

    ``complete`` returns a :class:`Completion` or raises :class:`LLMUnavailable`
    (worth degrading or retrying later) or :class:`LLMRejected` (this request is wrong).
    With ``late``, a call still running at the timeout is not cut off: ``complete``
    raises :class:`LLMUnavailable` at the timeout as usual, and the call goes on (up to
    the settle time); ``late`` then gets its :class:`Completion` (the endpoint billed it),
    its error, or :class:`LLMUnsettled` when it ran out of time as well.
    ``request_id`` goes to the endpoint as ``X-Client-Request-Id`` (OpenAI logs it with
    the request), so what the endpoint billed can be matched to what was counted.
    """

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.7,
        model: str | None = None,
        max_tokens: int | None = None,
        late: LateOutcome | None = None,
        request_id: str | None = None,
    ) -> Completion: ...

    async def aclose(self) -> None: ...


def worst_case_usd(
    prices: PriceTable, model: str, messages: Sequence[Mapping[str, str]], max_tokens: int
) -> float:
    """The most a call can cost: a prompt token per byte (a byte-level tokenizer never does
    worse) plus a few per message, and every one of ``max_tokens`` generated."""
    prompt = sum(len(m.get("content", "").encode("utf-8")) + 8 for m in messages)
    return prices.cost_usd(model, prompt, max_tokens)


class LastCosts:
    """The last paid cost of a kind of call (a model, a purpose), per goal: what a call
    whose own report was lost is counted at. Per goal, so one goal's dear calls never
    raise what another goal is charged; at most ``limit`` (goal, kind) pairs, the least
    recently paid forgotten (then the worst case counts, which is never less)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = max(1, limit)
        self._paid: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._paid)

    def paid(self, goal_id: str | None, kind: str, usd: float) -> None:
        key = (goal_id or "", kind)
        self._paid[key] = usd
        self._paid.move_to_end(key)
        while len(self._paid) > self.limit:
            self._paid.popitem(last=False)

    def get(self, goal_id: str | None, kind: str) -> float | None:
        return self._paid.get((goal_id or "", kind))

    def dump(self) -> list[list[Any]]:
        """Every pair and its cost, least recently paid first (for a snapshot)."""
        return [[goal, kind, usd] for (goal, kind), usd in self._paid.items()]

    def restore(self, rows: list[list[Any]]) -> None:
        """Replace every pair with those of a :meth:`dump`, within the limit."""
        paid: OrderedDict[tuple[str, str], float] = OrderedDict()
        for goal, kind, usd in rows:
            paid[(str(goal), str(kind))] = float(usd)
        while len(paid) > self.limit:
            paid.popitem(last=False)
        self._paid = paid


def estimate_tokens(text: str) -> int:
    """About four characters a token: the usual rule of thumb for English text."""
    return math.ceil(len(text) / 4)


def _estimate_prompt(messages: Sequence[Mapping[str, str]]) -> int:
    return sum(estimate_tokens(m.get("content", "")) for m in messages)


def default_answer(messages: Sequence[Mapping[str, str]], model: str) -> str:
    """A deterministic answer that shows which model, system prompt and question produced it."""
    system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
    question = next(
        (m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), ""
    )
    # crc32, not hash(): the answer must be the same in every process.
    persona = f" (system {zlib.crc32(system.encode()):08x})" if system else ""
    return f"[{model}]{persona} answer to: {question[:80]}"


class OpenAILLM:
    """The real adapter: any OpenAI-compatible endpoint through ``openai.AsyncOpenAI``."""

    def __init__(self, settings: LLMSettings, clock: Clock | None = None) -> None:
        if not settings.configured:
            raise LLMUnavailable("no LLM endpoint configured (OPENAI_BASE_URL / OPENAI_API_KEY)")
        import openai

        self.settings = settings
        self._clock = clock or SystemClock()
        self._settling: set[asyncio.Task[None]] = set()
        self._client = openai.AsyncOpenAI(
            base_url=settings.base_url or _OPENAI_URL,
            api_key=settings.api_key or _PLACEHOLDER_KEY,
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
            # The client the openai package would make, each body it reads bounded: the
            # answer, an error's body, a redirect's (see _bound_body).
            http_client=openai.DefaultAsyncHttpxClient(
                timeout=settings.timeout_s,
                headers={"Accept-Encoding": _ACCEPTED_ENCODINGS},
                event_hooks={"response": [_bound_body]},
            ),
        )

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.7,
        model: str | None = None,
        max_tokens: int | None = None,
        late: LateOutcome | None = None,
        request_id: str | None = None,
    ) -> Completion:
        import httpx
        import openai

        wanted = model or self.settings.model
        body: dict[str, Any] = {"model": wanted, "messages": messages, "temperature": temperature}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        headers = {} if request_id is None else {CLIENT_REQUEST_ID_HEADER: request_id}
        started = self._clock.monotonic()
        timeout_s = self.settings.timeout_s
        if self.settings.settle_s <= 0:
            late = None
        settle_s = self.settings.settle_s if late is not None else 0.0
        # The client's own timeout is per attempt; the bound below covers the retries too,
        # so a caller waits about timeout_s at most, whatever the endpoint does.
        bound = timeout_s + settle_s

        def finish(response: Any) -> Completion:
            return self._completion(response, messages, wanted, started)

        # The client's own request path (its retries, timeouts, auth and error types), but
        # the body as it is and the answer read as JSON: chat.completions.create walks the
        # parameters through its type transforms and builds typed models of the answer,
        # 2.3 ms of CPU a call here against 1.1 ms this way (docs/performance.md).
        call = asyncio.ensure_future(
            self._within(
                bound,
                self._client.post(
                    "/chat/completions",
                    cast_to=httpx.Response,
                    body=body,
                    options={"timeout": bound, "headers": headers},
                ),
            )
        )
        try:
            if late is None:
                response = await call
            else:
                response = await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except asyncio.CancelledError:
            if late is not None and not call.cancelled():
                # The caller is going away; the call may still be paid: count it when it ends.
                self._settle_later(call, late, finish)
            raise
        except TimeoutError as exc:
            if late is None:
                raise self._failure(exc) from None
            if call.done():
                # It answered in the same moment the caller gave up (a process paused past
                # its timeout finds both ready when it resumes): the paid answer is here.
                try:
                    response = call.result()
                except (TimeoutError, openai.OpenAIError) as inner:
                    raise self._failure(inner) from None
            else:
                # Given up on, not cut off: the endpoint may have taken the call and bills
                # it whether or not anybody reads the answer; its usage is read when it comes.
                self._settle_later(call, late, finish)
                failure = self._failure(exc)
                failure.settling = True
                raise failure from None
        except openai.OpenAIError as exc:
            # Not chained: the endpoint's own error may echo the key, and a chained
            # cause would carry it into any traceback that is logged.
            raise self._failure(exc) from None
        return finish(response)

    def _settle_later(
        self, call: asyncio.Future[Any], late: LateOutcome, finish: Callable[[Any], Completion]
    ) -> None:
        """Tell ``late`` how ``call`` ends (``finish`` reads its response)."""
        reporter = asyncio.create_task(self._report_late(call, late, finish))
        self._settling.add(reporter)
        reporter.add_done_callback(self._settling.discard)

    @staticmethod
    async def _within(seconds: float, call: Awaitable[Any]) -> Any:
        async with asyncio.timeout(seconds):
            return await call

    async def _report_late(
        self, call: asyncio.Future[Any], late: LateOutcome, finish: Callable[[Any], Completion]
    ) -> None:
        import openai

        outcome: Completion | LLMError
        try:
            outcome = finish(await call)
        except TimeoutError:
            outcome = LLMUnsettled(
                f"LLM call still unanswered {self.settings.timeout_s + self.settings.settle_s:g} s"
                " after it was sent; whether the endpoint billed it is not known"
            )
        except asyncio.CancelledError:
            call.cancel()
            log.warning(
                "an LLM call given up on at its timeout was abandoned at shutdown;"
                " its cost is not counted"
            )
            raise
        except (openai.OpenAIError, LLMError) as exc:
            outcome = exc if isinstance(exc, LLMError) else self._failure(exc)
        try:
            await late(outcome)
        except Exception:
            log.exception("reporting a late LLM call failed")

    def _completion(
        self, response: Any, messages: list[dict[str, str]], wanted: str, started: float
    ) -> Completion:
        latency_ms = max(0.0, (self._clock.monotonic() - started) * 1000.0)
        data = _answer_body(response)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise LLMUnavailable("LLM endpoint answered without choices")
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise LLMUnavailable("LLM endpoint answered unusably: the message is not text")
        text = content or ""
        model = data.get("model")
        # The name it gives is recorded (cut short), not priced: a call costs what the model
        # asked for costs, whatever cheaper name the endpoint claims.
        answered_by = model[:MAX_MODEL_CHARS] if isinstance(model, str) and model else wanted
        usage = data.get("usage")
        counts = (
            (usage.get("prompt_tokens"), usage.get("completion_tokens"))
            if isinstance(usage, dict)
            else (None, None)
        )
        if all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_USAGE_TOKENS
            for n in counts
        ):
            prompt_tokens, completion_tokens = cast("tuple[int, int]", counts)
        else:
            # Some compatible servers omit usage; an estimate keeps budgets counting. So do
            # counts no call has (a priced 1e20 tokens overflows the cost record's fields).
            prompt_tokens = _estimate_prompt(messages)
            completion_tokens = estimate_tokens(text)
        return Completion(
            text=text,
            model=answered_by,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=self.settings.prices.cost_usd(wanted, prompt_tokens, completion_tokens),
            latency_ms=latency_ms,
            raw_finish_reason=_text_or_none(choice.get("finish_reason")),
            meta=_meta(data),
        )

    async def aclose(self) -> None:
        if self._settling:
            # Calls given up on may still answer: a moment to learn what they cost.
            await asyncio.wait(set(self._settling), timeout=_SETTLE_AT_CLOSE_S)
            for reporter in set(self._settling):
                reporter.cancel()
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self._client.close()

    def _failure(self, exc: BaseException) -> LLMError:
        """The error a failed call raises; its message has no key in it (see redact_secrets)."""
        import openai

        def scrubbed(text: str) -> str:
            # The key is replaced everywhere first (the body is bounded at 8 MiB; a cut
            # first let a copy straddling it move into what was kept, no longer whole),
            # then the text is cut, then searched for anything else key-like.
            key = self.settings.api_key or ""
            if len(key) >= _MIN_SECRET_CHARS:
                text = text.replace(key, REDACTED)
            return redact_secrets(text[: _MAX_ERROR_CHARS + 512])[:_MAX_ERROR_CHARS]

        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            message = scrubbed(f"LLM endpoint answered HTTP {status}: {exc.message}")
            # 408 and 429 are the endpoint's capacity, not the request's fault.
            if status in (408, 429) or status >= 500:
                return LLMUnavailable(message, status_code=status)
            return LLMRejected(message, status_code=status)
        if isinstance(exc, TimeoutError | openai.APITimeoutError):
            return LLMUnavailable(f"LLM endpoint timed out after {self.settings.timeout_s:g} s")
        if isinstance(exc, openai.APIConnectionError):
            return LLMUnavailable(scrubbed(f"LLM endpoint unreachable: {exc.__cause__ or exc}"))
        return LLMUnavailable(scrubbed(f"LLM endpoint answered unusably: {exc}"))


REDACTED = "[redacted]"
# A configured key shorter than this is not searched for by value: replacing every
# occurrence of a short string would mangle the message. Real keys are far longer.
_MIN_SECRET_CHARS = 8
_CREDENTIAL_PATTERNS = (
    # An Authorization header or field, whatever its scheme: `Authorization: Bearer x`,
    # `'authorization': 'Basic x'`, `Authorization=x`.
    re.compile(
        r"""(?i)(\bauthorization["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?[^\s"',;}&]+"""
    ),
    # A bearer token on its own.
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9\-._~+/]+=*"),
    # api_key=x, api-key: x, "apiKey": "x", x-api-key: x, key=x in a query string.
    re.compile(r"""(?i)(\b(?:x-)?api[_-]?key["']?\s*[:=]\s*["']?)[^\s"',;}&]+"""),
    re.compile(r"(?i)([?&]key=)[^\s&\"']+"),
    # OpenAI-style secret keys, also partly masked ones (`sk-proj-abc***wxyz`).
    re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}"),
)


def redact_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``secrets`` and anything that looks like a credential replaced.

    For error texts that leave the process (events, logs): an endpoint's error body
    may echo the key it was sent.
    """
    for secret in sorted({s for s in secrets if len(s) >= _MIN_SECRET_CHARS}, key=len)[::-1]:
        text = text.replace(secret, REDACTED)
    for pattern in _CREDENTIAL_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


def _answer_body(response: Any) -> dict[str, Any]:
    """The JSON object an endpoint answered with; LLMUnavailable for anything else."""
    try:
        data = json.loads(response.content)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: arrays or objects nested deeper than the parser goes.
        raise LLMUnavailable("LLM endpoint answered unusably: the body is not JSON") from None
    if not isinstance(data, dict):
        raise LLMUnavailable("LLM endpoint answered unusably: the body is not a JSON object")
    return data


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _meta(extra: Mapping[str, Any] | None) -> dict[str, str]:
    hidden = (extra or {}).get(META_FIELD)
    if not isinstance(hidden, dict):
        return {}
    return _bounded_meta(hidden)


def _bounded_meta(hidden: Mapping[Any, Any]) -> dict[str, str]:
    """The first :data:`MAX_META_ENTRIES` entries of ``hidden`` with a text key and a text
    (or number) value within :data:`MAX_META_KEY_CHARS` and :data:`MAX_META_VALUE_CHARS`."""
    kept: dict[str, str] = {}
    for key, value in hidden.items():
        if len(kept) >= MAX_META_ENTRIES:
            break
        if isinstance(value, float) or (isinstance(value, int) and value.bit_length() <= 1024):
            # A number as its text (a longer whole number would not fit anyway).
            value = str(value)
        if (
            isinstance(key, str)
            and isinstance(value, str)
            and 0 < len(key) <= MAX_META_KEY_CHARS
            and len(value) <= MAX_META_VALUE_CHARS
        ):
            kept[key] = value
    return kept


# Only what _BoundedBody can measure once inflated: a server may not answer in another.
_ACCEPTED_ENCODINGS = "gzip, deflate"
_INFLATED_BY_CLIENT = ("gzip", "deflate", "br", "zstd")
_INFLATE_STEP = 1 << 20


async def _bound_body(response: Any) -> None:
    """An httpx response hook, run before the body is read: the client reads it through a
    :class:`_BoundedBody`, inside its own retries and timeouts."""
    # The stream must be an AsyncByteStream of the package the response comes from
    # (httpx2 for openai >= 3, httpx before).
    base = sys.modules[type(response).__module__.partition(".")[0]].AsyncByteStream
    bounded = _bounded_stream_type(base)
    response.stream = bounded(response.stream, response.status_code, response.headers)


@lru_cache(maxsize=4)
def _bounded_stream_type(base: type) -> type[_BoundedBody]:
    return cast("type[_BoundedBody]", type("BoundedBody", (_BoundedBody, base), {}))


class _BoundedBody:
    """A response body read no further than :data:`MAX_RESPONSE_BYTES`, as sent (whatever its
    Content-Length says) or once inflated.

    An answer (2xx) past the limit is refused: :class:`LLMUnavailable`, as any 200 that is
    not a chat completion. Any other body (an error's, a redirect's) just ends at the limit:
    its status is what counts, and the client retries it or not as ever. A body in an
    encoding not asked for, or that does not inflate, is refused with the error its status
    calls for (as :meth:`OpenAILLM._failure` classifies it).
    """

    def __init__(self, inner: Any, status: int, headers: Mapping[str, str]) -> None:
        self._inner = inner
        self._status = status
        self._answer = 200 <= status < 300
        declared = str(headers.get("content-length") or "").strip()
        self._declared = int(declared) if declared.isdigit() else None
        codings = str(headers.get("content-encoding") or "").lower().split(",")
        self._codings = [c.strip() for c in codings if c.strip() in _INFLATED_BY_CLIENT]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        limit = MAX_RESPONSE_BYTES
        if self._answer and self._declared is not None and self._declared > limit:
            raise self._refused(f"it declares {self._declared} bytes")
        inflate = self._inflater()
        sent = inflated = 0
        chunks = self._inner.__aiter__()
        try:
            async for chunk in chunks:
                sent += len(chunk)
                if inflate is not None:
                    inflated += inflate(chunk, limit - inflated)
                if sent > limit or inflated > limit:
                    if self._answer:
                        how = "were read" if inflated <= limit else f"inflated to over {limit}"
                        raise self._refused(f"{sent} bytes {how} before it was cut off")
                    if inflate is None:
                        yield chunk[: len(chunk) - (sent - limit)]
                    return
                yield chunk
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()

    def _inflater(self) -> Callable[[bytes, int], int] | None:
        """None for a body the client does not inflate, else a function of the next piece
        sent and the room left, that tells how many bytes that piece inflates to."""
        if not self._codings:
            return None
        coding = self._codings[0]
        if len(self._codings) > 1 or coding not in ("gzip", "deflate"):
            encoded = ", ".join(self._codings)
            raise self._refused(
                f"it is encoded as {encoded}, not {_ACCEPTED_ENCODINGS}", size=False
            )
        window = zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS
        inflater = zlib.decompressobj(window)
        first = True

        def inflate(chunk: bytes, room: int) -> int:
            nonlocal inflater, first
            was_first, first = first, False
            try:
                return _inflated_size(inflater, chunk, room)
            except zlib.error:
                if not (was_first and coding == "deflate"):
                    raise self._refused(f"it does not inflate as {coding}", size=False) from None
            # "deflate" may come without its zlib header: as the client does, inflate it raw
            # when its first piece does not inflate (and refuse it if that fails too).
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            return inflate(chunk, room)

        return inflate

    async def aclose(self) -> None:
        await self._inner.aclose()

    def _refused(self, why: str, *, size: bool = True) -> LLMError:
        status = self._status
        what = f"over the limit of {MAX_RESPONSE_BYTES} bytes" if size else "unreadable"
        if self._answer:
            return LLMUnavailable(f"LLM endpoint answered unusably: the body is {what}: {why}")
        message = f"LLM endpoint answered HTTP {status} with a body {what}: {why}"
        if 400 <= status < 500 and status not in (408, 429):
            return LLMRejected(message, status_code=status)
        return LLMUnavailable(message, status_code=status if status >= 400 else None)


def _inflated_size(inflater: Any, data: bytes, room: int) -> int:
    """How many bytes ``data`` inflates to through ``inflater``, counted in steps and not
    kept; counting stops once past ``room``."""
    total = 0
    while True:
        piece = inflater.decompress(data, _INFLATE_STEP)
        total += len(piece)
        data = inflater.unconsumed_tail
        if total > room or (not data and len(piece) < _INFLATE_STEP):
            return total


# ---------------------------------------------------------------------------------------
# In-memory fake

Reply = str | tuple[str, Mapping[str, str]]
"""What a scripted or computed in-memory reply is: the text, optionally with meta."""


@dataclass(frozen=True)
class LLMCall:
    """One call an :class:`InMemoryLLM` received."""

    messages: list[dict[str, str]]
    temperature: float
    model: str
    max_tokens: int | None
    request_id: str | None = None


class InMemoryLLM:
    """An :class:`LLMClient` without a network, for unit tests.

    ``replies`` is a script (texts, ``(text, meta)`` pairs or :class:`LLMError`
    instances to raise, consumed in order) or a function of the messages; by default
    it answers :func:`default_answer`. Tokens are estimated from text length.
    """

    def __init__(
        self,
        replies: Iterable[Reply | LLMError] | Callable[[list[dict[str, str]]], Reply] | None = None,
        *,
        model: str = "gpt-4o-mini",
        fail_times: int = 0,
        delay_s: float = 0.0,
        prices: PriceTable | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._script: list[Reply | LLMError] | None = None
        self._function: Callable[[list[dict[str, str]]], Reply] | None = None
        if callable(replies):
            self._function = replies
        elif replies is not None:
            self._script = list(replies)
        self.model = model
        self.delay_s = delay_s
        self.calls: list[LLMCall] = []
        self.closed = False
        self._fail_times = fail_times
        self._prices = prices or PriceTable()
        self._clock = clock or SystemClock()

    def fail_next(self, times: int) -> None:
        """Raise :class:`LLMUnavailable` on the next ``times`` calls."""
        self._fail_times = times

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.7,
        model: str | None = None,
        max_tokens: int | None = None,
        late: LateOutcome | None = None,
        request_id: str | None = None,
    ) -> Completion:
        # No timeout of its own: nothing is ever given up on, so ``late`` is never called.
        if self.closed:
            raise RuntimeError("InMemoryLLM used after aclose()")
        wanted = model or self.model
        self.calls.append(
            LLMCall([dict(m) for m in messages], temperature, wanted, max_tokens, request_id)
        )
        started = self._clock.monotonic()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self._fail_times > 0:
            self._fail_times -= 1
            raise LLMUnavailable("InMemoryLLM: configured failure")
        reply = self._next_reply(messages, wanted)
        text, meta = (reply, {}) if isinstance(reply, str) else (reply[0], dict(reply[1]))
        prompt_tokens = _estimate_prompt(messages)
        completion_tokens = estimate_tokens(text)
        if max_tokens is not None and completion_tokens > max_tokens:
            text = text[: max_tokens * 4]
            completion_tokens = max_tokens
            finish = "length"
        else:
            finish = "stop"
        return Completion(
            text=text,
            model=wanted,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=self._prices.cost_usd(wanted, prompt_tokens, completion_tokens),
            latency_ms=max(0.0, (self._clock.monotonic() - started) * 1000.0),
            raw_finish_reason=finish,
            meta=meta,
        )

    def _next_reply(self, messages: list[dict[str, str]], model: str) -> Reply:
        if self._function is not None:
            return self._function(messages)
        if self._script is None:
            return default_answer(messages, model)
        if not self._script:
            # A test that runs out of script has a wrong expectation; say so loudly.
            raise RuntimeError(f"InMemoryLLM: no scripted reply left for call {len(self.calls)}")
        reply = self._script.pop(0)
        if isinstance(reply, LLMError):
            raise reply
        return reply

    async def aclose(self) -> None:
        self.closed = True


def create_llm(settings: LLMSettings | None = None, clock: Clock | None = None) -> LLMClient | None:
    """The configured endpoint, or None when none is configured (the platform then degrades)."""
    settings = settings or LLMSettings.from_env()
    if not settings.configured:
        return None
    default = OpenAILLM(settings, clock)
    own = {
        m.name: OpenAILLM(settings.model_copy(update={"base_url": m.base_url}), clock)
        for m in settings.models
        if m.base_url
    }
    return ModelEndpoints(default, own) if own else default


class ModelEndpoints:
    """Calls each model with an endpoint of its own (``ORCH_LLM_MODELS``) there, the others at
    the platform's endpoint."""

    def __init__(self, default: LLMClient, by_model: Mapping[str, LLMClient]) -> None:
        self.default = default
        self.by_model = dict(by_model)

    async def complete(self, messages: list[dict[str, str]], **options: Any) -> Completion:
        client = self.by_model.get(options.get("model") or "", self.default)
        return await client.complete(messages, **options)

    async def aclose(self) -> None:
        for client in (self.default, *self.by_model.values()):
            await client.aclose()
