"""OpenAI's chat-completion shapes: a request body checked and turned into a platform request,
an answer turned into a ``chat.completion`` or its stream of chunks, errors in OpenAI's shape.

No I/O here. Everything a caller sends is untrusted: each field is checked for its type
and size, and the first problem refuses the request (:class:`~streams.errors.InvalidRequest`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from streams.client import Answer
from streams.errors import InvalidRequest
from streams.specialties import PROFILES

__all__ = [
    "AUTO",
    "ChatRequest",
    "Limits",
    "completion",
    "completion_chunks",
    "error_body",
    "model_list",
    "parse_chat",
]

AUTO = "auto"
_PINNED = "specialty/"
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format")
_OMITTED = "(earlier turns omitted)\n"


@dataclass(frozen=True)
class Limits:
    """How much of a conversation the gateway accepts and passes on."""

    max_messages: int = 256
    history_chars: int = 8000  # earlier turns kept in the request's context, newest first
    system_chars: int = 4000


@dataclass(frozen=True)
class ChatRequest:
    """What the platform is asked: the last user message, with the rest as context."""

    model: str
    message: str
    context: dict[str, str]
    stream: bool
    include_usage: bool
    user: str | None
    temperature: float | None
    max_tokens: int | None


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts: list[str] = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(f"{where}.content[{i}]: only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}.content[{i}].text must be a string")
            parts.append(text)
        return "\n".join(parts)
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts")


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number between {low:g} and {high:g}")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _whole(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{name} must be a whole number >= 1")
    return value


def _model(body: Mapping[str, Any]) -> tuple[str, str | None]:
    """The model as asked and the specialty it pins (None: the platform routes)."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 200:
        raise InvalidRequest("model must be a non-empty string: auto or specialty/<name>")
    model = model.strip()
    if not model.startswith(_PINNED):
        # Any other name (gpt-4o-mini, ...) lets the platform choose, so an app works unchanged.
        return model, None
    name = model.removeprefix(_PINNED)
    if name not in PROFILES:
        raise InvalidRequest(
            f"unknown model {model!r}: use auto or one of "
            + ", ".join(f"{_PINNED}{n}" for n in sorted(PROFILES))
        )
    return model, name


def _history(turns: list[tuple[str, str]], budget: int) -> str:
    """Earlier turns as ``role: text`` lines, newest kept first, within ``budget`` characters."""
    kept: list[str] = []
    used = 0
    for role, text in reversed(turns):
        line = f"{role}: {text}"
        if used + len(line) + 1 > budget:
            remaining = budget - used - len(_OMITTED) - len(role) - 6
            if not kept and remaining > 0:  # the newest turn alone is too long: keep its end
                kept.append(f"{role}: ...{text[-remaining:]}")
            return _OMITTED + "\n".join(reversed(kept))
        kept.append(line)
        used += len(line) + 1
    return "\n".join(reversed(kept))


def parse_chat(body: Any, limits: Limits = Limits()) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body; raise :class:`InvalidRequest` naming the problem."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    model, specialty = _model(body)
    for name in _UNSUPPORTED:
        if body.get(name):
            raise InvalidRequest(f"{name} is not supported by this gateway")
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("n must be 1: the platform gives one answer per request")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user.strip()):
        raise InvalidRequest("user, when given, must be a non-empty string")
    temperature = _number(body, "temperature", 0.0, 2.0)
    max_tokens = _whole(body, "max_tokens") or _whole(body, "max_completion_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages has {len(messages)} items; the limit is {limits.max_messages}"
        )
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, item in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object with role and content")
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(sorted(_ROLES))}")
        text = _text(item.get("content"), where)
        if role in ("system", "developer"):
            system.append(text)
        else:
            turns.append((str(role), text))
    if not turns or turns[-1][0] != "user":
        raise InvalidRequest("the last message (other than system) must be the user's")
    message = turns[-1][1]
    context: dict[str, str] = {}
    if specialty is not None:
        context["specialty"] = specialty
    joined = "\n".join(s for s in system if s.strip())
    if joined:
        context["system"] = joined[: limits.system_chars]
    if len(turns) > 1:
        context["history"] = _history(turns[:-1], limits.history_chars)
    return ChatRequest(
        model=model,
        message=message,
        context=context,
        stream=stream,
        include_usage=bool((options or {}).get("include_usage")),
        user=user,
        temperature=temperature,
        max_tokens=max_tokens,
    )


def _tokens(text: str) -> int:
    # An estimate (about 4 characters a token): the platform's answer event carries cost,
    # not token counts; the usage docs say so.
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _usage(request: ChatRequest, answer: Answer) -> dict[str, int]:
    prompt = _tokens(request.message) + sum(_tokens(v) for v in request.context.values())
    completion_tokens = _tokens(answer.text)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def _id(answer: Answer) -> str:
    return f"chatcmpl-{answer.run_id}"


def completion(request: ChatRequest, answer: Answer, *, now: float | None = None) -> dict[str, Any]:
    """The ``chat.completion`` object of an answer."""
    return {
        "id": _id(answer),
        "object": "chat.completion",
        "created": int(now if now is not None else time.time()),
        "model": f"{_PINNED}{answer.specialty}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": _usage(request, answer),
        "system_fingerprint": f"tier:{answer.degradation_tier}",
    }


def completion_chunks(
    request: ChatRequest, answer: Answer, *, now: float | None = None
) -> Iterator[bytes]:
    """The answer as server-sent events in OpenAI's chunk format, ending with ``[DONE]``.

    The whole answer is one content chunk: the platform hands the gateway a finished
    answer, not tokens.
    """
    base = {
        "id": _id(answer),
        "object": "chat.completion.chunk",
        "created": int(now if now is not None else time.time()),
        "model": f"{_PINNED}{answer.specialty}",
        "system_fingerprint": f"tier:{answer.degradation_tier}",
    }
    deltas: list[tuple[dict[str, str], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": answer.text}, None),
        ({}, "stop"),
    ]
    for delta, finish in deltas:
        chunk = {
            **base,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if request.include_usage:
            chunk["usage"] = None
        yield _event(chunk)
    if request.include_usage:
        yield _event({**base, "choices": [], "usage": _usage(request, answer)})
    yield b"data: [DONE]\n\n"


def _event(payload: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_list(created: int = 0) -> dict[str, Any]:
    """``auto`` and one ``specialty/<name>`` per built-in specialty."""
    names = [AUTO, *(f"{_PINNED}{n}" for n in sorted(PROFILES))]
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "orchestrator"}
            for name in names
        ],
    }
