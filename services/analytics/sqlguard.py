"""What the analytics SQL surface runs: reads of the event log, within limits, and nothing else.

ClickHouse's ``readonly=1`` refuses writes to tables, but the embedded engine still
reads files (``file('/etc/passwd')``), writes them (``INTO OUTFILE``) and runs any
table function the build has. So every statement that comes through the surface
(``orchestrator sql``, ``orchestrator metrics``, the sink's query server) is
decided here before it runs:

1. ClickHouse's own parser checks it is exactly one statement: the text goes in
   as a bound *parameter* of ``formatQuery``, so it is data, never code. The
   statement that later runs is the one ``formatQuery`` returned.
2. ``EXPLAIN AST`` of that one statement (it parses, it does not execute) gives
   the syntax tree, which is walked against allowlists: statement kinds, node
   kinds, tables (the event log's own, from ``infra/clickhouse``) and functions:
   those of the engine's own list that were reviewed (``functions.txt``, which
   leaves out everything that reaches files, the network, processes, other
   servers, settings or the environment). A function a newer engine brings is
   refused until it is reviewed: ``python -m services.analytics.sqlguard`` lists
   them.
3. It runs on a session whose limits (:class:`QueryLimits`) are set before
   ``readonly=1``, so the statement cannot lift them.

Comments, letter case and quoting never reach the tree walk: the parser has
removed or normalised them.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from services.analytics.store import QueryLimits, QueryResult, ddl_statements
from streams.errors import QueryRefused, StoreError

__all__ = [
    "Catalog",
    "GuardEngine",
    "Reviewed",
    "GuardedQueries",
    "QueryLimits",
    "QueryRefused",
    "check_query",
    "event_tables",
    "load_catalog",
    "parse_ast",
    "reviewed_functions",
    "unreviewed",
]


class GuardEngine(Protocol):
    """What the guard needs from a store (``ClickHouseStore`` has it)."""

    def query(self, sql: str, *, readonly: bool = True) -> QueryResult:
        """A trusted internal read (the catalog, the current database's tables)."""
        ...

    def query_limited(
        self, sql: str, parameters: Mapping[str, str] | None = None, *, parsing: bool = False
    ) -> QueryResult:
        """A read on a limited session; ``parsing``: the session the guard parses on."""
        ...

    def text_limited(
        self, sql: str, clickhouse_format: str | None, *, parsing: bool = False
    ) -> str:
        """As :meth:`query_limited`, rendered; ``None``: the engine's default TabSeparated."""
        ...

    def close(self) -> None: ...


# -- the event log's tables -----------------------------------------------------------

_DDL_NAME = re.compile(
    r"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?(?:TABLE|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?`?(\w+)`?",
    re.IGNORECASE,
)


def event_tables(statements: list[str] | None = None) -> frozenset[str]:
    """The tables and views our own DDL (``infra/clickhouse``) creates: all a query may read."""
    if statements is None:
        statements = ddl_statements()
    names = {m.group(1) for s in statements if (m := _DDL_NAME.match(s))}
    if not names:
        raise StoreError("no table in the ClickHouse DDL; is infra/clickhouse there?")
    return frozenset(names)


# -- functions --------------------------------------------------------------------------

_OUTSIDE = "reaches outside the event log"
_SERVER = "reads the server's settings, identity or environment"
_LOOKUP = "reads tables or dictionaries other than the event log"

# Lower-case names (and prefixes, ending in '*') refused with the reason, whether
# ClickHouse knows them as ordinary or table functions. An alias is refused with
# the function it stands for.
_DENIED: dict[str, str] = {
    **dict.fromkeys(
        [
            "file",
            "filecluster",
            "url",
            "urlcluster",
            "s3*",
            "hdfs*",
            "azure*",
            "gcs",
            "oss",
            "cosn",
            "remote",
            "remotesecure",
            "cluster",
            "clusterallreplicas",
            "mysql",
            "postgresql",
            "odbc",
            "jdbc",
            "mongodb",
            "redis",
            "sqlite",
            "ytsaurus",
            "bigquery",
            "iceberg*",
            "deltalake*",
            "hudi*",
            "paimon*",
            "executable*",
            "input",
            "format",
            "filesystem*",
            "python",
            "arrowstream",
            "prometheus*",
            "shell",
            "ai*",
            "naivebayesclassifier*",
            "catboostevaluate",
            "getclienthttpheader",
            "showcertificate",
            "generateserialid",
            "logtrace",
        ],
        _OUTSIDE,
    ),
    **dict.fromkeys(
        [
            "getsetting",
            "getsettingordefault",
            "getserversetting",
            "getmergetreesetting",
            "getmacro",
            "hostname",
            "fqdn",
            "getoskernelversion",
            "buildid",
            "revision",
            "version",
            "uptime",
            "serveruuid",
            "getserverport",
            "tcpport",
            "displayname",
            "currentuser",
            "authenticateduser",
            "currentprofiles",
            "enabledprofiles",
            "defaultprofiles",
            "currentroles",
            "enabledroles",
            "defaultroles",
            "globalvariable",
            "zookeepersessionuptime",
            "transactionid",
            "transactionlatestsnapshot",
            "transactionoldestsnapshot",
            "getmaxtablenamelengthfordatabase",
            "addresstoline",
            "addresstolinewithinlines",
            "addresstosymbol",
            "demangle",
            "tid",
            "currentrequesturl",
            # PostgreSQL compatibility: pgGetUserById(any) answers the current user.
            "pggetuserbyid",
            "pgtableisvisible",
            # Domains cut by a top-level-domain list the server's configuration names.
            "cuttofirstsignificantsubdomaincustom*",
            "firstsignificantsubdomaincustom*",
            # The session's and the server's time zone (a setting and the host's own).
            "timezone",
            "servertimezone",
            # The embedded engine's version, as version() is the server's.
            "chdb",
            # This connection, query and shard as the server knows them.
            "connectionid",
            "currenthandler",
            "currentqueryid",
            "queryid",
            "initialqueryid",
            "initialquerystarttime",
            "shardnum",
            "shardcount",
            "hasthreadfuzzer",
        ],
        _SERVER,
    ),
    **dict.fromkeys(
        ["dict*", "dictionary", "joinget*", "hascolumnintable", "region*", "merge", "view*"],
        _LOOKUP,
    ),
    **dict.fromkeys(
        [
            # Time quadratic in a row's own values (strings up to the memory limit): one
            # row can take minutes, and the time limit is checked between blocks only.
            "editdistance",
            "editdistanceutf8",
            "dameraulevenshteindistance",
            "jarosimilarity",
            "jarowinklersimilarity",
            "arraylevenshteindistance*",
            "arraysimilarity",
            "multifuzzymatch*",
            # Calls its lambda once per element with a growing accumulator: the same.
            "arrayfold",
            # Every element against every other (60,000 strings each side: 12 s a row at
            # a 1 s limit), every needle against the haystack, every pattern compiled.
            "hasany",
            "hasall",
            "hassubstr",
            "countsubstrings*",
            "multisearch*",
            "multimatch*",
        ],
        "can run past the time limit within one row",
    ),
    # The engine's own stack traces (introspection), as addressToSymbol is.
    "flamegraph": _SERVER,
    "sleep": "holds a query thread idle",
    "sleepeachrow": "holds a query thread idle",
    "__*": "is internal to ClickHouse",
}
_DENIED_EXACT = {k: v for k, v in _DENIED.items() if not k.endswith("*")}
_DENIED_PREFIX = [(k[:-1], v) for k, v in _DENIED.items() if k.endswith("*")]

# Parser-made functions ClickHouse does not list.
_SYNTAX_FUNCTIONS = frozenset({"lambda"})
# in, notIn, globalNotNullIn, notInIgnoreSet, ...: `x IN name` reads the table `name`.
_IN_FUNCTION = re.compile(r"^(global)?(not)?(null)?in(ignoreset)?$", re.IGNORECASE)


def _denial(name: str) -> str | None:
    low = name.lower()
    if low in _DENIED_EXACT:
        return _DENIED_EXACT[low]
    for prefix, reason in _DENIED_PREFIX:
        if low.startswith(prefix):
            return reason
    return None


# The functions and aggregate combinators someone has looked at and found to compute
# only from their arguments, the rows and the query's own text: the engine's list is
# met with this one, so what a newer engine (or a server) adds is refused until it is
# reviewed, whatever it does.
_REVIEWED_FILE = Path(__file__).with_name("functions.txt")


class Reviewed(NamedTuple):
    """The reviewed allowlist: function names (exact case) and combinators (``If``, ...)."""

    functions: frozenset[str]
    combinators: frozenset[str]


def reviewed_functions(path: Path | None = None) -> Reviewed:
    """The allowlist in ``functions.txt``: a name a line, combinators written ``-If``."""
    functions: set[str] = set()
    combinators: set[str] = set()
    for line in (path or _REVIEWED_FILE).read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry.startswith("-"):
            combinators.add(entry[1:])
        elif entry:
            functions.add(entry)
    if not functions:
        raise StoreError(f"no reviewed function in {path or _REVIEWED_FILE}")
    return Reviewed(frozenset(functions), frozenset(combinators))


@dataclass
class Catalog:
    """The functions the surface allows: the engine's ``system.functions`` met with the
    reviewed list, minus :data:`_DENIED`."""

    exact: frozenset[str]
    case_insensitive: frozenset[str]  # lower-case
    aggregates: frozenset[str]
    combinators: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # name -> the function it stands for
    tables: frozenset[str] = field(default_factory=event_tables)
    # The engine's functions nobody has reviewed yet (lower-case): refused as such.
    new: frozenset[str] = frozenset()
    _seen: dict[str, bool] = field(default_factory=dict, repr=False)

    def refusal(self, name: str) -> str | None:
        """Why function ``name`` is refused, or None when it may run."""
        target = self.aliases.get(name) or self.aliases.get(name.lower(), "")
        reason = _denial(name) or _denial(target)
        if reason is not None:
            return f"refused: function {name}() {reason}"
        if self._known(name):
            return None
        if name.lower() in self.new:
            return (
                f"refused: function {name}() is new in this ClickHouse and not yet reviewed"
                " for this surface"
            )
        return f"refused: function {name}() is not one of the functions the surface allows"

    def _known(self, name: str) -> bool:
        if name in self._seen:
            return self._seen[name]
        known = (
            name in self.exact
            or name.lower() in self.case_insensitive
            or name in _SYNTAX_FUNCTIONS
            or self._aggregate(name)
        )
        self._seen[name] = known
        return known

    def _aggregate(self, name: str) -> bool:
        # countIf, sumArrayIf, quantileExactOrNull: an allowed aggregate plus combinators.
        if name in self.aggregates:
            return True
        return any(
            name.endswith(c) and len(name) > len(c) and self._aggregate(name[: -len(c)])
            for c in self.combinators
        )


def load_catalog(
    engine: GuardEngine, tables: frozenset[str] | None = None, reviewed: Reviewed | None = None
) -> Catalog:
    """Allowed functions: the engine's built-in ones that are reviewed and not denied."""
    reviewed = reviewed or reviewed_functions()
    rows = engine.query(
        "SELECT name, is_aggregate, case_insensitive, alias_to FROM system.functions"
        " WHERE origin = 'System'"
    ).rows
    aliases = {str(r[0]): str(r[3]) for r in rows if r[3]}
    aliases.update({str(r[0]).lower(): str(r[3]) for r in rows if r[3] and r[2]})

    def allowed(name: str) -> bool:
        return (
            name in reviewed.functions
            and _denial(name) is None
            and _denial(aliases.get(name, "")) is None
        )

    names = [r for r in rows if allowed(str(r[0]))]
    new = [str(r[0]) for r in rows if str(r[0]) not in reviewed.functions]
    combinators = [
        str(r[0])
        for r in engine.query("SELECT name FROM system.aggregate_function_combinators").rows
        if str(r[0]) in reviewed.combinators
    ]
    return Catalog(
        exact=frozenset(str(r[0]) for r in names),
        case_insensitive=frozenset(str(r[0]).lower() for r in names if r[2]),
        aggregates=frozenset(str(r[0]) for r in names if r[1]),
        combinators=tuple(sorted(combinators, key=len, reverse=True)),
        aliases=aliases,
        tables=tables if tables is not None else event_tables(),
        new=frozenset(n.lower() for n in new if _denial(n) is None),
    )


def unreviewed(engine: GuardEngine, reviewed: Reviewed | None = None) -> dict[str, list[str]]:
    """What to review after an engine upgrade: its functions and combinators that are
    neither reviewed nor denied, and reviewed ones the engine no longer has."""
    reviewed = reviewed or reviewed_functions()
    rows = engine.query("SELECT name, alias_to FROM system.functions WHERE origin = 'System'").rows
    names = {str(r[0]): str(r[1]) for r in rows}
    combinators = {
        str(r[0])
        for r in engine.query("SELECT name FROM system.aggregate_function_combinators").rows
    }
    return {
        "functions": sorted(
            n
            for n, target in names.items()
            if n not in reviewed.functions and _denial(n) is None and _denial(target) is None
        ),
        "combinators": sorted(combinators - reviewed.combinators),
        "gone": sorted(
            [n for n in reviewed.functions if n not in names]
            + ["-" + c for c in reviewed.combinators if c not in combinators]
        ),
    }


# -- the syntax tree --------------------------------------------------------------------


@dataclass
class Node:
    """One line of ``EXPLAIN AST``: ``<indent><Kind> [<text>] [(alias a)] [(children n)]``."""

    kind: str
    text: str
    children: list[Node] = field(default_factory=list)


_LINE = re.compile(r"^( *)(\S+)(?: +(.*))?$")
_CHILDREN = re.compile(r" +\(children (\d+)\)$")
# Characters that break or hide a line of the parser's dump: ClickHouse splits its dump
# into rows at each "\n" itself, and prints names as written and some control characters
# of literals raw. None of them may reach the walk (see check_query).
_UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f\x85\u2028\u2029]")
# The quoted tokens of a statement as formatQuery writes it (no comments; quotes and
# backslashes inside a token escaped with a backslash): string literals, then names.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`|\"(?:[^\"\\]|\\.)*\"", re.DOTALL)
_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?: \(alias .*\))?$")
_TABLE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?(?: \(alias .*\))?$")


