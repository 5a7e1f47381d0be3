"""Structured outputs through xgrammar (the grammar engine vLLM and SGLang use).

A request's constraint (:class:`GrammarSpec`: a JSON schema, any JSON object, a regex, a list of
choices or an EBNF grammar) is compiled once per distinct spec against the served tokenizer
(:class:`StructuredOutputs` keeps an LRU of compiled grammars; xgrammar caches the token-level tables
under them). Each constrained sequence holds a ``GrammarMatcher``; every step the engine fills the
matchers' rows of a packed bitmask (``[rows, ceil(vocab / 32)]`` int32) on worker threads while the
forward runs, and the sampler applies it to the constrained rows only, so free and constrained rows of
any mixes share one batch.

JSON is generated compactly (``", "`` and ``": "`` separators, no free whitespace), as
``json.dumps`` writes it: a grammar that allows any whitespace lets a small model loop on spaces.
Schema keywords xgrammar 0.2.9 does not enforce are refused by name (:data:`UNSUPPORTED_KEYWORDS`,
found by compiling each with and without it), never silently dropped.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]

# Keywords that compile to the same grammar as without them in xgrammar 0.2.9 (ignored) or that it
# does not implement: a schema using them is refused rather than followed in part.
UNSUPPORTED_KEYWORDS = frozenset({
    "uniqueItems", "contains", "minContains", "maxContains", "propertyNames", "dependentRequired",
    "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems", "not", "if", "then",
    "else", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor",
})  # fmt: skip
MAX_SPEC_CHARS = 64_000  # a schema, regex, grammar or choice list, as JSON


class GrammarError(ValueError):
    """A constraint that cannot be compiled or is not supported; ``param`` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to; ``value`` is JSON text (a schema, a choice list) or the
    regex / EBNF source; ``param`` is the request field it came from (for errors)."""

    kind: GrammarKind
    value: str = ""
    strict: bool = True
    param: str = "response_format"


def schema_problems(schema: Any, path: str = "#") -> list[str]:
    """Where ``schema`` uses a keyword that would not be enforced (or a reference outside itself)."""
    problems = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in UNSUPPORTED_KEYWORDS:
                problems.append(f"'{key}' at {path}")
            elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                problems.append(f"a $ref outside the schema ({value!r}) at {path}")
            if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
                for name, sub in value.items():
                    problems += schema_problems(sub, f"{path}/{key}/{name}")
            elif key not in ("enum", "const", "default", "examples", "required") and isinstance(value, dict | list):
                problems += schema_problems(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            problems += schema_problems(sub, f"{path}/{i}")
    return problems


class StructuredOutputs:
    """The served tokenizer's grammar compiler, a cache of compiled grammars and the mask workers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], *, cache_size: int = 256,
                 threads: int = 2) -> None:  # fmt: skip
        import xgrammar as xgr  # imported on first use: 2 s, and only constrained requests need it

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_limit_bytes=256 << 20)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(threads, thread_name_prefix="mixserve-grammar")
        self.compiles = 0

    def compile(self, spec: GrammarSpec):
        """The compiled grammar for ``spec`` (cached); raises :class:`GrammarError`. Blocking: call it
        off the event loop."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        if len(spec.value) > MAX_SPEC_CHARS:
            raise GrammarError(f"the constraint has {len(spec.value)} characters (limit {MAX_SPEC_CHARS})", spec.param)
        try:
            compiled = self._compile(spec)
        except GrammarError:
            raise
        except Exception as exc:  # xgrammar's parse errors: a bad regex, schema or grammar
            message = str(exc).split("] ", 1)[-1].strip() or type(exc).__name__
            raise GrammarError(f"the {spec.kind.replace('_', ' ')} does not compile: {message}", spec.param) from None
        with self._lock:
            self.compiles += 1
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        c = self._compiler
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_schema":
            schema = json.loads(spec.value)
            if not isinstance(schema, dict):
                raise GrammarError("a JSON schema must be an object", spec.param)
            problems = schema_problems(schema)
            if problems:
                raise GrammarError(f"the schema uses what structured outputs cannot enforce: {', '.join(problems)}",
                                   spec.param)  # fmt: skip
            return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=spec.strict)
        if spec.kind == "regex":
            return c.compile_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            # JSON string literals are EBNF string literals (the same escapes).
            return c.compile_grammar(
                "root ::= " + " | ".join(json.dumps(str(ch), ensure_ascii=False) for ch in choices)
            )
        return c.compile_grammar(spec.value)

    # ---------------------------------------------------------------------------------- per step
    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)

    def step_masks(self, rows: int, matchers: list, at: list[int]) -> StepMasks:
        """A step's bitmask (``rows`` rows), the ``matchers``' rows ``at`` filled on the worker threads
        (xgrammar releases the GIL) while the step's forward runs."""
        bitmask = self._xgr.allocate_token_bitmask(rows, self.vocab_size)
        half = (len(at) + 1) // 2
        parts = [(matchers[:half], at[:half]), (matchers[half:], at[half:])]
        futures = [self._workers.submit(_fill, m, bitmask, r) for m, r in parts if r]
        return StepMasks(self, bitmask, futures)

    def close(self) -> None:
        self._workers.shutdown(wait=False)


def _fill(matchers: list, bitmask: torch.Tensor, rows: list[int]) -> None:
    for m, r in zip(matchers, rows, strict=True):
        m.fill_next_token_bitmask(bitmask, r)


class StepMasks:
    """One step's grammar masks: wait for the fill, copy a row, apply to the sampler's logits."""

    def __init__(self, owner: StructuredOutputs, bitmask: torch.Tensor, futures: list[Future]) -> None:
        self._owner, self.bitmask, self._futures = owner, bitmask, futures

    def wait(self) -> None:
        for f in self._futures:
            f.result()

    def copy_row(self, dst: int, src: int) -> None:
        self.bitmask[dst] = self.bitmask[src]

    def apply(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Disallowed tokens of ``rows`` to ``-inf`` (in place); the bitmask's rows align with ``logits``'."""
        bitmask = self.bitmask
        if bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)
        self._owner._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self._owner.vocab_size, indices=rows)
