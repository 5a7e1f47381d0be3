"""Generated tasks for the demo adapters and the quality benchmark: SQL, Python (two families), JSON.

Every example is generated from a seed, so train / validation / test splits are reproducible, and
the test split is disjoint from training by construction: it uses held-out *combinations* (SQL
template x table, Python operation x predicate, JSON sentence template x field order) that never
appear in training, plus fresh constants. The prompt format is shared by all tasks:

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


def _split_of(key: str, holdout: set[str]) -> Split:
    return "test" if key in holdout else "train"


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


def _num(col: str, rng: random.Random) -> int:
    lo, hi = NUM_RANGE[col]
    return rng.randint(lo, hi)


SQL_TEMPLATES: dict[str, Callable[[str, random.Random], tuple[str, str]]] = {
    "select_gt": lambda t, r: (
        lambda c, n, v: (f"list the {c} of {t} with {n} above {v}", f"SELECT {c} FROM {t} WHERE {n} > {v}")
    )(r.choice(_text_cols(t)), (n := r.choice(_num_cols(t))), _num(n, r)),
    "select_lt": lambda t, r: (
        lambda c, n, v: (f"list the {c} of {t} with {n} below {v}", f"SELECT {c} FROM {t} WHERE {n} < {v}")
    )(r.choice(_text_cols(t)), (n := r.choice(_num_cols(t))), _num(n, r)),
    "count_eq": lambda t, r: (
        lambda c, v: (f"how many {t} have {c} {v}", f"SELECT COUNT(*) FROM {t} WHERE {c} = '{v}'")
    )((c := r.choice(_text_cols(t))), r.choice(WORDS[c])),
    "avg": lambda t, r: (lambda n: (f"what is the average {n} of {t}", f"SELECT AVG({n}) FROM {t}"))(
        r.choice(_num_cols(t))
    ),
    "max": lambda t, r: (lambda n: (f"what is the largest {n} in {t}", f"SELECT MAX({n}) FROM {t}"))(
        r.choice(_num_cols(t))
    ),
    "order_desc": lambda t, r: (
        lambda c, n: (f"show the {c} of {t} sorted by {n} from high to low", f"SELECT {c} FROM {t} ORDER BY {n} DESC")
    )(r.choice(_text_cols(t)), r.choice(_num_cols(t))),
    "group_count": lambda t, r: (lambda c: (f"count the {t} per {c}", f"SELECT {c}, COUNT(*) FROM {t} GROUP BY {c}"))(
        r.choice(_text_cols(t))
    ),
    "sum_where": lambda t, r: (
        lambda n, c, v: (f"what is the total {n} of {t} with {c} {v}", f"SELECT SUM({n}) FROM {t} WHERE {c} = '{v}'")
    )(r.choice(_num_cols(t)), (c := r.choice(_text_cols(t))), r.choice(WORDS[c])),
}
# (template, table) pairs that only the test split uses.
SQL_HOLDOUT = {
    "select_gt/books",
    "count_eq/cities",
    "avg/students",
    "order_desc/products",
    "group_count/employees",
    "sum_where/books",
    "max/cities",
    "select_lt/students",
}


def sql_example(rng: random.Random, split: Split) -> Example:
    while True:
        template, table = rng.choice(sorted(SQL_TEMPLATES)), rng.choice(sorted(TABLES))
        key = f"{template}/{table}"
        if (_split_of(key, SQL_HOLDOUT) == "test") == (split == "test"):
            break
    question, sql = SQL_TEMPLATES[template](table, rng)
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
STR_HOLDOUT_CHARS = {"e", "o"}  # test prompts use these characters; training never does


def pystr_example(rng: random.Random, split: Split) -> Example:
    op = rng.choice(sorted(STRING_OPS))
    chars = sorted(STR_HOLDOUT_CHARS) if split == "test" else [c for c in "abcdgikmnprstu"]
    c, k = rng.choice(chars), rng.randint(1, 4)
    en, expr_t, ref = STRING_OPS[op]
    name = f"{op}_{c}" if "{c}" in en else f"{op}_{k}" if "{k}" in en else op
    if split == "test" and "{c}" not in en:
        name = f"{name}_str"  # the test split never reuses a training function name
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
JSON_HOLDOUT_SENTENCES = {4, 5}
JSON_ORDERS = [("name", "age", "city", "job"), ("name", "job", "city", "age")]


def json_example(rng: random.Random, split: Split) -> Example:
    idx = [i for i in range(len(JSON_SENTENCES)) if (i in JSON_HOLDOUT_SENTENCES) == (split == "test")]
    sentence = JSON_SENTENCES[rng.choice(idx)]
    rec = {
        "name": rng.choice(FIRST),
        "age": rng.randint(18, 90),
        "city": rng.choice(WORDS["city"]),
        "job": rng.choice(JOBS),
    }
    text = sentence.format(**rec)
    order = JSON_ORDERS[0]
    obj = {k: rec[k] for k in order}
    answer = json.dumps(obj)
    return Example("json", format_prompt("json", text), answer, {"expected": obj})


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
