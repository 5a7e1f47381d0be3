"""The mix pool: the factors of the mixes in the running batch, stacked and rank-padded on the device.

S-LoRA's unified pool with Punica's SGMV semantics. Each layer's input group (``[q|k|v]``, ``o``,
``[gate|up]``, ``down``) has one ``A`` buffer ``[in, slots x members x R]`` and one ``B_j`` buffer
per member ``[slots x R, out_j]``, ``R`` the pool's padded rank. Slot 0 is the base model and is never
read. The rows of a step are sorted by slot (base rows first, skipped) and the step's mixes occupy
slots ``lo..hi``, so a whole batch's side path is, per input group, one product for ``A`` and one per
member for ``B`` whatever the number of distinct mixes:

- ``grouped`` (SGMV): ``t = grouped_mm(x, A[lo..hi], offs)``, ``y_j += grouped_mm(t_j, B_j[lo..hi], offs)``,
  ``offs`` where each slot's rows end: CPU steps with several mixes.
- ``masked``: ``t = (x @ A[:, lo..hi]) * own``, ``y_j += t_j @ B_j[lo..hi]``, ``own`` zeroing every
  column block but the row's own slot: dense GEMMs over the step's mixes, for any dtype and device;
  CUDA (measured faster than torch's grouped_mm there) and CPU steps with one mix (plain GEMMs then).

Zero-padded ranks and the masked blocks add exact zeros. Each row reads only its own mix's factors
(grouped), so a step's side-path bytes grow with the number of mixes in it, as they must; its op
count does not.

Slots are handed out as ``slots.py`` says: on a mix's first admission, kept (least recently used
first) after its last sequence finishes, weak references only.

Lowrank mixes take ``member_pool.py``'s path (cores over their members' resident factors) instead; this
pool serves dense-space merges, whose result is not in their members' span, in the same batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from server.adapters.slots import SlotTable

RANK_ALIGN = 16  # padded ranks are multiples of this: aligned strides, and few regrowths
# module name -> (A [r, in], B [out, r] with the LoRA scale folded in)
LoraFactorsByModule = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LoraGroup:
    """One layer's projections that share an input: ``t = x A_cat^T`` once, then ``y_j += t_j B_j^T``."""

    A_T: torch.Tensor  # [in, sum of the members' ranks]
    members: tuple[tuple[str, int, int, torch.Tensor], ...]  # (module, rank start, rank end, B_j^T [r_j, out])


