"""Merges on the singular vectors of each layer's task matrices: TSV-M, Iso-C and Iso-CTS.

Each function takes per-child 2-D task matrices ``T_i`` (already weighted: ``w_i dW_i``) and
returns the merged matrix. The operations are equivariant under orthonormal changes of basis,
``f(Q_B M_i Q_A^T) = Q_B f(M_i) Q_A^T``, so the same functions run on full ``[out, in]`` deltas
(``dense`` space) and on the small ``R x R`` cores of a shared factor basis (``lowrank`` space,
``lowrank.shared_basis``) with the same result up to rounding: this is why the low-rank space makes
these methods cheap (SVDs of ``sum(r) x sum(r)`` cores instead of 4096 x 14336 matrices; Core Space
merging, Panariello et al. 2025, https://arxiv.org/abs/2509.17786).

Low-rank task matrices need one adaptation of the papers' definitions, which assume full-rank task
matrices (full fine-tuning): a fraction "of the space" is a fraction of ``D = min(out, in, sum_i
rank(T_i))``, the dimension the tasks can span, not of ``min(out, in)``; and spectra are taken over
the numerically nonzero singular values only (``rank_tol``). For full-rank inputs both are the
papers' definitions exactly (``tests/test_spectral.py`` checks the authors' code on such a case);
for a rank-16 LoRA delta in a 4096 x 4096 layer, ``min(out, in)`` would add thousands of arbitrary
null-space directions at the mean singular value.

* TSV-M: Gargiulo et al. 2025, "Task Singular Vectors", https://arxiv.org/abs/2412.00081
* Iso-C / Iso-CTS: Marczak et al. 2025, "No Task Left Behind", https://arxiv.org/abs/2502.04959
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.steps import DECISION_DTYPE

# Singular values below this fraction of a matrix's largest count as zero (fp32 SVDs of exactly
# low-rank matrices leave ~1e-6 relative noise in the null directions).
RANK_RTOL = 1e-4


def thin_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``M = U diag(S) Vh`` with ``k = min(M.shape)`` components, singular values descending."""
    return torch.linalg.svd(M, full_matrices=False)


def numerical_rank(S: torch.Tensor, rtol: float = RANK_RTOL) -> int:
    """How many singular values (descending) exceed ``rtol`` times the largest; 0 for a zero matrix."""
    if S.numel() == 0 or float(S[0]) <= 0.0:
        return 0
    return int((S > rtol * S[0]).sum())


def polar_factor(X: torch.Tensor, rtol: float = RANK_RTOL) -> torch.Tensor:
    """The semi-orthogonal matrix nearest to ``X`` (orthogonal Procrustes): ``X = P S Q^T -> P Q^T``.

    Only the numerically nonzero singular values take part, so the answer is unique even when the
    columns of ``X`` are dependent (the same adapter twice); for full-column-rank ``X`` it is the
    usual polar factor TSV-M uses to decorrelate the concatenated singular vectors.
    """
    P, S, Qh = thin_svd(X)
    k = numerical_rank(S, rtol)
    return P[:, :k] @ Qh[:k]


def space_dim(tensors: Sequence[torch.Tensor], ranks: Sequence[int]) -> int:
    """``D = min(out, in, sum_i rank(T_i))``: the dimension the task matrices can span together."""
    return min(min(tensors[0].shape), sum(ranks))


