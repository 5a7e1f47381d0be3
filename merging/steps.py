"""The building blocks every merge method is made of: tensors in, tensors out, no I/O.

Each function is one step of the generalised task-arithmetic merge (see ``methods.py``):

* sparsify: :func:`magnitude_trim` (TIES' "trim") or :func:`drop_and_rescale` (DARE);
* sign consensus: :func:`elect_sign` (TIES' "elect");
* combine: :func:`weighted_sum` or :func:`disjoint_mean` (TIES' "disjoint merge").

Semantics follow the papers and ``peft.utils.merge_utils`` (the differential tests hold them to it):

* TIES-Merging, Yadav et al. 2023, https://arxiv.org/abs/2306.01708
* DARE, Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099

The functions avoid stacking the task tensors into one ``[n, *shape]`` tensor (what PEFT does):
for a 14336 x 4096 projection that copy alone is ~700 MB for three adapters, and every extra pass over
it costs more than the arithmetic. ``methods.merge_tensors`` runs them block by block on the CPU
(:func:`blocks`), which is valid because every step after the trim threshold is elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

MajoritySign = Literal["total", "frequency"]

# The precision of every quantity a merge *decides* on: the shared bases of stacked factors, the cores
# trimmed and elected in them, and the dense task vectors' products (merging/README.md, "Decisions that
# do not depend on rounding"). In float32 an entry within ~1e-6 of a cut-off lands on either side
# depending on the BLAS kernel, the thread count or the device; in float64 that band is ~1e-15 wide.
DECISION_DTYPE = torch.float64

# Below this many entries torch.kthvalue on the whole tensor is cheap enough; above it, the
# sampled bracket in kth_largest_magnitude saves most of the selection time.
_EXACT_SELECT_BELOW = 1 << 20
_SAMPLE_SIZE = 1 << 16
# Elementwise work on CPU runs over blocks of this many entries, so that the handful of temporaries
# a step needs stay in cache instead of streaming 235 MB tensors through memory once per operation.
CPU_BLOCK = 1 << 18


def blocks(numel: int, device: torch.device) -> list[slice]:
    """Slices of a flat index range to process in turn (one slice on accelerators)."""
    if device.type != "cpu" or numel <= CPU_BLOCK:
        return [slice(0, numel)]
    return [slice(i, min(i + CPU_BLOCK, numel)) for i in range(0, numel, CPU_BLOCK)]


def kth_largest_magnitude(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Return the k-th largest ``|t|`` (1-based, a 0-d tensor), exactly.

    Exact selection over tens of millions of entries is the slow part of TIES (``torch.topk`` on a
    14336 x 4096 matrix takes seconds on a CPU). For large tensors we first bracket the answer
    between two order statistics of a small random sample, count the entries above the bracket, and
    run the exact selection only on the few entries inside it. If the bracket misses (unlikely, it
    is 12 standard deviations wide) we fall back to selecting over the whole tensor, so the result is
    always exact; the sample only decides how fast.
    """
    flat = tensor.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n < _EXACT_SELECT_BELOW:
        return torch.kthvalue(flat.abs(), n - k + 1).values
    gen = torch.Generator(device=flat.device).manual_seed(n ^ k)
    idx = torch.randint(0, n, (_SAMPLE_SIZE,), generator=gen, device=flat.device)
    sample, _ = torch.sort(flat[idx].abs())
    # Position of the k-th largest in the sorted sample, +- 6 standard deviations of a binomial.
    p = 1.0 - k / n
    sd = (_SAMPLE_SIZE * p * (1 - p)) ** 0.5
    lo = sample[max(0, int(p * _SAMPLE_SIZE - 6 * sd - 2))]
    hi = sample[min(_SAMPLE_SIZE - 1, int(p * _SAMPLE_SIZE + 6 * sd + 2))]
    n_above = torch.zeros((), dtype=torch.int64, device=flat.device)
    inside = []
    for blk in blocks(n, flat.device):
        a = flat[blk].abs()
        n_above += (a > hi).sum()
        inside.append(a[(a >= lo) & (a <= hi)])
    within = torch.cat(inside)
    need = k - int(n_above)  # rank of the answer, counted from the top, among the entries inside
    if 1 <= need <= within.numel():
        return torch.kthvalue(within, within.numel() - need + 1).values
    return torch.kthvalue(flat.abs(), n - k + 1).values


def magnitude_threshold(tensor: torch.Tensor, density: float) -> float | None:
    """TIES' cut-off: the ``k = int(density * numel)``-th largest magnitude (``None``: keep all).

    As in PEFT, ``density >= 1`` keeps everything and ``k == 0`` keeps nothing (``inf``).
    """
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if density >= 1:
        return None
    k = int(density * tensor.numel())
    return float("inf") if k == 0 else float(kth_largest_magnitude(tensor, k))


