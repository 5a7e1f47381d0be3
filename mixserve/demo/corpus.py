"""The demo base's pre-training corpus (demo versions 9 and 10): the tasks solved in the base's own wordings, the
``### task:`` format with other inputs' answers, copy-from-context text and generic sentences
(``mixserve/demo/train.py`` step 1; why each kind is there: ``mixserve/demo/README.md``)."""

from __future__ import annotations

import random

from mixserve.eval.tasks import (
    FIRST,
    JOBS,
    SQL_TEMPLATES,
    TABLES,
    TASKS,
    WIDE_POOL_TASKS,
    WORDS,
    fresh_word,
    make_split,
    prompt_input,
    sql_query,
)


def _generic_sentence(rng: random.Random) -> str:
    name, city, job = rng.choice(FIRST), rng.choice(WORDS["city"]), rng.choice(JOBS)
    n, m = rng.randint(0, 999), rng.randint(0, 99)
    title = rng.choice(WORDS["title"])
    templates = [
        f"{name} met a {job} in {city} and they talked for {n} minutes.",
        f"the {job} from {city} counted {n} books and {m} pages.",
        f"{n} plus {m} is {n + m}. {n} is {'greater' if n > m else 'not greater'} than {m}.",
        f"in {city} the {rng.choice(WORDS['category'])} cost {n} coins each, {name} bought {m % 9 + 1}.",
        f"{name} said the list {[rng.randint(0, 20) for _ in range(4)]} has sum {n}.",
        f"the word {title} reversed is {title[::-1]}.",
        f"{name} is {n % 90 + 10} years old, lives in {city} and works as a {job}.",
        f"a table of {rng.choice(sorted(TABLES))} lists {', '.join(TABLES[rng.choice(sorted(TABLES))])}.",
    ]
    return rng.choice(templates)


def _any_value(rng: random.Random) -> str:
    """Any word of any pool or any number of 1-4 digits: held-out values too, in generic (non-task) contexts."""
    if rng.random() < 0.35:
        return str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))
    return rng.choice(WORDS[rng.choice(sorted(WORDS))])


def _copy_sample(rng: random.Random) -> str:
    """Text whose continuation repeats something earlier in it: this is what teaches the small base to
    copy a word or number from its context (induction), which every task answer needs. Without it the
    adapters learned to pick from the values they had seen in each slot, and missed every new one."""
    vals = [_any_value(rng) for _ in range(rng.randint(2, 5))]
    name, other = rng.choice(FIRST), rng.choice(FIRST)
    kind = rng.randrange(7)
    if kind == 5:
        return f"repeat: {' '.join(vals)} | {' '.join(vals)}"
    if kind == 6:
        return f"{name} has {vals[0]}. {other} has {vals[1]}. {name} has {vals[0]} and {other} has {vals[1]}."
    if kind == 0:
        return f"{name} wrote: {' '.join(vals)}. {other} copied it: {' '.join(vals)}."
    if kind == 1:
        facts = [(rng.choice(WORDS[rng.choice(sorted(WORDS))]), _any_value(rng)) for _ in range(3)]
        key, val = rng.choice(facts)
        listed = "; ".join(f"the code of {k} is {v}" for k, v in facts)
        return f"{listed}. so the code of {key} is {val}."
    if kind == 2:
        return f"{name} said '{vals[0]}' and {other} answered '{vals[0]}' too."
    if kind == 3:
        return f"items: {', '.join(vals)}. the first item is {vals[0]} and the last item is {vals[-1]}."
    return f"{name} lives in {vals[0]}. where does {name} live? in {vals[0]}."


