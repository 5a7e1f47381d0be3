"""A lowrank mix as a core in its own members' factor coordinates: what it costs is what its adapters cost.

A mix over members ``k = 1..K`` (its adapters, sorted by name) is, per module,

    dW = B_cat C A_cat,    B_cat = [s_1 B_1 .. s_K B_K] (out x sum r),    A_cat = [A_1; ..; A_K] (sum r x in),

with the members' own factors (``s_k`` its LoRA scale, as ``merge_mix``'s lowrank space stacks them) and
a small core ``C`` of
``(sum r) x (sum r)``. A server keeps each adapter's factors resident once and a mix as its members'
names and these cores (3 rank-16 members: 48 x 48 per module, ~1 MB per Mistral-7B in bf16), whatever
the number of adapters registered.

The merge itself runs exactly as :func:`merging.core_merge.merge_core` runs it, on an
:class:`~merging.family.AdapterFamily` of the mix's members alone (``U``, ``V`` orthonormal over their
stacks, float64; cached per adapter set): ``dW = U C_U V^T``. With the members' coordinates in it,
``R_B = U^T B_cat`` (rb x sum r, full row rank) and ``R_A = A_cat V`` (sum r x ra, full column rank),

    C = R_B^+ C_U R_A^+    gives    B_cat C A_cat = U (R_B R_B^+) C_U (R_A^+ R_A) V^T = U C_U V^T,

exactly when the pseudo-inverses are exact. When members are near-dependent (a perturbed copy of an
adapter) ``R_B`` has tiny singular values and the exact ``C`` huge entries, which the serving dtype
would round into noise; singular values under ``MAP_RTOL`` of the largest are dropped instead (a
least-squares solve) and the share of ``C_U``'s energy that is lost is recorded in ``energy_kept``.
An exact duplicate costs nothing: the family's bases hold its directions once and ``R_B`` stays
well-conditioned.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import count

import torch

from merging.adapters import LoraAdapter, LoraFactors
from merging.core_merge import BasisCache, merge_core
from merging.delta import LowRankDelta, MergedDelta, ModuleDelta
from merging.family import AdapterFamily, ModuleBasis
from merging.merge import MergeError
from merging.spec import AdapterLeaf, MixNode, leaves
from merging.steps import DECISION_DTYPE

# Singular values of a member stack's coordinates under this fraction of the largest are not inverted:
# float32 serving keeps ~1e-7 of each product, so an amplification past 1e4 would cost ~1e-3 of the delta.
MAP_RTOL = 1e-4


@dataclass
class MemberMix:
    """A merged mix as cores over its members' own factors: ``dW = B_cat C A_cat`` per module.

    ``members``: adapter names in coordinate order; ``fingerprints``: their contents (a cached mix is
    only valid over those very adapters); ``member_ranks[module]``: each member's rank in that module
    (0 where it leaves the module alone), i.e. the row and column blocks of ``cores[module]``.
    """

    members: tuple[str, ...]
    fingerprints: tuple[str, ...]
    cores: dict[str, torch.Tensor]  # module -> C [sum r, sum r] over the members' (scaled) factors
    member_ranks: dict[str, tuple[int, ...]]
    spec_hash: str
    method: str
    space: str
    seconds: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)  # the merged delta's rank per module
    energy_kept: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.cores.values())

    def to_merged(self, adapters: Mapping[str, LoraAdapter]) -> MergedDelta:
        """The same deltas as factors ``B = B_cat``, ``A = C A_cat`` (export, evaluation, tests);
        ``adapters`` must hold the members (checked by fingerprint)."""
        own = _members(self.members, adapters)
        if tuple(a.fingerprint for a in own) != self.fingerprints:
            raise MergeError("the mix's adapters changed since it was merged")
        modules: dict[str, ModuleDelta] = {}
        for m, C in self.cores.items():
            B_cat, A_cat = stacked_factors(own, m, C.dtype)
            modules[m] = LowRankDelta(A=C @ A_cat, B=B_cat)
        return MergedDelta(modules, self.spec_hash, self.method, self.space, self.seconds, dict(self.energy_kept))


def stacked_factors(members: list[LoraAdapter], module: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_cat, A_cat)`` of ``module``: the members' factors side by side, each ``B`` times its adapter's
    scale (what ``merge_mix``'s lowrank space stacks), rank 0 where a member leaves the module alone."""
    fs = [a.modules.get(module) for a in members]
    present = next(f for f in fs if f is not None)
    out, n_in = present.B.shape[0], present.A.shape[1]
    Bs = [f.B.to(dtype) * f.scale if f is not None else present.B.new_zeros((out, 0), dtype=dtype) for f in fs]
    As = [f.A.to(dtype) if f is not None else present.A.new_zeros((0, n_in), dtype=dtype) for f in fs]
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


