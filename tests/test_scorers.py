"""Scorers of the quality benchmark: each test pairs a refusal with an allowed twin, so neither side is vacuous."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from mixserve.eval import sandbox, scorers
from mixserve.eval.scorers import (
    PythonResult,
    extract_code,
    json_scores,
    run_python_tests,
    run_python_tests_many,
    sql_execution_match,
)

SETUP = """
CREATE TABLE t (name TEXT, age INTEGER, score REAL);
INSERT INTO t VALUES ('ann', 25, 1.5), ('bob', 35, 2.0), ('cid', 45, 2.0), ('dee', 35, 3.25), ('eve', 30, NULL);
"""

INFINITE_CTE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
# The same endless recursion, but aggregated: no row ever comes back, so only the deadline can stop it.
INFINITE_CTE_NO_ROWS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"

WRITES = [
    "DROP TABLE t",
    "INSERT INTO t VALUES ('zed', 99, 0.0)",
    "DELETE FROM t",
    "UPDATE t SET age = 0",
    "CREATE TABLE u (x)",
    "ATTACH DATABASE ':memory:' AS other",
    "PRAGMA writable_schema = ON",
    # Starts like a read, so only the authorizer stands in the way.
    "WITH doomed AS (SELECT 1) DELETE FROM t",
]


# --------------------------------------------------------------------------------------------- SQL


def test_sql_equivalent_queries_match():
    assert sql_execution_match(SETUP, "SELECT name FROM t WHERE age > 30", "SELECT t.name FROM t WHERE NOT age <= 30")


def test_sql_different_result_does_not_match():
    assert not sql_execution_match(SETUP, "SELECT name FROM t WHERE age > 30", "SELECT name FROM t WHERE age >= 30")


def test_sql_row_order_ignored_without_order_by():
    assert sql_execution_match(SETUP, "SELECT name FROM t", "SELECT name FROM t ORDER BY name DESC")


def test_sql_rows_compare_as_multisets():
    # Same set of values, different multiplicities: 35 appears twice in the gold result.
    assert not sql_execution_match(SETUP, "SELECT age FROM t", "SELECT DISTINCT age FROM t")


def test_sql_row_order_matters_with_order_by_in_gold():
    gold = "SELECT name FROM t ORDER BY age, name"
    assert sql_execution_match(SETUP, gold, "SELECT name FROM t ORDER BY age ASC, name ASC")
    assert not sql_execution_match(SETUP, gold, "SELECT name FROM t ORDER BY age DESC, name")
    assert sql_execution_match(SETUP, "select name from t order  by name", "SELECT name FROM t ORDER BY 1")


def test_sql_numbers_are_normalised():
    assert sql_execution_match(SETUP, "SELECT 2", "SELECT 2.0")
    assert sql_execution_match(SETUP, "SELECT 0.3", "SELECT 0.1 + 0.2")
    assert not sql_execution_match(SETUP, "SELECT 2", "SELECT 2.001")
    assert not sql_execution_match(SETUP, "SELECT 2", "SELECT '2'")


def test_sql_recursive_cte_and_functions_are_reads():
    cte = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5) SELECT sum(x) FROM c"
    assert sql_execution_match(SETUP, "SELECT 15", cte)
    assert sql_execution_match(SETUP, "SELECT 'ANN'", "SELECT upper(name) FROM t WHERE age = 25")


def test_sql_trailing_semicolon_and_comments_are_fine():
    assert sql_execution_match(SETUP, "SELECT count(*) FROM t", "-- count\n/* total */ SELECT count(*) FROM t;")


@pytest.mark.parametrize(
    "predicted",
    ["SELEC name FROM t", "SELECT name FROM missing", "SELECT nope FROM t", "", "   \n", "-- only a comment"],
)
def test_sql_broken_or_empty_prediction_is_false(predicted):
    assert not sql_execution_match(SETUP, "SELECT name FROM t", predicted)


@pytest.mark.parametrize("predicted", WRITES)
def test_sql_write_prediction_is_false(predicted):
    assert not sql_execution_match(SETUP, "SELECT count(*) FROM t", predicted)


@pytest.mark.parametrize("statement", WRITES)
def test_sql_locked_database_refuses_writes_and_stays_unchanged(statement):
    conn, _ = scorers._locked_database(SETUP)
    try:
        with pytest.raises(sqlite3.DatabaseError, match=r"not authorized|too many attached"):
            conn.execute(statement)
        assert conn.execute("SELECT count(*), sum(age) FROM t").fetchall() == [(5, 170)]
        assert [row[0] for row in conn.execute("SELECT name FROM sqlite_master")] == ["t"]
    finally:
        conn.close()


def test_sql_two_statements_are_false():
    assert not sql_execution_match(SETUP, "SELECT 1", "SELECT 1; DROP TABLE t")
    assert sql_execution_match(SETUP, "SELECT 1", "SELECT 1;")


def test_sql_runaway_query_is_stopped_by_the_deadline():
    started = time.monotonic()
    assert not sql_execution_match(SETUP, "SELECT 1", INFINITE_CTE_NO_ROWS, timeout_s=0.5)
    assert time.monotonic() - started < 1.5


def test_sql_runaway_query_is_stopped_by_the_row_cap():
    started = time.monotonic()
    assert not sql_execution_match(SETUP, "SELECT 1", INFINITE_CTE, timeout_s=30.0)
    assert time.monotonic() - started < 10.0  # far below the deadline: the cap stopped it


def test_sql_huge_value_is_refused():
    assert not sql_execution_match(SETUP, "SELECT 1", "SELECT length(randomblob(100000000))")
    assert sql_execution_match(SETUP, "SELECT 1000", "SELECT length(randomblob(1000))")


@pytest.mark.parametrize(
    "gold",
    ["SELECT nope FROM t", "SELECT name FROM missing", "DELETE FROM t", "", INFINITE_CTE],
)
def test_sql_gold_failure_raises(gold):
    with pytest.raises(ValueError, match="gold query failed"):
        sql_execution_match(SETUP, gold, "SELECT 1", timeout_s=0.5)


def test_sql_setup_failure_raises():
    with pytest.raises(ValueError, match="setup_sql failed"):
        sql_execution_match("CREATE TABLE (", "SELECT 1", "SELECT 1")


# ------------------------------------------------------------------------------------------ Python

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_python_correct_code_passes():
    assert run_python_tests(ADD, ADD_TESTS) == PythonResult(passed=True, reason="passed", output="")


def test_python_wrong_code_fails():
    result = run_python_tests("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert (result.passed, result.reason) == (False, "failed")
    assert "AssertionError" in result.output


def test_python_syntax_error():
    result = run_python_tests("def add(a, b)\n    return a + b\n", ADD_TESTS)
    assert (result.passed, result.reason) == (False, "syntax")


def test_python_runtime_error():
    result = run_python_tests("def add(a, b):\n    return undefined_name\n", ADD_TESTS)
    assert (result.passed, result.reason) == (False, "error")
    assert "NameError" in result.output


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit()"])
def test_python_exiting_early_does_not_pass(exit_call):
    # The tests would fail; a clean exit before they run must not read as a pass.
    result = run_python_tests(ADD + exit_call, "assert add(1, 2) == 4")
    assert (result.passed, result.reason) == (False, "error")


def test_python_broken_tests_raise():
    with pytest.raises(ValueError, match="tests do not compile"):
        run_python_tests(ADD, "assert add(1, 2) ==")


def test_python_endless_loop_times_out():
    started = time.monotonic()
    result = run_python_tests("while True:\n    pass\n", "assert True", timeout_s=1.0)
    assert (result.passed, result.reason) == (False, "timeout")
    assert time.monotonic() - started < 3.0


def test_python_sleep_times_out_on_wall_clock():
    # No CPU used, so only the parent's wall-clock timeout can stop it.
    started = time.monotonic()
    result = run_python_tests("import time\ntime.sleep(30)\n", "assert True", timeout_s=0.5)
    assert (result.passed, result.reason) == (False, "timeout")
    assert time.monotonic() - started < 2.5


def test_python_crash_by_signal_is_killed():
    result = run_python_tests("import faulthandler\nfaulthandler._sigsegv()\n", "assert True")
    assert (result.passed, result.reason) == (False, "killed")


@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        ('import os\nos.system("echo hi")\n', "sandbox: os.system"),
        ('import subprocess\nsubprocess.run(["true"])\n', "sandbox: "),
        ("import os\nos.fork()\n", "sandbox: os.fork"),
        ('import os\nos.execv("/bin/true", ["true"])\n', "sandbox: os.exec"),
        ('import socket\nsocket.socket().connect(("127.0.0.1", 9))\n', "sandbox: socket."),
        ("import ctypes\n", "sandbox: import ctypes"),
        ("x = bytearray(2 * 1024**3)\n", "MemoryError"),
        ("import os\nos.kill(os.getppid(), 0)\n", "sandbox: os.kill"),
    ],
    ids=["system", "subprocess", "fork", "exec", "socket", "ctypes", "2GB", "kill"],
)
def test_python_dangerous_code_does_not_pass(code, refusal):
    # "assert True" passes for any code that runs to the end; the refusal in the output shows what stopped it
    # (an exec'd or forked process would also fail, by never reporting, so the reason alone proves little).
    result = run_python_tests(code, "assert True")
    assert (result.passed, result.reason) == (False, "error")
    assert refusal in result.output


def test_python_harmless_twins_pass():
    # Counterparts of the refusals above, to show the sandbox refuses the operation and not everything.
    code = "import os, socket, tempfile\nx = bytearray(64 * 1024**2)\nwith tempfile.TemporaryFile() as f:\n    f.write(b'x')\n"
    assert run_python_tests(code, "assert len(x) == 64 * 1024**2").passed


def test_python_writing_outside_the_sandbox_is_refused():
    target = Path("/tmp") / f"mixserve-sandbox-escape-{uuid.uuid4().hex}"
    result = run_python_tests(f"open({str(target)!r}, 'w').write('x')\n", "assert True")
    assert (result.passed, result.reason) == (False, "error")
    assert "PermissionError" in result.output
    assert not target.exists()


def test_python_writing_inside_the_sandbox_is_allowed():
    result = run_python_tests(
        "with open('out.txt', 'w') as f:\n    f.write('x')\n", "assert open('out.txt').read() == 'x'"
    )
    assert result.passed


@pytest.mark.parametrize("operation", ["os.remove({p!r})", "os.rename({p!r}, 'stolen.txt')", "os.truncate({p!r}, 0)"])
def test_python_changing_files_outside_the_sandbox_is_refused(tmp_path, operation):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    result = run_python_tests("import os\n" + operation.format(p=str(victim)) + "\n", "assert True")
    assert not result.passed
    assert victim.read_text() == "keep me"


def test_python_output_is_bounded():
    result = run_python_tests("while True:\n    print('x' * 1000)\n", "assert True", timeout_s=5.0)
    assert not result.passed
    assert 0 < len(result.output) <= 4_000


def test_python_many_preserves_order():
    items = [
        (ADD, ADD_TESTS),
        ("def add(a, b):\n    return 0\n", ADD_TESTS),
        ("def add(a, b)\n", ADD_TESTS),
        ("def add(a, b):\n    raise KeyError(a)\n", ADD_TESTS),
        (ADD, "assert add(2, 2) == 4"),
    ]
    results = run_python_tests_many(items, workers=2)
    assert [result.reason for result in results] == ["passed", "failed", "syntax", "error", "passed"]


def test_python_many_runs_in_parallel(monkeypatch):
    # Both calls must be in flight at once to get through the barrier; a sequential loop would time out on it.
    barrier = threading.Barrier(2, timeout=10)

    def fake_run(code: str, tests: str, *, timeout_s: float, memory_mb: int) -> PythonResult:
        barrier.wait()
        return PythonResult(passed=code == tests, reason="passed" if code == tests else "failed")

    monkeypatch.setattr(sandbox, "run_python_tests", fake_run)
    results = run_python_tests_many([("a", "a"), ("a", "b")], workers=2)
    assert [result.reason for result in results] == ["passed", "failed"]


def test_python_many_rejects_zero_workers():
    with pytest.raises(ValueError, match="workers"):
        run_python_tests_many([(ADD, ADD_TESTS)], workers=0)


def test_python_sandbox_leaves_no_directory_behind():
    code = "import os\nopen('marker', 'w').close()\nprint(os.getcwd())\n"
    result = run_python_tests(code, "assert True")
    assert result.passed
    sandbox = result.output.strip()
    assert os.path.basename(sandbox).startswith("mixserve-sandbox-")
    assert not os.path.exists(sandbox)


# -------------------------------------------------------------------------------------------- JSON


def test_json_valid_and_exact():
    assert json_scores('{"a": 1, "b": [1, 2]}', {"a": 1, "b": [1, 2]}) == (True, True)


def test_json_valid_not_exact():
    assert json_scores('{"a": 2}', {"a": 1}) == (True, False)
    assert json_scores('{"a": 1, "b": 2}', {"a": 1}) == (True, False)


def test_json_key_order_and_number_types():
    assert json_scores(' \n{"b": 2.0, "a": [1]}\n', {"a": [1], "b": 2}) == (True, True)
    assert json_scores('{"a": true}', {"a": 1}) == (True, False)
    assert json_scores('{"a": true}', {"a": True}) == (True, True)


@pytest.mark.parametrize("predicted", ["{'a': 1}", '{"a": 1', "", '"just a string"', "42", '{"a": NaN}', "[1] [2]"])
def test_json_invalid(predicted):
    assert json_scores(predicted, {"a": 1}) == (False, False)


def test_json_absurd_nesting_does_not_raise():
    assert json_scores("[" * 100_000 + "]" * 100_000, []) == (False, False)


def test_json_fences_are_not_stripped():
    answer = '```json\n{"a": 1}\n```'
    assert json_scores(answer, {"a": 1}) == (False, False)
    assert json_scores(extract_code(answer), {"a": 1}) == (True, True)


# ------------------------------------------------------------------------------------------ Fences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("def f():\n    return 1\n\n", "def f():\n    return 1"),
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
        ("```\nSELECT 1\n```", "SELECT 1"),
        ("```SELECT name FROM t\nWHERE age > 3\n```", "SELECT name FROM t\nWHERE age > 3"),
        ("Use ```SELECT 1``` here", "SELECT 1"),
        ("```sql\nSELECT 1\n```\nor\n```sql\nSELECT 2\n```", "SELECT 1"),
        ("```python\ns = 'a ``` b'\nx = 1   \n```", "s = 'a ``` b'\nx = 1"),
        ("```python\ndef f():\n    return 1  ", "def f():\n    return 1"),
        ("```python", ""),
        ("", ""),
    ],
    ids=[
        "plain",
        "python",
        "bare",
        "no-info",
        "one-line",
        "first",
        "inner-backticks",
        "unclosed",
        "empty-fence",
        "empty",
    ],
)
def test_extract_code(text, expected):
    assert extract_code(text) == expected
