"""The LLM seam without a network: settings from env, the price table, the in-memory fake."""

from __future__ import annotations

import pytest

from streams.clock import FakeClock
from streams.errors import OrchestratorError
from streams.events import LlmCallCompleted
from streams.llm import (
    Completion,
    InMemoryLLM,
    LLMClient,
    LLMError,
    LLMRejected,
    LLMSettings,
    LLMUnavailable,
    ModelEndpoints,
    ModelPrice,
    OpenAILLM,
    PriceTable,
    cost_usd,
    create_llm,
    default_answer,
    estimate_tokens,
    redact_secrets,
)

_ENV_VARS = (
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "ORCH_LLM_MODEL",
    "ORCH_LLM_TIMEOUT",
    "ORCH_LLM_MAX_RETRIES",
    "ORCH_LLM_PRICES",
)
ASK = [
    {"role": "system", "content": "You are a billing specialist."},
    {"role": "user", "content": "Why was I charged twice this month?"},
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# -- settings ----------------------------------------------------------------------------


def test_settings_defaults_when_nothing_is_set() -> None:
    settings = LLMSettings.from_env()
    assert settings.base_url is None and settings.api_key is None
    assert settings.model == "gpt-4o-mini"
    assert settings.timeout_s == 30.0
    assert settings.max_retries == 2
    assert settings.configured is False


def test_settings_read_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8199/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ORCH_LLM_MODEL", "gpt-4.1-mini")
    monkeypatch.setenv("ORCH_LLM_TIMEOUT", "2.5")
    monkeypatch.setenv("ORCH_LLM_MAX_RETRIES", "0")
    settings = LLMSettings.from_env()
    assert settings.base_url == "http://127.0.0.1:8199/v1"
    assert settings.api_key == "sk-test"
    assert settings.model == "gpt-4.1-mini"
    assert settings.timeout_s == 2.5
    assert settings.max_retries == 0
    assert settings.configured is True


@pytest.mark.parametrize(
    ("env", "configured"),
    [
        ({"OPENAI_BASE_URL": "http://localhost:11434/v1"}, True),
        ({"OPENAI_API_KEY": "sk-x"}, True),
        ({"OPENAI_BASE_URL": "  ", "OPENAI_API_KEY": ""}, False),
    ],
)
def test_configured_needs_a_base_url_or_a_key(env: dict[str, str], configured: bool) -> None:
    assert LLMSettings.from_env(env).configured is configured


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ORCH_LLM_TIMEOUT", "soon"),
        ("ORCH_LLM_TIMEOUT", "-1"),
        ("ORCH_LLM_TIMEOUT", "0"),
        ("ORCH_LLM_MAX_RETRIES", "1.5"),
        ("ORCH_LLM_PRICES", "{not json"),
        ("ORCH_LLM_PRICES", '{"gpt-4o": [1]}'),
        ("ORCH_LLM_PRICES", '{"gpt-4o": {"input": -1, "output": 2}}'),
        ("ORCH_LLM_PRICES", "[1, 2]"),
    ],
)
def test_bad_settings_fail_fast_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        LLMSettings.from_env({name: value})


# -- prices ------------------------------------------------------------------------------


