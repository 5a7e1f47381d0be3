"""Comparison rows: the same adapters merged by PEFT's ``add_weighted_adapter``, as users would otherwise do.

PEFT (``peft.tuners.lora.LoraModel.add_weighted_adapter``) offers, for LoRA adapters:

- ``cat``: the factors concatenated, ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1 ... B_n]``: exactly the
  weighted sum of the task vectors (task arithmetic), rank ``sum(r)``;
- ``linear``, ``ties``, ``dare_ties`` (and ``dare_linear``, ``magnitude_prune``): *factor-wise*: the
  method runs on the ``A`` factors and, separately, on the ``B`` factors, each weighted by
  ``sqrt(w_i s_i)``, and the merged delta is ``B' @ A'``. This is also what LoRAX does. It is not the
  papers' operator (cross terms ``B_i A_j`` appear; trimming ``A`` and ``B`` is not trimming ``B A``);
- ``ties_svd`` (and the other ``*_svd``): the papers' operator on the dense ``dW_i``, then a truncated
  SVD to ``svd_rank`` (default: the largest child rank).

Each row here asks PEFT itself for the merged adapter and reads back its dense ``dW`` per module, so
the harness evaluates it exactly as it evaluates mixserve's merges. Needs ``peft`` (the dev extra).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from merging.delta import DenseDelta, MergedDelta

PEFT_COMBINATIONS = ("linear", "cat", "ties", "dare_ties", "ties_svd")


class PeftMerger:
    """A PEFT model over one base with every adapter loaded once; each call adds one weighted adapter."""

    def __init__(self, model_dir: Path, adapter_dirs: Mapping[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        names = list(adapter_dirs)
        self.model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
        self._count = 0

    @torch.no_grad()
    def merge(
        self,
        combination_type: str,
        names: Sequence[str],
        weights: Sequence[float],
        *,
        density: float | None = None,
        svd_rank: int | None = None,
        seed: int = 0,
    ) -> MergedDelta:
        """PEFT's merged adapter as dense per-module deltas (the keys mixserve's modules use)."""
        from peft.tuners.lora import LoraLayer

        self._count += 1
        new = f"merged{self._count}"
        t0 = time.perf_counter()
        torch.manual_seed(seed)  # dare_* draws its masks from the global generator
        self.model.add_weighted_adapter(
            list(names),
            list(weights),
            new,
            combination_type=combination_type,
            density=density,
            svd_rank=svd_rank,
        )
        seconds = time.perf_counter() - t0
        modules = {}
        for key, layer in self.model.base_model.model.named_modules():
            if isinstance(layer, LoraLayer) and new in layer.lora_A:
                dW = layer.get_delta_weight(new).detach().clone()
                modules[key] = DenseDelta(W=dW, rank_hint=layer.r[new])
        self.model.delete_adapter(new)
        return MergedDelta(modules, spec_hash=f"peft:{combination_type}", method=f"peft {combination_type}",
                           space="peft", seconds=seconds)  # fmt: skip