def parse_ast(text: str) -> Node:
    """The tree of ``EXPLAIN AST`` output (TabSeparated: one node per line, one space per level).

    Lines are split at "\n" only (``str.splitlines`` would also split at characters a
    literal may carry raw, making a line of its own from the literal's text), and each
    node must have exactly the children it declares: a dump that does not add up is
    refused, not read the way it seems to read.
    """
    if _UNSAFE.search(text):
        raise QueryRefused(_CONTROL)
    root: Node | None = None
    stack: list[tuple[int, Node]] = []
    declared: list[tuple[Node, int]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        count = _CHILDREN.search(line)
        match = _LINE.match(line[: count.start()] if count else line)
        if match is None:
            raise QueryRefused(f"refused: unexpected parser output {line.strip()!r}")
        depth = len(match.group(1))
        node = Node(match.group(2), (match.group(3) or "").strip())
        declared.append((node, int(count.group(1)) if count else 0))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            if depth != stack[-1][0] + 1:
                raise QueryRefused("refused: unexpected parser output (indentation)")
            stack[-1][1].children.append(node)
        elif root is None and depth == 0:
            root = node
        else:
            raise QueryRefused("refused: more than one statement")
        stack.append((depth, node))
    if root is None:
        raise QueryRefused("refused: the parser found no statement")
    if any(len(node.children) != n for node, n in declared):
        raise QueryRefused("refused: unexpected parser output (children)")
    return root


_CONTROL = (
    "refused: control or line-separator characters in the statement; write them as escapes"
    " in a string literal (e.g. '\\n')"
)


def _check_names(statement: str) -> None:
    """Refuse names that could forge a line of the parser's dump: a quoted name with a
    line break or control character in it (formatQuery writes one with a backslash
    escape; the dump prints it raw, as a line of its own) or any backslash escape."""
    for match in _QUOTED.finditer(statement):
        token = match.group(0)
        if token[0] in '`"' and ("\\" in token or _UNSAFE.search(token) or "\n" in token):
            raise QueryRefused(
                f"refused: the name {token[:40]!r} has an escape or a control character in it"
            )
    if _UNSAFE.search(statement):
        raise QueryRefused(_CONTROL)


# Node kinds a read of the event log is made of. Function and table nodes are checked
# by name; anything not listed (APPLY transformers, dictionaries, ...) is refused.
_STRUCTURE = frozenset(
    {
        "SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "ExpressionList",
        "TablesInSelectQuery", "TablesInSelectQueryElement", "TableExpression", "TableJoin",
        "ArrayJoin", "Subquery", "WithElement", "Asterisk", "QualifiedAsterisk",
        "ColumnsTransformerList", "ColumnsExceptTransformer", "ColumnsReplaceTransformer",
        "ColumnsReplaceTransformer::Replacement", "ColumnsRegexpMatcher", "ColumnsListMatcher",
        "QualifiedColumnsRegexpMatcher", "QualifiedColumnsListMatcher", "OrderByElement",
        "WindowDefinition", "WindowListElement", "InterpolateElement", "SampleRatio",
        "Literal", "Identifier", "QueryParameter",
    }
)  # fmt: skip
_STATEMENTS = {
    "InsertQuery": "INSERT",
    "Set": "SET",
    "Explain": "EXPLAIN",
    "ShowTables": "SHOW",
    "CreateQuery": "CREATE",
    "DropQuery": "DROP",
    "AlterQuery": "ALTER",
    "SystemQuery": "SYSTEM",
    "UseQuery": "USE",
    "KillQueryQuery": "KILL",
}
_HIDDEN = {"ColumnsApplyTransformer": "APPLY(<function>), which hides the function it calls,"}
_TRAILERS = {"Literal": "INTO OUTFILE", "Identifier": "a FORMAT clause", "Set": "a SETTINGS clause"}
_SETTINGS = "refused: a SETTINGS clause; the surface's limits and readonly cannot be changed"


def _statement_name(kind: str) -> str:
    if kind in _STATEMENTS:
        return _STATEMENTS[kind]
    return re.sub(r"Query$", "", kind).upper() or kind


class _Walker:
    def __init__(
        self, catalog: Catalog, local_tables: frozenset[str], with_names: frozenset[str]
    ) -> None:
        self.catalog = catalog
        self.local_tables = local_tables
        self.with_names = with_names

    def statement(self, root: Node) -> None:
        if root.kind == "SelectWithUnionQuery":
            self.select(root)
        elif root.kind == "DescribeQuery":
            # DESCRIBE <table or subquery>: one TableExpression, checked like a FROM.
            extra = [c for c in root.children if c.kind != "TableExpression"]
            if extra:
                raise QueryRefused(f"refused: {_TRAILERS.get(extra[0].kind, extra[0].kind)}")
            self.children(root)
        else:
            raise QueryRefused(
                f"refused: a {_statement_name(root.kind)} statement; only SELECT (with WITH,"
                " UNION, INTERSECT, EXCEPT) and DESCRIBE of the event log run here"
            )

    def select(self, node: Node) -> None:
        # A SELECT's clauses sit under its first child; anything after it is INTO OUTFILE
        # (a path literal), FORMAT (an identifier) or SETTINGS.
        for extra in node.children[1:]:
            if extra.kind == "Set":
                raise QueryRefused(_SETTINGS)
            what = _TRAILERS.get(extra.kind, extra.kind)
            raise QueryRefused(f"refused: {what}; the surface chooses where results go")
        self.children(node)

    def children(self, node: Node) -> None:
        for child in node.children:
            self.node(child, node)

    def node(self, node: Node, parent: Node) -> None:
        kind = node.kind
        if kind == "SelectWithUnionQuery":
            self.select(node)
            return
        if kind == "Set":
            raise QueryRefused(_SETTINGS)
        if kind == "Function":
            self.function(node, table=parent.kind == "TableExpression")
            return
        if kind == "TableIdentifier":
            self.table(_table_name(node))
            return
        if kind not in _STRUCTURE:
            what = _HIDDEN.get(kind, kind)
            raise QueryRefused(f"refused: {what} is not allowed on this surface")
        self.children(node)

    def function(self, node: Node, *, table: bool) -> None:
        match = _NAME.match(node.text)
        if match is None:
            raise QueryRefused(f"refused: function name {node.text!r}")
        name = match.group(1)
        if table:
            if name in self.catalog.tables:
                self.children(node)  # a parameterised view of the event log
                return
            reason = _denial(name)
            if reason is not None:
                raise QueryRefused(f"refused: table function {name}() {reason}")
            raise QueryRefused(
                f"refused: table function {name}() is not the event log; read "
                f"{_tables_hint(self.catalog.tables)}"
            )
        refusal = self.catalog.refusal(name)
        if refusal is not None:
            raise QueryRefused(refusal)
        if _IN_FUNCTION.match(name):
            args = node.children[0].children if node.children else []
            if len(args) == 2 and args[1].kind == "Identifier":
                self.table(_table_name(args[1]))
        self.children(node)

    def table(self, name: tuple[str | None, str]) -> None:
        database, table = name
        if database is not None:
            full = f"{database}.{table}"
            if database.lower() in ("system", "information_schema"):
                raise QueryRefused(f"refused: system table {full} is outside the event log")
            raise QueryRefused(
                f"refused: table {full} names a database; the event log is "
                f"{_tables_hint(self.catalog.tables)} in the current one"
            )
        if table in self.catalog.tables:
            return
        # Any other bare name must be a WITH name of this query (its body is checked where
        # it is defined), and no table of the current database: the engine would read that
        # table. A name that is neither reached the engine, which looked it up among the
        # files of its working directory (READONLY for a file there, UNKNOWN_TABLE else:
        # which files exist) and among other tables ("maybe you meant ...").
        if table in self.local_tables or table not in self.with_names:
            raise QueryRefused(
                f"refused: table {table} is not part of the event log; read "
                f"{_tables_hint(self.catalog.tables)}"
            )


def _table_name(node: Node) -> tuple[str | None, str]:
    match = _TABLE.match(node.text)
    if match is None:
        raise QueryRefused(f"refused: table name {node.text!r}")
    if match.group(2) is None:
        return None, match.group(1)
    return match.group(1), match.group(2)


def _tables_hint(tables: frozenset[str]) -> str:
    plain = sorted(t for t in tables if not t.startswith("metric_"))
    views = " and the metric_* views" if any(t.startswith("metric_") for t in tables) else ""
    return ", ".join(plain) + views


# -- the check ------------------------------------------------------------------------


def _syntax_error(err: StoreError) -> StoreError:
    # ClickHouse names the wrapper query in its message; the user wrote only the statement.
    message = re.sub(r" ?: In scope SELECT formatQuery\(.*\)\.", ".", str(err), flags=re.DOTALL)
    return StoreError(message)


def check_query(sql: str, engine: GuardEngine, catalog: Catalog | None = None) -> str:
    """The one statement to run for ``sql``, or :class:`QueryRefused` naming what was refused.

    ``engine`` parses (see the module doc); ``catalog`` defaults to :func:`load_catalog`.
    A syntax error is a :class:`StoreError` with ClickHouse's message.
    """
    if not sql.strip():
        raise QueryRefused("refused: an empty statement")
    try:
        formatted = engine.query_limited(
            "SELECT formatQuery({q:String})", {"q": sql}, parsing=True
        ).rows
    except StoreError as err:
        if "Multi-statements are not allowed" in str(err):
            raise QueryRefused("refused: more than one statement; send one at a time") from None
        raise _syntax_error(err) from None
    statement = str(formatted[0][0])
    _check_names(statement)
    if _SETTINGS_CLAUSE.search(statement):
        # Also the settings ClickHouse folds into the query (limit, offset, select, filter,
        # order, ...): no Set node shows them, readonly lets them through, and limit = 0
        # lifted the row cut the session sets.
        raise QueryRefused(_SETTINGS)
    try:
        tree = parse_ast(engine.text_limited(f"EXPLAIN AST {statement}", None, parsing=True))
    except QueryRefused:
        raise
    except StoreError as err:
        # Applying a SETTINGS clause is the one thing EXPLAIN does besides parsing.
        if "READONLY" in str(err) or "UNKNOWN_SETTING" in str(err):
            raise QueryRefused(_SETTINGS) from None
        raise
    catalog = catalog or load_catalog(engine)
    local = frozenset(
        str(r[0])
        for r in engine.query(
            "SELECT name FROM system.tables WHERE database = currentDatabase()"
        ).rows
    )
    try:
        _Walker(catalog, local, _with_names(statement)).statement(tree)
    except RecursionError:
        raise QueryRefused("refused: the query nests too deep to be checked") from None
    return statement


# formatQuery's text: a SETTINGS clause starts a line (a string's line breaks are escaped);
# a WITH name's subquery opens on the line after "<name> AS".
_SETTINGS_CLAUSE = re.compile(r"(?m)^\s*SETTINGS\b")
_WITH_NAME = re.compile(r"(?m)^\s*(`(?:[^`\\]|\\.)*`|[A-Za-z_][A-Za-z0-9_]*) AS\n\s*\(")


def _with_names(statement: str) -> frozenset[str]:
    """The names WITH gives subqueries in ``statement`` (formatQuery's text)."""
    names = set()
    for match in _WITH_NAME.finditer(statement):
        name = match.group(1)
        names.add(name[1:-1].replace("\\`", "`") if name.startswith("`") else name)
    return frozenset(names)


class GuardedQueries:
    """The SQL surface over a store: every statement checked, run on the limited session.

    A :class:`~services.analytics.store.SqlSource` for ``compute_metrics``.
    """

    def __init__(self, store: GuardEngine, *, owns_store: bool = False) -> None:
        self.store = store
        self._owns = owns_store
        self._catalog: Catalog | None = None
        self._lock = threading.Lock()

    def catalog(self) -> Catalog:
        with self._lock:
            if self._catalog is None:
                self._catalog = load_catalog(self.store)
            return self._catalog

    def check(self, sql: str) -> str:
        return check_query(sql, self.store, self.catalog())

    def query(self, sql: str, *, readonly: bool = True) -> QueryResult:
        if not readonly:
            raise QueryRefused("refused: the SQL surface only reads")
        return self.store.query_limited(self.check(sql))

    def text(self, sql: str, clickhouse_format: str) -> str:
        """The result rendered by ClickHouse in ``clickhouse_format``."""
        return self.store.text_limited(self.check(sql), clickhouse_format)

    def close(self) -> None:
        if self._owns:
            self.store.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m services.analytics.sqlguard``: what this engine has that nobody reviewed.

    Asks the engine the surface would read (``CLICKHOUSE_READ_URL`` or ``CLICKHOUSE_URL``'s
    server, else a throw-away embedded one) and prints its functions and combinators that
    the reviewed list neither allows nor :data:`_DENIED` refuses: the surface refuses
    them until each is added to one or the other. Exit status 1 when there are any.
    """
    import argparse
    import tempfile

    from services.analytics.settings import AnalyticsSettings
    from services.analytics.store import ClickHouseStore

    parser = argparse.ArgumentParser(
        prog="python -m services.analytics.sqlguard",
        description="List the functions of this ClickHouse that the SQL surface's reviewed"
        " list (functions.txt) neither allows nor denies.",
    )
    parser.add_argument(
        "--functions", type=Path, default=_REVIEWED_FILE, help="the reviewed list to check"
    )
    args = parser.parse_args(argv)
    reviewed = reviewed_functions(args.functions)
    url = AnalyticsSettings.from_env().read_url
    with tempfile.TemporaryDirectory(prefix="orch-sqlguard-") as tmp:
        store = ClickHouseStore(url=url) if url else ClickHouseStore(path=Path(tmp) / "ch")
        try:
            version = store.query("SELECT version()").rows[0][0]
            found = unreviewed(store, reviewed)
        finally:
            store.close()
    print(f"ClickHouse {version}, against {args.functions}")
    for title, key in (
        ("functions to review", "functions"),
        ("combinators to review", "combinators"),
        ("reviewed, no longer in this engine", "gone"),
    ):
        names = found[key]
        print(f"{title}: {len(names)}")
        for name in names:
            print(f"  {name}")
    return 1 if found["functions"] or found["combinators"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
