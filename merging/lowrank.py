"""The low-rank merge space: children's factors in one shared orthonormal basis.

Stack the children's factors ``B = [s_1 B_1 .. s_n B_n]`` (out x R) and ``A = [A_1; ..; A_n]``
(R x in) and take their thin SVDs, ``B = U_B (S_B V_B^T) = Q_B R_B`` and likewise ``A^T = Q_A R_A``
(the reference bases of Core Space merging; a QR would span the same space, but its basis, and so
what TIES trims in the cores, would depend on the order of the children). Then every child is
``dW_i = Q_B M_i Q_A^T`` with a small core ``M_i = R_B[:, i] R_A[:, i]^T`` (at most R x R). A merge
method runs on the cores and the result is ``Q_B M Q_A^T``, of rank <= R = sum of the children's ranks.
This is the shared-basis idea of Core Space merging (Panariello et al. 2025,
https://arxiv.org/abs/2509.17786) and KnOTS (Stoica et al. 2024, https://arxiv.org/abs/2410.19735).

The bases depend only on *which* factors are stacked, not on weights, method or density, so a
server can cache a :class:`SharedBasis` per adapter set and store only the small core per mix.

Every function works on the last two dimensions, so a stack of same-shaped modules (``A: [M, r, in]``,
``B: [M, out, r]``) goes through in one call (``core_merge.py`` merges a whole model that way); on 2-D
factors they are the plain per-module operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.delta import DenseDelta, LowRankDelta, ModuleDelta, refactor_lowrank
from merging.steps import DECISION_DTYPE


@dataclass(frozen=True)
class SharedBasis:
    """Orthonormal bases of the stacked factors and each child's core in them."""

    Q_B: torch.Tensor  # [..., out, rb], orthonormal columns
    Q_A: torch.Tensor  # [..., in, ra], orthonormal columns
    cores: list[torch.Tensor]  # M_i: [..., rb, ra], dW_i = Q_B @ M_i @ Q_A^T


