"""Lowrank mixes of family members merged on their coordinates: a whole model in a few batched calls.

``merge_mix`` in the ``lowrank`` space stacks the children's factors per module, takes orthonormal
bases of the stacks and merges the small cores (``merge.py``, ``lowrank.py``). On the family's
coordinates (``family.py``) the same steps run on matrices of ``rb`` rows instead of ``out``: a
Mistral-7B ``gate_proj`` stack is 64 x 48 instead of 14336 x 48. And since every module of one
shape has the same coordinate dimensions, all of them go through each step together: one batched
SVD for the 64 ``q_proj`` / ``o_proj`` stacks of a 32-layer model, one batched trim, and so on
(``merge_tensors(batched=True)``), instead of a Python loop over 224 modules.

The result per module is ``dW = U C V^T`` with the core ``C = B' A'`` (rb x ra) of the merged
coordinates. Semantics are ``merge_mix``'s in the lowrank space, to rounding: the bases agree up to
the signs of their vectors (every method here is indifferent to those), the cores up to rounding; so
linear methods and the spectral ones match it to rounding, and trimming / dropping methods may
move an entry that sits on the threshold. Masks are drawn from the same per-(seed, node, module)
generators. Methods whose per-tensor step is not a plain trim or drop (DELLA, Breadcrumbs, the
spectral ones) run their merge module by module on the batched cores.

``dense``-space nodes cannot run on coordinates (trimming a 14336 x 4096 matrix is not trimming its
core), nor can adapters outside the family: :func:`core_space_reason` says why, and such mixes take
``merge_mix`` and full factors.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from merging.adapters import LoraAdapter
from merging.delta import LowRankDelta, MergedDelta, ModuleDelta
from merging.family import AdapterFamily
from merging.lowrank import SharedBasis, concat_weighted, from_core, shared_basis
from merging.merge import MergeError, mask_generator
from merging.methods import get_method, linear_weights, merge_tensors, merges_batched
from merging.spec import AdapterLeaf, MixNode, leaves, mix_hash
from merging.steps import DECISION_DTYPE, draw_keep_masks


@dataclass
class CoreMix:
    """A merged mix as cores in the family's coordinates: ``dW = U C V^T`` per module.

    ``version`` is the family version the cores were merged at; a later version's bases start with
    the same columns, so a core stays valid, padded with zeros, for every later version.
    """

    cores: dict[str, torch.Tensor]  # module -> C [rb, ra]
    version: int
    spec_hash: str
    method: str
    space: str
    seconds: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)  # the merged delta's rank per module
    energy_kept: dict[str, float] = field(default_factory=dict)  # modules truncated by a node's rank

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.cores.values())

    def to_merged(self, family: AdapterFamily) -> MergedDelta:
        """The same deltas as a :class:`MergedDelta` of factors ``B = U``, ``A = C V^T`` (for export and
        evaluation; ``family`` must be the version the cores were merged at, or a later one)."""
        modules: dict[str, ModuleDelta] = {}
        for m, C in self.cores.items():
            basis = family.bases[m]
            rb, ra = C.shape
            modules[m] = LowRankDelta(A=C @ basis.V[:, :ra].mT.to(C.dtype), B=basis.U[:, :rb].to(C.dtype).contiguous())
        return MergedDelta(modules, self.spec_hash, self.method, self.space, self.seconds, dict(self.energy_kept))


def core_space_reason(
    mix: AdapterLeaf | MixNode, family: AdapterFamily, adapters: Mapping[str, LoraAdapter]
) -> str | None:
    """Why ``mix`` cannot be merged on the family's coordinates; ``None`` when it can."""
    if dense_node(mix):
        return "a dense-space node"
    for leaf in leaves(mix):
        adapter = adapters.get(leaf.adapter)
        if adapter is None or adapter not in family:
            return f"adapter {leaf.adapter!r} is not in the adapter family"
    return None


def dense_node(mix: AdapterLeaf | MixNode) -> bool:
    """Whether some node of ``mix`` merges in the dense space (its trimming acts on full matrices)."""
    return isinstance(mix, MixNode) and (mix.space == "dense" or any(dense_node(c) for c in mix.children))