class SetFamilies:
    """The :class:`AdapterFamily` of each adapter set merges have asked for, least recently used dropped
    past ``max_bytes``; each gets a version no other set has, so :class:`BasisCache` keys stay distinct.

    Only the members' coordinates are kept: a merge on coordinates needs the bases' shapes, never their
    entries (``U``, ``V`` become zero-stride views), so a set costs ``(sum r)^2``-sized numbers per module,
    not the bases' ``(out + in) x sum r`` (1 GB in float64 for three rank-16 adapters of a 7B)."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes, self.nbytes = max_bytes, 0
        self._sets: OrderedDict[tuple, tuple[AdapterFamily, dict]] = OrderedDict()
        self.own_grams = OwnGrams()
        self._bytes: dict[tuple, int] = {}
        self._versions = count(1)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._sets)

    def get(self, members: list[LoraAdapter]) -> tuple[AdapterFamily, dict[str, tuple[torch.Tensor, ...]]]:
        """The set's family and, per module, ``(R_B, R_A, R_B^+, R_A^+)`` (:func:`set_family`)."""
        key = tuple((a.name, a.fingerprint) for a in members)
        with self._lock:
            found = self._sets.get(key)
            if found is not None:
                self.hits += 1
                self._sets.move_to_end(key)
                return found
            self.misses += 1
            version = next(self._versions)
        found = set_family(members, version, self.own_grams)
        size = coordinate_bytes(found[0]) + sum(t.numel() * t.element_size() for ts in found[1].values() for t in ts)
        with self._lock:
            if key not in self._sets and size <= self.max_bytes:
                self._sets[key] = found
                self._bytes[key] = size
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    old, _ = self._sets.popitem(last=False)
                    self.nbytes -= self._bytes.pop(old)
        return found


def set_family(
    members: list[LoraAdapter], version: int = 0, own_grams: OwnGrams | None = None
) -> tuple[AdapterFamily, dict[str, tuple[torch.Tensor, ...]]]:
    """The :class:`AdapterFamily` of ``members`` as coordinates only, from Gram matrices.

    Per module, with ``B_cat = [B_1 .. B_K]`` (float64) and ``G = B_cat^T B_cat = Q diag(s^2) Q^T``, the
    coordinates ``R_B = diag(s) Q^T`` are ``B_cat``'s in the orthonormal basis ``U = B_cat Q diag(1/s)``
    (``R_B^T R_B = G``); likewise ``A_cat V = Q_A diag(s_A)`` from ``A_cat A_cat^T``. Every step of a
    merge on coordinates is indifferent to which orthonormal basis embeds them (``family.py``), so this
    is :meth:`AdapterFamily.extend`'s family up to rounding, at the cost of ``out x (sum r)^2`` products
    instead of SVDs of ``out x sum r`` stacks. Directions with ``s`` under ``GRAM_RTOL`` of the largest
    are null (a Gram matrix in float64 resolves singular values down to ~1e-8 of the largest).

    Also returns, per module, the maps from the family's coordinates to the members' own:
    ``(R_B, R_A, R_B^+, R_A^+)`` with ``R_B^+ = Q diag(1/s)``, singular values under ``MAP_RTOL`` of the
    largest not inverted.
    """
    bases, coords, maps = {}, {a.name: {} for a in members}, {}
    modules = sorted({m for a in members for m in a.modules})
    by_shape: dict[tuple, list[str]] = {}
    for m in modules:
        present = next(a.modules[m] for a in members if m in a.modules)
        ranks = tuple(a.modules[m].rank if m in a.modules else 0 for a in members)
        by_shape.setdefault((present.B.shape[0], present.A.shape[1], ranks), []).append(m)
    for (out, n_in, ranks), group in by_shape.items():
        grams = [_grams(members, m, own_grams) for m in group]  # only the small Gram matrices are stacked
        R_B, B_inv = _gram_coordinates(torch.stack([g for g, _ in grams]))  # [M, R, rb]: R_B^T, and R_B^+
        A_coords, A_inv = _gram_coordinates(torch.stack([g for _, g in grams]))  # [M, R, ra]: R_A, (R_A^+)^T
        for i, m in enumerate(group):
            rb, ra = _rank(R_B[i]), _rank(A_coords[i])
            maps[m] = (R_B[i, :, :rb].mT, A_coords[i, :, :ra], B_inv[i, :, :rb], A_inv[i, :, :ra].mT)
            bases[m] = ModuleBasis(_shape_only(torch.empty((), dtype=DECISION_DTYPE)).expand(out, rb),
                                   _shape_only(torch.empty((), dtype=DECISION_DTYPE)).expand(n_in, ra))  # fmt: skip
            start = 0
            for a, r in zip(members, ranks, strict=True):
                if r:  # the scale is in the coordinates (the Gram matrix is of the scaled B's)
                    coords[a.name][m] = LoraFactors(A=A_coords[i, start : start + r, :ra].contiguous(),
                                                    B=R_B[i, start : start + r, :rb].mT.contiguous(), scale=1.0)  # fmt: skip
                start += r
    family = AdapterFamily(max_rank=max((max(b.dims) for b in bases.values()), default=0), version=version, bases=bases,
                           svd_coordinates=True)  # fmt: skip
    return replace(family, members={a.name: replace(a, modules=coords[a.name], path=None) for a in members}), maps


