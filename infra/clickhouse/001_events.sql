-- The full event log: one row per event, deduplicated by event_id.
-- Applied at every sink start; every statement is idempotent.
--
-- Deduplication: ReplacingMergeTree collapses rows with equal sorting keys within a
-- partition. The key (event_type, event_key) identifies an event whatever its
-- occurred_at: an event re-created by a replay (after a crash, the same event id sent
-- again with a later time) is the same row. event_key is a 128-bit hash of the
-- event_id (FINAL reads 16 fixed bytes per row instead of a 36-character id). There
-- is no partitioning by time for the same reason: two copies of one event in two
-- months' partitions would never be merged. Until a merge runs, duplicates exist on
-- disk; queries that must count each event once read `events FINAL` (or the views of
-- 002_metrics.sql). A table made with the earlier key (event_type, occurred_at,
-- event_key) is moved to this one when the sink starts (services/analytics/store.py),
-- through events_before_key_change, which is dropped only after its rows are copied.
--
-- Typed columns: each one takes the event's field of the same name when the event
-- type has one (see services/analytics/_ingest.py). Add a column here and every
-- event type with such a field fills it from the next insert on.
CREATE TABLE IF NOT EXISTS events
(
    event_id         String,
    event_type       LowCardinality(String),
    occurred_at      DateTime64(3, 'UTC'),
    source           LowCardinality(String),
    run_id           String,
    goal_id          String,
    user_id          String,
    agent_id         String,
    specialty        LowCardinality(String),
    model            LowCardinality(String),
    cost_usd         Nullable(Float64),
    latency_ms       Nullable(Float64),
    prompt_tokens    Nullable(Int64),
    completion_tokens Nullable(Int64),
    degradation_tier LowCardinality(String),
    quality          Nullable(Float64),
    score            Nullable(Int64),
    reason           String,
    signature        String,
    automation_id    String,
    workflow_id      String,
    -- The whole event as JSON, as the event model writes it (bytes fields in base64).
    payload          String CODEC(ZSTD(1)),
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3),
    event_key        UInt128 MATERIALIZED reinterpretAsUInt128(sipHash128(event_id)),
    -- A row outside these bounds is refused and dead-lettered by the sink: a broken
    -- clock would otherwise scatter partitions and a wild score would skew satisfaction.
    CONSTRAINT occurred_at_in_range CHECK occurred_at >= toDateTime64('2000-01-01 00:00:00', 3, 'UTC')
        AND occurred_at < toDateTime64('2200-01-01 00:00:00', 3, 'UTC'),
    CONSTRAINT score_in_range CHECK score IS NULL OR (score >= 1 AND score <= 5)
)
ENGINE = ReplacingMergeTree
ORDER BY (event_type, event_key);

-- What the event models refuse, the table refuses too (the sink's fast path hands
-- ClickHouse the bytes without the models' checks): a negative or infinite cost, token
-- count or latency, a goal or user id no model takes. Such a row is dead-lettered, as the
-- services dead-letter the event. Added to a table made before them; none is stricter
-- than the models (streams/events.py), so no event a service takes is refused here.
ALTER TABLE events ADD CONSTRAINT IF NOT EXISTS amounts_are_counts CHECK
    (cost_usd IS NULL OR (isFinite(cost_usd) AND cost_usd >= 0))
    AND (latency_ms IS NULL OR (isFinite(latency_ms) AND latency_ms >= 0))
    AND (prompt_tokens IS NULL OR prompt_tokens >= 0)
    AND (completion_tokens IS NULL OR completion_tokens >= 0);

ALTER TABLE events ADD CONSTRAINT IF NOT EXISTS ids_are_identifiers CHECK
    (goal_id = '' OR match(goal_id, '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$'))
    AND (user_id = '' OR match(user_id, '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$'));
