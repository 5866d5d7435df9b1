"""Simulated worlds for learning: request types, hidden quality and costs, played by a fake LLM.

A world is a JSON file (format in ``docs/worlds.md``). It generates the
requests a benchmark sends, and its :meth:`World.responder` answers them as the
fake OpenAI-compatible server: it recognises the request type from the user
message, the specialty from the agent's system prompt and the model from the
request, and returns the hidden quality of that pairing (mean plus noise) in
``x_orchestrator``, with token usage per specialty and model. It also plays the
platform's LLM judge, grading an answer from its true quality with some noise.
The platform never sees the matrix; it only sees the quality each answer got
(or a judge's grade of it).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local.fake_openai import Responder, Usage
from streams.llm import estimate_tokens
from streams.specialties import PROFILES

__all__ = ["Arm", "Drift", "Model", "Request", "RequestType", "World", "WorldError"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")
# Model names as providers spell them ("gpt-4o-mini", "meta/llama-3.1-8b"); no "]" or space,
# so an answer's "[specialty @ model]" tag stays readable.
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$")
_SLOT = re.compile(r"\{([^{}]*)\}")
_WORD = re.compile(r"[a-z0-9_']+")
_SPAWN_LINE = re.compile(r"^\s*Specialty:\s*([A-Za-z][A-Za-z0-9_ ]*?)\s*$", re.MULTILINE)
_YOU_ARE = re.compile(r"You are an? ([A-Za-z][A-Za-z0-9_ ]*?) specialist", re.IGNORECASE)
# The tag the world's agents put first in an answer: "[code] ..." or "[code @ small] ...".
_ANSWER_TAG = re.compile(
    r"\[([a-z][a-z0-9_]*)(?: @ ([A-Za-z0-9][A-Za-z0-9._:/-]{0,99}))?\] answer to "
)
# What services/improvement/assess.py (judge_messages) sends to its judge.
_JUDGE_SYSTEM = "You grade answers"
# The improvement service asking for one instruction from a user's feedback.
_INSTRUCTION_SYSTEM = "You turn user feedback"
_SCORE_LINE = re.compile(r"^Score: ([1-5])/5$", re.MULTILINE)
# What the world's LLM writes from a poor rating: a style instruction, as a model would.
_INSTRUCTION = "Answer the question directly and check each step before you reply."
_JUDGE_REQUEST = "Request:\n"
_JUDGE_ANSWER = "\n\nAnswer:\n"
_JUDGE_COMPLETION_TOKENS = 2
_JUDGE_UNSURE = "5"
# How many answers the responder remembers the request index of, for its judge.
_REMEMBERED_ANSWERS = 100_000
# Below this share of its words found in a type's templates, a message is not that type.
_MIN_SIMILARITY = 0.5


class WorldError(ValueError):
    """A world file that does not describe a valid world; the message says where."""


@dataclass(frozen=True)
class RequestType:
    """A kind of request: message templates and its share of the traffic (normalised)."""

    name: str
    examples: tuple[str, ...]
    share: float


@dataclass(frozen=True)
class Request:
    """One generated request; ``repeat`` when it is an earlier message sent again."""

    message: str
    request_type: str
    repeat: bool = False


@dataclass(frozen=True)
class Model:
    """A model agents may run on: USD per 1M input and output tokens, an additive quality
    delta per request type (missing types: 0) and a factor on the specialty's completion
    tokens."""

    name: str
    input_per_m: float
    output_per_m: float
    quality: Mapping[str, float] = field(default_factory=dict)
    tokens: float = 1.0


@dataclass(frozen=True)
class Drift:
    """From request ``after`` on, these matrix cells and model deltas replace earlier ones."""

    after: int
    quality: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    models: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Arm:
    """A (specialty, model) choice: its quality and what one answer costs in USD."""

    specialty: str
    model: str | None
    quality: float
    cost_usd: float

    def reward(self, cost_weight: float) -> float:
        """``quality - cost_weight * cost_usd``: ``cost_weight`` is quality given up per USD."""
        return self.quality - cost_weight * self.cost_usd


@dataclass(frozen=True)
class _Phase:
    """The matrix and the model deltas in force between two drift points."""

    quality: Mapping[str, Mapping[str, float]]
    deltas: Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class _Template:
    request_type: str
    text: str
    pattern: re.Pattern[str]
    vocabulary: frozenset[str]


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _compile(request_type: str, text: str) -> _Template:
    parts: list[str] = []
    vocabulary = _words(_SLOT.sub(" ", text))
    last = 0
    for slot in _SLOT.finditer(text):
        parts.append(re.escape(text[last : slot.start()]))
        inner = slot.group(1)
        if inner == "#":
            parts.append(r"\d+")
        else:
            options = inner.split("|")
            parts.append("(?:" + "|".join(re.escape(o) for o in options) + ")")
            for option in options:
                vocabulary |= _words(option)
        last = slot.end()
    parts.append(re.escape(text[last:]))
    return _Template(request_type, text, re.compile("".join(parts) + r"\Z"), frozenset(vocabulary))


def _fill(template: str, rng: random.Random) -> str:
    def pick(slot: re.Match[str]) -> str:
        inner: str = slot.group(1)
        if inner == "#":
            return str(rng.randint(100, 99_999))
        return rng.choice(inner.split("|"))

    return _SLOT.sub(pick, template)


def _stable_rng(*parts: object) -> random.Random:
    """A generator that depends only on ``parts``, in every process and Python run."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _require(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise WorldError(f"{where}: {problem}")