def canonical_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``X = U diag(S) Vh`` with canonical signs: each right singular vector's largest entry
    is positive (as scikit-learn's ``svd_flip``).

    A singular vector is defined up to its sign, and LAPACK's choice depends on the matrix it is
    given, so ``X`` and ``Q X`` (the same factors in another orthonormal basis, as the family's
    coordinates are) could get different ones. Trimming does not care, but sign election by
    ``frequency`` breaks ties towards ``+`` and does: with canonical signs a basis, and every merge
    on it, depends only on ``X``'s column space and ``Vh``.
    """
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    signs = torch.gather(Vh, -1, Vh.abs().argmax(-1, keepdim=True)).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # [..., k, 1]
    return U * signs.mT, S, Vh * signs


def _thin_svd_basis(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``X = Q R`` with ``Q = U`` (orthonormal, by decreasing singular value) and ``R = S V^T``.

    Directions past ``X``'s numerical rank (singular values below ``max(shape) * eps * S_max``, the
    usual rank tolerance: rounding noise, e.g. an adapter stacked with a copy of itself) get exact zero
    rows in ``R``, so no core entry, and no decision taken on it, is made of rounding noise.
    """
    U, S, Vh = canonical_svd(X)
    tol = S[..., :1] * (max(X.shape[-2:]) * torch.finfo(S.dtype).eps)
    S = torch.where(S > tol, S, torch.zeros_like(S))
    return U, S.unsqueeze(-1) * Vh


def _thin_qr_basis(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Q, R = torch.linalg.qr(X, mode="reduced")
    return Q, R


def shared_basis(factors: Sequence[LowRankDelta], *, orthogonalize: str = "svd") -> SharedBasis:
    """Orthonormal bases of the stacked factors, and the children's cores ``M_i = R_B[:, i] R_A[:, i]^T``.

    ``orthogonalize="svd"`` (the default) gives the order-independent reference basis that trimming
    and dropping need; ``"qr"`` any orthonormal basis of the same spaces, several times cheaper on
    tall factors, for methods that do not depend on the basis (the spectral ones).

    Bases and cores are computed in ``DECISION_DTYPE`` (float64), whatever the factors' dtype: what a
    merge trims and elects in them must not depend on the kernels' rounding.
    """
    basis_of = _thin_qr_basis if orthogonalize == "qr" else _thin_svd_basis
    B_cat = torch.cat([f.B.to(DECISION_DTYPE) * f.scale for f in factors], dim=-1)  # [out, R]
    A_cat = torch.cat([f.A.to(DECISION_DTYPE) for f in factors], dim=-2)  # [R, in]
    Q_B, R_B = basis_of(B_cat)  # Q_B: [out, rb], R_B: [rb, R]
    Q_A, R_A = basis_of(A_cat.mT)  # Q_A: [in, ra], R_A: [ra, R]
    cores, start = [], 0
    for f in factors:
        stop = start + f.rank
        cores.append(R_B[..., start:stop] @ R_A[..., start:stop].mT)
        start = stop
    return SharedBasis(Q_B=Q_B, Q_A=Q_A, cores=cores)


def from_core(
    basis: SharedBasis, core: torch.Tensor, rank: int | None = None, *, balanced: bool = False
) -> tuple[LowRankDelta, float | torch.Tensor]:
    """``Q_B M Q_A^T`` as factors, optionally truncated to ``rank``; returns (delta, energy kept).

    Truncation is an SVD of the small core (rb x ra) instead of the full (out x in) matrix: the
    bases are orthonormal, so the core's singular values are the delta's. The energy kept is a float
    for one module and a tensor (one value per module) for a stack.

    ``balanced``: the factors ``B = Q_B U sqrt(S)``, ``A = sqrt(S) Vh Q_A^T`` from the core's
    (canonical) SVD, for a result that a parent node stacks with other children. The plain form's
    ``B = Q_B`` has orthonormal columns, whose equal singular values make the parent's basis of the
    stack an arbitrary rotation within them (LAPACK's choice, different for the same factors in other
    coordinates), and with it what the parent trims; with the core's singular values on both sides
    the parent's basis is defined by the factors.
    """
    full = rank is None or rank >= min(core.shape[-2:])
    if full and not balanced:
        return LowRankDelta(A=core @ basis.Q_A.mT, B=basis.Q_B), 1.0
    U, S, Vh = canonical_svd(core)
    S2 = S.pow(2)
    total = S2.sum(-1)
    k = S.shape[-1] if full else rank
    kept = torch.where(total > 0, S2[..., :k].sum(-1) / total.clamp(min=torch.finfo(S.dtype).tiny), 1.0)
    if balanced:
        root = S[..., :k].sqrt()
        delta = LowRankDelta(A=(root[..., :, None] * Vh[..., :k, :]) @ basis.Q_A.mT,
                             B=basis.Q_B @ (U[..., :k] * root[..., None, :]))  # fmt: skip
    else:
        delta = LowRankDelta(A=Vh[..., :k, :] @ basis.Q_A.mT, B=basis.Q_B @ (U[..., :k] * S[..., None, :k]))
    return delta, (1.0 if full else float(kept) if kept.dim() == 0 else kept)


def concat_weighted(factors: Sequence[LowRankDelta], weights: Sequence[float], divisor: float = 1.0) -> LowRankDelta:
    """``sum_i w_i dW_i / divisor`` exactly, as the concatenated factors (no basis needed).

    A linear merge is linear in the factors: ``sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 ..] @ [A_1; ..]``.
    """
    B = torch.cat([f.B * (f.scale * w / divisor) for f, w in zip(factors, weights, strict=True)], dim=-1)
    A = torch.cat([f.A for f in factors], dim=-2)
    return LowRankDelta(A=A, B=B)


def as_lowrank(delta: ModuleDelta, rank: int | None = None) -> tuple[LowRankDelta, float]:
    """``delta`` as factors of rank <= ``rank`` (default: its own rank) and the fraction of energy kept.

    Dense deltas go through a truncated SVD of the full matrix; low-rank ones only through the SVD of
    their small core, and only when ``rank`` is below their rank.
    """
    if isinstance(delta, DenseDelta):
        ref = refactor_lowrank(delta.W, rank if rank is not None else delta.rank)
        return ref.delta, ref.energy_kept
    if rank is None or rank >= delta.rank:
        return delta, 1.0
    basis = shared_basis([delta])
    low, kept = from_core(basis, basis.cores[0], rank)
    return low.to(delta.A.dtype), kept