class BasisCache:
    """The bases of adapter stacks, by adapter set: what a mix over a known set does not compute again.

    A node whose children are all adapters stacks the same factors whatever its weights, method or
    knobs (weights enter the merge of the cores, not the stack), so its :class:`SharedBasis` per group
    of same-shaped modules (bases and the children's cores) depends only on the family version, the
    adapters in order and the kind of basis. The SVDs of those stacks are most of a cold merge's time;
    with them cached a new mix over a known set merges on its cores alone. Least recently used sets
    are dropped past ``max_bytes``. One merge at a time may use it (a lock guards the bookkeeping).
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._sets: OrderedDict[tuple, dict[tuple[str, ...], SharedBasis]] = OrderedDict()
        self._set_bytes: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        """Adapter sets held."""
        return len(self._sets)

    def get_or_compute(
        self, adapter_set: tuple, group: tuple[str, ...], compute: Callable[[], SharedBasis]
    ) -> SharedBasis:
        with self._lock:
            basis = self._sets.get(adapter_set, {}).get(group)
            if basis is not None:
                self.hits += 1
                self._sets.move_to_end(adapter_set)
                return basis
            self.misses += 1
        basis = compute()
        size = _basis_bytes(basis)
        with self._lock:
            if self._set_bytes.get(adapter_set, 0) + size <= self.max_bytes:
                self._sets.setdefault(adapter_set, {})[group] = basis
                self._sets.move_to_end(adapter_set)
                self._set_bytes[adapter_set] = self._set_bytes.get(adapter_set, 0) + size
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    old, _ = self._sets.popitem(last=False)
                    self.nbytes -= self._set_bytes.pop(old)
        return basis


def _basis_bytes(basis: SharedBasis) -> int:
    return sum(t.numel() * t.element_size() for t in (basis.Q_B, basis.Q_A, *basis.cores))


def merge_core(
    mix: AdapterLeaf | MixNode,
    family: AdapterFamily,
    *,
    max_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    bases: BasisCache | None = None,
) -> CoreMix:
    """Merge ``mix`` (lowrank space, family members only) into cores ``C`` per module.

    ``max_rank`` truncates each module's merged delta to that rank (an SVD of its small core, as
    ``MergedDelta.to_lowrank``). ``bases``: a cache of adapter stacks' bases shared by merges (the
    result is the same with or without it). Raises :class:`MergeError` for a mix that is not in the
    family's space (:func:`core_space_reason`, checked by name here) and for non-finite results.
    """
    t0 = time.perf_counter()
    names = sorted({leaf.adapter for leaf in leaves(mix)})
    missing = [n for n in names if n not in family.members]
    if missing or dense_node(mix):
        raise MergeError(f"not mergeable on the family's coordinates: {missing or 'a dense-space node'}")
    members = [family.members[n] for n in names]
    modules = sorted({m for member in members for m in member.modules})
    cores: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    energy: dict[str, float] = {}
    for group in _groups(modules, names, family):
        ev = _GroupEvaluator(group, family, DECISION_DTYPE, bases)  # decisions in float64, C rounded below
        delta = ev.eval(mix, "0")
        if delta is None:
            continue
        B = delta.B * (delta.scale * mix.weight)
        if max_rank is not None and delta.rank > max_rank:
            basis = shared_basis([LowRankDelta(A=delta.A, B=B)])
            trimmed, kept = from_core(basis, basis.cores[0], max_rank)
            ev.record_energy(kept)
            delta, B = trimmed, trimmed.B
        C = (B @ delta.A).to(dtype)  # [M, rb, ra]
        finite = torch.isfinite(C).flatten(1).all(1)
        if not bool(finite.all()):
            bad = group[int((~finite).nonzero()[0])]
            raise MergeError(f"module {bad!r}: the merge produced NaN or Inf")
        for i, module in enumerate(group):
            cores[module] = C[i]
            ranks[module] = delta.rank
            if module in ev.energy:
                energy[module] = ev.energy[module]
    method = mix.method if isinstance(mix, MixNode) else "adapter"
    space = mix.space if isinstance(mix, MixNode) else "lowrank"
    return CoreMix(cores, family.version, mix_hash(mix), method, space, time.perf_counter() - t0, ranks, energy)


def _groups(modules: list[str], names: list[str], family: AdapterFamily) -> list[list[str]]:
    """Modules that can go through every step together: the same full and coordinate shapes, and the
    same rank for each adapter (0 where it leaves the module alone)."""
    groups: dict[tuple, list[str]] = {}
    for module in modules:
        basis = family.bases[module]
        ranks = tuple(family.members[n].modules[module].rank if module in family.members[n].modules else 0
                      for n in names)  # fmt: skip
        key = (basis.U.shape[0], basis.V.shape[0], basis.dims, ranks)
        groups.setdefault(key, []).append(module)
    return list(groups.values())


class _GroupEvaluator:
    """Evaluates a mix tree on a stack of same-shaped modules' coordinates (``[M, ...]`` tensors)."""

    def __init__(self, group: list[str], family: AdapterFamily, dtype: torch.dtype, bases: BasisCache | None) -> None:
        self.group, self.family, self.dtype, self.bases = group, family, dtype, bases
        basis = family.bases[group[0]]
        self.full = (basis.U.shape[0], basis.V.shape[0])  # (out, in) of the modules
        self.device = basis.U.device  # masks are drawn here, as merge_mix draws them on the tensors' device
        self.rb, self.ra = basis.dims
        self.energy: dict[str, float] = {}

    def eval(self, node: AdapterLeaf | MixNode, path: str) -> LowRankDelta | None:
        """The node's delta (before its own weight) on the group, ``None`` where it is zero."""
        if isinstance(node, AdapterLeaf):
            member = self.family.members[node.adapter]
            if self.group[0] not in member.modules:
                return None
            fs = [member.modules[m] for m in self.group]
            A = torch.stack([f.A for f in fs]).to(self.dtype)
            B = torch.stack([f.B * f.scale for f in fs]).to(self.dtype)  # a module's scale may differ
            return LowRankDelta(A=A, B=B)
        weights = [c.weight for c in node.children]
        method, params = get_method(node.method), node.params()
        kind = "qr" if method.family == "spectral" else "svd"
        if method.linear and node.rank is None:
            factors = self._children(node, path)
            if factors is None:
                return None
            return concat_weighted(factors, *linear_weights(weights, params))
        leaves_only = all(isinstance(c, AdapterLeaf) for c in node.children)
        if (
            leaves_only
            and self.family.svd_coordinates
            and sorted(c.adapter for c in node.children) == sorted(self.family.members)
        ):
            basis = self._coordinate_basis(node, path)  # the stack of exactly the members: nothing to compute
            if basis is None:
                return None
        elif self.bases is not None and leaves_only:
            # The set's basis may be cached: the children's factors are only needed to compute it.
            if all(self.group[0] not in self.family.members[c.adapter].modules for c in node.children):
                return None
            adapter_set = (self.family.version, kind, str(self.dtype), tuple(c.adapter for c in node.children))
            basis = self.bases.get_or_compute(adapter_set, tuple(self.group),
                                              lambda: self._basis(self._children(node, path), kind))  # fmt: skip
        else:
            factors = self._children(node, path)
            if factors is None:
                return None
            basis = self._basis(factors, kind)
        if merges_batched(method, params):
            masks = self._masks(node, path, basis.cores, params.drop_rate) if method.sparsify == "random" else None
            core = merge_tensors(method, basis.cores, weights, params, keep_masks=masks, batched=True)
        else:
            random = method.sparsify in ("random", "magnitude_sampling")
            core = torch.stack([
                merge_tensors(method, [c[i] for c in basis.cores], weights, params,
                              generator=self._generator(node, path, module) if random else None)
                for i, module in enumerate(self.group)
            ])  # fmt: skip
        delta, kept = from_core(basis, core, node.rank, balanced=path != "0")
        if node.rank is not None:
            self.record_energy(kept)
        return delta

    def _children(self, node: MixNode, path: str) -> list[LowRankDelta] | None:
        """The children's deltas, a rank-0 block for a child that leaves the group alone; None if all do."""
        children = [self.eval(c, f"{path}.{i}") for i, c in enumerate(node.children)]
        if all(c is None for c in children):
            return None
        return [c if c is not None else self._empty() for c in children]

    def _coordinate_basis(self, node: MixNode, path: str) -> SharedBasis | None:
        """The shared basis of a node whose children are exactly the family's members, when the family's
        coordinates are already in the SVD bases of their scaled stacks (``family.svd_coordinates``): the
        bases are identities and each child's core is its coordinates' product, which is what
        :func:`shared_basis` gives on those coordinates (canonical signs alike) without its SVDs. (A QR
        basis, for the spectral methods, may be any orthonormal one: the identity is.)"""
        factors = self._children(node, path)
        if factors is None:
            return None
        eye = functools.partial(torch.eye, dtype=self.dtype, device=self.device)
        M = len(self.group)
        basis = SharedBasis(Q_B=eye(self.rb).expand(M, -1, -1), Q_A=eye(self.ra).expand(M, -1, -1),
                            cores=[f.B @ f.A for f in factors])  # fmt: skip
        return self._padded(basis, sum(f.rank for f in factors))

    def _basis(self, factors: list[LowRankDelta], kind: str) -> SharedBasis:
        return self._padded(shared_basis(factors, orthogonalize=kind), sum(f.rank for f in factors))

    def record_energy(self, kept: float | torch.Tensor) -> None:
        values = kept.tolist() if isinstance(kept, torch.Tensor) else [kept] * len(self.group)
        for module, k in zip(self.group, values, strict=True):
            if k < 1.0:
                self.energy[module] = self.energy.get(module, 1.0) * k

    def _empty(self) -> LowRankDelta:
        """A module the child leaves alone contributes a rank-0 block, as in ``merge_mix``."""
        zeros = functools.partial(torch.zeros, dtype=self.dtype, device=self.device)
        return LowRankDelta(A=zeros(len(self.group), 0, self.ra), B=zeros(len(self.group), self.rb, 0))

    def _padded(self, basis: SharedBasis, R: int) -> SharedBasis:
        """Bases and cores with the shapes ``merge_mix`` gives them, ``min(out, R)`` x ``min(in, R)``.

        On coordinates the stack has ``rb`` rows, which is less than that only when the family's
        basis is smaller than the children's stacked rank (an adapter mixed with a copy of itself):
        the missing directions are null directions of the stack, zero in every core; padding keeps
        the core's size, hence TIES' ``k = density x size`` and the DARE masks, as ``merge_mix``'s.
        """
        kb, ka = min(self.full[0], R), min(self.full[1], R)
        pb, pa = kb - basis.Q_B.shape[-1], ka - basis.Q_A.shape[-1]
        if pb <= 0 and pa <= 0:
            return basis
        pad = torch.nn.functional.pad
        pb, pa = max(pb, 0), max(pa, 0)
        return SharedBasis(Q_B=pad(basis.Q_B, (0, pb)), Q_A=pad(basis.Q_A, (0, pa)),
                           cores=[pad(c, (0, pa, 0, pb)) for c in basis.cores])  # fmt: skip

    def _generator(self, node: MixNode, path: str, module: str) -> torch.Generator:
        return mask_generator(node.seed or 0, path, module)

    def _masks(self, node: MixNode, path: str, cores: list[torch.Tensor], drop_rate: float) -> list[torch.Tensor]:
        """Each module's DARE masks from its own generator (``merge_mix``'s draws), stacked per child."""
        per_module = [draw_keep_masks(cores[0].shape[1:], len(cores), drop_rate, self._generator(node, path, m))
                      for m in self.group]  # fmt: skip
        return [torch.stack([masks[i] for masks in per_module]) for i in range(len(cores))]