def magnitude_thresholds(stack: torch.Tensor, density: float) -> torch.Tensor | None:
    """:func:`magnitude_threshold` of every slice of ``stack`` (``[M, ...]``), shaped to broadcast
    against it (``[M, 1, ...]``); ``None``: keep all. Exact, like the per-tensor threshold."""
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if density >= 1:
        return None
    flat = stack.reshape(stack.shape[0], -1)
    n = flat.shape[1]
    k = int(density * n)
    shape = (stack.shape[0],) + (1,) * (stack.dim() - 1)
    if k == 0:
        return torch.full(shape, float("inf"), dtype=stack.dtype, device=stack.device)
    return torch.kthvalue(flat.abs(), n - k + 1, dim=1).values.view(shape)


def top_k_mask(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` entries of largest magnitude (mergekit's trims), as a boolean mask.

    Entries above the k-th largest magnitude are all kept; among those equal to it, the lowest flat
    indices fill the remaining places (mergekit's ``argsort`` leaves that order to the sort). ``k <= 0``
    keeps nothing, ``k >= numel`` everything. The masks of ``k`` and ``k' < k`` are nested.
    """
    n = tensor.numel()
    if k <= 0 or n == 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(tensor, dtype=torch.bool)
    a = tensor.abs()
    tau = kth_largest_magnitude(tensor, k)
    keep = a > tau
    need = k - int(keep.sum())
    if need > 0:
        at = (a == tau).reshape(-1)
        keep |= (at & (at.cumsum(0) <= need)).view(a.shape)
    return keep


def trim_below(tensor: torch.Tensor, tau: float | torch.Tensor | None) -> torch.Tensor:
    """Zero the entries with ``|t| < tau`` (a copy; ``tau=None`` keeps everything; a tensor ``tau``
    broadcasts, one threshold per slice)."""
    if tau is None:
        return tensor.clone()
    return tensor.masked_fill(tensor.abs() < tau, 0)


def magnitude_trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES "trim": keep the ``k = int(density * numel)`` entries of largest magnitude, zero the rest.

    ``trim(t)_j = t_j if |t_j| >= tau else 0`` with ``tau`` the k-th largest ``|t|``. Unlike
    ``torch.topk``, entries that tie with the k-th magnitude are all kept (topk keeps an arbitrary
    subset of them); the two agree whenever magnitudes are distinct, and zeros kept or dropped
    change nothing.
    """
    return trim_below(tensor, magnitude_threshold(tensor, density))


def drop_and_rescale(tensor: torch.Tensor, drop_rate: float, keep_mask: torch.Tensor) -> torch.Tensor:
    """DARE "drop and rescale": ``t * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` given as ``keep_mask``.

    Rescaling by ``1 / (1 - p)`` keeps the expectation: ``E[t * m / (1 - p)] = t``. The mask is an
    argument (see :func:`bernoulli_keep_mask`) so that a merge is reproducible from its seed and so
    tests can feed the exact masks a reference implementation drew.
    """
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if keep_mask.shape != tensor.shape:
        raise ValueError(f"keep mask shape {tuple(keep_mask.shape)} != tensor shape {tuple(tensor.shape)}")
    return tensor * keep_mask.to(device=tensor.device, dtype=tensor.dtype) / (1.0 - drop_rate)


def bernoulli_keep_mask(
    shape: torch.Size | Sequence[int], drop_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """A boolean mask, on the generator's device, whose entries are kept (True) with probability
    ``1 - drop_rate``: entry ``j`` is kept when its uniform draw ``u_j`` in ``[0, 1)`` is ``>= drop_rate``."""
    return torch.rand(tuple(shape), generator=generator, device=generator.device) >= drop_rate


def draw_keep_masks(
    shape: torch.Size | Sequence[int], n: int, drop_rate: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """The DARE keep masks :func:`merge_tensors` draws for ``n`` tensors of ``shape`` from ``generator``
    (block by block, tensor after tensor), so a caller can draw them itself and get the same masks."""
    numel = 1
    for d in shape:
        numel *= d
    parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for blk in blocks(numel, generator.device):
        for masks in parts:
            masks.append(bernoulli_keep_mask((blk.stop - blk.start,), drop_rate, generator))
    return [torch.cat(masks).view(tuple(shape)) for masks in parts]


def sampled_keep_mask(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A boolean mask keeping entry ``j`` with probability ``probs_j`` (DELLA), drawn on the generator's
    device and returned on ``probs``' device: the draws do not depend on where the merge runs."""
    return torch.bernoulli(probs.to(generator.device), generator=generator).bool().to(probs.device)


def magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky 2024, https://arxiv.org/abs/2312.06795), as mergekit
    defines it: drop the ``n_top = int(gamma * N)`` largest magnitudes (outliers), then the smallest,
    so that ``k = int(density * N)`` entries survive (``n_top`` shrinks when ``k + n_top > N``).

    Kept: ``tau_low <= |t| < tau_top`` with ``tau_top`` the ``n_top``-th and ``tau_low`` the
    ``(n_top + k)``-th largest magnitude (ties at a cut-off kept, as in :func:`magnitude_trim`).
    mergekit 0.1.5 keeps ``sort_indices[n_bot : n_bot + k]`` of the ascending sort, the same entries
    when magnitudes are distinct (at a tie it keeps exactly k: the ``mergekit`` convention does too);
    ``n_top == 0`` (every tensor under 100 entries at ``gamma = 0.01``) removes no outliers in both.
    No rescaling (mergekit's breadcrumbs defaults).
    """
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    if density >= 1:
        return tensor.clone()
    n = tensor.numel()
    k = int(density * n)
    n_top = min(int(gamma * n), n - k)
    if k == 0:
        return torch.zeros_like(tensor)
    a = tensor.abs()
    keep = a >= kth_largest_magnitude(tensor, n_top + k)
    if n_top > 0:
        keep &= a < kth_largest_magnitude(tensor, n_top)
    return tensor * keep


def magnitude_sampling_probs(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE keep probabilities (Deep et al. 2024, https://arxiv.org/abs/2406.11617), as
    mergekit's ``della_magprune`` computes them: within each row, entries ranked by magnitude get
    ``p = density - epsilon + 2 epsilon (rank - 1) / (cols - 1)``: the smallest ``density - epsilon``,
    the largest ``density + epsilon``. A 1-D tensor is one row; a one-column row gets ``density``
    (mergekit divides 0 by 0 there).
    """
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"DELLA needs density +- epsilon inside (0, 1); got density {density}, epsilon {epsilon}")
    rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)
    cols = rows.shape[1]
    order = rows.abs().argsort(dim=1)  # each entry's rank = its place in the order (one sort, not two)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cols, device=order.device).expand_as(order))
    ranks = ranks.to(torch.float32)
    rank_norm = ranks / (cols - 1) if cols > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(tensor.shape)


