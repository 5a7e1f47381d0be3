"""Merge methods as data: each is one configuration of a generalised task-arithmetic merge.

Like mergekit's ``generalized_task_arithmetic``, a method is (sparsifier) x (sign consensus) x
(normalisation), applied to per-child task vectors ``t_i`` with per-child weights ``w_i``:

    t_i'  = sparsify(t_i)                     # none | magnitude trim (TIES) | drop and rescale (DARE)
                                              # | outliers + smallest out (Breadcrumbs) | rank-sampled (DELLA)
    s     = elect_sign(t_1', ..., t_n')       # only with sign consensus
    out   = disjoint_mean(w_i t_i', s)        # with sign consensus
          | sum_i w_i t_i'  [/ sum_i w_i]     # without (divided only when normalising)
    out  *= lambda                            # the methods that declare it (mergekit's convention)

The *spectral* family (TSV-M, Iso-C, Iso-CTS) is not elementwise: it merges each module's task
matrices through their singular vectors (``spectral.py``).

The registry declares each method's hyper-parameters once; the mix schema (``spec.py``) validates
against these declarations instead of restating them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from merging import mergekit
from merging.mergekit import ChildSparsity
from merging.spectral import merge_spectral
from merging.steps import (
    MajoritySign,
    agreeing_sum,
    bernoulli_keep_mask,
    blocks,
    disjoint_mean,
    draw_keep_masks,
    drop_and_rescale,
    elect_sign,
    l1_rescaled,
    magnitude_outliers,
    magnitude_sampling_probs,
    magnitude_threshold,
    magnitude_thresholds,
    sampled_keep_mask,
    trim_below,
    weighted_sum,
)

Sparsifier = Literal["none", "magnitude", "random", "magnitude_outliers", "magnitude_sampling"]
Family = Literal["elementwise", "spectral"]
# How a sign-consensus method combines: "peft" elects on the unweighted vectors and divides by the
# count of agreeing entries (TIES, DARE-TIES, as PEFT); "mergekit" elects on the weighted vectors and
# divides by the agreeing weights only when the method normalises (DELLA, Breadcrumbs-TIES, as mergekit).
Consensus = Literal["peft", "mergekit"]
# Whose conventions a node merges with: mixserve's (this registry: PEFT's TIES and DARE, mergekit's DELLA
# and Breadcrumbs consensus) or mergekit 0.1.5's for all of its methods (``mergekit.py``).
Convention = Literal["mixserve", "mergekit"]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method's declaration: how it sparsifies, whether it elects signs, what it takes."""

    name: str
    summary: str
    paper: str
    sparsify: Sparsifier
    sign_consensus: bool
    params: tuple[str, ...]  # the hyper-parameters this method accepts (besides weights)
    family: Family = "elementwise"
    consensus: Consensus = "peft"
    normalize: bool = False  # mergekit-style: divide by the (agreeing) weights
    defaults: tuple[tuple[str, object], ...] = ()  # per-method overrides of PARAM_DEFAULTS

    @property
    def linear(self) -> bool:
        """A weighted sum of the children (exact on concatenated factors, no basis needed)."""
        return self.family == "elementwise" and self.sparsify == "none" and not self.sign_consensus

    def default(self, param: str) -> object:
        return dict(self.defaults).get(param, PARAM_DEFAULTS[param])


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
        MergeMethod(
            "breadcrumbs",
            "drop the `gamma` largest (outliers) and the smallest entries to keep `density`, weighted sum x `lambda`",
            "https://arxiv.org/abs/2312.06795",
            "magnitude_outliers",
            False,
            ("density", "gamma", "lambda"),
            consensus="mergekit",
            defaults=(("density", 0.9),),
        ),
        MergeMethod(
            "breadcrumbs_ties",
            "Breadcrumbs' mask, then sign election on the weighted entries and their sum x `lambda`",
            "https://arxiv.org/abs/2312.06795",
            "magnitude_outliers",
            True,
            ("density", "gamma", "lambda"),
            consensus="mergekit",
            defaults=(("density", 0.9),),
        ),
        MergeMethod(
            "della",
            "keep entries with probability density +- epsilon by magnitude rank per row, L1 rescale, "
            "sign election, mean over agreeing weights x `lambda`",
            "https://arxiv.org/abs/2406.11617",
            "magnitude_sampling",
            True,
            ("density", "epsilon", "lambda", "seed"),
            consensus="mergekit",
            normalize=True,
            defaults=(("density", 0.5),),
        ),
        MergeMethod(
            "della_linear",
            "DELLA's magnitude-ranked sampling and L1 rescale, then weighted sum x `lambda`",
            "https://arxiv.org/abs/2406.11617",
            "magnitude_sampling",
            False,
            ("density", "epsilon", "lambda", "seed"),
            consensus="mergekit",
            defaults=(("density", 0.5),),
        ),
        MergeMethod(
            "tsv",
            "Task Singular Vectors (TSV-M): each task's top `sv_fraction` singular components, "
            "decorrelated by orthogonal Procrustes, x `lambda`",
            "https://arxiv.org/abs/2412.00081",
            "none",
            False,
            ("sv_fraction", "lambda"),
            family="spectral",
        ),
        MergeMethod(
            "iso_c",
            "Iso-C: the sum of the task matrices with a flat spectrum (mean singular value) x `lambda`",
            "https://arxiv.org/abs/2502.04959",
            "none",
            False,
            ("lambda",),
            family="spectral",
        ),
        MergeMethod(
            "iso_cts",
            "Iso-CTS: the sum's top `common_fraction` subspace plus each task's own directions, "
            "orthogonalised, flat spectrum x `lambda`",
            "https://arxiv.org/abs/2502.04959",
            "none",
            False,
            ("common_fraction", "lambda"),
            family="spectral",
        ),
    )
}

