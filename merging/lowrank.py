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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.delta import DenseDelta, LowRankDelta, ModuleDelta, refactor_lowrank


@dataclass(frozen=True)
class SharedBasis:
    """Orthonormal bases of the stacked factors and each child's core in them."""

    Q_B: torch.Tensor  # [out, rb], orthonormal columns
    Q_A: torch.Tensor  # [in, ra], orthonormal columns
    cores: list[torch.Tensor]  # M_i: [rb, ra], dW_i = Q_B @ M_i @ Q_A^T


def _thin_svd_basis(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``X = Q R`` with ``Q = U`` (orthonormal, by decreasing singular value) and ``R = S V^T``."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U, S[:, None] * Vh


def _thin_qr_basis(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Q, R = torch.linalg.qr(X, mode="reduced")
    return Q, R


def shared_basis(factors: Sequence[LowRankDelta], *, orthogonalize: str = "svd") -> SharedBasis:
    """Orthonormal bases of the stacked factors, and the children's cores ``M_i = R_B[:, i] R_A[:, i]^T``.

    ``orthogonalize="svd"`` (the default) gives the order-independent reference basis that trimming
    and dropping need; ``"qr"`` any orthonormal basis of the same spaces, several times cheaper on
    tall factors, for methods that do not depend on the basis (the spectral ones).
    """
    basis_of = _thin_qr_basis if orthogonalize == "qr" else _thin_svd_basis
    B_cat = torch.cat([f.scaled_B() for f in factors], dim=1)  # [out, R]
    A_cat = torch.cat([f.A for f in factors], dim=0)  # [R, in]
    Q_B, R_B = basis_of(B_cat)  # Q_B: [out, rb], R_B: [rb, R]
    Q_A, R_A = basis_of(A_cat.mT)  # Q_A: [in, ra], R_A: [ra, R]
    cores, start = [], 0
    for f in factors:
        stop = start + f.rank
        cores.append(R_B[:, start:stop] @ R_A[:, start:stop].mT)
        start = stop
    return SharedBasis(Q_B=Q_B, Q_A=Q_A, cores=cores)


def from_core(basis: SharedBasis, core: torch.Tensor, rank: int | None = None) -> tuple[LowRankDelta, float]:
    """``Q_B M Q_A^T`` as factors, optionally truncated to ``rank``; returns (delta, energy kept).

    Truncation is an SVD of the small core (rb x ra) instead of the full (out x in) matrix: the
    bases are orthonormal, so the core's singular values are the delta's.
    """
    if rank is None or rank >= min(core.shape):
        return LowRankDelta(A=core @ basis.Q_A.mT, B=basis.Q_B), 1.0
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    total = float(S.pow(2).sum())
    kept = float(S[:rank].pow(2).sum()) / total if total > 0 else 1.0
    return LowRankDelta(A=Vh[:rank] @ basis.Q_A.mT, B=basis.Q_B @ (U[:, :rank] * S[:rank])), kept


def concat_weighted(factors: Sequence[LowRankDelta], weights: Sequence[float], divisor: float = 1.0) -> LowRankDelta:
    """``sum_i w_i dW_i / divisor`` exactly, as the concatenated factors (no basis needed).

    A linear merge is linear in the factors: ``sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 ..] @ [A_1; ..]``.
    """
    B = torch.cat([f.B * (f.scale * w / divisor) for f, w in zip(factors, weights, strict=True)], dim=1)
    A = torch.cat([f.A for f in factors], dim=0)
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
    return from_core(basis, basis.cores[0], rank)
