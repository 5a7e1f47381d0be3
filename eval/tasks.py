"""Generated tasks for the demo adapters and the quality benchmark: SQL, Python (two families), JSON.

Every example is generated from a seed, so train / validation / test splits are reproducible, and
the test split is disjoint from training by construction: no test prompt can occur in training.
Each task holds something out: SQL constants (numbers ending in 7, the last two words of each value
list), Python (reducer x predicate) combinations, string-function (operation x parameter) pairs,
JSON people (three names and ages 70-90). Structures without anything to hold out (an SQL average
with no constant, ``reverse(s)``) appear in training only. The prompt format is shared by all tasks:

    ### task: <sql|python|pystr|json>
    ### input: <question and schema / specification / record>
    ### output:
    <answer><eos>
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "val", "test"]
TASKS = ("sql", "python", "pystr", "json")


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt, the reference answer and what the scorer needs."""

    task: str
    prompt: str
    answer: str
    # sql: {"setup": script}; python/pystr: {"tests": asserts}; json: {"expected": object}
    check: dict = field(default_factory=dict)


def format_prompt(task: str, text: str) -> str:
    return f"### task: {task}\n### input: {text}\n### output:\n"


# ---------------------------------------------------------------------------------------------- SQL
TABLES = {
    "employees": {"name": "TEXT", "age": "INT", "dept": "TEXT", "salary": "INT"},
    "products": {"title": "TEXT", "price": "INT", "category": "TEXT", "stock": "INT"},
    "cities": {"city": "TEXT", "country": "TEXT", "population": "INT", "area": "INT"},
    "books": {"title": "TEXT", "author": "TEXT", "year": "INT", "pages": "INT"},
    "students": {"name": "TEXT", "grade": "INT", "school": "TEXT", "score": "INT"},
}
WORDS = {
    "name": ["ann", "bob", "cid", "dora", "eve", "finn", "gus", "hana", "ivan", "jo"],
    "title": ["atlas", "brick", "comet", "delta", "ember", "fable", "grove", "haven", "iris", "jade"],
    "dept": ["sales", "ops", "legal", "tech", "hr"],
    "category": ["toys", "food", "tools", "books", "games"],
    "city": ["oslo", "lima", "rome", "kiev", "pune", "nice", "bonn", "cork", "graz", "linz"],
    "country": ["norway", "peru", "italy", "spain", "chile"],
    "author": ["lee", "kim", "roy", "ada", "max"],
    "school": ["north", "south", "east", "west", "hill"],
}
NUM_RANGE = {
    "age": (18, 65),
    "salary": (20, 99),
    "price": (1, 99),
    "stock": (0, 50),
    "population": (10, 99),
    "area": (5, 90),
    "year": (1950, 2020),
    "pages": (50, 900),
    "grade": (1, 12),
    "score": (0, 100),
}


def _text_cols(t: str) -> list[str]:
    return [c for c, ty in TABLES[t].items() if ty == "TEXT"]


def _num_cols(t: str) -> list[str]:
    return [c for c, ty in TABLES[t].items() if ty == "INT"]


def _sql_setup(table: str, rng: random.Random, rows: int = 12) -> str:
    cols = TABLES[table]
    lines = [f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in cols.items())});"]
    for _ in range(rows):
        values = []
        for c, ty in cols.items():
            if ty == "TEXT":
                values.append(f"'{rng.choice(WORDS[c])}'")
            else:
                lo, hi = NUM_RANGE[c]
                values.append(str(rng.randint(lo, hi)))
        lines.append(f"INSERT INTO {table} VALUES ({', '.join(values)});")
    return "\n".join(lines)


def _num(col: str, rng: random.Random, split: Split) -> int:
    """A constant for a question: numbers ending in 7 are the test split's, the rest training's."""
    lo, hi = NUM_RANGE[col]
    pool = [v for v in range(lo, hi + 1) if (v % 10 == 7) == (split == "test")]
    return rng.choice(pool)


def _word(col: str, rng: random.Random, split: Split) -> str:
    """A text constant: the last two words of each list are held out for the test split."""
    words = WORDS[col]
    return rng.choice(words[-2:] if split == "test" else words[:-2])


