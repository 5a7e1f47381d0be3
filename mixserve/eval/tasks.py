"""Generated tasks for the demo adapters and the quality benchmark: SQL, Python (two families), JSON.

Every example is generated from a seed, so train / validation / test splits are reproducible, and
the validation and test splits are disjoint from training by construction: no such prompt can occur
in training. Each task holds something out by one stable rule (``held_out``: a crc32 hash, ~20% of
all values): SQL constants (made-up words drawn afresh per example, numbers), Python (reducer x
predicate) combinations, string-function (operation x parameter) pairs, JSON people (new held-out
names and cities with held-out ages). The held-out values are split again into a validation half and
a test half (``side_of``; for the code functions, 15 python combinations and 18 string pairs each,
``_python_held_out`` and ``_string_held_out``), so that tuning on the
validation split measures what the test split measures (generalisation to what training never
showed) without seeing a single test value or combination. Structures without anything to hold out
(an SQL average with no constant, ``reverse(s)``) appear in training only. The prompt format is shared by all tasks:

    ### task: <sql|python|pystr|json>
    ### input: <question and schema / specification / record>
    ### output:
    <answer><eos>
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
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


def prompt_input(prompt: str) -> str:
    """The ``<input>`` part of a prompt made by :func:`format_prompt`."""
    head, tail = "### input: ", "\n### output:\n"
    return prompt[prompt.index(head) + len(head) : prompt.rindex(tail)]


# ------------------------------------------------------------------------------------ values, held out
# Wide value pools (pronounceable made-up words, full numeric ranges): with a handful of values per
# slot an adapter learns "pick one of these 8 words" instead of "copy the word from the input", and
# fails on every value it did not see in that slot (the first demo adapters did exactly that).
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def made_up_word(rng: random.Random) -> str:
    """A pronounceable made-up word: 2 or 3 consonant-vowel syllables (70 syllables, ~350k words)."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3))))


def _word_pools(sizes: dict[str, int]) -> dict[str, list[str]]:
    """Disjoint, seeded pools of made-up words (2-3 consonant-vowel syllables), one per slot."""
    rng = random.Random("mixserve/word-pools")
    taken: set[str] = set()
    pools: dict[str, list[str]] = {}
    for slot, n in sizes.items():
        pool: list[str] = []
        while len(pool) < n:
            word = made_up_word(rng)
            if word not in taken:
                taken.add(word)
                pool.append(word)
        pools[slot] = sorted(pool)
    return pools


WORDS = _word_pools(
    {
        "name": 120,
        "title": 120,
        "dept": 40,
        "category": 40,
        "city": 120,
        "country": 60,
        "author": 80,
        "school": 40,
        "first": 150,  # JSON people
        "job": 40,
    }
)
FIRST, JOBS = WORDS["first"], WORDS["job"]


def held_out(value: object) -> bool:
    """Whether a value (word or number) is kept out of training: a stable ~20% of every pool."""
    return zlib.crc32(str(value).encode()) % 5 == 0


def side_of(value: object) -> Split:
    """Which split may use a new word: ``train`` (not held out), or the ``val`` / ``test`` half of the
    held-out ones (a second, independent hash: crc32 is linear, so a second crc32 would correlate)."""
    if not held_out(value):
        return "train"
    return "val" if hashlib.sha256(f"val/{value}".encode()).digest()[0] % 2 == 0 else "test"


def fresh_word(rng: random.Random, split: Split) -> str:
    """A made-up word drawn afresh for one example (open vocabulary), held out for the test split.

    Task slots that take words from the input (SQL text constants, JSON names and cities) use these rather than
    a pool: with a few hundred candidates an adapter memorises the training words and writes one of
    them for any new word (the third demo's JSON adapter did, on every held-out name); with ~350k
    candidates, nearly every training example is new and copying is the only way to fit them.
    """
    while True:
        word = made_up_word(rng)
        if side_of(word) == split:
            return word


def _pick(values: list, rng: random.Random, split: Split):
    """A value from ``values`` of the split's side: the values not held out for training, the held-out
    ones alternately for validation and test (in pool order), so that even a pool with two held-out
    values gives each split one."""
    if split == "train":
        return rng.choice([v for v in values if not held_out(v)])
    held = [v for v in values if held_out(v)]
    return rng.choice(held[0::2] if split == "val" else held[1::2])


