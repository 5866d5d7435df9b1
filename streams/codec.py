"""Avro single-object encoding of typed events, with writer-schema lookup by fingerprint.

Wire format (Avro spec, "Single-object encoding"): ``C3 01``, the 8-byte
little-endian CRC-64-AVRO fingerprint of the writer schema, then the Avro body.
A reader finds the writer schema by its fingerprint and resolves it against its
own (reader) schema of the same record name, so events written before a field
was added (with a default) stay readable, and so do events written after.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from pydantic import ValidationError

from streams.errors import DecodeError, UnknownSchemaError
from streams.events import ALL_EVENTS, Event

__all__ = ["MAGIC", "SCHEMA_DIR", "EventCodec", "default_codec", "load_schema_file"]

MAGIC = b"\xc3\x01"
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_HEADER = len(MAGIC) + 8


def load_schema_file(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        schema: dict[str, Any] = json.load(fh)
    return schema


def _fingerprint(parsed: Any) -> bytes:
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


class _Schema:
    __slots__ = ("fingerprint", "full_name", "parsed", "raw")

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = dict(raw)
        self.parsed = parse_schema(self.raw, _write_hint=False)
        self.full_name = f"{raw.get('namespace', '')}.{raw['name']}".lstrip(".")
        self.fingerprint = _fingerprint(self.parsed)


class EventCodec:
    """Encodes typed events to single-object Avro and decodes them back.

    ``schemas`` maps topic names to the current (reader and writer) schema of
    each event type; ``extra_writers`` are other known writer schemas, older or
    newer versions of the same records, looked up by fingerprint on decode.
    """

    def __init__(
        self,
        schemas: Mapping[str, Mapping[str, Any]],
        *,
        models: Iterable[type[Event]] = ALL_EVENTS,
        extra_writers: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        self._models = {m.topic: m for m in models}
        self._current: dict[str, _Schema] = {}
        self._by_name: dict[str, _Schema] = {}
        self._writers: dict[bytes, _Schema] = {}
        self._model_by_name: dict[str, type[Event]] = {}
        for topic, raw in schemas.items():
            sch = _Schema(raw)
            self._current[topic] = sch
            self._by_name[sch.full_name] = sch
            self._writers[sch.fingerprint] = sch
            if topic in self._models:
                self._model_by_name[sch.full_name] = self._models[topic]
        for raw in extra_writers:
            self.register_writer(raw)

    @classmethod
    def from_directory(cls, directory: Path = SCHEMA_DIR, **kwargs: Any) -> EventCodec:
        schemas = {p.stem: load_schema_file(p) for p in sorted(directory.glob("*.avsc"))}
        history = directory / "history"
        extra = (
            [load_schema_file(p) for p in sorted(history.glob("*.avsc"))]
            if history.is_dir()
            else []
        )
        return cls(schemas, extra_writers=[*extra, *kwargs.pop("extra_writers", ())], **kwargs)

    def register_writer(self, raw: Mapping[str, Any]) -> bytes:
        """Make another version of a known record readable; returns its fingerprint."""
        sch = _Schema(raw)
        self._writers.setdefault(sch.fingerprint, sch)
        return sch.fingerprint

    def schema_for(self, topic: str) -> dict[str, Any]:
        return dict(self._current[topic].raw)

    def fingerprint_for(self, topic: str) -> bytes:
        return self._current[topic].fingerprint

    def event_type_for(self, topic: str) -> str | None:
        """The ``event_type`` every event of ``topic`` has (None: a topic of no model)."""
        model = self._models.get(topic)
        if model is None:
            return None
        value = model.model_fields["event_type"].default
        return value if isinstance(value, str) else None

    # -- encode ---------------------------------------------------------------
    def encode(self, event: Event) -> bytes:
        sch = self._current.get(event.topic)
        if sch is None:
            raise KeyError(f"no schema for event type {event.topic!r}")
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(sch.fingerprint)
        fastavro.schemaless_writer(buf, sch.parsed, event.model_dump(mode="python"))
        return buf.getvalue()

    # -- decode ---------------------------------------------------------------
    def decode_record(self, data: bytes, *, topic: str | None = None) -> tuple[str, dict[str, Any]]:
        """Bytes to (record full name, dict) resolved to the reader schema."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}", topic=topic)
        data = bytes(data)
        if len(data) < _HEADER or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoding (missing C3 01 header)", topic=topic)
        fp = data[2:_HEADER]
        writer = self._writers.get(fp)
        if writer is None:
            raise UnknownSchemaError(f"unknown writer schema fingerprint {fp.hex()}", topic=topic)
        reader = self._by_name.get(writer.full_name, writer)
        try:
            record = fastavro.schemaless_reader(
                io.BytesIO(data[_HEADER:]), writer.parsed, reader.parsed
            )
        except Exception as exc:  # fastavro raises many kinds on corrupt bodies
            raise DecodeError(
                f"corrupt Avro body: {type(exc).__name__}: {exc}", topic=topic
            ) from exc
        if not isinstance(record, dict):
            raise DecodeError("Avro body is not a record", topic=topic)
        return writer.full_name, record

    def decode(self, data: bytes, *, topic: str | None = None) -> Event:
        name, record = self.decode_record(data, topic=topic)
        model = self._model_by_name.get(name)
        if model is None:
            raise DecodeError(f"no event model for record {name}", topic=topic)
        if topic is not None and model.topic != topic:
            raise DecodeError(f"a {model.topic} event does not belong on this topic", topic=topic)
        try:
            return model.model_validate(record)
        except ValidationError as exc:
            errors = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise DecodeError(f"invalid {model.topic}: {errors}", topic=topic) from exc


_DEFAULT: EventCodec | None = None


def default_codec() -> EventCodec:
    """The process-wide codec built from ``schemas/``."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = EventCodec.from_directory()
    return _DEFAULT
