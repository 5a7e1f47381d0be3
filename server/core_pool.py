"""The core pool: mixes over the adapter family, served from its shared bases, one slot of cores each.

A lowrank mix of family members is ``dW = U C V^T`` per module, with the family's bases ``U``, ``V``
and a small core ``C`` (``merging/family.py``, ``merging/core_merge.py``). Per layer and input group
(``[q|k|v]``, ``o``, ``[gate|up]``, ``down``, members ``j``) the pool holds on the serving device:

- ``V``: ``[in, n x R]``, the members' row bases side by side (shared by every mix);
- ``U``: ``[n x R, sum of outs]``, their column bases, transposed, block-diagonally (shared);
- the slots' cores: ``[slots x n x R, R]``, member ``j`` of slot ``s`` in rows ``(s n + j) R ...``, as
  ``C_j^T`` zero-padded to the pool's rank ``R``. Slot 0 stays zero: rows on the base model or on the
  factor pool get nothing from here.

A step's side path is then, per input group and whatever the number of distinct mixes in it:

    z  = x V                   one GEMM over every row (shared bases)
    z' = z C_slot(row)^T       one embedding_bag: each row's own slot's cores, weighted by its z
    y += z' U^T                one GEMM over every row (shared bases)

``embedding_bag`` with per-sample weights is a gathered batched product in one op: bag ``(row, j)``
sums rows ``(slot(row) n + j) R + k`` of the cores, weighted by ``z[row, j R + k]``. A step reads each
distinct mix's cores once (a 4 x rank-16 family on a Mistral-7B: 64 x 64 per module, ~1.8 MB a mix in
bf16), so neither its op count nor the shared bases' bytes grow with the number of mixes.

The family only grows by appending directions (``family.py``): a newer version's bases start with an
older one's, so the pool installs the newest version it is given and keeps serving cores merged at
older ones, zero-padded. Past the pool's padded rank the buffers are reallocated (``version`` bumps:
captured graphs hold their addresses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from merging.core_merge import CoreMix
from merging.family import AdapterFamily
from server.lora_pool import RANK_ALIGN
from server.slots import SlotTable


class PreparedCores:
    """A core-space mix laid out by layer and input group on the serving device: what the mix cache
    holds and the pool copies from. ``groups``: key -> ``[n, ra, rb]``, member ``j``'s ``C_j^T``
    (zero-padded to the group's largest member); ``version``: the family version its cores are in (only
    a version number: a cached mix does not keep its family's bases alive)."""

    def __init__(self, groups: dict[str, torch.Tensor], version: int) -> None:
        self.groups, self.version = groups, version

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.groups.values())


def prepare_cores(core_mix: CoreMix, layout: Mapping[str, Sequence[str]], device: torch.device,
                  dtype: torch.dtype) -> PreparedCores:  # fmt: skip
    """``CoreMix`` cores grouped by shared input, transposed, on the serving device; ``layout``:
    ``"<layer>.<group>" -> [module names]`` (the runtime's)."""
    groups = {}
    for key, modules in layout.items():
        cores = [core_mix.cores.get(m) for m in modules]
        present = [C for C in cores if C is not None]
        if not present:
            continue
        t = torch.zeros(len(cores), max(C.shape[1] for C in present), max(C.shape[0] for C in present), dtype=dtype)
        for j, C in enumerate(cores):
            if C is not None:
                t[j, : C.shape[1], : C.shape[0]] = C.T
        groups[key] = t.to(device)
    return PreparedCores(groups, core_mix.version)