class OwnGrams:
    """Each adapter's own Gram blocks per module, ``(s^2 B^T B, A A^T)`` in float64 (``r x r``), by name and
    fingerprint: the diagonal blocks of every set it joins, so a new set computes only its cross blocks.
    Least recently used adapters are dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes, self.nbytes = max_bytes, 0
        self._blocks: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, compute) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            found = self._blocks.get(key)
            if found is not None:
                self._blocks.move_to_end(key)
                return found
        found = compute()
        size = sum(t.numel() * t.element_size() for t in found)
        with self._lock:
            if key not in self._blocks and size <= self.max_bytes:
                self._blocks[key] = found
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    _, old = self._blocks.popitem(last=False)
                    self.nbytes -= sum(t.numel() * t.element_size() for t in old)
        return found


def _grams(members: list[LoraAdapter], module: str, own: OwnGrams | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_cat^T B_cat, A_cat A_cat^T)`` of ``module`` (float64, scaled ``B``), block by block: each member's
    own blocks from ``own`` when known, the cross blocks computed. Every block is the same product whether
    cached or not, so a set's coordinates do not depend on what was merged before."""
    fs = [(a, a.modules[module]) for a in members if module in a.modules]
    Bs = [f.B.to(DECISION_DTYPE) * f.scale for _, f in fs]
    As = [f.A.to(DECISION_DTYPE) for _, f in fs]
    ranks = [f.rank for _, f in fs]
    starts = [sum(ranks[:k]) for k in range(len(ranks))]
    R = sum(ranks)
    G_B, G_A = Bs[0].new_zeros(R, R), As[0].new_zeros(R, R)
    for k, (a, _) in enumerate(fs):

        def diagonal(k=k):
            return Bs[k].mT @ Bs[k], As[k] @ As[k].mT

        gb, ga = own.get((a.name, a.fingerprint, module), diagonal) if own is not None else diagonal()
        sk = slice(starts[k], starts[k] + ranks[k])
        G_B[sk, sk], G_A[sk, sk] = gb, ga
        for j in range(k):
            sj = slice(starts[j], starts[j] + ranks[j])
            G_B[sj, sk] = Bs[j].mT @ Bs[k]
            G_B[sk, sj] = G_B[sj, sk].mT
            G_A[sj, sk] = As[j] @ As[k].mT
            G_A[sk, sj] = G_A[sj, sk].mT
    return G_B, G_A


# Singular values of a member stack under this fraction of its largest are null directions of the set.
GRAM_RTOL = 1e-7


