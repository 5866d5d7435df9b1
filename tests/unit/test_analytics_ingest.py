"""The Avro-to-ClickHouse ingest path without an engine: types, containers, generated SQL, DDL."""

from __future__ import annotations

import io
import re

import fastavro
import pytest

from services.analytics import _ingest
from services.analytics.store import ddl_statements
from services.cli.dashboard import metric_queries
from streams.codec import default_codec
from streams.events import ALL_EVENTS
from tests.samples import sample_event

COLUMNS = [
    _ingest.Column("event_id", "String"),
    _ingest.Column("event_type", "LowCardinality(String)"),
    _ingest.Column("occurred_at", "DateTime64(3, 'UTC')"),
    _ingest.Column("goal_id", "String"),
    _ingest.Column("agent_id", "String"),
    _ingest.Column("specialty", "LowCardinality(String)"),
    _ingest.Column("cost_usd", "Nullable(Float64)"),
    _ingest.Column("score", "Nullable(Int64)"),
]


@pytest.mark.parametrize(
    ("avro", "clickhouse"),
    [
        ("string", "String"),
        ("bytes", "String"),
        ("long", "Int64"),
        ("int", "Int32"),
        ("double", "Float64"),
        ("boolean", "Bool"),
        (["null", "string"], "Nullable(String)"),
        (["null", "long"], "Nullable(Int64)"),
        ({"type": "long", "logicalType": "timestamp-millis"}, "DateTime64(3, 'UTC')"),
        (
            ["null", {"type": "long", "logicalType": "timestamp-millis"}],
            "Nullable(DateTime64(3, 'UTC'))",
        ),
        ({"type": "map", "values": "double"}, "Map(String, Float64)"),
        ({"type": "array", "items": "string"}, "Array(String)"),
        # ClickHouse has no Nullable(Map): an Avro null reads as the empty map.
        (["null", {"type": "map", "values": "string"}], "Map(String, String)"),
        ({"type": "enum", "name": "E", "symbols": ["a"]}, "String"),
    ],
)
def test_avro_types_map_to_clickhouse_types(avro, clickhouse):
    assert _ingest.clickhouse_type(avro) == clickhouse


def test_unsupported_avro_types_are_refused():
    with pytest.raises(ValueError, match="unions"):
        _ingest.clickhouse_type(["null", "string", "long"])
    with pytest.raises(ValueError, match="nested record"):
        _ingest.clickhouse_type({"type": "record", "name": "R", "fields": []})


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.topic)
def test_every_event_type_has_a_clickhouse_structure(cls):
    schema = default_codec().schema_for(cls.topic)
    names = [c.name for c in _ingest.structure(schema)]
    assert names == [f["name"] for f in schema["fields"]]


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.topic)
def test_container_holds_the_kafka_bodies_as_they_are(cls):
    codec = default_codec()
    events = [sample_event(cls), sample_event(cls)]
    values = [codec.encode(e) for e in events]
    bodies = [v[_ingest.HEADER_LEN :] for v in values]

    data = _ingest.avro_container(codec.schema_for(cls.topic), bodies)

    read = list(fastavro.reader(io.BytesIO(data)))
    assert read == [codec.decode_record(v)[1] for v in values]


def test_zigzag_longs_match_avro():
    for value in (0, 1, -1, 63, 64, -65, 2**31, 10**12):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, "long", value)
        assert _ingest._long(value) == buf.getvalue()


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.topic)
def test_select_maps_same_named_fields_and_defaults_the_rest(cls):
    schema = default_codec().schema_for(cls.topic)
    fields = {f["name"] for f in schema["fields"]}
    sql = _ingest.select_for(schema, COLUMNS, "src")

    outputs = re.findall(r" AS (\w+)(?:,|\s+FROM)", sql)
    assert outputs == [c.name for c in COLUMNS] + ["payload"]
    for col in COLUMNS:
        expr = re.search(rf"(?:SELECT |, )([^,]*(?:\([^)]*\))?[^,]*) AS {col.name}\b", sql)
        assert expr is not None
        if col.name in fields:
            assert "defaultValueOfTypeName" not in expr.group(1) or "ifNull" in expr.group(1)
        else:
            assert f"defaultValueOfTypeName('{col.type}')" in expr.group(1)
    assert sql.endswith(" FROM src")


def test_payload_names_every_field_and_base64s_bytes():
    schema = default_codec().schema_for("dead_letter")
    sql = _ingest.select_for(schema, COLUMNS, "src")
    payload = sql.split("toJSONString(", 1)[1]
    for field in schema["fields"]:
        assert f"{field['name']} " in payload.split(" AS Tuple(", 1)[1]
    assert "base64Encode(payload)" in payload
    assert "base64Encode(original_key)" in payload


def test_optional_id_into_plain_column_reads_empty_not_null():
    schema = default_codec().schema_for("llm_call_completed")  # agent_id is optional there
    sql = _ingest.select_for(schema, COLUMNS, "src")
    assert "CAST(ifNull(agent_id, defaultValueOfTypeName('String')) AS String) AS agent_id" in sql


def test_one_insert_statement_for_all_types_of_a_batch():
    codec = default_codec()
    selects = [
        _ingest.select_for(codec.schema_for(t), COLUMNS, f"src_{t}")
        for t in ("workflow_completed", "feedback_received")
    ]
    sql = _ingest.insert_statement("events", COLUMNS, selects)
    assert sql.startswith("INSERT INTO events (event_id, event_type,")
    assert sql.count("INSERT") == 1
    assert sql.count(" UNION ALL ") == 1
    assert "optimize_on_insert = 0" in sql


def test_quote_string_escapes_quotes_and_backslashes():
    assert _ingest.quote_string("it's a\\b") == "'it\\'s a\\\\b'"


def test_ddl_is_idempotent_and_defines_the_deduplicating_table():
    statements = ddl_statements()
    table = next(s for s in statements if "TABLE IF NOT EXISTS events" in s)
    assert "ENGINE = ReplacingMergeTree" in table
    # Deduplication ignores occurred_at: no time partitions, no time in the key.
    assert "PARTITION BY" not in table
    assert "ORDER BY (event_type, event_key)" in table
    assert "UInt128 MATERIALIZED reinterpretAsUInt128(sipHash128(event_id))" in table
    assert "payload" in table
    for statement in statements:
        idempotent = ("CREATE TABLE IF NOT EXISTS", "CREATE OR REPLACE VIEW")
        added = statement.startswith("ALTER TABLE events ADD CONSTRAINT IF NOT EXISTS")
        assert statement.startswith(idempotent) or added
        assert not statement.endswith(";")


def test_every_metric_reads_a_view_that_the_ddl_defines_over_final():
    ddl = "\n".join(ddl_statements())
    from datetime import UTC, datetime

    for name, sql in metric_queries(now=datetime(2026, 1, 2, tzinfo=UTC)).items():
        view = re.match(r"SELECT \* FROM (\w+)\(", sql)
        assert view is not None, name
        definition = ddl.split(f"CREATE OR REPLACE VIEW {view.group(1)} AS", 1)
        assert len(definition) == 2, f"{name}: view {view.group(1)} is not in the DDL"
        body = definition[1].split("CREATE OR REPLACE VIEW", 1)[0]
        assert "FROM events FINAL" in body, f"{view.group(1)} must hide duplicates"
