"""Avro bodies to ClickHouse rows: object-container files and the one INSERT ... SELECT per batch.

The sink never decodes events in Python on its hot path: the Avro body of each
message (its single-object encoding minus the 10-byte header) is copied into an
Avro object-container file per event type, and ClickHouse decodes those files
and maps them onto the ``events`` table in one statement. The mapping rule is
one line: a typed column of ``events`` takes the event's field of the same name
when the event type has one, and its type's default otherwise; ``payload`` is
the whole event as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streams.codec import MAGIC
from streams.sql import quote_string

__all__ = [
    "HEADER_LEN",
    "Column",
    "avro_container",
    "clickhouse_type",
    "insert_statement",
    "quote_string",
    "select_for",
    "structure",
]

# Single-object encoding: C3 01, then the 8-byte schema fingerprint, then the body.
HEADER_LEN = len(MAGIC) + 8

_PRIMITIVES = {
    "string": "String",
    "bytes": "String",
    "long": "Int64",
    "int": "Int32",
    "double": "Float64",
    "float": "Float32",
    "boolean": "Bool",
}
# ClickHouse cannot wrap these in Nullable; an Avro null reads as the empty value.
_NOT_NULLABLE = ("Map(", "Array(", "Tuple(")


@dataclass(frozen=True)
class Column:
    """A column of the ``events`` table as ClickHouse describes it."""

    name: str
    type: str


def clickhouse_type(avro_type: Any) -> str:
    """The ClickHouse type an Avro type reads into."""
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        if len(branches) != 1:
            raise ValueError(f"only [null, T] unions are supported, got {avro_type!r}")
        inner = clickhouse_type(branches[0])
        if "null" not in avro_type or inner.startswith(_NOT_NULLABLE):
            return inner
        return f"Nullable({inner})"
    if isinstance(avro_type, dict):
        logical = avro_type.get("logicalType")
        if logical == "timestamp-millis":
            return "DateTime64(3, 'UTC')"
        if logical == "timestamp-micros":
            return "DateTime64(6, 'UTC')"
        kind = avro_type["type"]
        if kind == "map":
            return f"Map(String, {clickhouse_type(avro_type['values'])})"
        if kind == "array":
            return f"Array({clickhouse_type(avro_type['items'])})"
        if kind in ("enum", "fixed"):
            return "String"
        if kind == "record":
            raise ValueError(f"nested record {avro_type.get('name')!r} is not supported")
        return clickhouse_type(kind)
    if avro_type in _PRIMITIVES:
        return _PRIMITIVES[avro_type]
    raise ValueError(f"unsupported Avro type {avro_type!r}")


def structure(schema: Mapping[str, Any]) -> list[Column]:
    """The fields of an Avro record schema as ClickHouse columns, in schema order."""
    return [Column(f["name"], clickhouse_type(f["type"])) for f in schema["fields"]]


def _is_bytes(avro_type: Any) -> bool:
    if isinstance(avro_type, list):
        return any(_is_bytes(t) for t in avro_type)
    if isinstance(avro_type, dict):
        return avro_type.get("type") == "bytes" and "logicalType" not in avro_type
    return bool(avro_type == "bytes")


def _json_value(field: Mapping[str, Any]) -> tuple[str, str]:
    """The expression and type of a field inside ``payload``: the JSON the event model writes."""
    name, avro_type = field["name"], field["type"]
    ch = clickhouse_type(avro_type)
    nullable = ch.startswith("Nullable(")
    if _is_bytes(avro_type):
        # Bytes are arbitrary binary (a dead letter's payload): base64 keeps the JSON valid UTF-8.
        return f"base64Encode({name})", "Nullable(String)" if nullable else "String"
    return name, ch


def _unwrap(ch_type: str, wrapper: str) -> str:
    prefix = wrapper + "("
    return ch_type[len(prefix) : -1] if ch_type.startswith(prefix) else ch_type


def select_for(
    schema: Mapping[str, Any],
    columns: Sequence[Column],
    source: str,
    event_type: str | None = None,
) -> str:
    """``SELECT`` of one event type from ``source`` shaped as ``columns`` plus ``payload``.

    ``event_type``: the topic's own, written as it is whatever a record's body says (a
    record on one topic naming another's type once replaced that type's row)."""
    fields = {f["name"]: f for f in schema["fields"]}
    exprs: list[str] = []
    for col in columns:
        field = fields.get(col.name)
        target_nullable = col.type.startswith("Nullable(")
        if col.name == "event_type" and event_type is not None:
            value = quote_string(event_type)
        elif field is None:
            value = f"defaultValueOfTypeName({quote_string(col.type)})"
        elif clickhouse_type(field["type"]).startswith("Nullable(") and not target_nullable:
            # An absent optional id reads as '' in a non-Nullable column: filters stay simple.
            bare = _unwrap(_unwrap(col.type, "LowCardinality"), "Nullable")
            value = f"ifNull({col.name}, defaultValueOfTypeName({quote_string(bare)}))"
        elif clickhouse_type(field["type"]) == col.type:
            exprs.append(f"{col.name} AS {col.name}")
            continue
        else:
            value = col.name
        # Every branch of the UNION must produce exactly the column's type.
        exprs.append(f"CAST({value} AS {col.type}) AS {col.name}")
    parts, types = [], []
    for f in schema["fields"]:
        expr, ch = _json_value(f)
        parts.append(expr)
        types.append(f"{f['name']} {ch}")
    payload = f"toJSONString(CAST(tuple({', '.join(parts)}) AS Tuple({', '.join(types)})))"
    exprs.append(f"{payload} AS payload")
    return f"SELECT {', '.join(exprs)} FROM {source}"


def insert_statement(table: str, columns: Sequence[Column], selects: Iterable[str]) -> str:
    """One INSERT for every event type of a batch: one part written, not one per type."""
    names = ", ".join([c.name for c in columns] + ["payload"])
    union = " UNION ALL ".join(selects)
    # optimize_on_insert would dedupe inside each block; FINAL and merges do it anyway.
    # ISO 8601 timestamps in payload, as the event models write them.
    settings = "optimize_on_insert = 0, date_time_output_format = 'iso'"
    return f"INSERT INTO {table} ({names}) SETTINGS {settings} {union}"


def _long(value: int) -> bytes:
    """Avro zig-zag varint."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _avro_bytes(data: bytes) -> bytes:
    return _long(len(data)) + data


def avro_container(schema: Mapping[str, Any], bodies: Sequence[bytes]) -> bytes:
    """An Avro object-container file with each of ``bodies`` (records of ``schema``) a
    block of its own. In one block the bodies ran together: a record with bytes past its
    end (which the codec ignores) was read by ClickHouse as the next record, a forged row
    in place of an honest event that went missing."""
    sync = os.urandom(16)
    meta = (
        _long(2)
        + _avro_bytes(b"avro.schema")
        + _avro_bytes(json.dumps(schema, separators=(",", ":")).encode())
        + _avro_bytes(b"avro.codec")
        + _avro_bytes(b"null")
        + _long(0)
    )
    blocks = b"".join(b"".join((_long(1), _long(len(body)), body, sync)) for body in bodies)
    return b"".join((b"Obj\x01", meta, sync, blocks))