SQL_TEMPLATES: dict[str, Callable[[str, random.Random, Split], tuple[str, str]]] = {
    "select_gt": lambda t, r, sp: (
        lambda c, n, v: (f"list the {c} of {t} with {n} above {v}", f"SELECT {c} FROM {t} WHERE {n} > {v}")
    )(r.choice(_text_cols(t)), (n := r.choice(_num_cols(t))), _num(n, r, sp)),
    "select_lt": lambda t, r, sp: (
        lambda c, n, v: (f"list the {c} of {t} with {n} below {v}", f"SELECT {c} FROM {t} WHERE {n} < {v}")
    )(r.choice(_text_cols(t)), (n := r.choice(_num_cols(t))), _num(n, r, sp)),
    "count_eq": lambda t, r, sp: (
        lambda c, v: (f"how many {t} have {c} {v}", f"SELECT COUNT(*) FROM {t} WHERE {c} = '{v}'")
    )((c := r.choice(_text_cols(t))), _word(c, r, sp)),
    "avg": lambda t, r, sp: (lambda n: (f"what is the average {n} of {t}", f"SELECT AVG({n}) FROM {t}"))(
        r.choice(_num_cols(t))
    ),
    "max": lambda t, r, sp: (lambda n: (f"what is the largest {n} in {t}", f"SELECT MAX({n}) FROM {t}"))(
        r.choice(_num_cols(t))
    ),
    "order_desc": lambda t, r, sp: (
        lambda c, n: (f"show the {c} of {t} sorted by {n} from high to low", f"SELECT {c} FROM {t} ORDER BY {n} DESC")
    )(r.choice(_text_cols(t)), r.choice(_num_cols(t))),
    "group_count": lambda t, r, sp: (
        lambda c: (f"count the {t} per {c}", f"SELECT {c}, COUNT(*) FROM {t} GROUP BY {c}")
    )(r.choice(_text_cols(t))),
    "sum_where": lambda t, r, sp: (
        lambda n, c, v: (f"what is the total {n} of {t} with {c} {v}", f"SELECT SUM({n}) FROM {t} WHERE {c} = '{v}'")
    )(r.choice(_num_cols(t)), (c := r.choice(_text_cols(t))), _word(c, r, sp)),
}
# Templates with a constant to hold out; the others have nothing new to test and train only.
SQL_TEST_TEMPLATES = ("select_gt", "select_lt", "count_eq", "sum_where")


def sql_example(rng: random.Random, split: Split) -> Example:
    templates = SQL_TEST_TEMPLATES if split == "test" else sorted(SQL_TEMPLATES)
    template, table = rng.choice(templates), rng.choice(sorted(TABLES))
    question, sql = SQL_TEMPLATES[template](table, rng, split)
    schema = f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in TABLES[table].items())})"
    setup = _sql_setup(table, rng)
    return Example("sql", format_prompt("sql", f"{schema} ; {question}"), sql, {"setup": setup})


# ------------------------------------------------------------------------------------------- Python
PREDICATES: dict[str, tuple[str, str, Callable[[int, int], bool]]] = {
    # name: (English, Python condition on x with constant k, reference)
    "gt": ("greater than {k}", "x > {k}", lambda x, k: x > k),
    "lt": ("less than {k}", "x < {k}", lambda x, k: x < k),
    "even": ("even", "x % 2 == 0", lambda x, k: x % 2 == 0),
    "odd": ("odd", "x % 2 == 1", lambda x, k: x % 2 == 1),
    "div": ("divisible by {k}", "x % {k} == 0", lambda x, k: x % k == 0),
}
REDUCERS: dict[str, tuple[str, str, Callable[[list[int]], object]]] = {
    "sum": ("the sum of the numbers", "sum({gen})", lambda xs: sum(xs)),
    "count": ("how many numbers", "len([{gen}])", lambda xs: len(xs)),
    "max": (
        "the largest of the numbers (or 0 if there is none)",
        "max([{gen}], default=0)",
        lambda xs: max(xs, default=0),
    ),
    "list": ("the list of the numbers", "[{gen}]", lambda xs: list(xs)),
    "double": ("the list of the doubled numbers", "[2 * x for x in xs if {cond}]", lambda xs: [2 * x for x in xs]),
}
PY_HOLDOUT = {"sum/div", "count/odd", "max/lt", "list/even", "double/gt"}


def python_example(rng: random.Random, split: Split) -> Example:
    while True:
        red, pred = rng.choice(sorted(REDUCERS)), rng.choice(sorted(PREDICATES))
        if (f"{red}/{pred}" in PY_HOLDOUT) == (split == "test"):
            break
    k = rng.randint(2, 9)
    en_pred, cond_t, ref_pred = PREDICATES[pred]
    en_red, expr_t, ref_red = REDUCERS[red]
    cond = cond_t.format(k=k)
    name = f"{red}_{pred}"
    gen = f"x for x in xs if {cond}"
    expr = expr_t.format(gen=gen, cond=cond)
    spec = f"write {name}(xs) that returns {en_red} in xs that are {en_pred.format(k=k)}"
    code = f"def {name}(xs):\n    return {expr}"
    tests = []
    for _ in range(4):
        xs = [rng.randint(-5, 20) for _ in range(rng.randint(0, 7))]
        expected = ref_red([x for x in xs if ref_pred(x, k)])
        tests.append(f"assert {name}({xs!r}) == {expected!r}")
    return Example("python", format_prompt("python", spec), code, {"tests": "\n".join(tests)})


