"""Run a model (base, one adapter, or a merged mix) over task examples and score the answers.

Works with any local Hugging Face causal LM directory and PEFT LoRA adapters: merged deltas are
folded into the base weights for the duration of one evaluation (``folded``), generation is greedy
and batched with left padding, and every task's answers go to its scorer in ``scorers.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.delta import MergedDelta
from mixserve.eval.scorers import TaskScore, score
from mixserve.eval.tasks import Example


@dataclass
class Generated:
    texts: list[str]
    new_tokens: int
    seconds: float


class ModelUnderTest:
    """A base model and tokenizer kept in memory; mixes are folded in and out of its weights."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        self.params = dict(self.model.named_parameters())

    @contextlib.contextmanager
    def folded(self, merged: MergedDelta | None) -> Iterator[None]:
        """Add the merged delta to the weights, restore them afterwards (exactly: from a copy)."""
        if merged is None:
            yield
            return
        saved = {}
        with torch.no_grad():
            for module, delta in merged.modules.items():
                p = self.params[f"{module}.weight"]
                saved[module] = p.detach().clone()
                p += delta.dense().to(p.dtype).to(p.device)
        try:
            yield
        finally:
            with torch.no_grad():
                for module, w in saved.items():
                    self.params[f"{module}.weight"].copy_(w)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 32, min_new_tokens: int = 0
    ) -> Generated:
        """Greedy completions, cut at the first eos; counts generated tokens (eos included).
        ``min_new_tokens``: eos is suppressed until that many tokens are out."""
        texts, new_tokens, t0 = [], 0, time.perf_counter()
        eos = self.tokenizer.eos_token_id
        for i in range(0, len(prompts), batch_size):
            batch = list(prompts[i : i + batch_size])
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                ids = row.tolist()
                if eos in ids:
                    ids = ids[: ids.index(eos)]
                    new_tokens += 1
                new_tokens += len(ids)
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return Generated(texts, new_tokens, time.perf_counter() - t0)


def evaluate(
    mut: ModelUnderTest,
    merged: MergedDelta | None,
    examples: dict[str, list[Example]],
    *,
    batch_size: int = 32,
) -> dict[str, TaskScore]:
    """Scores per task with ``merged`` folded in (latency is measured on the serving path: ``latency.py``)."""
    scores = {}
    with mut.folded(merged):
        for task, exs in examples.items():
            out = mut.generate([e.prompt for e in exs], batch_size=batch_size)
            scores[task] = score(task, exs, out.texts)
    return scores
