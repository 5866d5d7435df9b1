"""Simulated worlds for learning: request types, hidden quality and costs, played by a fake LLM.

A world is a JSON file (format in ``docs/worlds.md``). It generates the
requests a benchmark sends, and its :meth:`World.responder` answers them as the
fake OpenAI-compatible server: it recognises the request type from the user
message and the specialty from the agent's system prompt, and returns the
hidden quality of that pairing (mean plus noise) in ``x_orchestrator``, with
token usage priced per specialty. The platform never sees the matrix; it only
sees the quality each answer got, as it would from a judge.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local.fake_openai import Responder, Usage
from streams.llm import estimate_tokens
from streams.specialties import PROFILES

__all__ = ["Request", "RequestType", "World", "WorldError"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")
_SLOT = re.compile(r"\{([^{}]*)\}")
_WORD = re.compile(r"[a-z0-9_']+")
_SPAWN_LINE = re.compile(r"^\s*Specialty:\s*([A-Za-z][A-Za-z0-9_ ]*?)\s*$", re.MULTILINE)
_YOU_ARE = re.compile(r"You are an? ([A-Za-z][A-Za-z0-9_ ]*?) specialist", re.IGNORECASE)
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


def _number(value: Any, where: str, low: float, high: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    _require(
        ok and math.isfinite(value) and low <= value <= high,
        where,
        f"want a number in [{low:g}, {high:g}], got {value!r}",
    )
    return float(value)


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
    # Messages this world generated -> their type: the responder's exact lookup.
    _generated: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _templates: tuple[_Template, ...] = field(default=(), compare=False, repr=False)

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
        }
        unknown = sorted(set(data) - known)
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
            _templates=tuple(_compile(t.name, ex) for t in types for ex in t.examples),
        )

    def to_dict(self) -> dict[str, Any]:
        """The world file's content (shares as stored: normalised to sum to 1)."""
        return {
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

    def dump(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out

    # -- the hidden truth ----------------------------------------------------------------

    def best_specialty(self, request_type: str) -> str:
        row = self.quality[request_type]
        return max(self.specialties, key=lambda s: row[s])

    def oracle_reward(self, request_type: str | None = None) -> float:
        """The best mean quality of a type; without a type, the traffic-weighted mean of those."""
        if request_type is not None:
            return max(self.quality[request_type].values())
        return sum(t.share * self.oracle_reward(t.name) for t in self.request_types)

    def mean_quality(self, request_type: str, specialty: str) -> float:
        """A specialty the world does not know serves as badly as its worst one."""
        row = self.quality[request_type]
        return row.get(specialty, min(row.values()))

    def quality_of(self, message: str, specialty: str, seed: int = 0) -> tuple[str, float] | None:
        """The (type, sampled quality) of an answer: the same for the same inputs, every time."""
        request_type = self.identify(message)
        if request_type is None:
            return None
        mean = self.mean_quality(request_type, specialty)
        sample = _stable_rng(self.name, seed, specialty, message).gauss(mean, self.noise)
        return request_type, min(1.0, max(0.0, sample))

    def oracle_quality(self, request: Request, seed: int = 0) -> float:
        """What the type's best specialty scores on this very message (the same noise draw)."""
        best = self.best_specialty(request.request_type)
        judged = self.quality_of(request.message, best, seed)
        return judged[1] if judged else self.quality[request.request_type][best]

    def upper_bound_quality(self, request: Request, seed: int = 0) -> float:
        """The best any choice scores on this very message: the max over every specialty of
        its draw. No router can beat it; the oracle (the type's best on average) can be
        beaten where a message's draw is learnable (a repeated message)."""
        draws = [self.quality_of(request.message, s, seed) for s in self.specialties]
        return max((d[1] for d in draws if d is not None), default=self.oracle_quality(request))

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

    def responder(self, seed: int = 0) -> Responder:
        """A :data:`local.fake_openai.Responder` that plays this world."""

        def respond(request: dict[str, Any]) -> tuple[str, Usage | None, dict[str, str]]:
            messages: Sequence[Mapping[str, Any]] = request.get("messages") or []
            systems = [str(m.get("content") or "") for m in messages if m.get("role") == "system"]
            users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
            user = users[-1] if users else ""
            prompt_tokens = sum(estimate_tokens(str(m.get("content") or "")) for m in messages)
            spawn = _SPAWN_LINE.search(user)
            if spawn is not None:
                # The spawner asks for a system prompt: keep the specialty readable in it.
                asked = "_".join(spawn.group(1).lower().split())
                text = (
                    f"You are a {asked} specialist in the {self.name} world. Answer the"
                    " user's request directly, precisely and within your scope."
                )
                return text, Usage(prompt_tokens, estimate_tokens(text)), {}
            specialty = next((s for s in map(self.specialty_in, systems) if s), None)
            judged = self.quality_of(user, specialty, seed) if specialty else None
            if specialty is None or judged is None:
                # Not an agent answering a request of this world (e.g. a prompt rewrite):
                # answer plainly, keeping any specialty it names identifiable, with no quality.
                named = specialty or self.specialty_in(user)
                text = f"You are a {named} specialist." if named else f"[{self.name}] noted."
                return text, Usage(prompt_tokens, estimate_tokens(text)), {}
            request_type, quality = judged
            text = f"[{specialty}] answer to a {request_type.replace('_', ' ')} request."
            tokens = self.cost.get(specialty, max(self.cost.values()))
            extra = {
                "quality": f"{quality:.4f}",
                "request_type": request_type,
                "specialty": specialty,
                "world": self.name,
            }
            return text, Usage(prompt_tokens, tokens), extra

        return respond

    # -- unseen worlds -------------------------------------------------------------------

    @classmethod
    def random(cls, seed: int) -> World:
        """A valid world nobody tuned for: random types, vocabulary, matrix, costs."""
        rng = _stable_rng("random-world", seed)
        pool = [p for p in PROFILES if p != "general"]
        specialties = sorted(rng.sample(pool, rng.randint(3, 6)))
        n_types = rng.randint(4, 9)
        topics = rng.sample(_TOPIC_WORDS, 3 * n_types)
        request_types = []
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
        return cls.from_dict(
            {
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
        )


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
