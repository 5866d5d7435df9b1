-- The seed dashboard as views over the event log. Every view reads `events FINAL`,
-- so an event delivered twice counts once. Windows are half-open [since, until),
-- passed as parameters: SELECT * FROM metric_response_time(since = '...', until = '...').
-- CREATE OR REPLACE keeps a redefined metric current on the next sink start.

-- Every event once, for ad-hoc queries.
CREATE OR REPLACE VIEW events_final AS
SELECT * FROM events FINAL;

-- How many events of one type: agents spawned, automations created, feedback items.
CREATE OR REPLACE VIEW metric_event_count AS
SELECT count() AS events
FROM events FINAL
WHERE event_type = {event_type:String}
  AND occurred_at >= {since:DateTime64(3, 'UTC')}
  AND occurred_at < {until:DateTime64(3, 'UTC')};

-- A pattern can be reported again as it recurs; count each signature once.
CREATE OR REPLACE VIEW metric_patterns_discovered AS
SELECT uniqExact(signature) AS patterns
FROM events FINAL
WHERE event_type = 'pattern_discovered'
  AND occurred_at >= {since:DateTime64(3, 'UTC')}
  AND occurred_at < {until:DateTime64(3, 'UTC')};

-- An agent is active when its latest lifecycle event is not a retirement
-- (a retired agent loaded again is active again; on a tie, retirement wins).
-- The latest event is found as max(milliseconds * 2 + retired): one integer per row
-- is about three times cheaper to aggregate than a (time, flag) tuple.
CREATE OR REPLACE VIEW metric_active_agents AS
SELECT count() AS active_agents
FROM
(
    SELECT
        agent_id,
        max(toUnixTimestamp64Milli(occurred_at) * 2 + (event_type = 'agent_retired')) % 2
            AS retired
    FROM events FINAL
    WHERE event_type IN ('agent_spawned', 'agent_loaded', 'agent_retired')
      AND agent_id != ''
      AND occurred_at < {until:DateTime64(3, 'UTC')}
    GROUP BY agent_id
)
WHERE retired = 0;

-- LLM spend per UTC day, days without calls included as 0.
CREATE OR REPLACE VIEW metric_cost_by_day AS
SELECT toDate(occurred_at) AS day, sum(cost_usd) AS cost_usd
FROM events FINAL
WHERE event_type = 'llm_call_completed'
  AND occurred_at >= {since:DateTime64(3, 'UTC')}
  AND occurred_at < {until:DateTime64(3, 'UTC')}
GROUP BY day
ORDER BY day WITH FILL FROM toDate({since:DateTime64(3, 'UTC')}) TO toDate({until:DateTime64(3, 'UTC')}) + 1;

-- Response time of answered requests; p95 is the exact nearest-rank quantile.
CREATE OR REPLACE VIEW metric_response_time AS
SELECT
    count() AS answers,
    avgOrNull(latency_ms) AS avg_ms,
    quantileExactOrNull(0.95)(latency_ms) AS p95_ms
FROM events FINAL
WHERE event_type = 'workflow_completed'
  AND occurred_at >= {since:DateTime64(3, 'UTC')}
  AND occurred_at < {until:DateTime64(3, 'UTC')};

-- User satisfaction: the share of scored feedback at 4 or 5 of 5.
CREATE OR REPLACE VIEW metric_user_satisfaction AS
SELECT
    count() AS scored,
    countIf(score >= 4) AS satisfied,
    if(scored = 0, NULL, satisfied / scored) AS satisfaction
FROM events FINAL
WHERE event_type = 'feedback_received'
  AND score IS NOT NULL
  AND occurred_at >= {since:DateTime64(3, 'UTC')}
  AND occurred_at < {until:DateTime64(3, 'UTC')};

-- Terminal outcomes per specialty: completed / (completed + failed).
CREATE OR REPLACE VIEW metric_success_by_specialty AS
SELECT
    specialty,
    countIf(event_type = 'workflow_completed') AS completed,
    countIf(event_type = 'workflow_failed') AS failed,
    completed / (completed + failed) AS success_rate
FROM events FINAL
WHERE event_type IN ('workflow_completed', 'workflow_failed')
  AND occurred_at >= {since:DateTime64(3, 'UTC')}
  AND occurred_at < {until:DateTime64(3, 'UTC')}
GROUP BY specialty
ORDER BY specialty;

-- LLM spend per goal, largest first.
CREATE OR REPLACE VIEW metric_spend_by_goal AS
SELECT goal_id, sum(cost_usd) AS spend_usd, count() AS llm_calls
FROM events FINAL
WHERE event_type = 'llm_call_completed'
  AND occurred_at >= {since:DateTime64(3, 'UTC')}
  AND occurred_at < {until:DateTime64(3, 'UTC')}
GROUP BY goal_id
ORDER BY spend_usd DESC, goal_id;

-- Answers per degradation tier: how often the platform answered below full LLM service.
CREATE OR REPLACE VIEW metric_answers_by_tier AS
SELECT degradation_tier, count() AS answers
FROM events FINAL
WHERE event_type = 'workflow_completed'
  AND occurred_at >= {since:DateTime64(3, 'UTC')}
  AND occurred_at < {until:DateTime64(3, 'UTC')}
GROUP BY degradation_tier
ORDER BY answers DESC, degradation_tier;