@dataclass
class CorePlan:
    """Each row's core slot for one step (built once per step, shared by every layer); the gather indices
    per group width are built on first use (inside a captured graph when the step is one)."""

    slots: torch.Tensor  # [rows] long, 0 = no core-space mix
    rank: int
    aranges: Mapping[int, torch.Tensor]  # width -> arange(width), made once by the pool
    _index: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def index(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a group ``width = n x R`` wide: the cores' rows to gather (``slot x width + 0..width``, per
        row) and where each bag of ``R`` starts."""
        if width not in self._index:
            rows = ((self.slots * width).unsqueeze(1) + self.aranges[width]).view(-1)
            starts = torch.arange(0, rows.numel(), self.rank, device=self.slots.device)
            self._index[width] = (rows, starts)
        return self._index[width]


class CorePool:
    """``slots`` slots of cores and the installed family's bases for every layer's input groups."""

    def __init__(self, groups: Mapping[str, tuple[int, Sequence[str], Sequence[int]]], slots: int,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        """``groups``: ``"<layer>.<group>" -> (in features, member modules, member out features)``."""
        self.groups = {k: (n_in, tuple(names), tuple(outs)) for k, (n_in, names, outs) in groups.items()}
        self.dtype, self.device = dtype, device
        self.table = SlotTable(slots, "core-space mix")
        self.rank = 0  # R: every core and basis padded to it
        self.version = 0  # bumped when the buffers are reallocated (captured graphs hold their addresses)
        self.installed = -1  # the family version whose bases the buffers hold
        self.latest: AdapterFamily | None = None  # the newest version offered: installed when a mix needs it
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # key -> (V, U, cores)
        self.aranges: dict[int, torch.Tensor] = {}  # group width -> arange(width): the gathers' offsets in a slot

    @property
    def slots(self) -> int:
        """Slots including slot 0 (no core-space mix)."""
        return self.table.count + 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bufs in self.buffers.values() for t in bufs)

    # ---------------------------------------------------------------------------------------- family
    def offer(self, family: AdapterFamily) -> None:
        """Make ``family`` the version to install when a mix merged at it (or at an older one the pool has
        not installed) is first loaded; the bases are copied then, on the engine's thread. Offer a version
        before any mix merged at it is admitted."""
        if self.latest is None or family.version > self.latest.version:
            self.latest = family

    def install(self, family: AdapterFamily) -> None:
        """Serve ``family``'s bases now (a no-op for a version already installed or older): the buffers
        regrow when its rank passes the pool's, loaded slots keep their cores."""
        self.offer(family)
        if family.version <= self.installed:
            return
        if family.rank == 0:  # no adapter in the family yet: nothing to allocate
            self.installed = family.version
            return
        rank = -(-family.rank // RANK_ALIGN) * RANK_ALIGN
        if rank > self.rank:
            self._grow(rank)
        R = self.rank
        for key, (V, U, _) in self.buffers.items():
            _, names, outs = self.groups[key]
            V.zero_()
            U.zero_()
            col = 0
            for j, (module, out) in enumerate(zip(names, outs, strict=True)):
                basis = family.bases.get(module)
                if basis is not None:
                    V[:, j * R : j * R + basis.V.shape[1]] = basis.V
                    U[j * R : j * R + basis.U.shape[1], col : col + out] = basis.U.mT
                col += out
        self.installed = family.version

    def _grow(self, rank: int) -> None:
        """Reallocate at a larger padded rank, loaded cores copied over (built before anything changes)."""
        new = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
        buffers = {key: (new(n_in, len(names) * rank), new(len(names) * rank, sum(outs)),
                         new(self.slots * len(names) * rank, rank))
                   for key, (n_in, names, outs) in self.groups.items()}  # fmt: skip
        old = self.rank
        for key, (_, _, C) in buffers.items():
            if old and key in self.buffers:
                n = len(self.groups[key][1])
                C.view(self.slots, n, rank, rank)[:, :, :old, :old] = self.buffers[key][2].view(self.slots, n, old, old)
        self.buffers, self.rank = buffers, rank
        self.aranges = {w: torch.arange(w, device=self.device) for w in {V.shape[1] for V, _, _ in buffers.values()}}
        self.version += 1

    # ----------------------------------------------------------------------------------------- slots
    def can_acquire(self, cores: PreparedCores) -> bool:
        return self.table.can_acquire(cores)

    def acquire(self, cores: PreparedCores) -> int:
        """The slot holding ``cores`` (installing its family and copying it in if needed)."""
        return self.table.acquire(cores, self._load)

    def release(self, slot: int) -> None:
        self.table.release(slot)

    def _load(self, slot: int, cores: PreparedCores) -> None:
        if cores.version > self.installed:
            if self.latest is None or self.latest.version < cores.version:
                raise ValueError(f"cores of family version {cores.version}, which the pool was never offered")
            self.install(self.latest)
        R = self.rank
        for key, (_, _, C) in self.buffers.items():
            block = C.view(self.slots, -1, R, R)[slot]  # [n, R, R]
            block.zero_()
            t = cores.groups.get(key)
            if t is not None:
                block[:, : t.shape[1], : t.shape[2]] = t

    # ------------------------------------------------------------------------------------- side path
    def plan(self, row_slots: Sequence[int], to_device: Callable[..., torch.Tensor]) -> CorePlan | None:
        """The step's plan; None when no row is on a core-space mix. ``to_device``: host ints -> device
        tensor (the runtime's, so nothing waits on the device)."""
        if not any(row_slots):
            return None
        return CorePlan(to_device(list(row_slots), torch.long), self.rank, self.aranges)

    def add_side(self, key: str, x: torch.Tensor, out: torch.Tensor, plan: CorePlan) -> None:
        """``out += ((x V) C_slot(row)^T) U^T`` for every row (rows on slot 0 add exact zeros); ``out`` is
        the group's fused output (``[q|k|v]``, ``[gate|up]``, ``o``, ``down``)."""
        V, U, C = self.buffers[key]
        z = x @ V
        rows, starts = plan.index(V.shape[1])
        zc = torch.embedding_bag(C, rows, starts, False, 0, False, z.view(-1))[0]  # [rows x members, R]
        out.addmm_(zc if len(zc) == len(x) else zc.view(len(x), -1), U)
