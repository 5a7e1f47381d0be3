"""Merge methods as data: each is one configuration of a generalised task-arithmetic merge.

Like mergekit's ``generalized_task_arithmetic``, a method is (sparsifier) x (sign consensus) x
(normalisation), applied to per-child task vectors ``t_i`` with per-child weights ``w_i``:

    t_i'  = sparsify(t_i)                     # none | magnitude trim (TIES) | drop and rescale (DARE)
    s     = elect_sign(t_1', ..., t_n')       # only with sign consensus
    out   = disjoint_mean(w_i t_i', s)        # with sign consensus
          | sum_i w_i t_i'  [/ sum_i w_i]     # without (divided only when normalising)

The registry declares each method's hyper-parameters once; the mix schema (``spec.py``) validates
against these declarations instead of restating them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from merging.steps import (
    MajoritySign,
    bernoulli_keep_mask,
    blocks,
    disjoint_mean,
    drop_and_rescale,
    elect_sign,
    magnitude_threshold,
    trim_below,
    weighted_sum,
)

Sparsifier = Literal["none", "magnitude", "random"]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method's declaration: how it sparsifies, whether it elects signs, what it takes."""

    name: str
    summary: str
    paper: str
    sparsify: Sparsifier
    sign_consensus: bool
    params: tuple[str, ...]  # the hyper-parameters this method accepts (besides weights)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "linear",
            "weighted average (normalize=true, default) or weighted sum",
            "https://arxiv.org/abs/2203.05482",
            "none",
            False,
            ("normalize",),
        ),
        MergeMethod(
            "task_arithmetic",
            "weighted sum of task vectors",
            "https://arxiv.org/abs/2212.04089",
            "none",
            False,
            (),
        ),
        MergeMethod(
            "magnitude_prune",
            "trim each task vector to `density` by magnitude, then weighted sum",
            "https://arxiv.org/abs/2306.01708",
            "magnitude",
            False,
            ("density",),
        ),
        MergeMethod(
            "ties",
            "trim to `density`, elect sign, disjoint mean of agreeing entries",
            "https://arxiv.org/abs/2306.01708",
            "magnitude",
            True,
            ("density", "majority_sign"),
        ),
        MergeMethod(
            "dare_linear",
            "drop entries with probability `drop_rate`, rescale by 1/(1-drop_rate), weighted sum",
            "https://arxiv.org/abs/2311.03099",
            "random",
            False,
            ("drop_rate", "seed"),
        ),
        MergeMethod(
            "dare_ties",
            "DARE drop and rescale, then TIES sign election and disjoint mean",
            "https://arxiv.org/abs/2311.03099",
            "random",
            True,
            ("drop_rate", "majority_sign", "seed"),
        ),
    )
}

# Defaults for the declared hyper-parameters. TIES' paper keeps the top 20%; DARE's drops 50% and more.
PARAM_DEFAULTS: dict[str, object] = {
    "density": 0.2,
    "drop_rate": 0.5,
    "majority_sign": "total",
    "normalize": True,
    "seed": 0,
}


@dataclass(frozen=True)
class MergeParams:
    """Hyper-parameters of one merge node; only those the method declares are read."""

    density: float = 1.0
    drop_rate: float = 0.0
    majority_sign: MajoritySign = "total"
    normalize: bool = False


def get_method(name: str) -> MergeMethod:
    """Look up a method by name, with an error that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


def merge_tensors(
    method: MergeMethod,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: MergeParams,
    *,
    generator: torch.Generator | None = None,
    keep_masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge same-shaped task vectors with ``method``; the result is a fresh tensor.

    For DARE methods the drop masks come from ``keep_masks`` if given (one per tensor, True = keep),
    otherwise they are drawn from ``generator``. Only the trim threshold needs a whole tensor; every
    other step is elementwise and runs block by block (see ``steps.blocks``).
    """
    if not tensors:
        raise ValueError("a merge needs at least one tensor")
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    if method.sparsify == "random" and keep_masks is None and generator is None:
        raise ValueError(f"{method.name} needs a seeded generator or explicit keep masks")
    taus = [magnitude_threshold(t, params.density) for t in tensors] if method.sparsify == "magnitude" else None
    flats = [t.reshape(-1) for t in tensors]
    masks = [m.reshape(-1) for m in keep_masks] if keep_masks is not None else None
    out = torch.empty_like(tensors[0])
    out_flat = out.view(-1)
    for blk in blocks(out_flat.numel(), out.device):
        parts = [f[blk] for f in flats]
        if taus is not None:
            parts = [trim_below(t, tau) for t, tau in zip(parts, taus, strict=True)]
        elif method.sparsify == "random":
            # Masks are drawn block by block, child after child: deterministic for a given generator.
            part_masks = (
                [m[blk] for m in masks]
                if masks is not None
                else [bernoulli_keep_mask(t.shape, params.drop_rate, generator) for t in parts]
            )
            parts = [drop_and_rescale(t, params.drop_rate, m) for t, m in zip(parts, part_masks, strict=True)]
        if method.sign_consensus:
            out_flat[blk] = disjoint_mean(parts, weights, elect_sign(parts, params.majority_sign))
        else:
            out_flat[blk] = weighted_sum(parts, weights)
    if params.normalize:
        total = float(sum(weights))
        if total == 0.0:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        out.div_(total)
    return out
