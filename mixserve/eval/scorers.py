"""Scorers for the quality benchmark: text-to-SQL, Python with tests, JSON, and fenced-code extraction.

Standard library only, no network. Every scorer takes model output as untrusted input: bad output
scores False (or a failed :class:`PythonResult`), it never raises. A broken *task* (gold SQL that
fails, tests that do not compile) raises ``ValueError``, because that is a bug in the benchmark and
must not be counted against the model.

Python runs in the subprocess sandbox of ``sandbox.py`` (re-exported here).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mixserve.eval.sandbox import PythonResult, run_python_tests, run_python_tests_many  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from mixserve.eval.tasks import Example

# --------------------------------------------------------------------------------------------- SQL

# More rows than this from one query means a runaway or a cross join gone wrong, not an answer.
MAX_SQL_ROWS = 100_000
# Largest string or blob a query may build: stops `SELECT randomblob(1e9)` and friends from eating memory.
_MAX_SQL_VALUE_BYTES = 10_000_000
# Virtual-machine instructions between two deadline checks: cheap enough, and a few ms apart at worst.
_PROGRESS_EVERY = 1_000
_FLOAT_DECIMALS = 6

_READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_READ, sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
# Functions that reach outside the database. Most builds lack them or have them disabled, but deny by name anyway.
_DENIED_SQL_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})
_LEADING_SQL_NOISE = re.compile(r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?(?:\*/|\Z))*", re.DOTALL)
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


class _RejectedQueryError(Exception):
    """The query is not a single read-only SELECT/WITH, or its result is too large."""


def _read_only_authorizer(
    action: int, arg1: str | None, arg2: str | None, db_name: str | None, source: str | None
) -> int:
    """SQLite authorizer that allows reading and nothing else (no writes, DDL, PRAGMA, ATTACH, transactions)."""
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_SQL_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


class _Deadline:
    """Wall-clock deadline shared with SQLite's progress handler; re-armed before every query."""

    def __init__(self) -> None:
        self.at = math.inf

    def arm(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def expired(self) -> bool:
        # A truthy return makes SQLite abort the statement with OperationalError("interrupted").
        return time.monotonic() > self.at


def _locked_database(setup_sql: str) -> tuple[sqlite3.Connection, _Deadline]:
    """Return a fresh in-memory database built from ``setup_sql``, then locked down to reads.

    Raises ``ValueError`` if the setup script fails. The caller arms the deadline and closes the connection.
    """
    # isolation_level=None: no implicit BEGIN from the sqlite3 module, which the authorizer would refuse.
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.executescript(setup_sql)
    except sqlite3.Error as error:
        conn.close()
        raise ValueError(f"setup_sql failed: {error}") from error
    deadline = _Deadline()
    conn.set_authorizer(_read_only_authorizer)
    conn.set_progress_handler(deadline.expired, _PROGRESS_EVERY)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_SQL_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    return conn, deadline


def _first_keyword(sql: str) -> str:
    """The first SQL keyword, lower-cased, after leading whitespace and comments ("" if none)."""
    rest = sql[_LEADING_SQL_NOISE.match(sql).end() :]  # type: ignore[union-attr]  # `(...)*` matches anywhere
    word = re.match(r"[A-Za-z]+", rest)
    return word.group(0).lower() if word else ""


def _normalise_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Round floats so 0.1 + 0.2 equals 0.3; 2 and 2.0 then compare (and hash) equal as Python numbers do."""
    return tuple(round(value, _FLOAT_DECIMALS) if isinstance(value, float) else value for value in row)


def _query_rows(conn: sqlite3.Connection, deadline: _Deadline, sql: str, timeout_s: float) -> list[tuple[Any, ...]]:
    """Run one read-only query and return its normalised rows.

    Raises ``_RejectedQueryError`` (not SELECT/WITH, not a query, too many rows) or ``sqlite3.Error`` (syntax,
    unknown table, refused by the authorizer, interrupted at the deadline, several statements).
    """
    # The authorizer is the real guard; this check only turns away VALUES, PRAGMA, EXPLAIN and empty input early.
    if _first_keyword(sql) not in {"select", "with"}:
        raise _RejectedQueryError("not a SELECT or WITH query")
    deadline.arm(timeout_s)
    # Connection.execute refuses a second statement ("You can only execute one statement at a time").
    cursor = conn.execute(sql)
    if cursor.description is None:
        raise _RejectedQueryError("statement returns no result set")
    rows: list[tuple[Any, ...]] = []
    while batch := cursor.fetchmany(1_000):
        rows.extend(_normalise_row(row) for row in batch)
        if len(rows) > MAX_SQL_ROWS:
            raise _RejectedQueryError(f"more than {MAX_SQL_ROWS} rows")
    return rows


def sql_execution_match(setup_sql: str, gold: str, predicted: str, *, timeout_s: float = 2.0) -> bool:
    """Execution accuracy: does ``predicted`` return the same result as ``gold`` on the ``setup_sql`` database?

    Rows compare as multisets (order ignored) unless ``gold`` contains ORDER BY anywhere, then as sequences.
    Floats are rounded to 6 decimals, so 2 and 2.0 match; column names do not matter.

    The prediction scores False, never raises, when it is empty, not a single read-only SELECT/WITH,
    invalid, refused by the read-only authorizer, slower than ``timeout_s`` (wall clock), or returns
    more than ``MAX_SQL_ROWS`` rows. Raises ``ValueError`` if ``setup_sql`` or ``gold`` fails (a task bug).
    """
    conn, deadline = _locked_database(setup_sql)
    try:
        try:
            gold_rows = _query_rows(conn, deadline, gold, timeout_s)
        except (sqlite3.Error, _RejectedQueryError) as error:
            raise ValueError(f"gold query failed: {error}") from error
        try:
            predicted_rows = _query_rows(conn, deadline, predicted, timeout_s)
        except Exception:  # anything wrong with model output is a miss, whatever sqlite3 raises
            return False
    finally:
        conn.close()
    if _ORDER_BY.search(gold):
        return predicted_rows == gold_rows
    return Counter(predicted_rows) == Counter(gold_rows)


# -------------------------------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_equal(a: Any, b: Any) -> bool:
    """Python equality (1 == 1.0, dict key order ignored), except that booleans never equal numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def json_scores(predicted: str, expected: dict[str, Any] | list[Any]) -> tuple[bool, bool]:
    """Return ``(valid, exact)`` for a model's JSON answer; never raises.

    valid: ``predicted``, stripped of surrounding whitespace, parses as strict JSON (NaN and Infinity are
    refused) to an object or array. Markdown fences are *not* removed: pass the text through
    :func:`extract_code` first where fences are allowed. exact: valid, and equal to ``expected`` as
    Python compares them (1 == 1.0, key order ignored), except that true/false never equal 1/0.
    """
    try:
        value = json.loads(predicted.strip(), parse_constant=_reject_constant)
    except Exception:  # ValueError for bad JSON, RecursionError for absurd nesting, TypeError for non-str
        return False, False
    if not isinstance(value, dict | list):
        return False, False
    try:
        return True, _json_equal(value, expected)
    except RecursionError:
        return True, False


# ------------------------------------------------------------------------------------------ Fences

_FENCE = "```"
_INFO_STRING = re.compile(r"[\w+#.-]*")


def extract_code(text: str) -> str:
    """Return the content of the first ``` fenced block in ``text`` (else ``text``), trailing whitespace stripped.

    The opening line's info string (```python) is dropped; a first line that does not look like one
    (```SELECT 1 ... with spaces) is kept as code. An unclosed fence runs to the end of the text (a
    truncated answer), and a one-line block ```SELECT 1``` gives its inside.
    """
    start = text.find(_FENCE)
    if start < 0:
        return text.rstrip()
    rest = text[start + len(_FENCE) :]
    first_line, newline, body = rest.partition("\n")
    if _FENCE in first_line:
        return first_line[: first_line.index(_FENCE)].strip()
    if not _INFO_STRING.fullmatch(first_line.strip()):
        body = rest  # no info string: the code starts right after the fence
    elif not newline:
        return ""  # "```python" and nothing else
    close = re.search(r"^[ \t]*```", body, re.MULTILINE)
    return (body[: close.start()] if close else body).rstrip()


@dataclass
class TaskScore:
    """Scores of one task in one evaluation (fractions in [0, 1])."""

    task: str
    n: int
    accuracy: float  # sql: execution match; python/pystr: pass@1; json: exact match
    valid: float | None = None  # json: parseable
    failures: dict[str, int] = field(default_factory=dict)
    correct: str = ""  # per example, in order: "1" counted in accuracy, "0" not (for the bootstrap intervals)


def _bits(flags: Sequence[bool]) -> str:
    return "".join("1" if f else "0" for f in flags)


def score(task: str, examples: Sequence[Example], outputs: Sequence[str]) -> TaskScore:
    """Score one task's outputs against its examples."""
    n = len(examples)
    if task == "sql":
        ok = [
            sql_execution_match(e.check["setup"], e.answer, o.strip()) for e, o in zip(examples, outputs, strict=True)
        ]
        return TaskScore(task, n, sum(ok) / max(n, 1), correct=_bits(ok))
    if task in ("python", "pystr"):
        results = run_python_tests_many(
            [(extract_code(o), e.check["tests"]) for e, o in zip(examples, outputs, strict=True)]
        )
        failures: dict[str, int] = {}
        for r in results:
            if not r.passed:
                failures[r.reason] = failures.get(r.reason, 0) + 1
        passed = [r.passed for r in results]
        return TaskScore(task, n, sum(passed) / max(n, 1), failures=failures, correct=_bits(passed))
    if task == "json":
        pairs = [json_scores(o, e.check["expected"]) for e, o in zip(examples, outputs, strict=True)]
        exact = [bool(x) for _, x in pairs]
        return TaskScore(task, n, sum(exact) / max(n, 1), valid=sum(v for v, _ in pairs) / max(n, 1),
                         correct=_bits(exact))  # fmt: skip
    raise ValueError(f"unknown task {task!r}")