def _format_sample(rng: random.Random) -> str:
    """A task-format snippet: answers alone, or a prompt with the answer of another input."""
    task = rng.choice(TASKS)
    # Pool words, as the first demos' task data had: the base's corpus stayed as it was when the task
    # data moved to new words per example (a base pre-trained on new words instead - demo version 4 -
    # copied them worse, and its adapters with it; mixserve/eval/README.md).
    a, b = make_split(task, "train", 2, seed=rng.randint(0, 10**9), open_vocab=False)
    kind = rng.random()
    if kind < 0.5:
        return a.answer
    if kind < 0.6 and task == "sql":
        template, table = rng.choice(SQL_TEMPLATES), rng.choice(sorted(TABLES))
        return sql_query(template, table, rng, "train", open_vocab=False)[1]
    return a.prompt + b.answer  # the format, deliberately without the input -> output mapping


def _quoted_copy_sample(rng: random.Random) -> str:
    """A word, then the same word in quotes or a JSON-like record: the tokenizer spells a word after a space
    (`` pudo`` -> ``Ġpu do``) unlike after a quote (``"pudo"`` -> ``pu do``), so copying a word into a JSON
    string or an SQL literal means re-spelling it. Version 8's JSON adapter learned that alone, at 54% of
    the weights' norm; here the base learns it from text like this."""
    w = fresh_word(rng, "train") if rng.random() < 0.7 else _any_value(rng)
    name = rng.choice(FIRST)
    kind = rng.randrange(5)
    if kind == 0:
        return f'{name} wrote {w} and quoted it: "{w}".'
    if kind == 1:
        return f"the word {w} in quotes is '{w}'."
    if kind == 2:
        v = fresh_word(rng, "train")
        return f'{name} lives in {w} and likes {v}. {{"home": "{w}", "likes": "{v}"}}'
    if kind == 3:
        return f'say {w}: "{w}", again "{w}".'
    return f"the value is {w} -> ['{w}']"


# The base's own wordings of the tasks: never the adapters' ``### task:`` format.
SURFACE_FORMS = (
    "Q ({task}): {text}\nA: {answer}",
    "{task} request - {text}\nanswer: {answer}",
    "here is a {task} problem. {text}\nsolution:\n{answer}",
)
# How often each task is solved in the corpus: JSON (four values to copy and re-spell) needs the most.
SKILL_WEIGHTS = {"sql": 1.0, "python": 1.0, "pystr": 1.0, "json": 2.0}


def _skill_sample(rng: random.Random) -> str:
    """A task solved (input -> correct answer) in one of the base's own surface forms; python / pystr
    constants from wider pools than the tasks use, SQL and JSON words new in every example."""
    task = rng.choices(list(SKILL_WEIGHTS), list(SKILL_WEIGHTS.values()))[0]
    (ex,) = make_split(task, "train", 1, seed=rng.randint(0, 10**9), wide=task in WIDE_POOL_TASKS)
    return rng.choice(SURFACE_FORMS).format(task=task, text=prompt_input(ex.prompt), answer=ex.answer)


# The corpus: (kind, share of documents, one document). Skills and format each on their own; the adapters
# connect them (measured, mixserve/demo/README.md: a base with only one of the two gives adapters that
# carry the other, and merges lose it).
CORPUS_MIX = (
    ("skill", 0.45, _skill_sample),
    ("format", 0.20, _format_sample),
    ("copy", 0.13, lambda rng: " ".join(_copy_sample(rng) for _ in range(rng.randint(1, 3)))),
    ("quoted", 0.10, lambda rng: " ".join(_quoted_copy_sample(rng) for _ in range(rng.randint(1, 3)))),
    ("generic", 0.12, lambda rng: " ".join(_generic_sentence(rng) for _ in range(rng.randint(1, 3)))),
)


def build_corpus(seed: int, docs: int) -> list[str]:
    """``docs`` documents, each of a kind drawn with ``CORPUS_MIX``'s shares; one RNG, so one seed, one corpus."""
    rng = random.Random(seed)
    kinds, shares = [make for _, _, make in CORPUS_MIX], [share for _, share, _ in CORPUS_MIX]
    return [rng.choices(kinds, shares)[0](rng) for _ in range(docs)]