def _shown(value: Any) -> str:
    """``repr`` for an error message, short even for a hostile value."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value: Any, where: str, low: float, high: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(value) and low <= value <= high
    except OverflowError:  # an int too large for a float
        ok = False
    _require(ok, where, f"want a number in [{low:g}, {high:g}], got {_shown(value)}")
    return float(value)


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


def _object(value: Any, where: str, what: str, known: set[str] | None = None) -> dict[str, Any]:
    """``value`` as a JSON object (with only ``known`` keys, when given)."""
    _require(isinstance(value, dict), where, f"want {what}, got {_shown(value)}")
    if known is not None:
        unknown = sorted(str(k) for k in set(value) - known)
        _require(not unknown, where, f"unknown field(s) {', '.join(unknown)}")
    return dict(value)


def _deltas(value: Any, where: str, types: Sequence[str]) -> dict[str, float]:
    """A model's quality adjustment: request type -> additive delta in [-1, 1]."""
    raw = _object(value, where, "request type -> quality delta")
    out: dict[str, float] = {}
    for t, delta in raw.items():
        _require(t in types, f"{where}.{t}", f"not a request type of this world ({list(types)})")
        out[t] = _number(delta, f"{where}.{t}", -1.0, 1.0)
    return out


def _parse_models(value: Any, where: str, types: Sequence[str]) -> dict[str, Model]:
    raw = _object(value, where, "model name -> {price, quality, tokens}")
    models: dict[str, Model] = {}
    for name, spec in raw.items():
        at = f"{where}.{name}"
        _require(
            bool(_MODEL.match(name)) and name != "default",
            at,
            "not a model name (letters, digits, . _ : / -; not 'default', which"
            " ORCH_LLM_PRICES keeps for unknown models)",
        )
        spec = _object(
            spec, at, "an object with price, quality, tokens", {"price", "quality", "tokens"}
        )
        price = spec.get("price")
        if not (isinstance(price, list) and len(price) == 2):
            raise WorldError(
                f"{at}.price: want [input, output] USD per 1M tokens, got {_shown(price)}"
            )
        tokens = _number(spec.get("tokens", 1.0), f"{at}.tokens", 0.0, 100.0)
        _require(tokens > 0, f"{at}.tokens", "must be positive")
        models[name] = Model(
            name=name,
            input_per_m=_number(price[0], f"{at}.price[0]", 0.0, 1e6),
            output_per_m=_number(price[1], f"{at}.price[1]", 0.0, 1e6),
            quality=_deltas(spec.get("quality", {}), f"{at}.quality", types),
            tokens=tokens,
        )
    return models


def _parse_drift(
    value: Any,
    where: str,
    types: Sequence[str],
    specialties: Sequence[str],
    models: Mapping[str, Model],
) -> tuple[Drift, ...]:
    _require(isinstance(value, list), where, "want a list of {after, quality, models}")
    out: list[Drift] = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        entry = _object(
            entry, at, "an object with after, quality, models", {"after", "quality", "models"}
        )
        after = entry.get("after")
        if not (isinstance(after, int) and not isinstance(after, bool) and 1 <= after <= 10**12):
            raise WorldError(
                f"{at}.after: want a whole number of requests (at least 1), got {_shown(after)}"
            )
        if out:
            _require(
                after > out[-1].after,
                f"{at}.after",
                f"must be larger than the entry before's ({out[-1].after})",
            )
        cells: dict[str, dict[str, float]] = {}
        for t, row in _object(
            entry.get("quality", {}), f"{at}.quality", "type -> specialty -> mean"
        ).items():
            _require(
                t in types, f"{at}.quality.{t}", f"not a request type of this world ({list(types)})"
            )
            row = _object(row, f"{at}.quality.{t}", "specialty -> mean")
            for s, mean in row.items():
                _require(
                    s in specialties,
                    f"{at}.quality.{t}.{s}",
                    f"not a specialty of this world ({list(specialties)})",
                )
                cells.setdefault(t, {})[s] = _number(mean, f"{at}.quality.{t}.{s}", 0.0, 1.0)
        changed: dict[str, dict[str, float]] = {}
        for m, spec in _object(
            entry.get("models", {}), f"{at}.models", "model -> {quality}"
        ).items():
            _require(m in models, f"{at}.models.{m}", f"not a model of this world ({list(models)})")
            spec = _object(spec, f"{at}.models.{m}", "an object with quality", {"quality"})
            changed[m] = _deltas(spec.get("quality", {}), f"{at}.models.{m}.quality", types)
        _require(
            any(cells.values()) or any(changed.values()),
            at,
            "changes nothing: give quality cells and/or model quality deltas",
        )
        out.append(Drift(after, cells, changed))
    return tuple(out)


