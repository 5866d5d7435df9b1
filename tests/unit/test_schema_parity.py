"""Every event model against its .avsc, field by field (names, order, types, defaults)."""

from __future__ import annotations

import datetime
import types
import typing
from typing import Any, Literal, get_args, get_origin

import pytest

from streams.codec import SCHEMA_DIR, load_schema_file
from streams.events import ALL_EVENTS, Event
from streams.topics import CATALOG

ENVELOPE = ["event_id", "event_type", "occurred_at", "source", "run_id", "goal_id", "user_id"]


def _expected_avro(ann: Any) -> Any:
    origin = get_origin(ann)
    if origin is typing.Annotated:
        return _expected_avro(get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in get_args(ann) if a is not type(None)]
        return ["null", _expected_avro(inner)]
    if origin is Literal:
        return "string"
    if origin is dict:
        return {"type": "map", "values": _expected_avro(get_args(ann)[1])}
    if origin is list:
        return {"type": "array", "items": _expected_avro(get_args(ann)[0])}
    simple = {str: "string", int: "long", float: "double", bool: "boolean", bytes: "bytes"}
    if ann in simple:
        return simple[ann]
    if ann is datetime.datetime:
        return {"type": "long", "logicalType": "timestamp-millis"}
    raise AssertionError(f"unmapped type {ann}")


def test_one_schema_file_per_event_and_no_strays():
    files = {p.stem for p in SCHEMA_DIR.glob("*.avsc")}
    assert files == {cls.topic for cls in ALL_EVENTS}
    assert {t.name for t in CATALOG} == files


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.topic)
def test_model_matches_avsc(cls: type[Event]):
    schema = load_schema_file(SCHEMA_DIR / f"{cls.topic}.avsc")
    assert schema["name"] == cls.__name__
    assert schema["namespace"] == "orchestrator.events"
    fields = {f["name"]: f for f in schema["fields"]}
    names = [f["name"] for f in schema["fields"]]
    assert names[: len(ENVELOPE)] == ENVELOPE, "envelope first, in order"
    assert set(names) == set(cls.model_fields), "same field names"
    for name, field in cls.model_fields.items():
        avro = fields[name]
        assert avro["type"] == _expected_avro(field.annotation), name
        if field.is_required():
            assert "default" not in avro or name in ENVELOPE[:4], name
        elif name not in ("event_id", "occurred_at", "event_type"):
            default = field.get_default(call_default_factory=True)
            if isinstance(default, bytes):
                default = default.decode()
            assert avro.get("default", "<missing>") == default, name


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.topic)
def test_key_field_is_always_present(cls: type[Event]):
    field = cls.model_fields[cls.key_field]
    assert field.is_required() or cls.key_field == "original_topic", cls.key_field


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.topic)
def test_event_type_names_the_topic(cls: type[Event]):
    assert get_args(cls.model_fields["event_type"].annotation) == (cls.topic,)