def _svds(tensors: Sequence[torch.Tensor], rtol: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    out = []
    for t in tensors:
        U, S, Vh = thin_svd(t)
        out.append((U, S, Vh, numerical_rank(S, rtol)))
    return out


def _check(tensors: Sequence[torch.Tensor]) -> None:
    if not tensors:
        raise ValueError("a merge needs at least one tensor")
    for t in tensors:
        if t.dim() != 2 or t.shape != tensors[0].shape:
            raise ValueError("spectral merges take 2-D task matrices of one shape")


def tsv_merge(
    tensors: Sequence[torch.Tensor], fraction: float | None = None, lam: float = 1.0, rtol: float = RANK_RTOL
) -> torch.Tensor:
    """TSV-M (Gargiulo et al. 2025, Alg. 1): compress each task, decorrelate, rebuild.

    ``T_i = U_i S_i V_i^T``; keep each task's top ``k_i = min(rank(T_i), floor(fraction * D))``
    components; concatenate ``U = [U_1k .. U_nk]``, ``S = diag(S_1k .. S_nk)``, ``V = [V_1k .. V_nk]``;
    replace ``U`` and ``V`` by their polar factors (``polar_factor``: the orthogonal Procrustes
    solution, which removes the interference between tasks' singular vectors) and return
    ``lam * U_perp S V_perp^T``. The paper's ``fraction = 1 / n`` (the default, ``None``) counts only
    the nonzero tasks, so a module that some children leave untouched is not cut down; with equal
    ranks it keeps every component of every task (no compression, only the decorrelation).
    """
    _check(tensors)
    svds = _svds(tensors, rtol)
    if fraction is None:
        fraction = 1.0 / max(1, sum(r > 0 for *_, r in svds))
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    d = space_dim(tensors, [r for *_, r in svds])
    per_task = int(fraction * d)
    Us, Ss, Vhs = [], [], []
    for U, S, Vh, r in svds:
        k = min(r, per_task)
        Us.append(U[:, :k])
        Ss.append(S[:k])
        Vhs.append(Vh[:k])
    S_cat = torch.cat(Ss)
    if S_cat.numel() == 0:
        return torch.zeros_like(tensors[0])
    U_perp = polar_factor(torch.cat(Us, dim=1), rtol)
    V_perp = polar_factor(torch.cat(Vhs, dim=0).mT, rtol)
    return (U_perp * (S_cat * lam)) @ V_perp.mT


def flatten_spectrum(S: torch.Tensor) -> torch.Tensor:
    """Iso-C's isotropic spectrum: every singular value replaced by their mean."""
    return torch.full_like(S, float(S.mean())) if S.numel() else S


def iso_c(tensors: Sequence[torch.Tensor], lam: float = 1.0, rtol: float = RANK_RTOL) -> torch.Tensor:
    """Iso-C (Marczak et al. 2025, Eq. 5): the task-arithmetic sum with a flat spectrum.

    ``T = sum_i T_i = U S V^T`` over its ``r`` nonzero singular values; return
    ``lam * mean(S) * U V^T``. The result spans the same row and column spaces as ``T`` and every
    direction in it gets the same gain, so tasks whose directions are weak in the sum are not
    drowned by the dominant ones.
    """
    _check(tensors)
    total = torch.stack(list(tensors)).sum(0) if len(tensors) > 1 else tensors[0].clone()
    U, S, Vh = thin_svd(total)
    r = numerical_rank(S, rtol)
    if r == 0:
        return torch.zeros_like(total)
    S_flat = flatten_spectrum(S[:r]) * lam
    return (U[:, :r] * S_flat) @ Vh[:r]


def iso_cts(
    tensors: Sequence[torch.Tensor], common_fraction: float = 0.8, lam: float = 1.0, rtol: float = RANK_RTOL
) -> torch.Tensor:
    """Iso-CTS (Marczak et al. 2025, Sec. 4.2): common subspace + task-specific directions, flattened.

    With ``D`` the space's dimension (``space_dim``) and ``n`` tasks (those not zero on this module): ``k = D - n * round((D - floor(
    common_fraction * D)) / n)`` directions come from the top of the sum ``T = sum_i T_i``'s SVD (the
    common subspace ``U_c``); each task contributes its top ``s = (D - k) / n`` singular directions
    of ``T_i - U_c U_c^T T_i`` (what the common subspace misses of it). The concatenated left and
    right vectors are orthogonalised (``polar_factor``), the concatenated singular values flattened
    to their mean (``flatten_spectrum``), and the result scaled by ``lam``.
    """
    _check(tensors)
    if not 0 < common_fraction <= 1:
        raise ValueError(f"common_fraction must be in (0, 1], got {common_fraction}")
    ranks = [numerical_rank(thin_svd(t)[1], rtol) for t in tensors]
    # Tasks that leave this module untouched get no share of the space (as TSV-M's default fraction).
    active = [t for t, r in zip(tensors, ranks, strict=True) if r > 0]
    n = max(1, len(active))
    d = space_dim(tensors, ranks)
    if d == 0:
        return torch.zeros_like(tensors[0])
    k = int(d * common_fraction)
    k = min(d, max(0, d - round((d - k) / n) * n))
    s = (d - k) // n
    total = torch.stack(list(tensors)).sum(0)
    U, S, Vh = thin_svd(total)
    # The common subspace holds only the sum's nonzero directions: past its rank, LAPACK's singular
    # vectors are an arbitrary basis of the null space, and projecting the tasks on them would make
    # the result depend on the basis (dense and lowrank would differ when tasks cancel).
    k = min(k, numerical_rank(S, rtol))
    Us, Ss, Vhs = [U[:, :k]], [S[:k]], [Vh[:k]]
    if s > 0:
        Uc = U[:, :k]
        for t in active:
            Ut, St, Vht = thin_svd(t - Uc @ (Uc.mT @ t))
            Us.append(Ut[:, :s])
            Ss.append(St[:s])
            Vhs.append(Vht[:s])
    S_cat = torch.cat(Ss)
    keep = S_cat > rtol * S_cat.max() if S_cat.numel() else S_cat.bool()
    if not bool(keep.any()):
        return torch.zeros_like(tensors[0])
    # Directions with a zero singular value (a task with nothing outside the common subspace) carry
    # no information: leave them out of the orthogonalisation and the mean, as for TSV-M.
    U_cat = torch.cat(Us, dim=1)[:, keep]
    V_cat = torch.cat(Vhs, dim=0)[keep].mT
    S_flat = flatten_spectrum(S_cat[keep]) * lam
    return (polar_factor(U_cat, rtol) * S_flat) @ polar_factor(V_cat, rtol).mT


def merge_spectral(
    name: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    sv_fraction: float | None = None,
    common_fraction: float = 0.8,
) -> torch.Tensor:
    """A spectral method (``tsv``, ``iso_c``, ``iso_cts``) on weighted task matrices ``w_i T_i``.

    The papers merge unweighted task matrices; a child's weight scales its matrix first. The SVDs run in
    float64 (``DECISION_DTYPE``): which singular values count and how the concatenated singular vectors
    are orthogonalised are decisions too (in float32 the demo's dense Iso-CTS moved by 4e-4 with the
    kernel set); the result comes back in the input dtype.
    """
    weighted = [t.to(DECISION_DTYPE) * w for t, w in zip(tensors, weights, strict=True)]
    if name == "tsv":
        out = tsv_merge(weighted, sv_fraction, lam)
    elif name == "iso_c":
        out = iso_c(weighted, lam)
    elif name == "iso_cts":
        out = iso_cts(weighted, common_fraction, lam)
    else:
        raise ValueError(f"no spectral merge named {name!r}")
    return out.to(tensors[0].dtype)
