"""Merge results: per-module deltas, low-rank or dense, and the MergedDelta that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Entries of the float64 product :meth:`LowRankDelta.dense` forms at a time (64 MB).
_DENSE_BLOCK = 1 << 23


@dataclass(frozen=True)
class LowRankDelta:
    """``dW = scale * B @ A`` with ``A: [r, in]``, ``B: [out, r]``.

    ``scale`` stays separate (rather than folded into ``B``) so that the dense task vector is formed
    in the same order as PEFT forms it, ``(B @ A) * scale``: TIES trimming compares magnitudes, and an
    entry at the threshold must not move across it because of rounding.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    def to(self, dtype: torch.dtype) -> LowRankDelta:
        """The same delta with factors in ``dtype`` (``scale`` kept apart)."""
        if self.A.dtype == dtype and self.B.dtype == dtype:
            return self
        return LowRankDelta(A=self.A.to(dtype), B=self.B.to(dtype), scale=self.scale)

    @property
    def rank(self) -> int:
        return self.A.shape[-2]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(out, in)`` of the weight this delta adds to (the last two dimensions of a stack)."""
        return (self.B.shape[-2], self.A.shape[-1])

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def dense(self, exact: bool = True) -> torch.Tensor:
        """The dense ``dW = scale * (B @ A)`` (``[out, in]``, the factors' dtype), a fresh tensor.

        ``exact`` (default): formed in float64 and rounded once. The products of float32 (or bf16)
        entries are exact there and the rank-r sums accurate to ~1e-16, so the rounded ``dW`` is the same
        whatever BLAS kernel, thread count or device computed it (except an entry within ~1e-16 of a
        rounding boundary), and so is what a dense merge trims and elects on it. A product in the
        factors' dtype (``exact=False``, for results no decision is taken on) differs by ~1e-7 between
        kernels, enough to move the entries at a trim's cut-off (and the sign of near-zero sums).
        """
        if not exact:
            out = self.B @ self.A
            return out if self.scale == 1.0 else out.mul_(self.scale)
        A = self.A.to(torch.float64)
        shape = (*self.B.shape[:-1], self.A.shape[-1])
        out = torch.empty(shape, dtype=torch.promote_types(self.A.dtype, self.B.dtype), device=self.A.device)
        step = max(1, _DENSE_BLOCK // max(1, shape[-1])) if self.B.dim() == 2 else shape[0]
        for i in range(0, shape[0], step):  # row blocks of a matrix: the float64 temporaries stay small
            block = self.B[i : i + step].to(torch.float64) @ A
            out[i : i + step] = block.mul_(self.scale) if self.scale != 1.0 else block
        return out

    def scaled_B(self) -> torch.Tensor:
        """``scale * B``: the factor to stack when the scale must live inside the factors."""
        return self.B if self.scale == 1.0 else self.B * self.scale


@dataclass(frozen=True)
class DenseDelta:
    """An exact dense ``dW: [out, in]`` (the result of a ``dense``-space merge)."""

    W: torch.Tensor
    # The rank the node would be served at if it must become low-rank (sum of its children's ranks).
    rank_hint: int

    @property
    def rank(self) -> int:
        """The rank this delta is served at when it must become low-rank (not the matrix's true rank)."""
        return self.rank_hint

    @property
    def shape(self) -> tuple[int, int]:
        return (self.W.shape[0], self.W.shape[1])

    @property
    def nbytes(self) -> int:
        return self.W.numel() * self.W.element_size()

    def dense(self) -> torch.Tensor:
        return self.W


ModuleDelta = LowRankDelta | DenseDelta


@dataclass(frozen=True)
class Refactored:
    """A dense delta re-factored to low rank, with the fraction of its energy the factors keep."""

    delta: LowRankDelta
    energy_kept: float  # ||B @ A||_F^2 / ||dW||_F^2, in [0, 1]


def refactor_lowrank(W: torch.Tensor, rank: int, *, oversample: int = 8, niter: int = 4, seed: int = 0) -> Refactored:
    """Truncated SVD ``W ~ U_k S_k V_k^T`` returned as ``B = U_k S_k``, ``A = V_k^T``.

    Uses a randomized SVD (Halko et al. 2011, ``torch.svd_lowrank``) when ``rank`` is small against
    the matrix, a full SVD otherwise. ``energy_kept = sum(S_k^2) / ||W||_F^2`` says how much of the
    delta survives; it is 1 up to rounding when ``rank`` >= the rank of ``W``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    out_dim, in_dim = W.shape
    total = float(W.float().pow(2).sum())
    if total == 0.0:
        zero_A = W.new_zeros((0, in_dim))
        return Refactored(LowRankDelta(A=zero_A, B=W.new_zeros((out_dim, 0))), 1.0)
    k = min(rank, out_dim, in_dim)
    q = min(k + oversample, out_dim, in_dim)
    if q < min(out_dim, in_dim) // 2:
        # svd_lowrank draws its test matrix from the global RNG: fork it so merges stay deterministic.
        cuda_ids = [W.device.index if W.device.index is not None else torch.cuda.current_device()] if W.is_cuda else []
        with torch.random.fork_rng(devices=cuda_ids):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
        Vh = V.mT
    else:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    kept = float(S.pow(2).sum()) / total
    return Refactored(LowRankDelta(A=Vh.contiguous(), B=(U * S).contiguous()), min(kept, 1.0))


@dataclass
class MergedDelta:
    """The result of merging a mix: a delta per adapted module, plus provenance.

    ``modules`` maps a module name (as in the base model, e.g. ``model.layers.0.self_attn.q_proj``)
    to its delta. Modules every child leaves untouched are absent.
    """

    modules: dict[str, ModuleDelta]
    spec_hash: str
    method: str
    space: str
    seconds: float = 0.0
    energy_kept: dict[str, float] = field(default_factory=dict)  # filled by to_lowrank()

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.modules.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {m: d.rank for m, d in self.modules.items()}

    def to_lowrank(self, rank: int | None = None) -> MergedDelta:
        """All modules as factors of rank <= ``rank`` (default: each module's own rank); energy kept multiplies."""
        from merging.lowrank import as_lowrank  # lowrank builds on this module

        modules: dict[str, ModuleDelta] = {}
        energy: dict[str, float] = dict(self.energy_kept)
        for name, d in self.modules.items():
            modules[name], kept = as_lowrank(d, rank)
            if kept < 1.0:
                energy[name] = energy.get(name, 1.0) * kept
        return MergedDelta(modules, self.spec_hash, self.method, self.space, self.seconds, energy)

    def lowrank_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A, B)}``; raises if a module is still dense (call :meth:`to_lowrank` first)."""
        out = {}
        for name, d in self.modules.items():
            if not isinstance(d, LowRankDelta):
                raise ValueError(f"module {name!r} is dense; call to_lowrank() first")
            out[name] = (d.A, d.scaled_B())
        return out