# ---------------------------------------------------------------------------------------------- SQL
TABLES = {
    "employees": {"name": "TEXT", "age": "INT", "dept": "TEXT", "salary": "INT"},
    "products": {"title": "TEXT", "price": "INT", "category": "TEXT", "stock": "INT"},
    "cities": {"city": "TEXT", "country": "TEXT", "population": "INT", "area": "INT"},
    "books": {"title": "TEXT", "author": "TEXT", "year": "INT", "pages": "INT"},
    "students": {"name": "TEXT", "grade": "INT", "school": "TEXT", "score": "INT"},
}
NUM_RANGE = {
    "age": (18, 99),
    "salary": (100, 999),
    "price": (1, 999),
    "stock": (0, 500),
    "population": (10, 999),
    "area": (5, 900),
    "year": (1900, 2024),
    "pages": (50, 999),
    "grade": (1, 12),
    "score": (0, 100),
}


def _text_cols(t: str) -> list[str]:
    return [c for c, ty in TABLES[t].items() if ty == "TEXT"]


def _num_cols(t: str) -> list[str]:
    return [c for c, ty in TABLES[t].items() if ty == "INT"]


def _sql_setup(table: str, rng: random.Random, constants: dict[str, str], rows: int = 12) -> str:
    """The table's rows; text columns draw from 4 values that include the question's constant, so an
    equality filter matches some rows (a query with a miscopied constant then gives another result)."""
    cols = TABLES[table]
    choices = {c: rng.sample(WORDS[c], 4) for c in _text_cols(table)}
    for c, v in constants.items():
        choices[c][0] = v
    lines = [f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in cols.items())});"]
    for _ in range(rows):
        values = []
        for c, ty in cols.items():
            if ty == "TEXT":
                values.append(f"'{rng.choice(choices[c])}'")
            else:
                values.append(str(rng.randint(*NUM_RANGE[c])))
        lines.append(f"INSERT INTO {table} VALUES ({', '.join(values)});")
    return "\n".join(lines)


def _num(col: str, rng: random.Random, split: Split) -> int:
    return _pick(list(range(NUM_RANGE[col][0], NUM_RANGE[col][1] + 1)), rng, split)


def sql_query(
    template: str, t: str, rng: random.Random, split: Split, open_vocab: bool = True
) -> tuple[str, str, dict[str, str]]:
    """(question, gold SQL, text constants by column) for one template on table ``t``.

    Text constants are new words (``fresh_word``), or with ``open_vocab=False`` words of the column's
    pool (what pre-training's format exposure shows).
    """
    text, num = rng.choice(_text_cols(t)), rng.choice(_num_cols(t))
    if template in ("select_gt", "select_lt"):
        v = _num(num, rng, split)
        word, op = ("above", ">") if template == "select_gt" else ("below", "<")
        return f"list the {text} of {t} with {num} {word} {v}", f"SELECT {text} FROM {t} WHERE {num} {op} {v}", {}
    if template in ("count_eq", "sum_where"):
        w = fresh_word(rng, split) if open_vocab else _pick(WORDS[text], rng, split)
        if template == "count_eq":
            return f"how many {t} have {text} {w}", f"SELECT COUNT(*) FROM {t} WHERE {text} = '{w}'", {text: w}
        q = f"what is the total {num} of {t} with {text} {w}"
        return q, f"SELECT SUM({num}) FROM {t} WHERE {text} = '{w}'", {text: w}
    if template == "avg":
        return f"what is the average {num} of {t}", f"SELECT AVG({num}) FROM {t}", {}
    if template == "max":
        return f"what is the largest {num} in {t}", f"SELECT MAX({num}) FROM {t}", {}
    if template == "order_desc":
        q = f"show the {text} of {t} sorted by {num} from high to low"
        return q, f"SELECT {text} FROM {t} ORDER BY {num} DESC", {}
    if template == "group_count":
        return f"count the {t} per {text}", f"SELECT {text}, COUNT(*) FROM {t} GROUP BY {text}", {}
    raise ValueError(f"unknown SQL template {template!r}")


SQL_TEMPLATES = ("avg", "count_eq", "group_count", "max", "order_desc", "select_gt", "select_lt", "sum_where")
# Templates with a constant to hold out; the others have nothing new to test and train only.
SQL_TEST_TEMPLATES = ("select_gt", "select_lt", "count_eq", "sum_where")


