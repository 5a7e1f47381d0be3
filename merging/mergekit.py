"""mergekit's conventions for its generalized task-arithmetic methods, as a MixSpec node can ask for them.

A node with ``"convention": "mergekit"`` merges as mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``
and ``linear`` do (``mergekit/merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``), where
mixserve's own semantics (``methods.py``, PEFT's for TIES and DARE) differ:

* per child ``t_i``: sparsify with the child's own ``density`` (and ``gamma`` / ``epsilon``), mergekit's
  default 1 (keep all):
  - ``magnitude`` (TIES): exactly ``k = max(1, int(density * N))`` entries (:func:`steps.top_k_mask`);
  - ``random`` (DARE): keep with probability ``density``, then (``rescale``, default on) scale to the
    child's original L1 norm instead of ``1 / density``;
  - ``magnitude_outliers`` (Breadcrumbs): in the order of decreasing magnitude, skip
    ``min(int(gamma * N), N - int(density * N))`` entries and keep the next ``int(density * N)``;
  - ``della_magprune``: DELLA's rank-scaled keep probabilities (``steps.magnitude_sampling_probs``), L1
    rescale by default;
  ``rescale`` on a magnitude or outlier trim L1-rescales it too;
* weight each child, ``w_i t_i``; with sign consensus (TIES, DARE-TIES, Breadcrumbs-TIES, DELLA) elect
  the sign of ``sum_i w_i t_i`` per entry (the *weighted* vectors) and keep only the weighted entries
  that agree;
* sum; with ``normalize`` divide by the sum of the (agreeing) weights, a zero divisor counting as 1
  (mergekit's defaults: on for linear, TIES and DELLA, off for the rest); times ``lambda``.

mergekit's ``linear`` merges whole models, ``sum_i w_i theta_i / sum_i w_i``: over the deltas of one
base that is the normalized weighted sum above; without ``normalize`` it scales the base's own weights
by ``sum_i w_i``, which no adapter delta expresses (``mergekit_config`` refuses it unless the weights
sum to 1).

DARE and DELLA masks come from mixserve's seeded generators (mergekit draws from torch's global RNG), so
those merges agree with mergekit in law (kept fraction, norm), not entry by entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.steps import (
    agreeing_sum,
    bernoulli_keep_mask,
    elect_sign,
    l1_rescaled,
    magnitude_sampling_probs,
    sampled_keep_mask,
    top_k_mask,
    weighted_sum,
)

# mergekit 0.1.5's registry: method -> (default normalize, default rescale). Every method takes
# ``weight`` per model; all but ``linear`` take ``lambda``, ``rescale`` and a per-model ``density``.
DEFAULTS: dict[str, tuple[bool, bool]] = {
    "linear": (True, False),
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_linear": (False, True),
    "dare_ties": (False, True),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (False, False),
    "della": (True, True),
    "della_linear": (False, True),
}
# mergekit's defaults for the per-model sparsification parameters.
DEFAULT_DENSITY, DEFAULT_GAMMA, DEFAULT_EPSILON = 1.0, 0.01, 0.15


@dataclass(frozen=True)
class ChildSparsity:
    """One child's sparsification parameters (mergekit's per-model ``density``, ``gamma``, ``epsilon``)."""

    density: float = DEFAULT_DENSITY
    gamma: float = DEFAULT_GAMMA
    epsilon: float = DEFAULT_EPSILON


def params_of(method: str) -> tuple[str, ...]:
    """The node-level hyper-parameters a mergekit-convention ``method`` takes (besides weights)."""
    if method == "linear":
        return ("normalize",)
    extra = {"breadcrumbs": ("gamma",), "breadcrumbs_ties": ("gamma",), "della": ("epsilon",),
             "della_linear": ("epsilon",)}.get(method, ())  # fmt: skip
    seed = ("seed",) if method in ("dare_linear", "dare_ties", "della", "della_linear") else ()
    return ("density", "normalize", "rescale", "lambda", *extra, *seed)


def sparsify(
    tensor: torch.Tensor, kind: str, child: ChildSparsity, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """mergekit's ``sparsify`` of one task vector (a fresh tensor); ``kind`` as ``MergeMethod.sparsify``."""
    if kind == "none" or child.density >= 1:
        return tensor.clone()
    n = tensor.numel()
    if kind == "magnitude":
        keep = top_k_mask(tensor, max(1, int(child.density * n)))
    elif kind == "magnitude_outliers":
        k = int(child.density * n)
        skip = min(int(child.gamma * n), n - k)
        keep = top_k_mask(tensor, skip + k) & ~top_k_mask(tensor, skip)
    elif kind == "random":
        keep = bernoulli_keep_mask(tensor.shape, 1.0 - child.density, generator).to(tensor.device)
    elif kind == "magnitude_sampling":
        keep = sampled_keep_mask(magnitude_sampling_probs(tensor, child.density, child.epsilon), generator)
    else:
        raise ValueError(f"no mergekit sparsification for {kind!r}")
    return l1_rescaled(tensor, keep) if rescale else tensor * keep


def merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    children: Sequence[ChildSparsity],
    *,
    kind: str,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic over same-shaped task vectors (see the module docstring)."""
    if not len(tensors) == len(weights) == len(children):
        raise ValueError(f"{len(tensors)} tensors, {len(weights)} weights, {len(children)} children's parameters")
    if kind in ("random", "magnitude_sampling") and generator is None:
        raise ValueError("mergekit's DARE and DELLA need a seeded generator")
    parts = [sparsify(t, kind, c, rescale, generator) for t, c in zip(tensors, children, strict=True)]
    if consensus:
        positive = elect_sign([t * w for t, w in zip(parts, weights, strict=True)], "total")
        out = agreeing_sum(parts, weights, positive, divide=normalize)
    else:
        out = weighted_sum(parts, weights)
        total = float(sum(weights))
        if normalize and abs(total) >= 1e-8:
            out.div_(total)
    return out.mul_(lam) if lam != 1.0 else out