class PreparedLora:
    """A merged mix laid out by layer and input group on the serving device: what the mix cache holds
    and the pool copies from."""

    def __init__(self, groups: dict[str, LoraGroup]) -> None:
        self.groups = groups

    @property
    def nbytes(self) -> int:
        return sum(
            g.A_T.numel() * g.A_T.element_size() + sum(b.numel() * b.element_size() for *_, b in g.members)
            for g in self.groups.values()
        )

    def module_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A, B)}`` back from the grouped layout (for inspection and tests)."""
        return {module: (g.A_T[:, r0:r1].T, B_T.T) for g in self.groups.values() for module, r0, r1, B_T in g.members}


def prepare_lora(by_module: LoraFactorsByModule, layout: Mapping[str, Sequence[str]], device: torch.device,
                 dtype: torch.dtype) -> PreparedLora:  # fmt: skip
    """Checked ``{module: (A, B)}`` grouped by shared input (A's of a group concatenated, B's transposed);
    ``layout``: ``"<layer>.<group>" -> [module names]`` (the runtime's)."""
    groups = {}
    for key, modules in layout.items():
        present = [(m, *by_module[m]) for m in modules if m in by_module]
        if not present:
            continue
        members, r0 = [], 0
        for m, A, B in present:
            members.append((m, r0, r0 + A.shape[0], B.T.to(device, dtype).contiguous()))
            r0 += A.shape[0]
        A_cat = torch.cat([A for _, A, _ in present], dim=0)
        groups[key] = LoraGroup(A_cat.T.to(device, dtype).contiguous(), tuple(members))
    return PreparedLora(groups)


@dataclass
class SidePlan:
    """How one step's rows use the pool (built once per step, shared by every layer)."""

    first: int  # rows before this are on the base model: the side path skips them
    lo: int  # the step's mixes are in slots lo..hi
    hi: int
    grouped: bool
    offs: torch.Tensor | None = None  # grouped: int32 end row (after ``first``) of each slot lo..hi
    own: torch.Tensor | None = None  # masked: each adapted row's slot - lo (long)
    dtype: torch.dtype = torch.float32
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask(self, width: int) -> torch.Tensor:
        """``[rows, (hi - lo + 1) x width]``: ones on each row's own slot's columns (once per step and width;
        built on first use, so inside a captured graph when the step is one)."""
        if width not in self._masks:
            one_hot = F.one_hot(self.own, self.hi - self.lo + 1).to(self.dtype)
            self._masks[width] = one_hot.repeat_interleave(width, dim=1)
        return self._masks[width]


class LoraPool:
    """``max_loras`` slots of rank-padded factors for every layer's input groups (allocated on first use)."""

    def __init__(self, groups: Mapping[str, tuple[int, Sequence[str], Sequence[int]]], max_loras: int,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        """``groups``: ``"<layer>.<group>" -> (in features, member modules, member out features)``."""
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.groups = {k: (n_in, tuple(names), tuple(outs)) for k, (n_in, names, outs) in groups.items()}
        self.max_loras, self.dtype, self.device = max_loras, dtype, device
        self.rank = 0
        self.version = 0  # bumped when the buffers are reallocated (captured graphs hold their addresses)
        self.buffers: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # key -> (A, [B_j])
        self._stacked: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.table = SlotTable(max_loras, "mix")
        itemsize = torch.empty((), dtype=dtype).element_size()
        dims = [d for n_in, _, outs in self.groups.values() for d in (n_in, *outs)]
        # grouped_mm on CPU only: there it is one loop over the step's slots where the masked product is
        # rows x slots. On an H200 (bench/results/gpu-h200.md, 8 slots, Mistral-7B bf16, CUDA graphs)
        # torch's grouped_mm kernels made the side path slower than the masked GEMMs: one mix at bs1
        # 12.0 vs 8.2 ms a step, 32 rows over 8 mixes 15.8 vs 9.7 ms (base 5.9 / 7.2 ms). Older torch
        # builds lack F.grouped_mm; odd strides take the masked path too.
        self.grouped = device.type == "cpu" and hasattr(F, "grouped_mm") and all(d * itemsize % 16 == 0 for d in dims)

    # ---------------------------------------------------------------------------------------- slots
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for A, Bs in self.buffers.values() for t in (A, *Bs))

    @property
    def slots(self) -> int:
        """Slots including slot 0 (the base model)."""
        return self.max_loras + 1

    def slot_of(self, lora: PreparedLora) -> int | None:
        return self.table.slot_of(lora)

    def can_acquire(self, lora: PreparedLora | None) -> bool:
        return lora is None or self.table.can_acquire(lora)

    def acquire(self, lora: PreparedLora | None) -> int:
        """The slot holding ``lora`` (copying it in if needed); 0 for the base model (or a mix without
        factors). Pair with :meth:`release`."""
        if lora is None or not lora.groups:
            return 0
        return self.table.acquire(lora, self._load)

    def release(self, slot: int) -> None:
        self.table.release(slot)

    def _load(self, slot: int, lora: PreparedLora) -> None:
        rank = max((r1 - r0 for g in lora.groups.values() for _, r0, r1, _ in g.members), default=0)
        if rank > self.rank:
            self._grow(-(-rank // RANK_ALIGN) * RANK_ALIGN)
        self._copy_in(slot, lora)

    def _grow(self, rank: int) -> None:
        """Reallocate every buffer at a larger padded rank, the loaded slots' factors copied over (the new
        buffers are built before anything changes: running out of memory leaves the pool as it was)."""
        new = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
        buffers = {key: (new(n_in, self.slots * len(names) * rank), [new(self.slots * rank, o) for o in outs])
                   for key, (n_in, names, outs) in self.groups.items()}  # fmt: skip
        old = self.rank
        for key, (A, Bs) in buffers.items():
            if old and key in self.buffers:
                oA, oBs = self.buffers[key]
                n = len(Bs)
                A.view(A.shape[0], self.slots, n, rank)[..., :old] = oA.view(oA.shape[0], self.slots, n, old)
                for B, oB in zip(Bs, oBs, strict=True):
                    B.view(self.slots, rank, -1)[:, :old] = oB.view(self.slots, old, -1)
        # The same memory as [slots, in, members x R] and [slots, R, out] (grouped_mm's operands).
        self._stacked = {key: (A.view(A.shape[0], self.slots, -1).transpose(0, 1), [B.view(self.slots, rank, -1) for B in Bs])
                         for key, (A, Bs) in buffers.items()}  # fmt: skip
        self.buffers, self.rank = buffers, rank
        self.version += 1

    def _copy_in(self, slot: int, lora: PreparedLora) -> None:
        r = self.rank
        for key, (A, Bs) in self.buffers.items():
            names = self.groups[key][1]
            width = len(names) * r
            A[:, slot * width : (slot + 1) * width] = 0
            for B in Bs:
                B[slot * r : (slot + 1) * r] = 0
            group = lora.groups.get(key)
            for proj, r0, r1, B_T in group.members if group is not None else ():
                j = names.index(proj)
                A[:, slot * width + j * r : slot * width + j * r + r1 - r0] = group.A_T[:, r0:r1]
                Bs[j][slot * r : slot * r + r1 - r0] = B_T

    # ----------------------------------------------------------------------------------- side path
    def plan(self, row_slots: Sequence[int], to_device) -> SidePlan | None:
        """The side path's layout for rows with these slots (sorted); None when every row is on the base.
        ``to_device``: host ints -> device tensor (the runtime's, so nothing waits on the device)."""
        first = sum(1 for s in row_slots if s == 0)
        if first == len(row_slots):
            return None
        if any(a > b for a, b in itertools.pairwise(row_slots)):
            raise ValueError("rows must be sorted by mix slot")
        mixed = row_slots[first:]
        lo, hi = mixed[0], mixed[-1]
        # Masked products cost rows x slots (nothing wasted with one mix: plain GEMMs, no grouped_mm
        # call overhead, which on CPU is a loop over slots); grouped ones read only each row's own slot.
        grouped = self.grouped and (self.device.type != "cpu" or hi > lo)
        if grouped:
            ends, n = [], 0
            for slot in range(lo, hi + 1):
                n += mixed.count(slot)
                ends.append(n)
            return SidePlan(first, lo, hi, True, offs=to_device(ends, torch.int32))
        return SidePlan(first, lo, hi, False, own=to_device([s - lo for s in mixed], torch.long), dtype=self.dtype)

    def add_side(self, key: str, x: torch.Tensor, out: torch.Tensor, plan: SidePlan) -> None:
        """``out += (x A_slot(row)) B_slot(row)`` for the adapted rows (from ``plan.first`` on); ``out`` is
        the group's fused output (``[q|k|v]``, ``[gate|up]``, ``o``, ``down``)."""
        r, sizes = self.rank, self.groups[key][2]
        n, lo, hi = len(sizes), plan.lo, plan.hi + 1
        if plan.first:
            x, out = x[plan.first :], out[plan.first :]
        outs = out.split(sizes, dim=-1) if n > 1 else (out,)
        if plan.grouped:
            A3, B3s = self._stacked[key]
            t = F.grouped_mm(x, A3[lo:hi], offs=plan.offs)
            for j, (B3, y) in enumerate(zip(B3s, outs, strict=True)):
                y.add_(F.grouped_mm(t if n == 1 else t[:, j * r : (j + 1) * r], B3[lo:hi], offs=plan.offs))
            return
        A, Bs = self.buffers[key]
        t = x @ A[:, lo * n * r : hi * n * r]
        if hi - lo > 1:
            t.mul_(plan.mask(n * r))  # other slots' column blocks zeroed
        for j, (B, y) in enumerate(zip(Bs, outs, strict=True)):
            if n == 1:
                tj = t
            elif hi - lo == 1:
                tj = t[:, j * r : (j + 1) * r]
            else:  # member j's columns of every slot, slot-major like B_j's rows
                tj = t.view(len(x), hi - lo, n, r)[:, :, j].reshape(len(x), -1)
            y.addmm_(tj, B[lo * r : hi * r])
