"""OpenAI request bodies checked and turned into platform requests; answers in OpenAI's shapes."""

from __future__ import annotations

import json

import pytest

from services.gateway.chat import (
    Limits,
    completion,
    completion_chunks,
    error_body,
    model_list,
    parse_chat,
)
from streams.client import Answer
from streams.errors import InvalidRequest

ANSWER = Answer("run-1", "code_1", "code", "Use a dict.get default.", 0.0012, 40.0, "llm")


def _body(**extra: object) -> dict[str, object]:
    return {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_the_last_user_message_is_the_request_and_the_rest_is_context() -> None:
    chat = parse_chat(
        {
            "model": "specialty/code",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a KeyError?"},
                {"role": "assistant", "content": "A missing key."},
                {"role": "user", "content": [{"type": "text", "text": "And how to avoid it?"}]},
            ],
            "temperature": 0.3,
            "max_tokens": 50,
            "user": "u1",
        }
    )
    assert chat.message == "And how to avoid it?"
    assert chat.context == {
        "specialty": "code",
        "system": "Be brief.",
        "history": "user: What is a KeyError?\nassistant: A missing key.",
    }
    assert (chat.temperature, chat.max_tokens, chat.user) == (0.3, 50, "u1")
    assert not chat.stream


def test_any_other_model_name_lets_the_platform_route() -> None:
    chat = parse_chat(_body(model="gpt-4o-mini"))
    assert chat.model == "gpt-4o-mini" and "specialty" not in chat.context


def test_history_is_bounded_newest_turns_first() -> None:
    turns = [{"role": "user", "content": f"turn {i} " + "x" * 100} for i in range(200)]
    chat = parse_chat({"model": "auto", "messages": turns}, Limits(history_chars=1000))
    history = chat.context["history"]
    assert len(history) <= 1000
    assert history.startswith("(earlier turns omitted)")
    assert "turn 198 " in history and "turn 0 " not in history


def test_a_single_huge_earlier_turn_keeps_its_end() -> None:
    messages = [
        {"role": "user", "content": "a" * 50_000 + "END"},
        {"role": "user", "content": "now"},
    ]
    history = parse_chat({"model": "auto", "messages": messages}).context["history"]
    assert len(history) <= Limits().history_chars and history.endswith("END")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([], "JSON object"),
        ({"messages": []}, "model must be"),
        (_body(model=7), "model must be"),
        (_body(model="specialty/nope"), "unknown model"),
        (_body(model="specialty/code\r\nX-Evil: 1"), "unknown model"),
        ({"model": "auto", "messages": "hi"}, "non-empty list"),
        ({"model": "auto", "messages": [{"role": "user", "content": "a"}] * 300}, "limit is 256"),
        ({"model": "auto", "messages": ["hi"]}, "must be an object"),
        ({"model": "auto", "messages": [{"role": "root", "content": "a"}]}, "role must be"),
        ({"model": "auto", "messages": [{"role": "user", "content": 5}]}, "content must be"),
        (
            {"model": "auto", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "only text parts",
        ),
        (
            {"model": "auto", "messages": [{"role": "assistant", "content": "a"}]},
            "must be the user's",
        ),
        (_body(temperature="hot"), "temperature must be a number"),
        (_body(temperature=3), "between 0 and 2"),
        (_body(temperature=float("nan")), "temperature must be a number"),
        (_body(max_tokens=0), "max_tokens must be"),
        (_body(max_tokens=True), "max_tokens must be"),
        (_body(n=2), "n must be 1"),
        (_body(stream="yes"), "stream must be"),
        (_body(tools=[{"type": "function"}]), "tools is not supported"),
        (_body(user=""), "user, when given"),
        (_body(stream_options=[1]), "stream_options must be"),
    ],
)
def test_a_bad_body_is_refused_naming_the_problem(body: object, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        parse_chat(body)


def test_a_completion_has_openai_fields_and_usage() -> None:
    chat = parse_chat(_body())
    out = completion(chat, ANSWER, now=1000)
    assert out["id"] == "chatcmpl-run-1" and out["object"] == "chat.completion"
    assert out["created"] == 1000 and out["model"] == "specialty/code"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ANSWER.text}
    assert out["choices"][0]["finish_reason"] == "stop"
    usage = out["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_stream_is_role_then_the_whole_text_then_stop_then_done() -> None:
    chat = parse_chat(_body(stream=True, stream_options={"include_usage": True}))
    events = list(completion_chunks(chat, ANSWER, now=5))
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert {(c["object"], c["id"]) for c in chunks} == {("chat.completion.chunk", "chatcmpl-run-1")}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": ANSWER.text}, {}]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_errors_and_models_have_openai_shapes() -> None:
    assert error_body("no", "invalid_request_error", "invalid_api_key") == {
        "error": {
            "message": "no",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    ids = [m["id"] for m in model_list()["data"]]
    assert ids[0] == "auto" and "specialty/code" in ids and "specialty/general" in ids