def sql_example(rng: random.Random, split: Split, open_vocab: bool = True) -> Example:
    templates = SQL_TEMPLATES if split == "train" else SQL_TEST_TEMPLATES
    template, table = rng.choice(templates), rng.choice(sorted(TABLES))
    question, sql, constants = sql_query(template, table, rng, split, open_vocab)
    schema = f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in TABLES[table].items())})"
    setup = _sql_setup(table, rng, constants)
    return Example("sql", format_prompt("sql", f"{schema} ; {question}"), sql, {"setup": setup})


# ------------------------------------------------------------------------------------------- Python
PREDICATES: dict[str, tuple[str, str, Callable[[int, int], bool]]] = {
    # name: (English, Python condition on x with constant k, reference)
    "gt": ("greater than {k}", "x > {k}", lambda x, k: x > k),
    "lt": ("less than {k}", "x < {k}", lambda x, k: x < k),
    "ge": ("at least {k}", "x >= {k}", lambda x, k: x >= k),
    "le": ("at most {k}", "x <= {k}", lambda x, k: x <= k),
    "eq": ("equal to {k}", "x == {k}", lambda x, k: x == k),
    "ne": ("not equal to {k}", "x != {k}", lambda x, k: x != k),
    "even": ("even", "x % 2 == 0", lambda x, k: x % 2 == 0),
    "odd": ("odd", "x % 2 == 1", lambda x, k: x % 2 == 1),
    "div": ("divisible by {k}", "x % {k} == 0", lambda x, k: x % k == 0),
    "ndiv": ("not divisible by {k}", "x % {k} != 0", lambda x, k: x % k != 0),
    "pos": ("positive", "x > 0", lambda x, k: x > 0),
    "neg": ("negative", "x < 0", lambda x, k: x < 0),
}
REDUCERS: dict[str, tuple[str, str, Callable[[list[int]], object]]] = {
    # name: (English, Python expression with {gen} = "x for x in xs if <cond>" or {cond}, reference)
    "sum": ("the sum of the numbers", "sum({gen})", lambda xs: sum(xs)),
    "count": ("how many numbers", "len([{gen}])", lambda xs: len(xs)),
    "max": (
        "the largest of the numbers (or 0 if there is none)",
        "max([{gen}], default=0)",
        lambda xs: max(xs, default=0),
    ),
    "min": (
        "the smallest of the numbers (or 0 if there is none)",
        "min([{gen}], default=0)",
        lambda xs: min(xs, default=0),
    ),
    "first": (
        "the first of the numbers (or 0 if there is none)",
        "next(({gen}), 0)",
        lambda xs: xs[0] if xs else 0,
    ),
    "any": ("whether there are any numbers", "any({cond} for x in xs)", lambda xs: len(xs) > 0),
    "list": ("the list of the numbers", "[{gen}]", lambda xs: list(xs)),
    "double": ("the list of the doubled numbers", "[2 * x for x in xs if {cond}]", lambda xs: [2 * x for x in xs]),
    "square": ("the list of the squared numbers", "[x * x for x in xs if {cond}]", lambda xs: [x * x for x in xs]),
    "sumsq": (
        "the sum of the squares of the numbers",
        "sum(x * x for x in xs if {cond})",
        lambda xs: sum(x * x for x in xs),
    ),
}


def _python_held_out() -> tuple[frozenset[str], frozenset[str]]:
    """(validation, test) reducer x predicate combinations that training never shows: a quarter of the
    120, on a diagonal pattern (reducer i, predicate j held out when 5i + j = 0 mod 4), so every reducer
    keeps 9 of its 12 predicates in training and every predicate 7-8 of its 10 reducers; alternately
    validation and test, 15 each. Demo version 9 held out 5 of 25 (3 test, 2 validation): too few to
    tell merges apart (issue 27)."""
    held = [
        f"{red}/{pred}" for i, red in enumerate(REDUCERS) for j, pred in enumerate(PREDICATES) if (5 * i + j) % 4 == 0
    ]
    return frozenset(held[0::2]), frozenset(held[1::2])


PY_VAL_HOLDOUT, PY_TEST_HOLDOUT = _python_held_out()
PY_HOLDOUT = PY_VAL_HOLDOUT | PY_TEST_HOLDOUT


def _py_side(combo: str) -> Split:
    if combo not in PY_HOLDOUT:
        return "train"
    return "val" if combo in PY_VAL_HOLDOUT else "test"


# Wider constant pools for the base's corpus ("other value pools"): with k in 2..9 only, a model can
# learn each function's few constants by heart instead of copying the one the question names.
PY_K, PY_K_WIDE = (2, 9), (2, 30)


