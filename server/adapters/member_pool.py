"""The member pool: adapters resident once as their own factors, and each mix as a small core over its members.

A lowrank mix over members ``k = 1..K`` is ``dW = B_cat C A_cat`` per module (``merging/member_merge.py``).
On the serving device the pool keeps, per layer and input group (``[q|k|v]``, ``o``, ``[gate|up]``,
``down``; modules ``j``), S-LoRA's unified pool of adapters and a table of mix cores:

- adapter slots (``--adapter-slots``, LRU, never evicted while a running row's mix needs them):
  ``A``: ``[slots x in, n x r]``, row ``slot x in + c`` holding column ``c`` of every module's ``A_j``
  (rank-padded to the pool's ``r``); ``B_j``: ``[slots x r, out_j]``, row ``slot x r + i`` holding
  column ``i`` of ``s B_j`` (the adapter's LoRA scale folded in). Slot 0 stays zero.
- mix slots (``--core-slots``): ``[slots x n x R, R]``, module ``j`` of mix slot ``s`` in rows
  ``(s n + j) R ...`` as ``C_j^T`` in the padded member coordinates (member ``k`` at ``k r``); ``R`` is
  ``r`` times the most members of a loaded mix, padded. Slot 0 stays zero.

A step's side path is, per input group and whatever the number of distinct mixes and adapters in it,
three gathered products that read each row's own members in place (no copy of any factor):

    z  = x A_member          one embedding_bag, a bag per (row, member): the member's A rows weighted by x
    z' = C_row z             one embedding_bag, a bag per (row, module): the row's core rows weighted by z
    y_j += B_j,members z'_j  one embedding_bag per module, a bag per row: its members' B_j rows weighted by z'

so a row costs its own mix's rank, not the number of adapters registered, and a step reads each
distinct member's factors (the feasibility run, ``shared/notes/gathered-side-path.md``: 32 mixes over
96 adapters at 1.30x the base step where gathering copies cost 2.33x).

Plans come two ways: on the host for eager steps (only the (row, member) pairs that exist), or on the
device from the rows' mix slots alone (:meth:`MemberPool.static_plan`, every row padded to ``K``
members: what a CUDA graph captures).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from merging.adapters import LoraAdapter
from merging.member_merge import MemberMix
from server.adapters.lora_pool import RANK_ALIGN
from server.adapters.slots import PoolFullError, SlotTable


def _align(n: int) -> int:
    return -(-n // RANK_ALIGN) * RANK_ALIGN


def _core_width(members: int, rank: int) -> int:
    """The core rows a mix of ``members`` needs in the pool: its members padded to a power of two, as a
    graph's static plan pads a row's bags (a 3-member row reads 4 members' worth)."""
    return _align((1 << (members - 1).bit_length()) * rank)


class PreparedMembers:
    """A member-core mix ready for the pool: its adapters (what the pool makes resident) and, per input
    group, each module's compact ``C^T`` on the serving device with its members' ranks (laid out at the
    pool's padded rank when loaded). Its bytes are the cores only: adapters are the pool's."""

    def __init__(self, adapters: tuple[LoraAdapter, ...],
                 groups: dict[str, list[tuple[torch.Tensor, tuple[int, ...]] | None]]) -> None:  # fmt: skip
        self.adapters, self.groups = adapters, groups

    @property
    def nbytes(self) -> int:
        return sum(e[0].numel() * e[0].element_size() for g in self.groups.values() for e in g if e is not None)


def prepare_members(mix: MemberMix, adapters: Mapping[str, LoraAdapter], layout: Mapping[str, Sequence[str]],
                    device: torch.device, dtype: torch.dtype) -> PreparedMembers:  # fmt: skip
    """``mix``'s cores grouped by shared input, transposed, on the serving device; ``adapters`` must hold
    its members (the same contents it was merged on); ``layout``: ``"<layer>.<group>" -> [modules]``."""
    own = tuple(adapters[n] for n in mix.members)
    if tuple(a.fingerprint for a in own) != mix.fingerprints:
        raise ValueError("the mix's adapters changed since it was merged")
    groups = {}
    for key, modules in layout.items():
        entries = [(mix.cores[m].T.contiguous().to(device, dtype), mix.member_ranks[m]) if m in mix.cores else None
                   for m in modules]  # fmt: skip
        if any(e is not None for e in entries):
            groups[key] = entries
    return PreparedMembers(own, groups)


@dataclass
class MemberPlan:
    """One step's rows and their mixes' members (built once per step, shared by every layer)."""

    rows: int
    members: int  # K: the most members of a row's mix (rows are padded to it in the cores' bags)
    core_slots: torch.Tensor  # [rows] long, 0 = no member mix
    pair_row: torch.Tensor  # [P] long: the row of each (row, member) pair
    pair_slot: torch.Tensor  # [P] adapter slot
    pair_pos: torch.Tensor  # [P] row x K + k
    row_offsets: torch.Tensor  # [rows] long: where each row's pairs start (times r: its B bag)
    rank: int  # r
    core_rank: int  # R
    # Few distinct adapters in the step: their slots (host ints) and each pair's index among them; the
    # side path then runs plain products per distinct adapter on views of the pool (no gather, no copy).
    distinct: tuple[int, ...] | None = None
    pair_d: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)

    def a_index(self, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A rows of each pair's member (``slot x in + 0..in``) and where each pair's bag starts."""
        key = ("a", n_in)
        if key not in self._cache:
            ar = torch.arange(n_in, device=self.pair_slot.device)
            rows = ((self.pair_slot * n_in).unsqueeze(1) + ar).view(-1)
            self._cache[key] = rows, torch.arange(0, rows.numel(), n_in, device=ar.device)
        return self._cache[key]

    def b_index(self) -> torch.Tensor:
        """B rows of every pair's member (``slot x r + 0..r``), pairs in row order."""
        if "b" not in self._cache:
            ar = torch.arange(self.rank, device=self.pair_slot.device)
            self._cache["b"] = ((self.pair_slot * self.rank).unsqueeze(1) + ar).view(-1)
        return self._cache["b"]

    def core_index(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Core rows of bag ``(row, j)``: ``(slot n + j) R + 0..K r``, and the bags' starts."""
        key = ("c", n)
        if key not in self._cache:
            width = self.members * self.rank
            dev = self.core_slots.device
            base = (self.core_slots.unsqueeze(1) * n + torch.arange(n, device=dev)) * self.core_rank  # [rows, n]
            rows = (base.unsqueeze(2) + torch.arange(width, device=dev)).view(-1)
            self._cache[key] = rows, torch.arange(0, rows.numel(), width, device=dev)
        return self._cache[key]


class MemberPool:
    """Adapter slots and mix-core slots for every layer's input groups (allocated on first use)."""

    def __init__(self, groups: Mapping[str, tuple[int, Sequence[str], Sequence[int]]], adapter_slots: int,
                 core_slots: int, dtype: torch.dtype, device: torch.device, max_members: int = 16) -> None:  # fmt: skip
        """``groups``: ``"<layer>.<group>" -> (in features, member modules, member out features)``."""
        if adapter_slots < max_members:
            raise ValueError(f"{adapter_slots} adapter slots cannot hold a mix of {max_members} adapters")
        self.groups = {k: (n_in, tuple(names), tuple(outs)) for k, (n_in, names, outs) in groups.items()}
        self.dtype, self.device, self.max_members = dtype, device, max_members
        self.adapters = SlotTable(adapter_slots, "adapter")
        self.mixes = SlotTable(core_slots, "member mix")
        self.rank = 0  # r: every adapter's factors padded to it
        self.core_rank = 0  # R: every mix's cores padded to it
        self.version = 0  # bumped when buffers are reallocated (captured graphs hold their addresses)
        # Eager steps reading at most this many distinct adapters take plain products per adapter (on views
        # of the pool) instead of the gathered ones: bench/results/ops-*.md measured the crossover.
        self.dense_max = 8
        self.factors: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # key -> (A rows, [B_j rows])
        self.cores: dict[str, torch.Tensor] = {}  # key -> [mix slots x n x R, R]
        self._members: dict[int, list[int]] = {}  # mix slot -> its members' adapter slots
        # Each mix slot's members' adapter slots, as a graph reads them (rows padded to a power of two).
        width = 1 << (max_members - 1).bit_length()
        self.member_table = torch.zeros(self.mixes.count + 1, width, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        """Mix slots including slot 0 (no member mix)."""
        return self.mixes.count + 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for A, Bs in self.factors.values() for t in (A, *Bs)) + sum(
            t.numel() * t.element_size() for t in self.cores.values()
        )

    def adapter_bytes(self, adapter: LoraAdapter) -> int:
        """Device bytes one adapter takes in the pool (at its padded rank)."""
        r = max(self.rank, _align(max(adapter.ranks.values(), default=1)))
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum((n_in * len(names) + sum(outs)) * r * item for n_in, names, outs in self.groups.values())

    # ---------------------------------------------------------------------------------------- slots
    def can_acquire(self, mix: PreparedMembers) -> bool:
        """Whether ``mix`` and every member fit now (a resident member costs no slot)."""
        if not self.mixes.can_acquire(mix):
            return False
        needed = sum(1 for a in mix.adapters if self.adapters.slot_of(a) is None)
        in_use_idle = sum(1 for a in mix.adapters if self.adapters.is_idle(a))
        return needed <= self.adapters.free_count() - in_use_idle

    def acquire(self, mix: PreparedMembers) -> int:
        """The mix slot holding ``mix``, its members resident (loading what is missing). Pair with
        :meth:`release`. Raises :class:`PoolFullError` when they do not fit (nothing is held then)."""
        if not self.can_acquire(mix):
            raise PoolFullError(f"no room for a mix of {len(mix.adapters)} adapters in the adapter pool")
        held: list[int] = []
        try:
            for adapter in mix.adapters:
                held.append(self.adapters.acquire(adapter, self._load_adapter))
            slot = self.mixes.acquire(mix, self._load_mix)
        except BaseException:
            for s in held:
                self.adapters.release(s)
            raise
        if self._members.get(slot) != held:  # an idle mix's members may have moved since it was loaded
            self._members[slot] = held
            self.member_table[slot].zero_()
            self.member_table[slot, : len(held)] = torch.tensor(held, dtype=torch.long)
        return slot

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        for s in self._members[slot]:
            self.adapters.release(s)
        self.mixes.release(slot)

    def _load_adapter(self, slot: int, adapter: LoraAdapter) -> None:
        rank = _align(max(adapter.ranks.values(), default=1))
        if rank > self.rank or not self.factors:
            self._grow(max(rank, self.rank), self.core_rank)
        self._copy_adapter(slot, adapter)

    def _copy_adapter(self, slot: int, adapter: LoraAdapter) -> None:
        r = self.rank
        for key, (A, Bs) in self.factors.items():
            n_in, names, _ = self.groups[key]
            a_rows = A[slot * n_in : (slot + 1) * n_in]
            a_rows.zero_()
            for j, (module, B) in enumerate(zip(names, Bs, strict=True)):
                b_rows = B[slot * r : (slot + 1) * r]
                b_rows.zero_()
                f = adapter.modules.get(module)
                if f is not None:  # B with its LoRA scale: the cores are over the scaled factors
                    a_rows[:, j * r : j * r + f.rank] = f.A.T
                    b_rows[: f.rank] = (f.B.to(B.dtype) * f.scale).T

    def _load_mix(self, slot: int, mix: PreparedMembers) -> None:
        width = _core_width(len(mix.adapters), self.rank)
        if width > self.core_rank:
            self._grow(self.rank, width)
        self._copy_mix(slot, mix)

    def _copy_mix(self, slot: int, mix: PreparedMembers) -> None:
        r, R = self.rank, self.core_rank
        for key, C in self.cores.items():
            block = C.view(self.slots, -1, R, R)[slot]
            block.zero_()
            for j, entry in enumerate(mix.groups.get(key, ())):
                if entry is None:
                    continue
                Ct, ranks = entry
                idx = torch.tensor([k * r + i for k, rk in enumerate(ranks) for i in range(rk)], device=C.device)
                block[j].index_put_((idx.unsqueeze(1), idx.unsqueeze(0)), Ct)

    def _grow(self, rank: int, core_rank: int) -> None:
        """Reallocate at larger padded ranks (built before anything changes), then copy every loaded
        adapter and mix back in at the new layout."""
        new = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
        loaded_mixes = self.mixes.loaded()
        core_rank = max([core_rank, *(_core_width(len(m.adapters), rank) for _, m in loaded_mixes)])
        slots_a = self.adapters.count + 1
        factors = {key: (new(slots_a * n_in, len(names) * rank), [new(slots_a * rank, o) for o in outs])
                   for key, (n_in, names, outs) in self.groups.items()}  # fmt: skip
        cores = {key: new(self.slots * len(names) * core_rank, core_rank) for key, (_, names, _) in self.groups.items()}
        self.factors, self.cores, self.rank, self.core_rank = factors, cores, rank, core_rank
        for slot, adapter in self.adapters.loaded():
            self._copy_adapter(slot, adapter)
        for slot, mix in loaded_mixes:
            self._copy_mix(slot, mix)
        self.version += 1

    # ------------------------------------------------------------------------------------- side path
    def plan(self, row_slots: Sequence[int], to_device: Callable[..., torch.Tensor]) -> MemberPlan | None:
        """The step's plan from the rows' mix slots; None when no row is on a member mix. ``to_device``:
        host ints -> device tensor (the runtime's, so nothing waits on the device)."""
        if not any(row_slots):
            return None
        K = max(len(self._members[s]) for s in row_slots if s)
        pair_row, pair_slot, pair_pos, offsets = [], [], [], []
        for b, s in enumerate(row_slots):
            offsets.append(len(pair_row) * self.rank)
            for k, a in enumerate(self._members[s] if s else ()):
                pair_row.append(b)
                pair_slot.append(a)
                pair_pos.append(b * K + k)
        distinct, pair_d = tuple(dict.fromkeys(pair_slot)), None
        if len(distinct) <= self.dense_max:
            index = {a: d for d, a in enumerate(distinct)}
            pair_d = to_device([index[a] for a in pair_slot])
        return MemberPlan(len(row_slots), K, to_device(list(row_slots)), to_device(pair_row), to_device(pair_slot),
                          to_device(pair_pos), to_device(offsets), self.rank, self.core_rank,
                          distinct if pair_d is not None else None, pair_d)  # fmt: skip

    def static_plan(self, core_slots: torch.Tensor, members: int) -> MemberPlan:
        """A plan from device tensors only (what a CUDA graph captures): every row padded to ``members``
        members (slot 0's zeros where a row has fewer, or no mix)."""
        rows, dev = core_slots.shape[0], core_slots.device
        pair_slot = self.member_table[core_slots, :members].reshape(-1)
        pair_row = torch.arange(rows, device=dev).repeat_interleave(members)
        pos = torch.arange(rows * members, device=dev)
        offsets = torch.arange(rows, device=dev) * (members * self.rank)
        return MemberPlan(rows, members, core_slots, pair_row, pair_slot, pos, offsets, self.rank, self.core_rank)

    def add_side(self, key: str, x: torch.Tensor, out: torch.Tensor, plan: MemberPlan) -> None:
        """``out += B_cat C_row A_cat x`` for every row (rows without a member mix add exact zeros); ``out``
        is the group's fused output (``[q|k|v]``, ``[gate|up]``, ``o``, ``down``)."""
        A, Bs = self.factors[key]
        n_in, names, outs = self.groups[key]
        n, r, K = len(names), self.rank, plan.members
        if plan.distinct is not None:  # few adapters: one product per adapter over every row, then the pairs'
            zall = x.new_empty(len(plan.distinct), len(x), n * r)
            for d, slot in enumerate(plan.distinct):
                torch.mm(x, A[slot * n_in : (slot + 1) * n_in], out=zall[d])
            zp = zall[plan.pair_d, plan.pair_row]
        else:
            a_rows, a_starts = plan.a_index(n_in)
            xs = x.index_select(0, plan.pair_row)  # [P, in]: the activations weighting each pair's bag
            zp = torch.embedding_bag(A, a_rows, a_starts, False, 0, False, xs.view(-1))[0]  # [P, n r]
        z = zp.new_zeros(plan.rows * K, n * r).index_copy_(0, plan.pair_pos, zp)
        z = z.view(plan.rows, K, n, r).transpose(1, 2).reshape(-1)  # module-major: [rows, n, K r]
        c_rows, c_starts = plan.core_index(n)
        zc = torch.embedding_bag(self.cores[key], c_rows, c_starts, False, 0, False, z)[0]  # [rows n, R]
        zc = zc.view(plan.rows, n, -1)[:, :, : K * r].reshape(plan.rows, n, K, r)
        col = 0
        for j, (B, width) in enumerate(zip(Bs, outs, strict=True)):
            w = zc[:, j].reshape(plan.rows * K, r).index_select(0, plan.pair_pos)  # [P, r]
            y = out[:, col : col + width]
            col += width
            if plan.distinct is not None:
                W = w.new_zeros(len(plan.distinct), plan.rows, r).index_put_((plan.pair_d, plan.pair_row), w)
                for d, slot in enumerate(plan.distinct):
                    y.addmm_(W[d], B[slot * r : (slot + 1) * r])
            else:
                y.add_(torch.embedding_bag(B, plan.b_index(), plan.row_offsets, False, 0, False, w.view(-1))[0])