# Defaults for the declared hyper-parameters (a method may override one in ``defaults``). TIES' paper
# keeps the top 20%; DARE's drops 50% and more; gamma and epsilon are mergekit's; Iso-CTS' paper uses
# 0.8 of the space for the common subspace; ``sv_fraction`` None means 1 / the number of children
# that touch the module (TSV-M's 1 / number of tasks), decided per module at merge time.
PARAM_DEFAULTS: dict[str, object] = {
    "density": 0.2,
    "drop_rate": 0.5,
    "majority_sign": "total",
    "normalize": True,
    "seed": 0,
    "gamma": 0.01,
    "epsilon": 0.15,
    "lambda": 1.0,
    "sv_fraction": None,
    "common_fraction": 0.8,
}


@dataclass(frozen=True)
class MergeParams:
    """Hyper-parameters of one merge node; only those the method declares are read."""

    density: float = 1.0
    drop_rate: float = 0.0
    majority_sign: MajoritySign = "total"
    normalize: bool = False
    gamma: float = 0.01
    epsilon: float = 0.15
    lam: float = 1.0
    sv_fraction: float | None = None  # None: 1 / the number of nonzero tensors
    common_fraction: float = 0.8
    # "mergekit": merge as mergekit 0.1.5 does (``mergekit.py``): per-child sparsity, exact-k trims,
    # L1 rescale (``rescale``), weighted election and the agreeing weights as divisor.
    convention: Convention = "mixserve"
    rescale: bool = False
    children: tuple[ChildSparsity, ...] | None = None  # mergekit: each child's density / gamma / epsilon


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
    batched: bool = False,
) -> torch.Tensor:
    """Merge same-shaped task vectors with ``method``; the result is a fresh tensor.

    For random methods (DARE, DELLA) the keep masks come from ``keep_masks`` if given (one per
    tensor, True = keep), otherwise they are drawn from ``generator``. Spectral methods (TSV, Iso)
    take 2-D matrices and work on their SVDs (``spectral.py``). Elementwise methods need a whole
    tensor only for thresholds, DELLA's per-row ranks and L1 rescaling; every other step is
    elementwise and runs block by block (see ``steps.blocks``).

    ``batched``: each tensor is a stack ``[M, ...]`` of M independent merges (e.g. one per module of
    a model), each slice merged exactly as it would be alone: per-slice trim thresholds, masks from
    ``keep_masks`` (draw them per slice with :func:`draw_keep_masks`). Only the methods whose
    per-tensor step is a magnitude trim or a DARE drop (or none) take stacks
    (:func:`merges_batched`); the others are merged slice by slice by the caller.
    """
    if not tensors:
        raise ValueError("a merge needs at least one tensor")
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    random = method.sparsify in ("random", "magnitude_sampling")
    if random and keep_masks is None and generator is None:
        raise ValueError(f"{method.name} needs a seeded generator or explicit keep masks")
    if params.convention == "mergekit":
        if batched:
            raise ValueError("mergekit-convention merges do not take stacks; merge slice by slice")
        children = params.children or (ChildSparsity(params.density, params.gamma, params.epsilon),) * len(tensors)
        return mergekit.merge(tensors, weights, children, kind=method.sparsify, consensus=method.sign_consensus,
                              normalize=params.normalize, rescale=params.rescale, lam=params.lam,
                              generator=generator)  # fmt: skip
    if batched:
        return _finish(method, params, weights, _merge_batched(method, tensors, weights, params, keep_masks))
    if method.family == "spectral":
        return merge_spectral(method.name, tensors, weights, lam=params.lam, sv_fraction=params.sv_fraction,
                              common_fraction=params.common_fraction)  # fmt: skip
    if method.sparsify == "magnitude_outliers":
        tensors = [magnitude_outliers(t, params.density, params.gamma) for t in tensors]
    elif method.sparsify == "magnitude_sampling" and params.density < 1:  # density 1 keeps all (mergekit)
        masks_in = keep_masks or [
            sampled_keep_mask(magnitude_sampling_probs(t, params.density, params.epsilon), generator) for t in tensors
        ]
        tensors = [l1_rescaled(t, m) for t, m in zip(tensors, masks_in, strict=True)]
    taus = [magnitude_threshold(t, params.density) for t in tensors] if method.sparsify == "magnitude" else None
    flats = [t.reshape(-1) for t in tensors]
    if method.sparsify == "random" and keep_masks is None and tensors[0].device != generator.device:
        # Masks are drawn on the generator's device (the CPU) in its block order, wherever the merge runs.
        keep_masks = draw_keep_masks(tensors[0].shape, len(tensors), params.drop_rate, generator)
    masks = [m.reshape(-1) for m in keep_masks] if keep_masks is not None and method.sparsify == "random" else None
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
        out_flat[blk] = _combine(method, parts, weights, params)
    return _finish(method, params, weights, out)