def python_example(rng: random.Random, split: Split, wide: bool = False) -> Example:
    while True:
        red, pred = rng.choice(sorted(REDUCERS)), rng.choice(sorted(PREDICATES))
        if _py_side(f"{red}/{pred}") == split:
            break
    k = rng.randint(*(PY_K_WIDE if wide else PY_K))
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
        if rng.random() < 0.5:  # k itself in the list: tells x > k from x >= k, x == k from x != k
            xs.insert(rng.randint(0, len(xs)), k)
        expected = ref_red([x for x in xs if ref_pred(x, k)])
        tests.append(f"assert {name}({xs!r}) == {expected!r}")
    return Example("python", format_prompt("python", spec), code, {"tests": "\n".join(tests)})


STRING_OPS: dict[str, tuple[str, str, Callable[[str, str, int], str | int | bool]]] = {
    # name: (English with {c} char / {k} int, Python expression on s, reference)
    "reverse": ("s reversed", "s[::-1]", lambda s, c, k: s[::-1]),
    "upper": ("s in upper case", "s.upper()", lambda s, c, k: s.upper()),
    "double": ("s written twice", "s + s", lambda s, c, k: s + s),
    "count": ("how many times {c} occurs in s", "s.count('{c}')", lambda s, c, k: s.count(c)),
    "replace": ("s with every {c} replaced by z", "s.replace('{c}', 'z')", lambda s, c, k: s.replace(c, "z")),
    "remove": ("s with every {c} removed", "s.replace('{c}', '')", lambda s, c, k: s.replace(c, "")),
    "starts": ("whether s starts with {c}", "s.startswith('{c}')", lambda s, c, k: s.startswith(c)),
    "ends": ("whether s ends with {c}", "s.endswith('{c}')", lambda s, c, k: s.endswith(c)),
    "has": ("whether {c} occurs in s", "'{c}' in s", lambda s, c, k: c in s),
    "find": ("the position of the first {c} in s (or -1)", "s.find('{c}')", lambda s, c, k: s.find(c)),
    "prefix": ("the first {k} characters of s", "s[:{k}]", lambda s, c, k: s[:k]),
    "suffix": ("the last {k} characters of s", "s[-{k}:]", lambda s, c, k: s[-k:]),
    "drop": ("s without its first {k} characters", "s[{k}:]", lambda s, c, k: s[k:]),
    "repeat": ("s repeated {k} times", "s * {k}", lambda s, c, k: s * k),
}
STR_CHARS = "abcdgikmnprstu"
STR_K = (1, 2, 3, 4, 5)


def _string_held_out() -> tuple[dict[str, set], dict[str, set]]:
    """(validation, test) (operation, parameter) pairs that training never shows: 4 of the 14 characters
    of every character operation, 2 of the 5 lengths of every length operation (seeded draws, one per
    operation, so every parameter value still appears in its role through the other operations), half
    of each to validation and half to test: 18 pairs each (7 character operations x 2 + 4 length
    operations x 1). Demo version 9 held out 8 (5 test, 3 validation)."""
    val: dict[str, set] = {}
    test: dict[str, set] = {}
    for op, (en, _, _) in STRING_OPS.items():
        params: list = list(STR_CHARS) if "{c}" in en else list(STR_K) if "{k}" in en else []
        if not params:
            continue
        drawn = random.Random(f"pystr/held-out/{op}").sample(params, 4 if len(params) > 5 else 2)
        val[op], test[op] = set(drawn[0::2]), set(drawn[1::2])
    return val, test


STR_VAL_HOLDOUT, STR_TEST_HOLDOUT = _string_held_out()


def _str_side(op: str, param: object) -> Split:
    if param in STR_VAL_HOLDOUT.get(op, set()):
        return "val"
    return "test" if param in STR_TEST_HOLDOUT.get(op, set()) else "train"


STR_CHARS_WIDE, STR_K_WIDE = "abcdefghijklmnopqrstuvwxy", tuple(range(1, 10))  # the base's corpus only