def _gram_coordinates(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q diag(s), Q diag(1/s))`` for ``G = Q diag(s^2) Q^T`` (batched), columns by decreasing ``s``, with
    canonical signs (the largest entry of each column positive); null directions (``GRAM_RTOL``) zeroed in
    both, directions under ``MAP_RTOL`` not inverted."""
    lam, Q = torch.linalg.eigh(G)
    lam, Q = lam.flip(-1), Q.flip(-1)
    s = lam.clamp(min=0).sqrt()
    top = s[..., :1]
    s = torch.where(s > GRAM_RTOL * top, s, torch.zeros_like(s))
    inv = torch.where(s > MAP_RTOL * top, 1 / s.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    pivot = Q.abs().argmax(dim=-2, keepdim=True)
    Q = Q * torch.gather(Q, -2, pivot).sign()
    return Q * s.unsqueeze(-2), Q * inv.unsqueeze(-2)


def _rank(coords: torch.Tensor) -> int:
    """Nonzero columns of ``Q diag(s)`` (they come first)."""
    return int((coords.abs().sum(0) > 0).sum())


def _shape_only(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``t``'s shape, dtype and device holding one number (what a merge on coordinates reads)."""
    return t.new_zeros(()).expand(t.shape)


def coordinate_bytes(family: AdapterFamily) -> int:
    """Bytes of a family's members' coordinates."""
    return sum(t.numel() * t.element_size() for a in family.members.values() for f in a.modules.values()
               for t in (f.A, f.B))  # fmt: skip


def mix_members(mix: AdapterLeaf | MixNode) -> tuple[str, ...]:
    """The adapters a mix reads, sorted: its members' coordinate order."""
    return tuple(sorted({leaf.adapter for leaf in leaves(mix)}))


def merge_members(
    mix: AdapterLeaf | MixNode,
    adapters: Mapping[str, LoraAdapter],
    *,
    max_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    families: SetFamilies | None = None,
    bases: BasisCache | None = None,
) -> MemberMix:
    """Merge ``mix`` (no ``dense``-space node) into cores over its members' own factors.

    The merge is :func:`merge_core`'s on the members' set family (same decisions, float64); ``families``
    and ``bases`` cache that family and the bases of its sub-sets (the result is the same without).
    """
    t0 = time.perf_counter()
    names = mix_members(mix)
    own = _members(names, adapters)
    family, maps = (families if families is not None else SetFamilies()).get(own)
    core = merge_core(mix, family, max_rank=max_rank, dtype=DECISION_DTYPE, bases=bases)
    cores: dict[str, torch.Tensor] = {}
    member_ranks: dict[str, tuple[int, ...]] = {}
    energy = dict(core.energy_kept)
    by_shape: dict[tuple, list[str]] = {}
    for m, C_U in core.cores.items():
        by_shape.setdefault((tuple(C_U.shape), maps[m][0].shape, maps[m][1].shape), []).append(m)
    for group in by_shape.values():  # same-shaped modules mapped in one batched product
        R_B = torch.stack([maps[m][0] for m in group])
        R_A = torch.stack([maps[m][1] for m in group])
        C_U = torch.stack([core.cores[m] for m in group])
        B_pinv, A_pinv = torch.stack([maps[m][2] for m in group]), torch.stack([maps[m][3] for m in group])
        C = B_pinv @ C_U @ A_pinv
        lost = torch.linalg.matrix_norm(R_B @ C @ R_A - C_U) ** 2
        total = torch.linalg.matrix_norm(C_U) ** 2
        for m, c, lo, to in zip(group, C.to(dtype), lost.tolist(), total.tolist(), strict=True):
            if to > 0 and lo > 1e-12 * to:
                energy[m] = energy.get(m, 1.0) * max(0.0, 1.0 - lo / to)
            cores[m] = c
            member_ranks[m] = tuple(a.modules[m].rank if m in a.modules else 0 for a in own)
    return MemberMix(names, tuple(a.fingerprint for a in own), cores, member_ranks, core.spec_hash, core.method,
                     core.space, time.perf_counter() - t0, dict(core.ranks), energy)  # fmt: skip


def _members(names: tuple[str, ...], adapters: Mapping[str, LoraAdapter]) -> list[LoraAdapter]:
    missing = [n for n in names if n not in adapters]
    if missing:
        raise MergeError(f"unknown adapter(s) {', '.join(map(repr, missing))}")
    return [adapters[n] for n in names]
