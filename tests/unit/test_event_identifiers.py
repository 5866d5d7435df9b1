"""Goal, user and agent ids are matched whole: a trailing newline, a NUL or a Unicode line
separator never makes a valid id (a ``$`` with ``re.match`` let "g1\\n" through)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streams.codec import default_codec
from streams.errors import DecodeError
from streams.events import RequestReceived, validate_identifier
from streams.keys import key_id_of

HOSTILE_IDS = [
    "g1\n",
    "g1\r\n",
    "g1\n\n",
    "\ng1",
    "g\n1",
    "g1\r",
    "g1\x00",
    "\x00g1",
    "g1\u2028",
    "g1\u2029",
    "g1\x85",
    "g1 ",
    "g1\t",
    "",
    "g" * 129,
    "g" * 128 + "\n",
]


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_a_hostile_identifier_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="invalid identifier"):
        validate_identifier(value)


@pytest.mark.parametrize("value", ["g1", "a", "g" * 128, "acme.prod:team-1@eu_2"])
def test_ordinary_identifiers_still_pass(value: str) -> None:
    assert validate_identifier(value) == value


@pytest.mark.parametrize("field", ["goal_id", "user_id"])
@pytest.mark.parametrize("value", ["g1\n", "g1\x00", "g1\u2028"])
def test_a_request_naming_a_hostile_goal_or_user_is_refused_where_made_and_read(
    field: str, value: str
) -> None:
    fields = {"source": "sdk", "run_id": "r1", "goal_id": "g1", "user_id": "u1", "message": "hi"}
    with pytest.raises(ValidationError, match="invalid identifier"):
        RequestReceived.model_validate(fields | {field: value})
    # What a producer without our models would write: the same record, unchecked.
    codec = default_codec()
    data = codec.encode(RequestReceived.model_construct(**(fields | {field: value})))
    with pytest.raises(DecodeError, match="invalid identifier"):
        codec.decode(data, topic=RequestReceived.topic)


_KEY = "orch_0123456789abcdef_" + "A" * 40


@pytest.mark.parametrize("tail", ["\x00", "\u2028x", "\nx", "!"])
def test_a_string_shaped_like_a_key_only_up_to_its_end_is_no_key(tail: str) -> None:
    assert key_id_of(_KEY) == "0123456789abcdef"
    assert key_id_of(" " + _KEY + "\n") == "0123456789abcdef"  # pasted with whitespace
    assert key_id_of(_KEY + tail) is None
