"""A lowrank mix as a core in its own members' factor coordinates: what it costs is what its adapters cost.

A mix over members ``k = 1..K`` (its adapters, sorted by name) is, per module,

    dW = B_cat C A_cat,    B_cat = [B_1 .. B_K] (out x sum r),    A_cat = [A_1; ..; A_K] (sum r x in),

with the members' own raw factors (their scales folded into ``C``) and a small core ``C`` of
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

from merging.adapters import LoraAdapter
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
    cores: dict[str, torch.Tensor]  # module -> C [sum r, sum r] over the members' raw factors
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
    """``(B_cat, A_cat)`` of ``module``: the members' raw factors side by side (rank 0 where absent)."""
    fs = [a.modules.get(module) for a in members]
    present = next(f for f in fs if f is not None)
    out, n_in = present.B.shape[0], present.A.shape[1]
    Bs = [f.B.to(dtype) if f is not None else present.B.new_zeros((out, 0), dtype=dtype) for f in fs]
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
        self._sets: OrderedDict[tuple, AdapterFamily] = OrderedDict()
        self._bytes: dict[tuple, int] = {}
        self._maps: dict[int, dict[str, tuple[torch.Tensor, ...]]] = {}  # family version -> per-module maps
        self._versions = count(1)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._sets)

    def get(self, members: list[LoraAdapter]) -> AdapterFamily:
        key = tuple((a.name, a.fingerprint) for a in members)
        with self._lock:
            family = self._sets.get(key)
            if family is not None:
                self.hits += 1
                self._sets.move_to_end(key)
                return family
            self.misses += 1
            version = next(self._versions)
        family = AdapterFamily(max_rank=sum(max(a.ranks.values(), default=0) for a in members))
        for adapter in members:
            family = family.extend(adapter)
        bases = {m: ModuleBasis(_shape_only(b.U), _shape_only(b.V)) for m, b in family.bases.items()}
        family = replace(family, version=version, bases=bases)
        size = coordinate_bytes(family)
        with self._lock:
            if key not in self._sets and size <= self.max_bytes:
                self._sets[key] = family
                self._bytes[key] = size
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    old, _ = self._sets.popitem(last=False)
                    self.nbytes -= self._bytes.pop(old)
        return family

    def maps(self, family: AdapterFamily, names: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per module ``(R_B, R_A, R_B^+, R_A^+)``: the members' stacked coordinates and their truncated
        pseudo-inverses (``MAP_RTOL``), computed once per family (they depend on the set only)."""
        with self._lock:
            cached = self._maps.get(family.version)
        if cached is not None:
            return cached
        coordinates = [family.members[n] for n in names]
        by_shape: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for m in family.bases:
            R_B, R_A = stacked_factors(coordinates, m, DECISION_DTYPE)  # U^T B_cat [rb, sum r], A_cat V [sum r, ra]
            by_shape.setdefault((R_B.shape, R_A.shape), []).append((m, R_B, R_A))
        out = {}
        for group in by_shape.values():
            B_pinv = torch.linalg.pinv(torch.stack([g[1] for g in group]), rtol=MAP_RTOL)
            A_pinv = torch.linalg.pinv(torch.stack([g[2] for g in group]), rtol=MAP_RTOL)
            for (m, R_B, R_A), bp, ap in zip(group, B_pinv, A_pinv, strict=True):
                out[m] = (R_B, R_A, bp, ap)
        with self._lock:
            if family.version in {f.version for f in self._sets.values()}:
                self._maps[family.version] = out
                for stale in set(self._maps) - {f.version for f in self._sets.values()}:
                    del self._maps[stale]
        return out


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
    family = (families if families is not None else SetFamilies()).get(own)
    core = merge_core(mix, family, max_rank=max_rank, dtype=DECISION_DTYPE, bases=bases)
    cores: dict[str, torch.Tensor] = {}
    member_ranks: dict[str, tuple[int, ...]] = {}
    energy = dict(core.energy_kept)
    maps = (families if families is not None else SetFamilies()).maps(family, names)
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
