"""The adapter family: per module, one orthonormal basis that spans every registered adapter.

Stack the family's factors per module, ``B_all = [B_1 .. B_n]`` (out x R) and
``A_all = [A_1; ..; A_n]`` (R x in). The family keeps orthonormal ``U`` (out x rb) spanning the
columns of ``B_all`` and ``V`` (in x ra) spanning the rows of ``A_all``, and every member's
*coordinates* in them, ``B_i' = U^T B_i`` (rb x r) and ``A_i' = A_i V`` (r x ra), so that
``dW_i = s_i B_i A_i = U (s_i B_i' A_i') V^T`` exactly (up to rounding).

Every operation of the ``lowrank`` merge space (``lowrank.py``: bases of the stacked factors by SVD
or QR, a merge on the cores, truncation by the core's SVD, weighted concatenation) commutes with
such an orthonormal embedding: the SVD of ``U X`` is ``U`` times the SVD of ``X``. So a lowrank mix of
family members can be merged on the coordinates alone, in matrices of a few dozen rows instead of
4096 or 14336 (``core_merge.py``), and its result is ``U C V^T`` with a small core ``C`` (rb x ra):
that core is all a server has to keep per mix, and ``x V`` and ``. U^T`` are shared by every mix.
This is Core Space merging's shared basis (Panariello et al. 2025, https://arxiv.org/abs/2509.17786)
kept for a whole family instead of one adapter set.

Growing the family appends: the part of a new adapter's factors outside ``span(U)`` is
orthonormalised and added as new columns, earlier columns untouched. Earlier members' coordinates get
zero rows, and a core merged before the extension is the extended one's with zero rows and columns
appended, so nothing merged earlier is invalidated. Directions of a replaced or removed adapter stay
(wasted rank, not wrong results). A bound on each module's basis size (``max_rank``) keeps the cores
small; an adapter that would exceed it is not admitted (a server serves it through full factors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from merging.adapters import LoraAdapter, LoraFactors
from merging.steps import DECISION_DTYPE

# A new direction is kept when its singular value, after projecting out the existing basis twice, is
# above this fraction of the new factor's norm: float64 (the bases' dtype) leaves ~1e-15 of an in-span
# factor behind, float32 weights differ from their own rounding by ~1e-7.
SPAN_RTOL = 1e-10


class FamilyFullError(ValueError):
    """Admitting the adapter would grow some module's basis past the family's bound."""


@dataclass(frozen=True)
class ModuleBasis:
    """Orthonormal bases of one module's family: every member's ``B`` in ``span(U)``, ``A^T`` in ``span(V)``."""

    U: torch.Tensor  # [out, rb]
    V: torch.Tensor  # [in, ra]

    @property
    def dims(self) -> tuple[int, int]:
        """``(rb, ra)``: the coordinate dimensions (the size of a core)."""
        return (self.U.shape[1], self.V.shape[1])


@dataclass(frozen=True)
class AdapterFamily:
    """An immutable snapshot of the family; :meth:`extend` returns the next one (``version + 1``)."""

    max_rank: int = 256
    version: int = 0
    bases: Mapping[str, ModuleBasis] = field(default_factory=dict)
    # name -> the member as coordinates: per module A' [r, ra], B' [rb, r] and the adapter's scale
    members: Mapping[str, LoraAdapter] = field(default_factory=dict)
    # The coordinates are already in the SVD bases of the members' scaled stacks (a set family from Gram
    # matrices, ``member_merge.set_family``): a node stacking exactly the members needs no bases of its own.
    svd_coordinates: bool = False

    def __contains__(self, adapter: LoraAdapter) -> bool:
        """Whether this very adapter (same name and content fingerprint) is a member."""
        member = self.members.get(adapter.name)
        return member is not None and member.fingerprint == adapter.fingerprint

    def dims(self, module: str) -> tuple[int, int]:
        basis = self.bases.get(module)
        return basis.dims if basis is not None else (0, 0)

    @property
    def rank(self) -> int:
        """The largest coordinate dimension over modules (what a core is padded to)."""
        return max((max(b.dims) for b in self.bases.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes of the bases (the members' coordinates are small beside them)."""
        return sum(t.numel() * t.element_size() for b in self.bases.values() for t in (b.U, b.V))

    def fits(self, adapter: LoraAdapter) -> bool:
        """Whether the adapter could join without any module's basis passing ``max_rank`` (an upper
        bound: directions already in the basis would cost nothing)."""
        return all(max(self.dims(m)) + f.rank <= self.max_rank for m, f in adapter.modules.items())

    def extend(self, adapter: LoraAdapter, *, rtol: float = SPAN_RTOL) -> AdapterFamily:
        """The family with ``adapter`` as a member (replacing a member of that name); raises
        :class:`FamilyFullError` when some module's basis would pass ``max_rank``."""
        bases = dict(self.bases)
        for module, f in adapter.modules.items():
            old = bases.get(module)
            dtype = DECISION_DTYPE  # the cores merged on these coordinates trim and elect: no float32 noise
            B, A_T = f.B.to(dtype), f.A.mT.to(dtype)
            U = _extend(old.U if old else None, B, rtol)
            V = _extend(old.V if old else None, A_T, rtol)
            if max(U.shape[1], V.shape[1]) > self.max_rank:
                raise FamilyFullError(
                    f"adapter {adapter.name!r}: module {module!r} would need a basis of rank "
                    f"{max(U.shape[1], V.shape[1])} (the family's bound is {self.max_rank})"
                )
            bases[module] = ModuleBasis(U, V)
        members = {name: _padded(m, bases) for name, m in self.members.items() if name != adapter.name}
        members[adapter.name] = _coordinates(adapter, bases)
        return replace(self, version=self.version + 1, bases=bases, members=members)

    def extend_all(self, adapters: Iterable[LoraAdapter]) -> tuple[AdapterFamily, dict[str, str]]:
        """Admit each adapter that fits, in order; returns the family and ``{name: why not}`` for the rest."""
        family, refused = self, {}
        for adapter in adapters:
            try:
                family = family.extend(adapter)
            except FamilyFullError as exc:
                refused[adapter.name] = str(exc)
        return family, refused