def test_cost_of_a_known_model() -> None:
    # gpt-4o-mini: 0.15 USD per 1M prompt tokens, 0.60 per 1M completion tokens.
    assert cost_usd("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)
    assert cost_usd("gpt-4o-mini", 1000, 500) == pytest.approx(0.00015 + 0.0003)


def test_dated_snapshot_takes_the_longest_matching_family() -> None:
    table = PriceTable()
    assert table.price("gpt-4o-mini-2024-07-18") == ModelPrice(0.15, 0.60)
    assert table.price("gpt-4o-2024-08-06") == ModelPrice(2.50, 10.00)


def test_unknown_model_is_priced_high_not_free() -> None:
    assert cost_usd("llama3:8b", 1_000_000, 1_000_000) == pytest.approx(2.50 + 10.00)


def test_env_overrides_and_adds_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ORCH_LLM_PRICES",
        '{"gpt-4o-mini": [1, 2], "llama3": {"input": 0, "output": 0}, "default": [5, 7]}',
    )
    assert cost_usd("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert cost_usd("llama3:8b", 1_000_000, 1_000_000) == 0.0
    assert cost_usd("mystery", 1_000_000, 1_000_000) == pytest.approx(12.0)
    # Untouched entries keep their built-in price.
    assert cost_usd("gpt-4o", 1_000_000, 0) == pytest.approx(2.50)
    assert LLMSettings.from_env().prices.price("llama3") == ModelPrice(0.0, 0.0)


# -- errors ------------------------------------------------------------------------------


def test_error_tree() -> None:
    assert issubclass(LLMUnavailable, LLMError) and issubclass(LLMRejected, LLMError)
    assert issubclass(LLMError, OrchestratorError)
    assert LLMRejected("bad", status_code=400).status_code == 400


# -- the in-memory fake -------------------------------------------------------------------


def test_in_memory_fake_satisfies_the_protocol() -> None:
    assert isinstance(InMemoryLLM(), LLMClient)


async def test_default_answer_is_deterministic_and_costed() -> None:
    llm = InMemoryLLM(clock=FakeClock())
    completion = await llm.complete(ASK)
    expected = default_answer(ASK, "gpt-4o-mini")
    assert completion.text == expected
    assert expected.startswith("[gpt-4o-mini] (system ")
    assert expected.endswith("answer to: Why was I charged twice this month?")
    # 29 + 35 characters of prompt, four characters a token.
    assert completion.prompt_tokens == 8 + 9
    assert completion.completion_tokens == estimate_tokens(expected)
    assert completion.cost_usd == pytest.approx(
        (17 * 0.15 + completion.completion_tokens * 0.60) / 1e6
    )
    assert completion.latency_ms == 0.0
    assert completion.raw_finish_reason == "stop"
    assert completion.meta == {}


async def test_other_system_prompt_gives_another_answer() -> None:
    llm = InMemoryLLM()
    other = [{"role": "system", "content": "You are a poet."}, ASK[1]]
    assert (await llm.complete(ASK)).text != (await llm.complete(other)).text


async def test_scripted_replies_in_order_with_meta_and_errors() -> None:
    llm = InMemoryLLM(["first", ("second", {"quality": "0.8"}), LLMRejected("nope"), "fourth"])
    assert (await llm.complete(ASK)).text == "first"
    second = await llm.complete(ASK)
    assert (second.text, second.meta) == ("second", {"quality": "0.8"})
    with pytest.raises(LLMRejected, match="nope"):
        await llm.complete(ASK)
    assert (await llm.complete(ASK)).text == "fourth"
    with pytest.raises(RuntimeError, match="no scripted reply left"):
        await llm.complete(ASK)


async def test_reply_function_sees_the_messages() -> None:
    llm = InMemoryLLM(lambda messages: messages[-1]["content"].upper())
    assert (await llm.complete(ASK)).text == "WHY WAS I CHARGED TWICE THIS MONTH?"


async def test_configured_failures_then_recovery() -> None:
    llm = InMemoryLLM(fail_times=2)
    for _ in range(2):
        with pytest.raises(LLMUnavailable):
            await llm.complete(ASK)
    assert (await llm.complete(ASK)).text.startswith("[gpt-4o-mini]")
    llm.fail_next(1)
    with pytest.raises(LLMUnavailable):
        await llm.complete(ASK)
    assert len(llm.calls) == 4


async def test_calls_are_recorded_with_their_options() -> None:
    llm = InMemoryLLM(["x"])
    await llm.complete(ASK, temperature=0.1, model="gpt-4.1-nano", max_tokens=64)
    (call,) = llm.calls
    assert call.messages == ASK and call.messages is not ASK
    assert (call.temperature, call.model, call.max_tokens) == (0.1, "gpt-4.1-nano", 64)


async def test_max_tokens_cuts_the_answer() -> None:
    llm = InMemoryLLM(["word " * 100])
    completion = await llm.complete(ASK, max_tokens=5)
    assert completion.completion_tokens == 5
    assert completion.text == "word " * 4
    assert completion.raw_finish_reason == "length"


async def test_latency_comes_from_the_clock() -> None:
    clock = FakeClock()

    def slow(messages: list[dict[str, str]]) -> str:
        clock.advance(0.25)
        return "done"

    completion = await InMemoryLLM(slow, clock=clock).complete(ASK)
    assert completion.latency_ms == pytest.approx(250.0)


async def test_closed_fake_refuses_calls() -> None:
    llm = InMemoryLLM()
    await llm.aclose()
    with pytest.raises(RuntimeError):
        await llm.complete(ASK)


def test_completion_is_frozen() -> None:
    completion = Completion("t", "m", 1, 1, 0.0, 1.0)
    with pytest.raises(AttributeError):
        completion.text = "other"  # type: ignore[misc]


# -- choosing the adapter -----------------------------------------------------------------


def test_create_llm_is_none_when_not_configured() -> None:
    assert create_llm(LLMSettings()) is None
    assert create_llm() is None  # from the (cleaned) environment


async def test_create_llm_builds_the_openai_adapter_from_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    llm = create_llm()
    assert isinstance(llm, OpenAILLM)
    assert isinstance(llm, LLMClient)
    assert llm.settings.base_url == "http://127.0.0.1:9/v1"
    await llm.aclose()


def test_openai_adapter_refuses_missing_configuration() -> None:
    with pytest.raises(LLMUnavailable, match="no LLM endpoint configured"):
        OpenAILLM(LLMSettings())


# -- no key in error texts ----------------------------------------------------------------

_KEY = "sk-proj-Zx81kLmQ0vT4nB7cR2yW"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"Incorrect API key provided: {_KEY}.", "Incorrect API key provided: "),
        ("Incorrect API key provided: sk-proj-Zx81********************2yW.", "provided: "),
        (f"{{'Authorization': 'Bearer {_KEY}'}}", "{'Authorization': '"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: "),
        ("header authorization=opaque-token-value-123 rejected", " rejected"),
        ("auth failed for bearer eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl", "auth failed for "),
        ("POST /v1/chat?api_key=abc123secret&x=1 failed", "&x=1 failed"),
        ('{"apiKey": "abc123secret", "ok": false}', '"ok": false'),
        ("x-api-key: abc123secret", "x-api-key: "),
        ("GET /models?key=abc123secret", "GET /models?key="),
        ("the key my-own-endpoint-key-42 is not allowed", "is not allowed"),
    ],
)
def test_redact_secrets_removes_keys_and_credential_shapes(text: str, kept: str) -> None:
    out = redact_secrets(text, ["my-own-endpoint-key-42"])
    assert "[redacted]" in out and kept in out
    for leaked in (_KEY, "Zx81", "abc123secret", "dXNlcjpw", "opaque-token", "eyJhbG", "own-end"):
        assert leaked not in out