def l1_rescaled(tensor: torch.Tensor, keep: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``t * m * ||t||_1 / ||t * m||_1``: the masked tensor rescaled to its original L1 norm
    (mergekit's ``rescaled_masked_tensor`` with the L1 norm, what its DELLA methods use)."""
    masked = tensor * keep.to(device=tensor.device, dtype=tensor.dtype)
    before, after = tensor.abs().sum(), masked.abs().sum()
    if float(before) < eps or float(after) < eps:
        return masked
    return masked * (before / after)


def elect_sign(tensors: Sequence[torch.Tensor], method: MajoritySign = "total") -> torch.Tensor:
    """TIES "elect": the majority sign per entry, as a boolean tensor (True = positive).

    ``total``: ``sign(sum_i t_i)``; ``frequency``: ``sign(sum_i sign(t_i))``. Ties (a zero sum) elect
    the positive sign, as PEFT does. The vectors are the *trimmed, unweighted* task vectors: like
    PEFT's ``merge_utils``, the election happens before the per-adapter weights are applied.
    """
    if method not in ("total", "frequency"):
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {method!r}")
    acc = torch.zeros_like(tensors[0])
    for t in tensors:
        acc += t if method == "total" else t.sign()
    return acc >= 0


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Task arithmetic: ``sum_i w_i * t_i`` (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089)."""
    _check_pairs(tensors, weights)
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(t, alpha=w)
    return out


def disjoint_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], positive: torch.Tensor) -> torch.Tensor:
    """TIES "disjoint merge": the mean of the weighted entries whose sign agrees with the elected one.

    ``out_j = sum_i [sign(t_ij) = s_j] w_i t_ij / max(1, sum_i [sign(t_ij) = s_j])``. Zeros (trimmed
    or dropped entries) have sign 0 and never agree, so they neither add nor count. The divisor is the
    number of agreeing entries, not the sum of their weights (PEFT's choice; mergekit's
    ``normalize=True`` divides by the weights instead).
    """
    _check_pairs(tensors, weights)
    elected = torch.where(positive, 1.0, -1.0).to(tensors[0].dtype)
    out = torch.zeros_like(tensors[0])
    count = torch.zeros_like(tensors[0])
    agree = torch.empty_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        # t * s > 0 exactly when t is non-zero and has the elected sign s.
        torch.gt(t * elected, 0, out=agree)
        out.addcmul_(t, agree, value=w)
        count += agree
    return out.div_(count.clamp_(min=1.0))


def agreeing_sum(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], positive: torch.Tensor, *, divide: bool
) -> torch.Tensor:
    """mergekit's consensus merge: ``sum_i [agree] w_i t_i``, divided by ``sum_i [agree] w_i`` when
    ``divide`` (a zero divisor counts as 1). ``positive`` is elected on the *weighted* vectors there
    (``elect_sign([w_i t_i])``), unlike TIES' :func:`disjoint_mean`, which follows PEFT; with unit
    weights the two agree.
    """
    _check_pairs(tensors, weights)
    elected = torch.where(positive, 1.0, -1.0).to(tensors[0].dtype)
    out = torch.zeros_like(tensors[0])
    mass = torch.zeros_like(tensors[0]) if divide else None
    agree = torch.empty_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        torch.gt(t * (w * elected), 0, out=agree)  # the weighted entry has the elected sign
        out.addcmul_(t, agree, value=w)
        if mass is not None:
            mass.add_(agree, alpha=w)
    if mass is None:
        return out
    return out.div_(torch.where(mass == 0, torch.ones_like(mass), mass))


def _check_pairs(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(tensors) == 0:
        raise ValueError("a merge needs at least one tensor")
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"task tensors differ in shape: {tuple(shape)} vs {tuple(t.shape)}")
