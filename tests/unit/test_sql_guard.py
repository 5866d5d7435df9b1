"""The SQL surface's guard and limits, on the real embedded engine (chdb).

Every hostile statement must be refused before it runs, with a message naming what
was refused; every query users and the dashboard rely on must still answer; heavy
queries the guard lets through must be stopped by the engine's limits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.analytics import sqlguard
from services.analytics.settings import AnalyticsSettings
from services.analytics.sqlguard import (
    GuardedQueries,
    QueryRefused,
    Reviewed,
    check_query,
    event_tables,
    load_catalog,
    parse_ast,
    reviewed_functions,
    unreviewed,
)
from services.analytics.store import ClickHouseStore, QueryLimits
from services.cli.dashboard import compute_metrics, metric_queries
from streams import events as ev
from streams.errors import StoreError
from tests.samples import sample_event
from tests.unit.test_analytics_store import encoded

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SYNTHETIC_ROWS = 30_000
LIMITS = QueryLimits(
    max_seconds=1.5,
    max_memory_bytes=128 * 1024 * 1024,
    max_rows_to_read=100_000,
    max_bytes_to_read=1024 * 1024 * 1024,
    max_result_rows=20_000,
    max_result_bytes=16 * 1024 * 1024,
    max_threads=1,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseStore]:
    base = tmp_path_factory.mktemp("sqlguard")
    store = ClickHouseStore(path=base / "clickhouse", limits=LIMITS)
    store.apply_schema()
    kinds = [
        ev.WorkflowCompleted,
        ev.WorkflowFailed,
        ev.FeedbackReceived,
        ev.LlmCallCompleted,
        ev.AgentSpawned,
        ev.PatternDiscovered,
        ev.AutomationCreated,
    ]
    ago = [timedelta(hours=i) for i in range(len(kinds) * 3)]
    samples = [sample_event(k, occurred_at=NOW - a) for k, a in zip(kinds * 3, ago, strict=True)]
    store.insert([encoded(e) for e in samples])
    # Volume for the limits, through the trusted write path.
    store.execute(
        "INSERT INTO events (event_id, event_type, occurred_at, source, payload)"
        " SELECT toString(number), 'synthetic', toDateTime64('2026-11-01 00:00:00', 3, 'UTC'),"
        f" 'bench', repeat('p', 100) FROM numbers({SYNTHETIC_ROWS})"
    )
    # A table of the current database that is not the event log.
    store.execute("CREATE TABLE secrets (token String) ENGINE = Memory")
    store.execute("INSERT INTO secrets VALUES ('hunter2')")
    yield store
    store.close()


@pytest.fixture(scope="module")
def surface(store: ClickHouseStore) -> GuardedQueries:
    return GuardedQueries(store)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.txt"
    path.write_text("the-secret-content\n")
    return path


# -- hostile statements: (statement, what the refusal must name) -------------------------

OUT = "/tmp/orchestrator-sqlguard-outfile"
HOSTILE: list[tuple[str, str]] = [
    # files and the process's own environment
    ("SELECT file('/etc/passwd')", "function file()"),
    ("SELECT file('/proc/self/environ')", "function file()"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table function file()"),
    ("SELECT filesystemAvailable()", "function filesystemAvailable()"),
    ("SELECT * FROM filesystem('/etc')", "table function filesystem()"),
    # writing files
    (f"SELECT 1 INTO OUTFILE '{OUT}'", "INTO OUTFILE"),
    (f"SELECT event_id FROM events INTO OUTFILE '{OUT}' TRUNCATE FORMAT CSV", "INTO OUTFILE"),
    (f"select 1 into outfile '{OUT}' compression 'gzip'", "INTO OUTFILE"),
    # the network, other servers, processes
    ("SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')", "table function url()"),
    ("SELECT * FROM s3('http://127.0.0.1:1/b/k.csv', 'CSV')", "table function s3()"),
    ("SELECT * FROM s3Cluster('c', 'http://127.0.0.1:1/b/k', 'CSV')", "s3Cluster()"),
    ("SELECT * FROM hdfs('hdfs://127.0.0.1:1/x', 'CSV')", "table function hdfs()"),
    ("SELECT * FROM azureBlobStorage('x', 'c', 'b')", "azureBlobStorage()"),
    ("SELECT * FROM remote('127.0.0.1:9000', system.one)", "table function remote()"),
    ("SELECT * FROM remoteSecure('127.0.0.1:9440', default.events)", "remoteSecure()"),
    ("SELECT * FROM cluster('default', system.one)", "table function cluster()"),
    ("SELECT * FROM executable('id', 'TSV', 'x String')", "table function executable()"),
    ("SELECT * FROM mysql('127.0.0.1:1', 'db', 't', 'u', 'p')", "table function mysql()"),
    ("SELECT * FROM postgresql('127.0.0.1:1', 'db', 't', 'u', 'p')", "postgresql()"),
    ("SELECT * FROM odbc('DSN=x', 't')", "table function odbc()"),
    ("SELECT * FROM jdbc('jdbc:x', 't')", "table function jdbc()"),
    ("SELECT * FROM sqlite('/tmp/x.db', 't')", "table function sqlite()"),
    ("SELECT * FROM iceberg('http://127.0.0.1:1/t')", "table function iceberg()"),
    ("SELECT * FROM deltaLake('http://127.0.0.1:1/t')", "table function deltaLake()"),
    ("SELECT * FROM input('a String')", "table function input()"),
    ("SELECT * FROM format(CSV, 'a\n1')", "table function format()"),
    ("SELECT aiGenerate('write a poem')", "function aiGenerate()"),
    # settings, identity and environment of the server
    ("SELECT getSetting('max_execution_time')", "function getSetting()"),
    ("SELECT getMacro('replica')", "function getMacro()"),
    ("SELECT hostName()", "function hostName()"),
    ("SELECT fullHostName()", "function fullHostName()"),
    ("SELECT currentUser()", "function currentUser()"),
    ("SELECT version(), uptime()", "function version()"),
    ("SELECT pgGetUserById(1)", "function pgGetUserById()"),
    # a top-level-domain list from the server's configuration
    (
        "SELECT firstSignificantSubdomainCustom('a.b.com', 'public_suffix_list')",
        "function firstSignificantSubdomainCustom()",
    ),
    ("SELECT cutToFirstSignificantSubdomainCustomRFC('a.b', 'x')", "SubdomainCustomRFC()"),
    ("SELECT pg_get_userbyid(1)", "function pg_get_userbyid()"),
    ("SELECT serverTimezone()", "function serverTimezone()"),
    ("SELECT timezone()", "function timezone()"),
    ("SELECT timeZone()", "function timeZone()"),
    ("SELECT chdb()", "function chdb()"),
    ("SELECT buildId()", "function buildId()"),
    ("SELECT serverUUID()", "function serverUUID()"),
    ("SELECT getServerPort('tcp_port')", "function getServerPort()"),
    ("SELECT FQDN()", "function FQDN()"),
    ("SELECT getOSKernelVersion()", "function getOSKernelVersion()"),
    ("SELECT filesystemCapacity()", "function filesystemCapacity()"),
    ("SELECT displayName()", "function displayName()"),
    ("SELECT currentRoles(), enabledRoles()", "function currentRoles()"),
    ("SELECT defaultRoles()", "function defaultRoles()"),
    ("SELECT currentProfiles()", "function currentProfiles()"),
    ("SELECT zookeeperSessionUptime()", "function zookeeperSessionUptime()"),
    ("SELECT queryID()", "function queryID()"),
    ("SELECT initial_query_id()", "function initial_query_id()"),
    ("SELECT connectionId()", "function connectionId()"),
    ("SELECT shardNum(), shardCount()", "function shardNum()"),
    # tables and dictionaries other than the event log
    ("SELECT * FROM system.processes", "system table system.processes"),
    ("SELECT * FROM system.settings WHERE changed", "system table system.settings"),
    ("SELECT name, path FROM system.disks", "system table system.disks"),
    ("SELECT database, name, data_paths FROM system.tables", "system table system.tables"),
    ("SELECT * FROM system.numbers LIMIT 10", "system table system.numbers"),
    ("SELECT * FROM information_schema.tables", "system table information_schema.tables"),
    ("SELECT * FROM INFORMATION_SCHEMA.TABLES", "system table INFORMATION_SCHEMA.TABLES"),
    ("SELECT * FROM other_db.events", "table other_db.events names a database"),
    ("SELECT * FROM secrets", "table secrets is not part of the event log"),
    ("SELECT 1 IN secrets", "table secrets is not part of the event log"),
    ("SELECT 1 IN system.numbers", "system table system.numbers"),
    ("SELECT 1 FROM events AS e JOIN system.one AS o ON 1", "system table system.one"),
    ("SELECT * FROM merge('system', '.*')", "table function merge()"),
    ("SELECT * FROM dictionary('d')", "table function dictionary()"),
    ("SELECT dictGet('d', 'v', toUInt64(1))", "function dictGet()"),
    ("SELECT joinGet('j', 'v', 1)", "function joinGet()"),
    ("SELECT hasColumnInTable('system', 'tables', 'name')", "function hasColumnInTable()"),
    ("DESCRIBE TABLE system.tables", "system table system.tables"),
    ("DESCRIBE file('/etc/passwd', 'LineAsString')", "table function file()"),
    # table functions that are not the event log at all
    ("SELECT * FROM numbers(1000000000000)", "table function numbers()"),
    ("SELECT count() FROM numbers_mt(1e12)", "table function numbers_mt()"),
    ("SELECT * FROM zeros(100)", "table function zeros()"),
    ("SELECT * FROM generateRandom('a String') LIMIT 1", "table function generateRandom()"),
    ("SELECT * FROM values('a Int8', 1)", "table function values()"),
    ("SELECT * FROM view(SELECT 1)", "table function view()"),
    # settings: neither SET nor SETTINGS may lift the limits
    ("SET max_execution_time = 0", "SET statement"),
    ("SET readonly = 0", "SET statement"),
    ("SELECT 1 SETTINGS max_execution_time = 0", "SETTINGS clause"),
    ("SELECT count() FROM events SETTINGS readonly = 0", "SETTINGS clause"),
    ("SELECT * FROM (SELECT 1 SETTINGS max_memory_usage = 0)", "SETTINGS clause"),
    ("SELECT 1 SETTINGS no_such_setting = 1", "SETTINGS clause"),
    # other statements; writes are ClickHouse's to refuse too, but never reach it
    ("INSERT INTO events (event_id) VALUES ('x')", "INSERT statement"),
    ("DROP TABLE events", "DROP statement"),
    ("ALTER TABLE events DELETE WHERE 1", "ALTER statement"),
    ("CREATE TABLE t (a Int8) ENGINE = Memory", "CREATE statement"),
    ("TRUNCATE TABLE events", "statement"),
    ("KILL QUERY WHERE 1", "statement"),
    ("SYSTEM DROP DNS CACHE", "SYSTEM statement"),
    ("EXPLAIN SELECT 1", "EXPLAIN statement"),
    ("SHOW TABLES FROM system", "SHOW statement"),
    ("SHOW PROCESSLIST", "statement"),
    ("USE system", "USE statement"),
    ("OPTIMIZE TABLE events FINAL", "statement"),
    # more than one statement: the second would run in the embedded engine
    ("SELECT 1; SELECT 2", "more than one statement"),
    ("SELECT 1; SELECT file('/etc/passwd')", "more than one statement"),
    (f"SELECT 1; SELECT 1 INTO OUTFILE '{OUT}'", "more than one statement"),
    # the surface chooses the format
    ("SELECT 1 FORMAT JSON", "FORMAT clause"),
    ("SELECT event_id FROM events FORMAT Native", "FORMAT clause"),
    # case, quoting and comments change nothing
    ("SELECT FiLe('/etc/passwd')", "function FiLe()"),
    ("SELECT FILE('/etc/passwd')", "function FILE()"),
    ("SELECT `file`('/etc/passwd')", "function file()"),
    ("SELECT \"file\"('/etc/passwd')", "function file()"),
    ("SELECT/**/file/**/('/etc/passwd')", "function file()"),
    ("SELECT 1 -- harmless\n, file('/etc/passwd')", "function file()"),
    ("/* a comment */ SELECT * FROM URL('http://127.0.0.1:1/', 'CSV', 'a String')", "URL()"),
    ("SELECT * FROM `system`.`processes`", "system table system.processes"),
    ('SELECT * FROM "system"."settings"', "system table system.settings"),
    ("SELECT * FROM `system.tables`", "system table system.tables"),
    ("SELECT GetSetting('readonly')", "function GetSetting()"),
    # hidden in subqueries, CTEs, unions, lambdas, parameterised views
    ("SELECT * FROM (SELECT * FROM (SELECT file('/etc/passwd') AS f))", "function file()"),
    ("WITH t AS (SELECT file('/etc/passwd') AS f) SELECT * FROM t", "function file()"),
    ("WITH t AS (SELECT * FROM system.tables) SELECT * FROM t", "system table system.tables"),
    ("WITH (SELECT getSetting('readonly')) AS s SELECT s", "function getSetting()"),
    ("SELECT (SELECT getSetting('readonly'))", "function getSetting()"),
    ("SELECT 1 UNION ALL SELECT * FROM remote('127.0.0.1', system.one)", "remote()"),
    ("SELECT 1 INTERSECT SELECT count() FROM system.processes", "system.processes"),
    ("SELECT arrayMap(p -> file(p), ['/etc/hostname'])", "function file()"),
    ("WITH (p -> file(p)) AS f SELECT f('/etc/passwd')", "function file()"),
    ("SELECT * FROM events WHERE event_id IN (SELECT name FROM system.tables)", "system.tables"),
    (
        "SELECT * FROM metric_event_count(event_type = (SELECT getSetting('readonly')),"
        " since = '2020-01-01 00:00:00', until = '2030-01-01 00:00:00')",
        "function getSetting()",
    ),
    ("SELECT count() OVER (PARTITION BY file('/etc/passwd')) FROM events", "function file()"),
    ("SELECT * APPLY(file) FROM (SELECT '/etc/passwd' AS p)", "APPLY(<function>)"),
    # holding a thread idle
    ("SELECT sleep(3)", "function sleep()"),
    ("SELECT sleepEachRow(1) FROM events", "function sleepEachRow()"),
    # a row's own values costing time quadratic in their size, past the time limit
    (
        "SELECT editDistance(repeat('a', 50000), repeat(toString(x), 50000))"
        " FROM (SELECT arrayJoin([1, 2, 3, 4]) AS x)",
        "function editDistance() can run past the time limit",
    ),
    ("SELECT levenshteinDistance('a', 'b')", "function levenshteinDistance() can run past"),
    ("SELECT jaroWinklerSimilarity('a', 'b')", "function jaroWinklerSimilarity() can run"),
    ("SELECT arrayLevenshteinDistance([1], [2])", "function arrayLevenshteinDistance() can"),
    (
        "SELECT arrayFold((acc, x) -> arrayConcat(acc, [x]), range(100000), [0])",
        "function arrayFold() can run past",
    ),
    ("SELECT multiFuzzyMatchAny('abc', 1, ['a.c'])", "function multiFuzzyMatchAny() can run"),
    ("SELECT flameGraph(trace) FROM (SELECT [1, 2] AS trace)", "function flameGraph() reads"),
    # functions the engine does not list
    ("SELECT no_such_function(1)", "function no_such_function() is not one of"),
    ("SELECT __getScalar('x')", "function __getScalar()"),
]


# A line of the parser's dump forged from inside a name or a literal: ClickHouse splits
# its EXPLAIN AST output at each newline (a quoted name keeps one raw), and prints some
# control characters of literals raw (which str.splitlines breaks at). The forged
# "TableIdentifier events" made what follows it its children, which the walk never read:
# file(), other tables and system.* ran through the surface.
_FORGED_LINE = "    TableIdentifier events (alias z"
# A literal's raw character is refused as such; one formatQuery writes as an escape (\f)
# forges nothing, and the file() after it is refused by name.
_RAW = r"control|function file\(\)"
FORGED: list[tuple[str, str]] = [
    (f"SELECT tuple(file('/etc/hostname')) AS `x)\n{_FORGED_LINE}`", "has an escape"),
    (f"SELECT (SELECT file('/etc/hostname')) AS `x\n{_FORGED_LINE}`", "has an escape"),
    (f"SELECT tuple(file('/etc/hostname')) AS \"x)\n{_FORGED_LINE}\"", "has an escape"),
    (f"SELECT tuple(file('/etc/hostname')) AS `x)\u2028{_FORGED_LINE}`", "has an escape"),
    (f"SELECT tuple(file('/etc/hostname')) AS `x)\x0b{_FORGED_LINE}`", "has an escape"),
    (f"SELECT count() FROM events AS `e\n{_FORGED_LINE}`", "has an escape"),
    (f"SELECT `event_id\n{_FORGED_LINE}` FROM events", "has an escape"),
    ("SELECT 1 AS `a\\`b`", "has an escape"),
    *(
        (f"SELECT tuple('a{sep} {_FORGED_LINE}' AS q, file('/etc/hostname')) AS r", _RAW)
        for sep in ("\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\x85", "\x0b", "\x0c")
    ),
]


@pytest.mark.parametrize(("sql", "named"), FORGED, ids=[repr(s) for s, _ in FORGED])
def test_a_forged_line_of_the_parsers_dump_is_refused(
    surface: GuardedQueries, sql: str, named: str
) -> None:
    with pytest.raises(QueryRefused, match=named):
        surface.query(sql)
    with pytest.raises(QueryRefused):
        surface.text(sql, "CSVWithNames")


def test_names_and_literals_that_forge_nothing_still_answer(surface: GuardedQueries) -> None:
    # A newline written as an escape in a literal, a quoted name with a space, non-ASCII.
    assert surface.query("SELECT 'a\\nb' AS `my col`, 'ü' AS `größe`").rows == [("a\nb", "ü")]
    assert surface.query('SELECT 1 AS "quoted name"').columns == ["quoted name"]


def test_a_dump_that_does_not_add_up_is_refused() -> None:
    ok = "SelectWithUnionQuery (children 1)\n ExpressionList (children 1)\n  Literal UInt64_1"
    assert parse_ast(ok).children[0].children[0].text == "UInt64_1"
    # A node with more or fewer children than it declares, or a line broken elsewhere.
    for bad in (
        "SelectWithUnionQuery (children 2)\n ExpressionList (children 1)\n  Literal UInt64_1",
        "SelectWithUnionQuery (children 1)\n ExpressionList\n  Literal UInt64_1",
        "SelectWithUnionQuery (children 1)\n ExpressionList (children 1)\n  Literal 'a\u2028'",
    ):
        with pytest.raises(QueryRefused, match="parser output|control"):
            parse_ast(bad)


@pytest.mark.parametrize(("sql", "named"), HOSTILE, ids=[s for s, _ in HOSTILE])
def test_hostile_statement_is_refused_naming_what(
    surface: GuardedQueries, sql: str, named: str
) -> None:
    with pytest.raises(QueryRefused) as refused:
        surface.query(sql)
    message = str(refused.value)
    assert message.startswith("refused: "), message
    assert named in message, message
    with pytest.raises(QueryRefused):
        surface.text(sql, "CSVWithNames")


def test_the_corpus_is_large_and_varied() -> None:
    assert len(HOSTILE) >= 30
    assert len({named for _, named in HOSTILE}) >= 30


# From a review of the guard (.local/sqlreview/report.md): attacks it was found to refuse,
# kept so that it goes on refusing them. `secrets` is the store's table that is not the
# event log. (statement, what must raise, what its message must name): QueryRefused naming
# what was refused, or ClickHouse's own error (not a refusal) where the text does not parse
# or cannot be read as a query without a value the surface never binds.
_NOT_EVENTS = "table secrets is not part of the event log"
REFUSED_TOO: list[tuple[str, type[StoreError], str]] = [
    # another table as the right side of IN, however IN is written or the table named
    ("SELECT 'hunter2' IN (secrets)", QueryRefused, _NOT_EVENTS),
    ("SELECT in('hunter2', secrets)", QueryRefused, _NOT_EVENTS),
    ("SELECT globalIn('hunter2', secrets)", QueryRefused, _NOT_EVENTS),
    ("SELECT ('hunter2',) IN secrets", QueryRefused, _NOT_EVENTS),
    ("SELECT event_id GLOBAL IN secrets FROM events", QueryRefused, _NOT_EVENTS),
    ("SELECT 'hunter2' IN `secrets`", QueryRefused, _NOT_EVENTS),
    ("SELECT 'hunter2' IN \"secrets\"", QueryRefused, _NOT_EVENTS),
    ("SELECT 'hunter2' IN default.secrets", QueryRefused, "table default.secrets names a"),
    ("SELECT e.event_id IN secrets.token FROM events AS e", QueryRefused, "secrets.token names a"),
    # another table joined in
    ("SELECT * FROM events PASTE JOIN secrets", QueryRefused, _NOT_EVENTS),
    ("SELECT * FROM events AS e JOIN secrets USING (token)", QueryRefused, _NOT_EVENTS),
    ("SELECT * FROM events, secrets", QueryRefused, _NOT_EVENTS),
    # ClickHouse reads the WITH query here, not the table; the guard does not follow
    # WITH scopes, so a name of a table of the current database is refused wherever it is.
    ("WITH secrets AS (SELECT 1) SELECT * FROM secrets", QueryRefused, _NOT_EVENTS),
    # DESCRIBE of another table, directly or through a subquery
    ("DESCRIBE TABLE secrets", QueryRefused, _NOT_EVENTS),
    ("DESC (SELECT * FROM secrets)", QueryRefused, _NOT_EVENTS),
    # EXPLAIN as a subquery is the table function viewExplain()
    ("SELECT * FROM (EXPLAIN AST SELECT 1)", QueryRefused, "table function viewExplain()"),
    # a table function as the right side of IN
    ("SELECT 1 IN numbers(10)", QueryRefused, "function numbers() is not one of"),
    # another table read in a parameter, a WITH FILL step
    (
        "SELECT * FROM metric_event_count(event_type = 'agent_spawned',"
        " since = '2000-01-01 00:00:00', until = (SELECT max(token) FROM secrets))",
        QueryRefused,
        _NOT_EVENTS,
    ),
    (
        "SELECT toUInt64(1) AS n ORDER BY n WITH FILL STEP (SELECT count() FROM secrets)",
        QueryRefused,
        _NOT_EVENTS,
    ),
    # file() in the less common places an expression may sit
    (
        "SELECT * REPLACE (file('/etc/hostname') AS event_id) FROM events",
        QueryRefused,
        "function file()",
    ),
    (
        "SELECT count() OVER w FROM events WINDOW w AS (PARTITION BY file('/etc/hostname'))",
        QueryRefused,
        "function file()",
    ),
    (
        "SELECT f FROM events LEFT ARRAY JOIN file('/etc/hostname') AS f",
        QueryRefused,
        "function file()",
    ),
    ("SELECT COLUMNS('.*') APPLY x -> file(x) FROM events", QueryRefused, "APPLY(<function>)"),
    # SETTINGS in an IN subquery; FORMAT Null
    ("SELECT 1 IN (SELECT 1 SETTINGS readonly = 0)", QueryRefused, "SETTINGS clause"),
    ("SELECT 1 FORMAT Null", QueryRefused, "FORMAT clause"),
    # the server's identity, the transaction and the query, under other spellings
    ("SELECT hostname()", QueryRefused, "function hostname()"),
    ("SELECT `hostName`()", QueryRefused, "function hostName()"),
    ("SELECT transactionID()", QueryRefused, "function transactionID()"),
    ("SELECT currentQueryID()", QueryRefused, "function currentQueryID()"),
    # a line separator inside a comment: the comment is gone, file() is still refused
    ("SELECT 1 /* \u2028 */, file('/etc/hostname')", QueryRefused, "function file()"),
    # not SQL to ClickHouse: an escaped semicolon, full-width letters
    ("SELECT 1 \\; SELECT 2", StoreError, "(SYNTAX_ERROR)"),
    ("ＳＥＬＥＣＴ 1", StoreError, "(SYNTAX_ERROR)"),
    ("SELECT ｆｉｌｅ('/etc/hostname')", StoreError, "(SYNTAX_ERROR)"),
    # a query parameter the surface never binds, as a value and as a table
    ("SELECT {t:Identifier}", StoreError, "(UNKNOWN_QUERY_PARAMETER)"),
    ("SELECT * FROM {t:Identifier}", StoreError, "(UNKNOWN_QUERY_PARAMETER)"),
    # a forged line of the parser's dump after a carriage return in a quoted name, and
    # after a form feed in a literal (which the dump escapes: what follows is walked)
    (
        f"SELECT tuple(file('/etc/hostname')) AS `x)\r{_FORGED_LINE}`",
        QueryRefused,
        "has an escape",
    ),
    (
        f"SELECT tuple('a\x0c {_FORGED_LINE}' AS q, (SELECT groupArray(token) FROM secrets)) AS r",
        QueryRefused,
        _NOT_EVENTS,
    ),
]


@pytest.mark.parametrize(
    ("sql", "error", "named"), REFUSED_TOO, ids=[repr(s) for s, _, _ in REFUSED_TOO]
)
def test_statement_found_refused_in_review_stays_refused(
    surface: GuardedQueries, sql: str, error: type[StoreError], named: str
) -> None:
    for run in (lambda: surface.query(sql), lambda: surface.text(sql, "CSVWithNames")):
        with pytest.raises(StoreError) as failed:
            run()
        message = str(failed.value)
        if error is QueryRefused:
            assert isinstance(failed.value, QueryRefused), message
            assert message.startswith("refused: "), message
        else:
            assert not isinstance(failed.value, QueryRefused), message
        assert named in message, message


# ClickHouse files the functions that read the server, the session or the query under
# these categories. Each one it lists there has been looked at: it is refused, or it is
# here because it computes only from its arguments, the block or the query's own text.
SERVER_CATEGORIES = ("Other", "Introspection")
REVIEWED_HARMLESS = frozenset(
    """
    MACNumToString MACStringToNum MACStringToOUI bar blockNumber blockSerializedSize blockSize
    byteSize colorOKLABToSRGB colorOKLCHToSRGB colorSRGBToOKLAB colorSRGBToOKLCH countDigits
    currentDatabase currentSchemas defaultValueOfArgumentType defaultValueOfTypeName digits
    dumpColumnStructure errorCodeToName finalizeAggregation flipCoordinates formatQuery
    formatQueryFromJSON formatQueryOrNull formatQuerySingleLine formatQuerySingleLineOrNull
    formatReadableDecimalSize formatReadableQuantity formatReadableSize formatReadableTimeDelta
    fuzzQuery generateRandomStructure getSizeOfEnumType getSubcolumn getTypeSerializationStreams
    highlightQuery identity ignore indexHint initializeAggregation isConstant isDecimalOverflow
    isMergeTreePartCoveredBy lowCardinalityIndices lowCardinalityKeys materialize
    mergeTreePartInfo minSampleSizeContinuous minSampleSizeConversion neighbor normalizeQuery
    normalizeQueryKeepNames normalizedQueryHash normalizedQueryHashKeepNames obfuscateQuery
    obfuscateQueryWithSeed parseISO8601Duration parseQueryToJSON parseReadableSize
    parseReadableSizeOrNull parseReadableSizeOrZero parseTimeDelta partitionId
    rowNumberInAllBlocks rowNumberInBlock runningAccumulate runningConcurrency runningDifference
    runningDifferenceStartingWithFirstValue structureToCapnProtoSchema
    structureToProtobufSchema throwIf toColumnTypeName toTypeName tokenizeQuery transform
    variantElement variantType visibleWidth
    """.split()
)


def test_every_server_category_function_is_refused_or_reviewed(
    surface: GuardedQueries, store: ClickHouseStore
) -> None:
    # functions.txt holds no function of these categories that reads the server: each
    # one it allows there is in the list above, which says why it is harmless.
    listed = store.query(
        "SELECT name, categories FROM system.functions"
        " WHERE origin = 'System' AND alias_to = '' AND categories IN"
        f" {SERVER_CATEGORIES!r}"
    ).rows
    catalog = surface.catalog()
    unreviewed = sorted(
        str(name)
        for name, _ in listed
        if catalog.refusal(str(name)) is None and str(name) not in REVIEWED_HARMLESS
    )
    assert unreviewed == [], f"refuse them in sqlguard._DENIED or review them: {unreviewed}"
    assert len(listed) > len(REVIEWED_HARMLESS)  # the engine still files functions there


def test_a_function_nobody_reviewed_is_refused_even_when_the_engine_has_it(
    store: ClickHouseStore,
) -> None:
    # As a newer engine's new function would be: the engine lists it, functions.txt does
    # not. The same for an aggregate combinator.
    full = reviewed_functions()
    assert {"lower", "upper", "count"} <= full.functions and "If" in full.combinators
    catalog = load_catalog(store, reviewed=Reviewed(full.functions - {"lower"}, full.combinators))
    with pytest.raises(QueryRefused, match=r"function lower\(\) is new .* not yet reviewed"):
        check_query("SELECT lower('A')", store, catalog)
    with pytest.raises(QueryRefused, match=r"function LOWER\(\) is new"):
        check_query("SELECT LOWER('A')", store, catalog)
    assert check_query("SELECT upper('a')", store, catalog) == "SELECT upper('a')"
    no_if = load_catalog(store, reviewed=Reviewed(full.functions, full.combinators - {"If"}))
    with pytest.raises(QueryRefused, match=r"function countIf\(\) is not one of"):
        check_query("SELECT countIf(1 = 1)", store, no_if)
    assert check_query("SELECT count()", store, no_if) == "SELECT count()"
    # The review lists both, and a reviewed name the engine lacks as gone.
    found = unreviewed(
        store, Reviewed(full.functions - {"lower"} | {"notAFunction"}, full.combinators - {"If"})
    )
    assert found == {"functions": ["lower"], "combinators": ["If"], "gone": ["notAFunction"]}


def test_the_reviewed_list_allows_nothing_the_guard_denies(store: ClickHouseStore) -> None:
    reviewed = reviewed_functions()
    aliases = dict(
        store.query(
            "SELECT name, alias_to FROM system.functions WHERE origin = 'System' AND alias_to != ''"
        ).rows
    )
    denied = sorted(
        name
        for name in reviewed.functions
        if sqlguard._denial(name) or sqlguard._denial(aliases.get(name, ""))
    )
    assert denied == []
    assert len(reviewed.functions) > 1500 and len(reviewed.combinators) >= 10
    catalog = load_catalog(store)
    for name in ("file", "getSetting", "hostName", "dictGet", "sleep"):
        assert catalog.refusal(name) is not None


def test_the_review_command_lists_what_the_file_lacks(tmp_path: Path) -> None:
    # A process of its own: one embedded engine per process, and this module has one.
    text = sqlguard._REVIEWED_FILE.read_text(encoding="utf-8")
    short = tmp_path / "functions.txt"
    short.write_text(text.replace("\nlower\n", "\n").replace("\n-If\n", "\n"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKHOUSE_")}
    command = [sys.executable, "-m", "services.analytics.sqlguard", "--functions"]
    done = subprocess.run(
        [*command, str(short)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "functions to review: 1\n  lower\n" in done.stdout
    assert "combinators to review: 1\n  If\n" in done.stdout


_ZONE_PROBE = """
import tempfile
from pathlib import Path
from services.analytics.sqlguard import GuardedQueries
from services.analytics.store import ClickHouseStore
store = ClickHouseStore(path=Path(tempfile.mkdtemp()) / "ch")
store.apply_schema()
host = store.query("SELECT timezoneOf(now())").rows[0][0]
seen = GuardedQueries(store).query("SELECT timezoneOf(now()), toString(today())").rows[0]
print(host, *seen)
"""


def test_the_surface_shows_utc_not_the_hosts_time_zone() -> None:
    # A process of its own, in a zone far from UTC: the trusted reader shows it, the
    # surface's sessions do not, and its today() is the UTC day the budget counts in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKHOUSE_")}
    env["TZ"] = "Pacific/Kiritimati"  # UTC+14: from 10:00 UTC on, its date is tomorrow's
    before = datetime.now(UTC).date().isoformat()
    done = subprocess.run(
        [sys.executable, "-c", _ZONE_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    host, zone, day = done.stdout.split()
    assert host == "Pacific/Kiritimati"
    assert zone == "UTC"
    assert day in (before, datetime.now(UTC).date().isoformat())


def test_refused_statements_had_no_effect(
    surface: GuardedQueries, store: ClickHouseStore, secret_file: Path
) -> None:
    outfile = secret_file.parent / "written.csv"
    for sql in (
        f"SELECT 1 INTO OUTFILE '{outfile}'",
        f"SELECT 1; SELECT 1 INTO OUTFILE '{outfile}'",
        f"SELECT 1 FROM events INTO OUTFILE '{outfile}' FORMAT CSV SETTINGS max_threads = 1",
    ):
        with pytest.raises(QueryRefused):
            surface.query(sql)
    assert not outfile.exists()
    assert not Path(OUT).exists()
    assert store.query("SELECT count() FROM secrets").rows == [(1,)]


def test_readonly_alone_is_no_sandbox_so_the_guard_decides(
    store: ClickHouseStore, surface: GuardedQueries, secret_file: Path
) -> None:
    # The limited session itself (readonly=1) reads files: this is why nothing reaches
    # it unchecked. Should chdb ever refuse this, the guard still must.
    read = f"SELECT file('{secret_file}')"
    assert store.query_limited(read).rows == [("the-secret-content\n",)]
    with pytest.raises(QueryRefused, match=r"function file\(\)"):
        surface.query(read)


def test_the_limited_session_holds_its_limits_and_refuses_changes(store: ClickHouseStore) -> None:
    got = store.query_limited(
        "SELECT getSetting('max_execution_time'), getSetting('readonly'),"
        " getSetting('max_result_rows'), getSetting('max_threads')"
    ).rows[0]
    assert (float(got[0]), int(got[1]), int(got[2]), int(got[3])) == (1.5, 1, 20_000, 1)
    for change in ("SET max_execution_time = 0", "SET readonly = 0"):
        with pytest.raises(StoreError, match="READONLY"):
            store.query_limited(change)


# -- what users rely on ---------------------------------------------------------------

LEGITIMATE = [
    "SELECT 1",
    "SELECT 41 + 1 AS answer;",
    "SELECT 1 /* ; SELECT file('/etc/passwd') */",
    "SELECT 1 -- ; DROP TABLE events",
    "SELECT count() FROM events FINAL",
    "SELECT count() FROM events_final",
    "select event_type, count() AS n from events_final group by event_type order by n desc, 1",
    "SELECT uniqExact(event_id) FROM events WHERE source = 'bench'",
    "SELECT event_type, countIf(cost_usd > 0), sumIf(cost_usd, cost_usd IS NOT NULL),"
    " avgOrNull(latency_ms), quantileExactOrNull(0.95)(latency_ms),"
    " quantilesExact(0.5, 0.9)(ifNull(latency_ms, 0)) FROM events FINAL GROUP BY event_type"
    " ORDER BY event_type",
    "SELECT toStartOfHour(occurred_at) AS hour, count() FROM events FINAL"
    " WHERE occurred_at >= now64(3) - INTERVAL 7 DAY GROUP BY hour ORDER BY hour",
    "SELECT goal_id, sum(cost_usd) AS spend FROM events FINAL"
    " WHERE event_type = 'llm_call_completed' GROUP BY goal_id ORDER BY spend DESC LIMIT 5",
    "SELECT JSONExtractString(payload, 'text') AS text, length(text) FROM events_final"
    " WHERE event_type = 'workflow_completed' ORDER BY event_id LIMIT 3",
    "WITH runs AS (SELECT run_id, max(occurred_at) AS last FROM events FINAL GROUP BY run_id)"
    " SELECT count() FROM runs WHERE last > '2020-01-01'",
    "WITH t AS (SELECT event_id FROM events WHERE event_type = 'feedback_received')"
    " SELECT count() FROM events WHERE event_id IN t",
    "SELECT count() FROM events WHERE event_id IN (SELECT event_id FROM events_final LIMIT 10)",
    "SELECT * FROM (SELECT event_type FROM events WHERE event_type = 'workflow_failed'"
    " UNION ALL SELECT event_type FROM events_final WHERE event_type = 'agent_spawned')"
    " ORDER BY event_type",
    "SELECT run_id, row_number() OVER (PARTITION BY goal_id ORDER BY occurred_at) AS n,"
    " lagInFrame(occurred_at) OVER w FROM events FINAL WHERE source != 'bench'"
    " WINDOW w AS (ORDER BY occurred_at, event_id) ORDER BY occurred_at, event_id",
    "SELECT arrayMap(x -> x * 2, [1, 2, 3]), arrayFilter(s -> s != '', ['a', '']),"
    " CASE event_type WHEN 'x' THEN 1 ELSE 0 END, if(score >= 4, 'good', 'other'),"
    " multiIf(score IS NULL, 'none', 'some'), toDate(occurred_at), formatDateTime(occurred_at,"
    " '%F'), lower(specialty), coalesce(quality, 0) FROM events_final ORDER BY event_id LIMIT 5",
    "SELECT specialty, groupArraySorted(3)(run_id), argMax(event_type, occurred_at)"
    " FROM events FINAL GROUP BY specialty ORDER BY specialty",
    "SELECT e.event_type, f.event_type FROM events_final AS e"
    " INNER JOIN events_final AS f ON e.run_id = f.run_id WHERE e.source != 'bench'"
    " ORDER BY e.event_id, f.event_id LIMIT 10",
    "SELECT * EXCEPT (payload, ingested_at) FROM events_final WHERE source != 'bench'"
    " ORDER BY event_id LIMIT 2",
    "SELECT COLUMNS('_id$') FROM events_final ORDER BY event_id LIMIT 1",
    "SELECT currentDatabase(), today(), toTypeName(occurred_at) FROM events LIMIT 1",
    "DESCRIBE TABLE events",
    "DESCRIBE (SELECT event_id, cost_usd FROM events)",
    "SELECT * FROM metric_event_count(event_type = 'agent_spawned',"
    " since = '2000-01-01 00:00:00.000', until = '2100-01-01 00:00:00.000')",
    "SELECT * FROM metric_response_time(since = '2000-01-01 00:00:00', until = '2100-01-01')",
]


@pytest.mark.parametrize("sql", LEGITIMATE)
def test_legitimate_query_answers_as_the_engine_would(
    surface: GuardedQueries, store: ClickHouseStore, sql: str
) -> None:
    assert surface.query(sql) == store.query(sql)
    assert surface.text(sql, "CSVWithNames") == store.query_text(sql, "CSVWithNames")


@pytest.mark.parametrize("name", sorted(metric_queries(now=NOW)))
def test_every_metric_query_passes_the_guard(
    surface: GuardedQueries, store: ClickHouseStore, name: str
) -> None:
    sql = metric_queries(now=NOW, since=NOW - timedelta(days=30))[name]
    assert surface.check(sql).split()[:4] == ["SELECT", "*", "FROM", sql.split()[3]]
    assert surface.query(sql) == store.query(sql)


def test_the_dashboard_through_the_guard_equals_the_trusted_path(
    surface: GuardedQueries, store: ClickHouseStore
) -> None:
    for since in (None, timedelta(days=1), timedelta(days=30)):
        guarded = compute_metrics(surface, now=NOW, since=since)
        assert guarded == compute_metrics(store, now=NOW, since=since)
    assert guarded["user_feedback_items"] == 3
    assert guarded["agents_spawned_today"] >= 1


def test_check_returns_the_one_statement_it_checked(store: ClickHouseStore) -> None:
    statement = check_query("select   1 -- x\n;", store)
    assert statement == "SELECT 1"


def test_a_syntax_error_is_clickhouses_message_about_the_users_text(
    surface: GuardedQueries,
) -> None:
    with pytest.raises(StoreError, match=r"Code: 62\. DB::Exception: Syntax error") as err:
        surface.query("SELEC 1")
    assert not isinstance(err.value, QueryRefused)
    assert "formatQuery" not in str(err.value)


# -- heavy queries the guard lets through: the limits stop them ---------------------------

# Each statement, and the error code of the limit that must stop it.
HEAVY = {
    "SELECT count() FROM events AS a, events AS b, events AS c": "TIMEOUT_EXCEEDED",
    "SELECT sum(cityHash64(a.payload, b.payload)) FROM events AS a CROSS JOIN events AS b": (
        "TIMEOUT_EXCEEDED"
    ),
    "SELECT count() FROM (SELECT event_id FROM events UNION ALL SELECT event_id FROM events"
    " UNION ALL SELECT event_id FROM events UNION ALL SELECT event_id FROM events)": (
        "TOO_MANY_ROWS"
    ),
    "SELECT event_id FROM events": "TOO_MANY_ROWS_OR_BYTES",
    "SELECT a.event_id, b.event_id FROM events AS a, events AS b": "TOO_MANY_ROWS_OR_BYTES",
    "SELECT groupArray(repeat(payload, 1000)) FROM events": "MEMORY_LIMIT_EXCEEDED",
    "SELECT length(repeat('x', 1000000000))": "MEMORY_LIMIT_EXCEEDED",
    "SELECT length(arrayJoin([range(100000000)]))": "MEMORY_LIMIT_EXCEEDED",
    # One block of rows past the result limit (the limit is checked between blocks).
    "SELECT arrayJoin(range(3000000))": "TOO_MANY_ROWS_OR_BYTES",
}


@pytest.mark.parametrize(("sql", "code"), HEAVY.items())
def test_heavy_query_is_stopped_by_a_limit_and_the_surface_still_answers(
    surface: GuardedQueries, sql: str, code: str
) -> None:
    assert surface.check(sql)  # allowed by the guard...
    with pytest.raises(StoreError) as stopped:
        surface.query(sql)  # ...and stopped by the engine
    assert not isinstance(stopped.value, QueryRefused)
    assert f"({code})" in str(stopped.value), str(stopped.value)
    # A result cut off midway must not leak into the next answer.
    assert surface.query("SELECT count() FROM events WHERE source = 'bench'").rows == [
        (SYNTHETIC_ROWS,)
    ]
    assert surface.text("SELECT 7 AS n", "CSVWithNames") == '"n"\n7\n'


def test_a_result_rendered_past_the_byte_limit_fails_and_the_surface_still_answers(
    surface: GuardedQueries,
) -> None:
    # 19,000 rows of 1,000 bytes (19 MB) under a 16 MiB limit: ClickHouse checks the limit
    # between blocks, and these came in one; the rendered answer is held to it too.
    sql = "SELECT repeat('x', 1000) FROM (SELECT arrayJoin(range(19000)))"
    with pytest.raises(StoreError, match=r"over the 16,777,216 .*\(TOO_MANY_ROWS_OR_BYTES\)"):
        surface.text(sql, "CSV")
    assert surface.text("SELECT 7 AS n", "CSVWithNames") == '"n"\n7\n'
    # Under the limit, the same kind of answer comes whole.
    small = "SELECT repeat('x', 1000) FROM (SELECT arrayJoin(range(1000)))"
    assert surface.text(small, "CSV").count("\n") == 1000


# -- parts without the engine -------------------------------------------------------------


def test_limits_come_from_the_environment() -> None:
    limits = AnalyticsSettings.from_env(
        {
            "ORCH_SQL_MAX_SECONDS": "2.5",
            "ORCH_SQL_MAX_MEMORY_MB": "64",
            "ORCH_SQL_MAX_READ_ROWS": "1000",
            "ORCH_SQL_MAX_READ_MB": "10",
            "ORCH_SQL_MAX_RESULT_ROWS": "50",
            "ORCH_SQL_MAX_RESULT_MB": "1",
            "ORCH_SQL_MAX_THREADS": "2",
        }
    ).query_limits()
    settings = limits.settings()
    assert settings["max_execution_time"] == 2.5
    assert settings["max_memory_usage"] == 64 * 1024 * 1024
    assert settings["max_rows_to_read"] == 1000
    assert settings["max_bytes_to_read"] == 10 * 1024 * 1024
    assert settings["max_result_rows"] == 50
    assert settings["max_result_bytes"] == 1024 * 1024
    assert settings["max_threads"] == 2
    assert settings["result_overflow_mode"] == "throw"
    assert list(settings)[-1] == "readonly" and settings["readonly"] == 1
    assert AnalyticsSettings.from_env({}).query_limits() == QueryLimits()
    with pytest.raises(ValueError, match="ORCH_SQL_MAX_SECONDS"):
        AnalyticsSettings.from_env({"ORCH_SQL_MAX_SECONDS": "0"})
    with pytest.raises(ValueError, match="ORCH_SQL_MAX_RESULT_ROWS"):
        AnalyticsSettings.from_env({"ORCH_SQL_MAX_RESULT_ROWS": "lots"})


def test_the_event_tables_are_the_ddls() -> None:
    tables = event_tables()
    assert {"events", "events_final", "metric_event_count", "metric_spend_by_goal"} <= tables
    assert not any(t.startswith("system") for t in tables)


def test_parser_output_that_is_not_one_tree_is_refused() -> None:
    assert parse_ast("SelectWithUnionQuery (children 1)\n ExpressionList\n").kind == (
        "SelectWithUnionQuery"
    )
    with pytest.raises(QueryRefused, match="more than one statement"):
        parse_ast("SelectWithUnionQuery\nSelectWithUnionQuery\n")
    with pytest.raises(QueryRefused, match="indentation"):
        parse_ast("SelectWithUnionQuery (children 1)\n   ExpressionList\n")
    with pytest.raises(QueryRefused, match="no statement"):
        parse_ast("\n")


def test_no_file_was_written_by_the_corpus() -> None:
    assert not os.path.exists(OUT)


# Found by a review on 2026-12-06; each ran before (through the real query server).
FOUND_LATER: list[tuple[str, str]] = [
    # Settings ClickHouse folds into the query: no Set node, readonly lets them through;
    # limit = 0 lifted the session's row cut (3,000,000 rows back under a 1,000,000 cut).
    ("SELECT arrayJoin(range(3000000)) AS n SETTINGS limit = 0", "SETTINGS clause"),
    ("SELECT * FROM events SETTINGS offset = 0", "SETTINGS clause"),
    ("SELECT * FROM (SELECT 1 SETTINGS limit = 0)", "SETTINGS clause"),
    # Quadratic in a row's own values: 8-12 s a row at a 1 s limit.
    (
        "SELECT hasAny(arrayMap(x -> toString(x), range(60000)),"
        " arrayMap(x -> toString(x + 1000000), range(60000)))",
        "function hasAny()",
    ),
    ("SELECT hasAll([1], [1])", "function hasAll()"),
    (
        "SELECT countSubstringsCaseInsensitiveUTF8(repeat('a', 1000000), 'aab')",
        "function countSubstringsCaseInsensitiveUTF8()",
    ),
    ("SELECT multiSearchAllPositions('abc', ['a'])", "function multiSearchAllPositions()"),
    ("SELECT multiMatchAny('x', ['q[a-z]{2,9}z'])", "function multiMatchAny()"),
    # A bare name that is neither an event table nor a WITH name reached the engine, which
    # told files of its working directory (READONLY) from names of nothing (UNKNOWN_TABLE).
    ("SELECT * FROM Makefile", "table Makefile is not part of the event log"),
    ("SELECT * FROM Makefil", "table Makefil is not part of the event log"),
    ("SELECT * FROM api_token", "table api_token is not part of the event log"),
]


@pytest.mark.parametrize(("sql", "named"), FOUND_LATER, ids=[s[:60] for s, _ in FOUND_LATER])
def test_what_a_later_review_ran_is_refused(surface: GuardedQueries, sql: str, named: str) -> None:
    with pytest.raises(QueryRefused) as refused:
        surface.text(sql, "CSVWithNames")
    assert named in str(refused.value), str(refused.value)


def test_an_aggregate_named_by_a_string_is_no_way_into_introspection(
    surface: GuardedQueries,
) -> None:
    # flameGraph is refused by name; arrayReduce('flameGraph', ...) turned addresses of the
    # sink's process into its symbols. Introspection is off for the session.
    with pytest.raises(StoreError, match="FUNCTION_NOT_ALLOWED|allow_introspection"):
        surface.text("SELECT arrayReduce('flameGraph', [[toUInt64(1)]])", "CSVWithNames")


def test_with_names_and_the_event_tables_still_answer(surface: GuardedQueries) -> None:
    assert (
        surface.text(
            "WITH t AS (SELECT 1 AS x), `u` AS (SELECT 2 AS y) SELECT x, y FROM t, `u`", "CSV"
        )
        == "1,2\n"
    )
    assert surface.text("SELECT count() > -1 FROM events", "CSV") == "1\n"
    assert surface.text("SELECT 1 AS SETTINGS", "CSV") == "1\n"  # a name, not a clause


def test_a_query_nested_past_pythons_recursion_is_refused_and_the_surface_answers(
    surface: GuardedQueries,
) -> None:
    # 200 nested calls overflowed the walker's recursion: the server dropped the
    # connection, and the CLI said the analytics service was not running.
    deep = "SELECT " + "abs(" * 300 + "1" + ")" * 300
    with pytest.raises(StoreError, match="nests too deep|too deep|TOO_DEEP"):
        surface.text(deep, "CSV")
    assert surface.text("SELECT 1", "CSV") == "1\n"
