"""Projections that read the same input, fused into one weight: ``[q|k|v]`` and ``[gate|up]`` as one GEMM each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FusedLinear:
    """Projections that read the same input as one weight (``[q|k|v]``, ``[gate|up]``): one GEMM, not three."""

    weight: torch.Tensor  # [sum of outs, in]
    bias: torch.Tensor | None
    sizes: tuple[int, ...]  # each member's output features, in the group's order (``architectures.py``)


def fuse_linears(linears: Sequence[torch.nn.Linear]) -> FusedLinear:
    """Concatenate the members' weights (and biases) and make each member's parameters views into the
    result, so the fused copy does not double the weights' memory."""
    if len(linears) == 1:  # fused in the checkpoint already (Phi-3's qkv_proj, gate_up_proj): no copy
        lin = linears[0]
        return FusedLinear(lin.weight, lin.bias, (lin.out_features,))
    with torch.no_grad():
        sizes = tuple(lin.out_features for lin in linears)
        weight = torch.cat([lin.weight for lin in linears])
        biased = [lin.bias is not None for lin in linears]
        bias = None
        if any(biased):
            zero = linears[0].weight.new_zeros
            bias = torch.cat([lin.bias if lin.bias is not None else zero(lin.out_features) for lin in linears])
        biases = bias.split(sizes) if bias is not None else [None] * len(linears)
        for lin, w, b, has_bias in zip(linears, weight.split(sizes), biases, biased, strict=True):
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            if has_bias:
                lin.bias = torch.nn.Parameter(b, requires_grad=False)
    return FusedLinear(weight, bias, sizes)