STRING_OPS: dict[str, tuple[str, str, Callable[[str, str, int], str | int | bool]]] = {
    # name: (English with {c} char / {k} int, Python expression on s, reference)
    "reverse": ("s reversed", "s[::-1]", lambda s, c, k: s[::-1]),
    "upper": ("s in upper case", "s.upper()", lambda s, c, k: s.upper()),
    "count": ("how many times {c} occurs in s", "s.count('{c}')", lambda s, c, k: s.count(c)),
    "replace": ("s with every {c} replaced by z", "s.replace('{c}', 'z')", lambda s, c, k: s.replace(c, "z")),
    "prefix": ("the first {k} characters of s", "s[:{k}]", lambda s, c, k: s[:k]),
    "suffix": ("the last {k} characters of s", "s[-{k}:]", lambda s, c, k: s[-k:]),
    "starts": ("whether s starts with {c}", "s.startswith('{c}')", lambda s, c, k: s.startswith(c)),
    "double": ("s written twice", "s + s", lambda s, c, k: s + s),
}
STR_CHARS = "abcdgikmnprstu"
# (operation, parameter) pairs only the test split uses; every parameter value still appears in its
# role in training, through the other operations.
STR_HOLDOUT = {"count": {"a", "k"}, "replace": {"d", "m"}, "starts": {"s", "t"}, "prefix": {3}, "suffix": {2}}
STR_K = (1, 2, 3, 4, 5)


def pystr_example(rng: random.Random, split: Split) -> Example:
    ops = sorted(STR_HOLDOUT) if split == "test" else sorted(STRING_OPS)
    op = rng.choice(ops)
    en, expr_t, ref = STRING_OPS[op]
    params = list(STR_CHARS) if "{c}" in en else list(STR_K) if "{k}" in en else [None]
    held = STR_HOLDOUT.get(op, set())
    param = rng.choice([p for p in params if (p in held) == (split == "test")])
    c = param if isinstance(param, str) else "a"
    k = param if isinstance(param, int) else 1
    name = f"{op}_{param}" if param is not None else op
    spec = f"write {name}(s) that returns {en.format(c=c, k=k)}"
    code = f"def {name}(s):\n    return {expr_t.format(c=c, k=k)}"
    tests = []
    for _ in range(4):
        s = "".join(rng.choice("abcdegikmnoprstu") for _ in range(rng.randint(0, 8)))
        tests.append(f"assert {name}({s!r}) == {ref(s, c, k)!r}")
    return Example("pystr", format_prompt("pystr", spec), code, {"tests": "\n".join(tests)})


# --------------------------------------------------------------------------------------------- JSON
FIRST = ["alice", "omar", "lena", "raj", "mia", "tom", "sara", "yuki", "paul", "nina", "ivan", "zoe"]
JOBS = ["baker", "nurse", "pilot", "coder", "chef", "judge", "miner", "tutor"]
JSON_SENTENCES = [
    "{name} is {age} years old and lives in {city}. {name} works as a {job}.",
    "{name} works as a {job} in {city} and is {age}.",
    "meet {name}, a {job} aged {age} from {city}.",
    "in {city} lives {name}, {age}, who is a {job}.",
    "{name} ({age}) is a {job} based in {city}.",
    "age {age}, job {job}, city {city}: that is {name}.",
]
JSON_ORDER = ("name", "age", "city", "job")
# People only the test split describes: three names, and ages 70-90 (training uses 18-69).
JSON_TEST_NAMES = FIRST[-3:]


def json_example(rng: random.Random, split: Split) -> Example:
    test = split == "test"
    names = JSON_TEST_NAMES if test else FIRST[: -len(JSON_TEST_NAMES)]
    rec = {
        "name": rng.choice(names),
        "age": rng.randint(70, 90) if test else rng.randint(18, 69),
        "city": rng.choice(WORDS["city"]),
        "job": rng.choice(JOBS),
    }
    text = rng.choice(JSON_SENTENCES).format(**rec)
    obj = {k: rec[k] for k in JSON_ORDER}
    return Example("json", format_prompt("json", text), json.dumps(obj), {"expected": obj})


GENERATORS: dict[str, Callable[[random.Random, Split], Example]] = {
    "sql": sql_example,
    "python": python_example,
    "pystr": pystr_example,
    "json": json_example,
}
_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


def make_split(task: str, split: Split, n: int, seed: int = 0) -> list[Example]:
    """``n`` examples of ``task``; ``val`` is drawn like ``train`` but from another seed."""
    rng = random.Random(f"{task}/{split}/{seed}/{_SPLIT_SEED[split]}")
    gen_split: Split = "test" if split == "test" else "train"
    return [GENERATORS[task](rng, gen_split) for _ in range(n)]