def _model_dict(model: Model) -> dict[str, Any]:
    out: dict[str, Any] = {"price": [model.input_per_m, model.output_per_m]}
    if model.quality:
        out["quality"] = dict(model.quality)
    if model.tokens != 1.0:
        out["tokens"] = model.tokens
    return out


def _drift_dict(change: Drift) -> dict[str, Any]:
    out: dict[str, Any] = {"after": change.after}
    if change.quality:
        out["quality"] = {t: dict(row) for t, row in change.quality.items()}
    if change.models:
        out["models"] = {m: {"quality": dict(row)} for m, row in change.models.items()}
    return out


@dataclass(frozen=True)
class World:
    """A simulated world; build it with :meth:`load`, :meth:`from_dict` or :meth:`random`."""

    name: str
    description: str
    specialties: tuple[str, ...]
    request_types: tuple[RequestType, ...]
    quality: Mapping[str, Mapping[str, float]]
    noise: float
    cost: Mapping[str, int]
    feedback_probability: float
    repetition: float
    models: Mapping[str, Model] = field(default_factory=dict)
    drift: tuple[Drift, ...] = ()
    judge_noise: float = 0.1
    judge_bias: float = 0.0
    # Messages this world generated -> their type: the responder's exact lookup.
    _generated: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _templates: tuple[_Template, ...] = field(default=(), compare=False, repr=False)
    # The matrix and model deltas before the first drift point, then after each one.
    _phases: tuple[_Phase, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        quality = {t: dict(row) for t, row in self.quality.items()}
        deltas = {m: dict(model.quality) for m, model in self.models.items()}
        phases = [_Phase(quality, deltas)]
        for change in self.drift:
            quality = {t: {**row, **change.quality.get(t, {})} for t, row in quality.items()}
            deltas = {m: {**row, **change.models.get(m, {})} for m, row in deltas.items()}
            phases.append(_Phase(quality, deltas))
        object.__setattr__(self, "_phases", tuple(phases))

    # -- building -----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> World:
        """Read and validate a world file."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise WorldError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "world") -> World:
        """Validate a parsed world; every problem names the field it is in."""
        _require(isinstance(data, dict), where, "a world is a JSON object")
        known = {
            "name",
            "description",
            "specialties",
            "request_types",
            "quality",
            "noise",
            "cost",
            "feedback_probability",
            "repetition",
            "models",
            "drift",
            "judge",
        }
        unknown = sorted(str(k) for k in set(data) - known)
        _require(not unknown, where, f"unknown field(s) {', '.join(unknown)}")
        name = data.get("name")
        _require(
            isinstance(name, str) and bool(_NAME.match(name)),
            f"{where}.name",
            f"want a lowercase name, got {name!r}",
        )
        specialties = data.get("specialties")
        _require(
            isinstance(specialties, list) and len(specialties) >= 2,
            f"{where}.specialties",
            "want a list of at least two names",
        )
        for s in specialties:
            _require(
                isinstance(s, str) and bool(_NAME.match(s)) and "-" not in s,
                f"{where}.specialties",
                f"{s!r} is not a specialty name (lowercase, digits, _)",
            )
        _require(len(set(specialties)) == len(specialties), f"{where}.specialties", "names repeat")
        raw_types = data.get("request_types")
        _require(
            isinstance(raw_types, list) and bool(raw_types),
            f"{where}.request_types",
            "want a non-empty list",
        )
        types: list[RequestType] = []
        for i, rt in enumerate(raw_types):
            at = f"{where}.request_types[{i}]"
            _require(isinstance(rt, dict), at, "want an object with name, examples, share")
            rt_name = rt.get("name")
            _require(
                isinstance(rt_name, str) and bool(_NAME.match(rt_name)),
                f"{at}.name",
                f"want a lowercase name, got {rt_name!r}",
            )
            examples = rt.get("examples")
            _require(
                isinstance(examples, list) and bool(examples),
                f"{at}.examples",
                "want a non-empty list of templates",
            )
            for ex in examples:
                _require(
                    isinstance(ex, str) and bool(ex.strip()),
                    f"{at}.examples",
                    f"{ex!r} is not a template",
                )
                for slot in _SLOT.findall(ex):
                    ok = slot == "#" or ("|" in slot and all(o.strip() for o in slot.split("|")))
                    _require(
                        ok, f"{at}.examples", f"slot {{{slot}}} in {ex!r}: use {{#}} or {{a|b|...}}"
                    )
            share = _number(rt.get("share"), f"{at}.share", 0.0, 1e9)
            _require(share > 0, f"{at}.share", "must be positive")
            types.append(RequestType(rt_name, tuple(examples), share))
        names = [t.name for t in types]
        _require(len(set(names)) == len(names), f"{where}.request_types", "names repeat")
        total = sum(t.share for t in types)
        if abs(total - 1.0) > 1e-9:  # shares already normalised stay bit for bit the same
            types = [RequestType(t.name, t.examples, t.share / total) for t in types]
        raw_quality = data.get("quality")
        _require(
            isinstance(raw_quality, dict),
            f"{where}.quality",
            "want request type -> specialty -> mean",
        )
        _require(
            set(raw_quality) == set(names),
            f"{where}.quality",
            f"want exactly the request types {names}",
        )
        quality: dict[str, dict[str, float]] = {}
        for t in names:
            row = raw_quality[t]
            _require(
                isinstance(row, dict) and set(row) == set(specialties),
                f"{where}.quality.{t}",
                f"want a mean for exactly the specialties {specialties}",
            )
            quality[t] = {
                s: _number(row[s], f"{where}.quality.{t}.{s}", 0.0, 1.0) for s in specialties
            }
        raw_cost = data.get("cost")
        _require(
            isinstance(raw_cost, dict) and set(raw_cost) == set(specialties),
            f"{where}.cost",
            f"want completion tokens for exactly the specialties {specialties}",
        )
        cost: dict[str, int] = {}
        for s in specialties:
            tokens = raw_cost[s]
            _require(
                isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0,
                f"{where}.cost.{s}",
                f"want a positive whole number of tokens, got {tokens!r}",
            )
            cost[s] = tokens
        description = data.get("description", "")
        _require(isinstance(description, str), f"{where}.description", "want a string")
        models = _parse_models(data.get("models", {}), f"{where}.models", names)
        drift = _parse_drift(data.get("drift", []), f"{where}.drift", names, specialties, models)
        judge = _object(data.get("judge", {}), f"{where}.judge", "{noise, bias}", {"noise", "bias"})
        return cls(
            name=name,
            description=description,
            specialties=tuple(specialties),
            request_types=tuple(types),
            quality=quality,
            noise=_number(data.get("noise", 0.0), f"{where}.noise", 0.0, 1.0),
            cost=cost,
            feedback_probability=_number(
                data.get("feedback_probability", 0.0), f"{where}.feedback_probability", 0.0, 1.0
            ),
            repetition=_number(data.get("repetition", 0.0), f"{where}.repetition", 0.0, 0.95),
            models=models,
            drift=drift,
            judge_noise=_number(judge.get("noise", 0.1), f"{where}.judge.noise", 0.0, 1.0),
            judge_bias=_number(judge.get("bias", 0.0), f"{where}.judge.bias", -1.0, 1.0),
            _templates=tuple(_compile(t.name, ex) for t in types for ex in t.examples),
        )

    def to_dict(self) -> dict[str, Any]:
        """The world file's content (shares as stored: normalised to sum to 1)."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "specialties": list(self.specialties),
            "request_types": [
                {"name": t.name, "examples": list(t.examples), "share": t.share}
                for t in self.request_types
            ],
            "quality": {t: dict(row) for t, row in self.quality.items()},
            "noise": self.noise,
            "cost": dict(self.cost),
            "feedback_probability": self.feedback_probability,
            "repetition": self.repetition,
        }
        # Absent parts stay absent: a world of the first format writes the same file as before.
        if self.models:
            out["models"] = {m: _model_dict(model) for m, model in self.models.items()}
        if self.drift:
            out["drift"] = [_drift_dict(change) for change in self.drift]
        if (self.judge_noise, self.judge_bias) != (0.1, 0.0):
            out["judge"] = {"noise": self.judge_noise, "bias": self.judge_bias}
        return out

    def dump(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out

    # -- the hidden truth ----------------------------------------------------------------

    def phase_at(self, request_index: int) -> int:
        """How many drift entries are in force at the 0-based ``request_index`` (0: none)."""
        if request_index < 0:
            raise ValueError(f"request_index must be at least 0, got {request_index}")
        return bisect.bisect_right([change.after for change in self.drift], request_index)

    def _phase(self, request_index: int | None) -> _Phase:
        return self._phases[0 if request_index is None else self.phase_at(request_index)]

    def _listed(self, model: str | None) -> str | None:
        """``model`` if this world lists it; any other model answers as the matrix says."""
        return model if isinstance(model, str) and model in self.models else None

    def best_specialty(
        self, request_type: str, *, model: str | None = None, request_index: int | None = None
    ) -> str:
        """The specialty with the best mean on a type (first listed among equals)."""
        return max(
            self.specialties,
            key=lambda s: self.mean_quality(
                request_type, s, model=model, request_index=request_index
            ),
        )

    def oracle_reward(
        self,
        request_type: str | None = None,
        *,
        model: str | None = None,
        request_index: int | None = None,
    ) -> float:
        """The best mean quality of a type; without a type, the traffic-weighted mean of those."""
        if request_type is not None:
            return max(
                self.mean_quality(request_type, s, model=model, request_index=request_index)
                for s in self.specialties
            )
        return sum(
            t.share * self.oracle_reward(t.name, model=model, request_index=request_index)
            for t in self.request_types
        )

    def mean_quality(
        self,
        request_type: str,
        specialty: str,
        *,
        model: str | None = None,
        request_index: int | None = None,
    ) -> float:
        """The matrix cell (in the phase of ``request_index``; None: before any drift) plus a
        listed model's delta for the type, clipped to [0, 1]. A specialty the world does not
        know serves as badly as its worst one; a model it does not list gets no delta."""
        phase = self._phase(request_index)
        row = phase.quality[request_type]
        mean = row.get(specialty, min(row.values()))
        listed = self._listed(model)
        if listed is None:
            return mean
        return _clip(mean + phase.deltas[listed].get(request_type, 0.0))

    def quality_of(
        self,
        message: str,
        specialty: str,
        seed: int = 0,
        *,
        model: str | None = None,
        request_index: int | None = None,
    ) -> tuple[str, float] | None:
        """The (type, sampled quality) of an answer: the same for the same inputs, every time.

        The noise is drawn per (world, seed, specialty, listed model, message); drift moves
        the mean, not the draw."""
        request_type = self.identify(message)
        if request_type is None:
            return None
        mean = self.mean_quality(request_type, specialty, model=model, request_index=request_index)
        listed = self._listed(model)
        # Without a listed model, the draw of the first format, bit for bit.
        parts = (seed, specialty, message) if listed is None else (seed, specialty, listed, message)
        sample = _stable_rng(self.name, *parts).gauss(mean, self.noise)
        return request_type, _clip(sample)

    def oracle_quality(
        self,
        request: Request,
        seed: int = 0,
        *,
        model: str | None = None,
        request_index: int | None = None,
    ) -> float:
        """What the type's best specialty scores on this very message (the same noise draw)."""
        best = self.best_specialty(request.request_type, model=model, request_index=request_index)
        judged = self.quality_of(
            request.message, best, seed, model=model, request_index=request_index
        )
        if judged is not None:
            return judged[1]
        return self.mean_quality(
            request.request_type, best, model=model, request_index=request_index
        )

    def upper_bound_quality(
        self,
        request: Request,
        seed: int = 0,
        *,
        model: str | None = None,
        request_index: int | None = None,
    ) -> float:
        """The best any choice scores on this very message: the max over every specialty of
        its draw. No router can beat it; the oracle (the type's best on average) can be
        beaten where a message's draw is learnable (a repeated message)."""
        draws = [
            self.quality_of(request.message, s, seed, model=model, request_index=request_index)
            for s in self.specialties
        ]
        return max(
            (d[1] for d in draws if d is not None),
            default=self.oracle_quality(request, seed, model=model, request_index=request_index),
        )

    # -- models and cost -----------------------------------------------------------------

    def strongest_model(self) -> str:
        """The dearest listed model (output price, then input): "always the strong model"."""
        return self._by_price(max)

    def cheapest_model(self) -> str:
        """The cheapest listed model (output price, then input)."""
        return self._by_price(min)

    def _by_price(self, pick: Any) -> str:
        if not self.models:
            raise ValueError(f"world {self.name} lists no models")
        chosen: str = pick(
            self.models, key=lambda m: (self.models[m].output_per_m, self.models[m].input_per_m)
        )
        return chosen

    def model_prices(self) -> dict[str, list[float]]:
        """``{model: [input, output]}`` USD per 1M tokens: ``json.dumps`` of it is the
        platform's ``ORCH_LLM_PRICES`` for this world (empty without models)."""
        return {m: [model.input_per_m, model.output_per_m] for m, model in self.models.items()}

    def answer_tokens(self, specialty: str, *, model: str | None = None) -> int:
        """Completion tokens of an answer: the specialty's ``cost`` times a listed model's
        ``tokens`` (at least 1); an unknown specialty writes as much as the wordiest."""
        tokens = self.cost.get(specialty, max(self.cost.values()))
        listed = self._listed(model)
        if listed is None:
            return tokens
        return max(1, round(tokens * self.models[listed].tokens))

    def answer_cost_usd(self, message: str, specialty: str, *, model: str | None = None) -> float:
        """What one answer costs at a listed model's price (0 for a model the world does not
        price); the prompt is the world's agent prompt plus ``message``, as the responder
        counts it."""
        listed = self._listed(model)
        if listed is None:
            return 0.0
        price = self.models[listed]
        prompt = estimate_tokens(self._agent_prompt(specialty)) + estimate_tokens(message)
        completion = self.answer_tokens(specialty, model=listed)
        return (prompt * price.input_per_m + completion * price.output_per_m) / 1e6

    def best_arm(
        self,
        request_type: str,
        *,
        cost_weight: float = 0.0,
        message: str | None = None,
        request_index: int | None = None,
    ) -> Arm:
        """The (specialty, model) with the best mean ``quality - cost_weight * cost_usd`` on a
        type; ``cost_weight`` is the quality one USD is worth giving up. Every listed model
        is tried (a world without models: model None, cost 0). The cost is that of
        ``message``, or of a typical message of the type."""
        if not (math.isfinite(cost_weight) and cost_weight >= 0):
            raise ValueError(f"cost_weight must be a finite number >= 0, got {cost_weight!r}")
        if request_type not in self.quality:
            raise KeyError(request_type)
        text = message if message is not None else self._typical_message(request_type)
        models: Sequence[str | None] = list(self.models) or [None]
        arms = [
            Arm(
                specialty,
                model,
                self.mean_quality(
                    request_type, specialty, model=model, request_index=request_index
                ),
                self.answer_cost_usd(text, specialty, model=model),
            )
            for specialty in self.specialties
            for model in models
        ]
        return max(arms, key=lambda arm: arm.reward(cost_weight))

    def oracle_score(
        self,
        request: Request,
        seed: int = 0,
        *,
        cost_weight: float = 0.0,
        request_index: int | None = None,
    ) -> float:
        """The oracle's reward on this very message in the phase of ``request_index``:
        :meth:`oracle_arm`'s ``quality - cost_weight * cost`` on a world with models, else
        :meth:`oracle_quality` (no model to choose, no cost in the reward)."""
        if self.models:
            arm = self.oracle_arm(
                request, seed, cost_weight=cost_weight, request_index=request_index
            )
            return arm.reward(cost_weight)
        return self.oracle_quality(request, seed, request_index=request_index)

    def oracle_arm(
        self,
        request: Request,
        seed: int = 0,
        *,
        cost_weight: float = 0.0,
        request_index: int | None = None,
    ) -> Arm:
        """The type's :meth:`best_arm` scored on this very message: its quality is the draw
        that arm gets (like :meth:`oracle_quality`), its cost that of this message."""
        arm = self.best_arm(
            request.request_type,
            cost_weight=cost_weight,
            message=request.message,
            request_index=request_index,
        )
        judged = self.quality_of(
            request.message, arm.specialty, seed, model=arm.model, request_index=request_index
        )
        if judged is None:
            return arm
        return Arm(arm.specialty, arm.model, judged[1], arm.cost_usd)

    def strong_arm(
        self, request: Request, seed: int = 0, *, request_index: int | None = None
    ) -> Arm:
        """ "Always the strong model": the type's best specialty on the dearest model, scored
        on this very message, at this message's cost (the RouteLLM comparison's baseline)."""
        strong = self.strongest_model()
        best = self.best_specialty(request.request_type, model=strong, request_index=request_index)
        judged = self.quality_of(
            request.message, best, seed, model=strong, request_index=request_index
        )
        cost = self.answer_cost_usd(request.message, best, model=strong)
        return Arm(best, strong, judged[1] if judged else 0.0, cost)

    def judge_grade(
        self,
        message: str,
        specialty: str,
        seed: int = 0,
        *,
        model: str | None = None,
        request_index: int | None = None,
    ) -> int | None:
        """The 1-10 grade the world's judge gives an answer: ``round(1 + 9 * clip(quality +
        judge_bias + N(0, judge_noise)))``, drawn per (world, seed, message, specialty,
        listed model); None for a message of no known type."""
        judged = self.quality_of(message, specialty, seed, model=model, request_index=request_index)
        if judged is None:
            return None
        rng = _stable_rng(self.name, seed, "judge", message, specialty, self._listed(model))
        seen = judged[1] + self.judge_bias + rng.gauss(0.0, self.judge_noise)
        return round(1 + 9 * _clip(seen))

    def _typical_message(self, request_type: str) -> str:
        examples = next(t.examples for t in self.request_types if t.name == request_type)
        return _fill(examples[0], _stable_rng(self.name, "typical", request_type))

    def _agent_prompt(self, specialty: str) -> str:
        """The system prompt the world writes for a new agent: it names the specialty."""
        return (
            f"You are a {specialty} specialist in the {self.name} world. Answer the"
            " user's request directly, precisely and within your scope."
        )

    def feedback_score(self, run_key: str, quality: float, seed: int = 0) -> int | None:
        """The 1-5 score a user gives (quality with a little doubt), or None for no feedback."""
        rng = _stable_rng(self.name, seed, "feedback", run_key)
        if rng.random() >= self.feedback_probability:
            return None
        return max(1, min(5, round(1 + 4 * quality + rng.gauss(0.0, 0.3))))

    # -- traffic -------------------------------------------------------------------------

    def sample_requests(self, n: int, seed: int = 0) -> list[Request]:
        """``n`` requests, the same list for the same seed; a ``repetition`` share repeats."""
        rng = _stable_rng(self.name, seed, "requests")
        weights = [t.share for t in self.request_types]
        out: list[Request] = []
        fresh: list[Request] = []
        for _ in range(n):
            if fresh and rng.random() < self.repetition:
                earlier = rng.choice(fresh)
                out.append(Request(earlier.message, earlier.request_type, repeat=True))
                continue
            rt = rng.choices(self.request_types, weights)[0]
            message = _fill(rng.choice(rt.examples), rng)
            self._generated.setdefault(message, rt.name)
            request = Request(message, rt.name)
            fresh.append(request)
            out.append(request)
        return out

    def identify(self, message: str) -> str | None:
        """The request type of a message: generated, matching a template, or similar to one."""
        known = self._generated.get(message)
        if known is not None:
            return known
        text = message.strip()
        for template in self._templates:
            if template.pattern.match(text):
                return template.request_type
        words = _words(text)
        if not words:
            return None
        best, score = None, 0.0
        for template in self._templates:
            overlap = len(words & template.vocabulary) / len(words)
            if overlap > score:
                best, score = template.request_type, overlap
        return best if score >= _MIN_SIMILARITY else None

    def specialty_in(self, text: str) -> str | None:
        """The specialty a prompt names ("You are a X specialist" or "Specialty: X")."""
        for pattern in (_SPAWN_LINE, _YOU_ARE):
            for found in pattern.finditer(text):
                name = "_".join(found.group(1).lower().split())
                if name in self.specialties or name in PROFILES:
                    return name
        return None

    # -- the fake LLM --------------------------------------------------------------------

    def responder(
        self,
        seed: int = 0,
        *,
        reveal_quality: bool = True,
        request_index: Callable[[], int] | None = None,
    ) -> Responder:
        """A :data:`local.fake_openai.Responder` that plays this world.

        It counts the answers it gives a quality (not spawn, judge or other calls): the
        count before an answer is that answer's request index, which decides its drift
        phase. ``request_index``, when given, says instead which request is being answered
        (a caller sending one request at a time knows; answers served from a cache never
        reach the model and would otherwise hold the world's clock back).
        ``reveal_quality`` False leaves ``quality`` out of ``x_orchestrator``, so the
        platform has to judge answers as it would a real model's (the world plays the
        judge too)."""
        lock = threading.Lock()
        answered = 0
        # (message, specialty, listed model) -> request index of its latest answer, so the
        # judge grades an answer in the phase it was given in.
        answered_at: dict[tuple[str, str, str | None], int] = {}

        def respond(request: dict[str, Any]) -> tuple[str, Usage | None, dict[str, str]]:
            nonlocal answered
            raw = request.get("messages")
            messages = [m for m in raw if isinstance(m, dict)] if isinstance(raw, list) else []
            systems = [str(m.get("content") or "") for m in messages if m.get("role") == "system"]
            users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
            user = users[-1] if users else ""
            prompt_tokens = sum(estimate_tokens(str(m.get("content") or "")) for m in messages)
            if any(s.lstrip().startswith(_JUDGE_SYSTEM) for s in systems):
                grade = _JUDGE_UNSURE
                found = self._judged_answer(user)
                if found is not None:
                    with lock:
                        index = answered_at.get(found, answered)
                    message, answerer, by = found
                    graded = self.judge_grade(
                        message, answerer, seed, model=by, request_index=index
                    )
                    grade = _JUDGE_UNSURE if graded is None else str(graded)
                return grade, Usage(prompt_tokens, _JUDGE_COMPLETION_TOKENS), {}
            if any(s.lstrip().startswith(_INSTRUCTION_SYSTEM) for s in systems):
                # A rating of 3 or more asks for nothing; a poorer one for more care.
                rated = _SCORE_LINE.search(user)
                text = _INSTRUCTION if rated is None or int(rated.group(1)) <= 2 else "NONE"
                return text, Usage(prompt_tokens, estimate_tokens(text)), {}
            spawn = _SPAWN_LINE.search(user)
            if spawn is not None:
                # The spawner asks for a system prompt: keep the specialty readable in it.
                text = self._agent_prompt("_".join(spawn.group(1).lower().split()))
                return text, Usage(prompt_tokens, estimate_tokens(text)), {}
            specialty = next((s for s in map(self.specialty_in, systems) if s), None)
            request_type = self.identify(user) if specialty else None
            if specialty is None or request_type is None:
                # Not an agent answering a request of this world (e.g. a prompt rewrite):
                # answer plainly, keeping any specialty it names identifiable, with no quality.
                named = specialty or self.specialty_in(user)
                text = f"You are a {named} specialist." if named else f"[{self.name}] noted."
                return text, Usage(prompt_tokens, estimate_tokens(text)), {}
            asked = request.get("model")
            model = self._listed(asked if isinstance(asked, str) else None)
            with lock:
                index = answered if request_index is None else request_index()
                answered += 1
                answered_at.pop((user, specialty, model), None)
                answered_at[(user, specialty, model)] = index
                if len(answered_at) > _REMEMBERED_ANSWERS:
                    del answered_at[next(iter(answered_at))]
            judged = self.quality_of(user, specialty, seed, model=model, request_index=index)
            quality = judged[1] if judged is not None else 0.0
            who = specialty if model is None else f"{specialty} @ {model}"
            text = f"[{who}] answer to a {request_type.replace('_', ' ')} request."
            extra = {
                "quality": f"{quality:.4f}",
                "request_type": request_type,
                "specialty": specialty,
                "world": self.name,
            }
            if not reveal_quality:
                del extra["quality"]
            if model is not None:
                extra["model"] = model
            if self.drift:
                extra["phase"] = str(self.phase_at(index))
            return text, Usage(prompt_tokens, self.answer_tokens(specialty, model=model)), extra

        return respond

    def _judged_answer(self, user: str) -> tuple[str, str, str | None] | None:
        """(request message, specialty, listed model) from a judge's user message holding
        ``Request:\\n...\\n\\nAnswer:\\n...`` and an answer of this world; None when either
        cannot be read."""
        if not user.startswith(_JUDGE_REQUEST):
            return None
        message, found, answer = user[len(_JUDGE_REQUEST) :].rpartition(_JUDGE_ANSWER)
        tag = _ANSWER_TAG.search(answer) if found else None
        if tag is None:
            return None
        specialty, model = tag.group(1), tag.group(2)
        if specialty not in self.specialties and specialty not in PROFILES:
            return None
        return message, specialty, self._listed(model)

    # -- unseen worlds -------------------------------------------------------------------

    @classmethod
    def random(cls, seed: int, models: int = 0, drift: bool = False) -> World:
        """A valid world nobody tuned for: random types, vocabulary, matrix, costs.

        ``models=2`` adds a cheap model (``small``) and a strong one (``large``, the matrix
        as is): the cheap one is within 0.05 of the strong on about half the types and 0.2
        to 0.4 worse on the others. ``drift`` adds one drift point between request 600 and
        1200 at which the busiest type's best specialty changes. Either one draws from its
        own generator and renames the world; ``World.random(seed)`` is the world it always
        was."""
        if models not in (0, 2):
            raise ValueError(f"models must be 0 or 2, got {models!r}")
        rng = _stable_rng("random-world", seed)
        pool = [p for p in PROFILES if p != "general"]
        specialties = sorted(rng.sample(pool, rng.randint(3, 6)))
        n_types = rng.randint(4, 9)
        topics = rng.sample(_TOPIC_WORDS, 3 * n_types)
        request_types: list[dict[str, Any]] = []
        quality: dict[str, dict[str, float]] = {}
        for i in range(n_types):
            words = topics[3 * i : 3 * i + 3]
            # A keyword of some specialty, right or wrong: what the static router goes by.
            lure = rng.choice(sorted(PROFILES[rng.choice(specialties)].keywords))
            frames = rng.sample(_FRAMES, 3)
            examples = [
                f.format(a=words[0], b=words[1], c=words[2], k=lure, alt=f"{{{words[2]}|{lure}}}")
                for f in frames
            ]
            name = f"{words[0]}_{words[1]}"
            request_types.append(
                {"name": name, "examples": examples, "share": round(rng.uniform(0.5, 2.0), 3)}
            )
            best = rng.choice(specialties)
            top = rng.uniform(0.65, 0.95)
            quality[name] = {
                s: round(top if s == best else rng.uniform(0.1, top - 0.15), 3) for s in specialties
            }
        data: dict[str, Any] = {
            "name": f"random-{seed}",
            "description": f"An unseen random world (seed {seed}).",
            "specialties": specialties,
            "request_types": request_types,
            "quality": quality,
            "noise": round(rng.uniform(0.05, 0.2), 3),
            "cost": {s: rng.randint(100, 600) for s in specialties},
            "feedback_probability": round(rng.uniform(0.0, 0.2), 3),
            "repetition": round(rng.uniform(0.0, 0.3), 3),
        }
        names = [str(t["name"]) for t in request_types]
        if models:
            more = _stable_rng("random-world", seed, "models")
            easy = set(more.sample(names, more.choice([n_types // 2, (n_types + 1) // 2])))
            deltas = {
                t: -round(more.uniform(0.005, 0.05) if t in easy else more.uniform(0.2, 0.4), 3)
                for t in names
            }
            data["models"] = {
                "small": {
                    "price": [0.15, 0.6],
                    "quality": deltas,
                    "tokens": round(more.uniform(0.8, 1.0), 2),
                },
                "large": {"price": [2.5, 10.0]},
            }
            data["name"] += "-2m"
            data["description"] += (
                f" Two models: small is cheap and nearly as good on {len(easy)} of"
                f" {n_types} types, much worse on the rest."
            )
        if drift:
            more = _stable_rng("random-world", seed, "drift")
            busiest = max(request_types, key=lambda t: t["share"])["name"]
            row = quality[busiest]
            old = max(specialties, key=lambda s: row[s])
            new = more.choice([s for s in specialties if s != old])
            after = more.randint(600, 1200)
            dropped = round(max(0.05, row[old] - more.uniform(0.2, 0.4)), 3)
            data["drift"] = [{"after": after, "quality": {busiest: {new: row[old], old: dropped}}}]
            data["name"] += "-drift"
            data["description"] += f" From request {after} on, {new} serves {busiest} best."
        return cls.from_dict(data)


# Neutral nouns (no specialty keyword among them) for random worlds' request vocabulary.
_TOPIC_WORDS = (
    "anchor beacon canyon dolphin ember falcon glacier hammock igloo jasmine kettle lagoon"
    " meadow nectar oyster prairie quiver rafter summit tundra umbrella valley willow zephyr"
    " almond bramble cobalt dune easel fjord gazebo harbor ivory juniper kayak lantern"
    " marble nutmeg orchard pebble quartz ribbon saddle thistle urchin velvet walnut yarrow"
    " acorn basalt cedar delta estuary fern granite heron iris jetty kelp lichen"
).split()
# Sentence frames: {a} {b} {c} are a type's topic words, {k} a specialty keyword, {alt} a choice.
_FRAMES = (
    "I need {k} advice on the {a} {b} near the {c}, case {{#}}",
    "Our {a} {b} broke again after the {alt}; what now?",
    "Quick {k} question about {a} {b} and {c}",
    "Tell me about the {a} {b} with {alt}, ticket {{#}}",
    "The {b} {a} needs {k} attention before the {c} {{#}}",
    "Describe {a} {b} {c} for a newcomer",
    "{k}: {a} {b} {alt} issue {{#}}",
)