def test_redact_secrets_leaves_ordinary_text_and_short_keys_alone() -> None:
    text = "LLM endpoint answered HTTP 400: model 'gpt-x' does not exist (task key k-1)"
    assert redact_secrets(text, ["k", "", "gpt"]) == text


async def test_a_model_with_its_own_endpoint_is_called_there() -> None:
    platform, own = InMemoryLLM(model="x"), InMemoryLLM(model="y")
    both = ModelEndpoints(platform, {"y": own})
    assert isinstance(both, LLMClient)
    await both.complete([{"role": "user", "content": "hi"}], model="y")
    await both.complete([{"role": "user", "content": "hi"}], model="z", request_id="r1")
    assert len(own.calls) == 1 and [c.request_id for c in platform.calls] == ["r1"]
    settings = LLMSettings.from_env(
        {
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "ORCH_LLM_MODELS": "a=1/2, b=3/4@http://127.0.0.1:8/v1",
        }
    )
    built = create_llm(settings)
    assert isinstance(built, ModelEndpoints) and set(built.by_model) == {"b"}
    await built.aclose()


async def test_a_clock_stepped_back_during_a_call_gives_no_negative_latency():
    # The latency becomes an event's latency_ms, which must be >= 0: a clock moved back
    # mid-call (a test's offset clock, a host's correction) must not make it fail.
    clock = FakeClock()

    def stepped_back(messages: list[dict[str, str]]) -> str:
        clock.advance(-5.0)
        return "an answer"

    done = await InMemoryLLM(stepped_back, clock=clock).complete([{"role": "user", "content": "q"}])
    assert done.latency_ms == 0.0
    event = LlmCallCompleted(
        source="loader", goal_id="g1", model=done.model, latency_ms=done.latency_ms
    )
    assert event.latency_ms == 0.0


def test_a_key_with_a_line_break_or_control_character_is_refused_at_start() -> None:
    # httpx quoted such a key escaped ("\\n") in its error: the exact key was not found to
    # redact, and its part after the break went into the cost events.
    for key in ("sk-abcdefgh\nijklmnop", "sk-abcdefgh ijklmnop", "sk-abcdefgh\x00ijkl"):
        with pytest.raises(ValueError, match="OPENAI_API_KEY"):
            LLMSettings.from_env({"OPENAI_API_KEY": key})
    assert LLMSettings.from_env({"OPENAI_API_KEY": "sk-abcdefgh-ijklmnop"}).api_key


def test_a_key_echoed_across_the_cut_of_a_long_error_is_not_kept_in_part() -> None:
    # The text was cut before the key was replaced: each replacement shortened it, and a
    # copy straddling the first cut moved into the kept part, no longer whole.
    key = "gsk_" + "Zq9Xw8Vu7Ts6Rq5P" * 3  # not sk-: only the exact value finds it
    llm = OpenAILLM(LLMSettings.from_env({"OPENAI_API_KEY": key, "OPENAI_BASE_URL": "http://x"}))
    echoed = " ".join([key] * 12) + " "
    prefix = "LLM endpoint answered unusably: "  # what _failure puts before the text
    # The last copy starts 40 characters before the first cut (2,000 + 512): it straddles it.
    filler = "x" * (2000 + 512 - 40 - len(prefix) - len(echoed))
    failure = llm._failure(RuntimeError(echoed + filler + key))  # noqa: SLF001
    assert str(failure).startswith(prefix) and "Zq9Xw8Vu" not in str(failure)