def linear_weights(weights: Sequence[float], params: MergeParams) -> tuple[list[float], float]:
    """``(w', divisor)`` with a linear method's result ``sum_i w'_i dW_i / divisor`` (the fast paths that
    concatenate factors): mixserve divides by the weights' sum when normalising; mergekit too, unless
    it is below 1e-8, and multiplies by ``lambda``."""
    divisor = float(sum(weights)) if params.normalize else 1.0
    if params.convention != "mergekit":
        return list(weights), divisor
    return [w * params.lam for w in weights], (divisor if abs(divisor) >= 1e-8 else 1.0)


def merges_batched(method: MergeMethod, params: MergeParams | None = None) -> bool:
    """Whether :func:`merge_tensors` takes stacks of independent merges (``batched=True``) for ``method``."""
    if params is not None and params.convention == "mergekit":
        return False
    return method.family == "elementwise" and method.sparsify in ("none", "magnitude", "random")


def _merge_batched(
    method: MergeMethod,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: MergeParams,
    keep_masks: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    if not merges_batched(method):
        raise ValueError(f"{method.name} does not merge stacks; merge slice by slice")
    parts = list(tensors)
    if method.sparsify == "magnitude":  # every child's thresholds in one selection
        taus = magnitude_thresholds(torch.cat(parts), params.density)
        taus = taus.split(len(parts[0])) if taus is not None else [None] * len(parts)
        parts = [trim_below(t, tau) for t, tau in zip(parts, taus, strict=True)]
    elif method.sparsify == "random":
        if keep_masks is None:
            raise ValueError("batched DARE merges take their keep masks (draw_keep_masks per slice)")
        parts = [drop_and_rescale(t, params.drop_rate, m) for t, m in zip(parts, keep_masks, strict=True)]
    return _combine(method, parts, weights, params)


def _combine(
    method: MergeMethod, parts: Sequence[torch.Tensor], weights: Sequence[float], params: MergeParams
) -> torch.Tensor:
    """Sign consensus and the weighted combination of the sparsified parts (elementwise)."""
    if method.sign_consensus and method.consensus == "mergekit":
        weighted = [t * w for t, w in zip(parts, weights, strict=True)]
        positive = elect_sign(weighted, "total")
        return agreeing_sum(parts, weights, positive, divide=method.normalize)
    if method.sign_consensus:
        return disjoint_mean(parts, weights, elect_sign(parts, params.majority_sign))
    return weighted_sum(parts, weights)


def _finish(method: MergeMethod, params: MergeParams, weights: Sequence[float], out: torch.Tensor) -> torch.Tensor:
    """Normalisation by the weights and ``lambda``, in place."""
    if params.normalize or (method.normalize and not method.sign_consensus):
        total = float(sum(weights))
        if total == 0.0:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        out.div_(total)
    if "lambda" in method.params and params.lam != 1.0:
        out.mul_(params.lam)
    return out