def _extend(Q: torch.Tensor | None, X: torch.Tensor, rtol: float) -> torch.Tensor:
    """``[Q, Q_new]``: ``Q_new`` an orthonormal basis of the part of ``span(X)`` outside ``span(Q)``.

    Projecting out ``Q`` twice is classical Gram-Schmidt with re-orthogonalisation ("twice is
    enough", Giraud et al. 2005), so ``Q_new`` is orthogonal to ``Q`` to working precision; an SVD of
    the remainder keeps its numerically nonzero directions only, so a factor already in the span (the
    same adapter twice) adds nothing.
    """
    if X.shape[1] == 0:
        return Q if Q is not None else X.new_zeros((X.shape[0], 0))
    scale = float(torch.linalg.matrix_norm(X))  # Frobenius: an upper bound of the largest singular value
    if Q is not None and Q.shape[1]:
        X = X - Q @ (Q.mT @ X)
        X = X - Q @ (Q.mT @ X)
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    new = U[:, S > rtol * scale] if scale > 0 else U[:, :0]
    return new.contiguous() if Q is None else torch.cat([Q, new], dim=1)


def _coordinates(adapter: LoraAdapter, bases: Mapping[str, ModuleBasis]) -> LoraAdapter:
    modules = {}
    for module, f in adapter.modules.items():
        basis = bases[module]
        B, A = f.B.to(basis.U.dtype), f.A.to(basis.V.dtype)
        modules[module] = LoraFactors(A=A @ basis.V, B=basis.U.mT @ B, scale=f.scale)
    return replace(adapter, modules=modules, path=None)


def _padded(member: LoraAdapter, bases: Mapping[str, ModuleBasis]) -> LoraAdapter:
    """Earlier coordinates in a grown basis: the new directions are orthogonal to the member's factors."""
    modules = {}
    for module, f in member.modules.items():
        rb, ra = bases[module].dims
        pad_b, pad_a = rb - f.B.shape[0], ra - f.A.shape[1]
        if pad_b or pad_a:
            f = LoraFactors(A=torch.nn.functional.pad(f.A, (0, pad_a)), B=torch.nn.functional.pad(f.B, (0, 0, 0, pad_b)),
                            scale=f.scale)  # fmt: skip
        modules[module] = f
    return replace(member, modules=modules)