def pystr_example(rng: random.Random, split: Split, wide: bool = False) -> Example:
    chars, ks = (STR_CHARS_WIDE, STR_K_WIDE) if wide else (STR_CHARS, STR_K)

    def params_of(op: str) -> list:
        en = STRING_OPS[op][0]
        params = list(chars) if "{c}" in en else list(ks) if "{k}" in en else [None]
        return [p for p in params if _str_side(op, p) == split]

    op = rng.choice([o for o in sorted(STRING_OPS) if params_of(o)])
    en, expr_t, ref = STRING_OPS[op]
    param = rng.choice(params_of(op))
    c = param if isinstance(param, str) else "a"
    k = param if isinstance(param, int) else 1
    name = f"{op}_{param}" if param is not None else op
    spec = f"write {name}(s) that returns {en.format(c=c, k=k)}"
    code = f"def {name}(s):\n    return {expr_t.format(c=c, k=k)}"
    tests = []
    for _ in range(4):
        s = "".join(rng.choice("abcdegikmnoprstu") for _ in range(rng.randint(0, 8)))
        if "{c}" in en and rng.random() < 0.5:  # the character itself in s, at an end half the time
            at = rng.choice((0, len(s), rng.randint(0, len(s))))
            s = s[:at] + c + s[at:]
        tests.append(f"assert {name}({s!r}) == {ref(s, c, k)!r}")
    return Example("pystr", format_prompt("pystr", spec), code, {"tests": "\n".join(tests)})


# --------------------------------------------------------------------------------------------- JSON
JSON_SENTENCES = [
    "{name} is {age} years old and lives in {city}. {name} works as a {job}.",
    "{name} works as a {job} in {city} and is {age}.",
    "meet {name}, a {job} aged {age} from {city}.",
    "in {city} lives {name}, {age}, who is a {job}.",
    "{name} ({age}) is a {job} based in {city}.",
    "age {age}, job {job}, city {city}: that is {name}.",
]
JSON_ORDER = ("name", "age", "city", "job")


def json_example(rng: random.Random, split: Split, open_vocab: bool = True) -> Example:
    """People only the test split describes: a new held-out name and city (``open_vocab=False``: a
    held-out name of the pool and any pool city) with a held-out age; jobs come from their pool.

    The city is a new word too: from a pool of 120, the adapter trained on 48,000 examples learned the
    pool and wrote a pool city sharing the input's first syllables ("tega" for "tegu") in 17% of the
    test records, while it copied the (new) names right in 97.5%."""
    rec = {
        "name": fresh_word(rng, split) if open_vocab else _pick(FIRST, rng, split),
        "age": _pick(list(range(18, 100)), rng, split),
        "city": fresh_word(rng, split) if open_vocab else rng.choice(WORDS["city"]),
        "job": fresh_word(rng, split) if open_vocab else rng.choice(JOBS),
    }
    text = rng.choice(JSON_SENTENCES).format(**rec)
    obj = {k: rec[k] for k in JSON_ORDER}
    return Example("json", format_prompt("json", text), json.dumps(obj), {"expected": obj})


def held_out_unit(example: Example, index: int) -> str:
    """What an example holds out, as the unit that varies between splits' draws (``intervals.py``): the
    function it asks for (a python reducer x predicate combination, a string operation x parameter), and
    for SQL and JSON, whose held-out values are drawn afresh per example, the example itself."""
    if example.task in ("python", "pystr"):
        return example.answer[len("def ") : example.answer.index("(")]
    return f"{example.task}:{index}"


GENERATORS: dict[str, Callable[..., Example]] = {
    "sql": sql_example,
    "python": python_example,
    "pystr": pystr_example,
    "json": json_example,
}
_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


# Tasks whose answers copy words from the input, and so take ``open_vocab``; tasks with ``wide`` pools.
OPEN_VOCAB_TASKS = ("sql", "json")
WIDE_POOL_TASKS = ("python", "pystr")


def make_split(
    task: str, split: Split, n: int, seed: int = 0, *, open_vocab: bool = True, wide: bool = False
) -> list[Example]:
    """``n`` examples of ``task`` from the split's side of the held-out rule (``side_of``).

    ``open_vocab=False`` draws the words an answer copies from fixed pools instead of afresh: what
    the base's pre-training shows of the task formats; adapters train and are tested on new words.
    ``wide=True`` (train split only) draws python / pystr constants from wider pools than the tasks
    use (k up to 30, any letter): what the base's corpus shows of the skills; the test split's
    held-out combinations stay out all the same.
    """
    if wide and split == "test":
        raise ValueError("wide pools are for the base's corpus, never the test split")
    rng = random.Random(f"{task}/{split}/{seed}/{_SPLIT_SEED[split]}")
    kwargs: dict[str, bool] = {"open_vocab": open_vocab} if task in OPEN_VOCAB_TASKS else {}
    if task in WIDE_POOL_TASKS and wide:
        kwargs["wide"] = True
    return [GENERATORS[task](rng, split, **kwargs) for _ in range(n)]
