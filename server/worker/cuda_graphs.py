"""Decode steps as replayed CUDA graphs: one graph per (batch bucket, key width, which pools the rows use).

A decode step launches a few hundred small kernels; at small batch their launch cost, not the weights'
bytes, bounds the step. Captured once, a graph replays them all with one launch (vLLM and gpt-fast do
the same). What a graph needs, and the runtime provides: no host-device syncs inside the step, and
every input in a static buffer — token ids, positions, cache positions, block tables (and the sliding
windows' narrower ones), the factor pool's row groups, the rows' member-mix slots. The KV cache and the pools' buffers are allocated once (a pool that
grows its rank bumps its ``version`` and the graphs are captured again).

A step of ``B`` rows runs in the graph of the next batch bucket; the padding rows come first, on the
base model, reading and writing only the reserved null block. The server captures every bucket up to
``--max-batch`` at every key width at start (:meth:`DecodeGraphs.capture_buckets`) for base-only
steps: the first step of a new shape no longer stalls every stream. Steps with mixes are captured on
first use, per number of members their rows are padded to (a power of two; the pools' ranks, hence
their buffers, grow with the first mixes they see). Graphs are captured from a side stream, share one memory pool and stop at the
last hidden states (the ``[rows, vocab]`` logits are computed after the replay, so no per-shape fp32
logits buffer stays allocated); capture errors are thread-local, so merges may copy to the device
meanwhile.

With ``capture=False`` the same static-buffer path runs eagerly: that is how CPU tests check it
against the plain decode (this machine has no GPU; the capture itself runs only on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.adapters.lora_pool import SidePlan
from server.adapters.member_pool import MemberPlan
from server.worker.kv_cache import NULL_BLOCK

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Graph:
    ids: torch.Tensor
    positions: torch.Tensor
    where: torch.Tensor
    table: torch.Tensor
    groups: torch.Tensor | None  # int32 end row per slot (grouped) or [rows] slot index (masked)
    core_slots: torch.Tensor | None  # [rows] each row's member-pool mix slot
    members: int  # K: every row's mix padded to this many members (0: no member mix in the step)
    narrow: dict[int, tuple[torch.Tensor, torch.Tensor]]  # window -> (window tables, first key positions)
    graph: object | None = None
    out: torch.Tensor | None = None  # the last hidden states [rows, hidden]


class DecodeGraphs:
    """Static-buffer decode for ``runtime`` (a :class:`~server.worker.runtime.ModelRuntime`)."""

    def __init__(self, runtime, *, capture: bool) -> None:
        self.runtime, self.capture = runtime, capture
        self._max_batch = 0  # set by capture_buckets
        self._reset()

    def _reset(self) -> None:
        """No graphs yet, for the pool's current buffers, and a fresh memory pool: capturing into an old one
        once its graphs are gone trips the CUDA caching allocator's assert (use_count > 0); its blocks
        are freed with the old graphs' outputs."""
        self._graphs: dict[tuple, _Graph] = {}
        self._pool_version = self._versions()
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None

    def _versions(self) -> tuple[int, int]:
        return (self.runtime.pool.version, self.runtime.cores.version)

    def capture_buckets(self, max_batch: int) -> int:
        """Capture every batch bucket up to ``max_batch`` at every key width for base-only steps (steps
        with mixes are captured on first use: the pools' ranks grow with the first mixes they see);
        returns how many graphs exist."""
        rt = self.runtime
        if self._versions() != self._pool_version:
            self._reset()
        self._max_batch = max_batch  # captured again after a pool regrows
        buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [self.bucket(max_batch)]
        for bp in buckets:
            for nb in rt.key_widths():
                if (bp, nb, False, 0) not in self._graphs:
                    self._graphs[(bp, nb, False, 0)] = self._new(bp, nb, False, 0)
        return len(self._graphs)

    @staticmethod
    def bucket(rows: int) -> int:
        return next((b for b in BATCH_BUCKETS if b >= rows), rows)

    def run(self, rows: Sequence, tables: list[list[int]], where: list[int],
            windows: dict[int, tuple[list[list[int]], list[int]]]) -> torch.Tensor:  # fmt: skip
        """Logits for ``rows`` (sorted by mix slot), ``tables`` padded to one width, ``where`` their cache
        positions, ``windows`` the narrow windows' tables (``runtime.window_tables``)."""
        rt = self.runtime
        if self._versions() != self._pool_version:  # a pool's buffers were reallocated
            self._reset()
            if self._max_batch:
                self.capture_buckets(self._max_batch)
        b, nb = len(rows), len(tables[0])
        bp = self.bucket(b)
        pad = bp - b
        slots = [0] * pad + [r.lora_slot for r in rows]
        core_slots = [0] * pad + [r.core_slot for r in rows]
        mixed = any(slots)
        cored = self.members_bucket(max((len(rt.cores._members[s]) for s in core_slots if s), default=0))
        key = (bp, nb, mixed, cored)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._new(bp, nb, mixed, cored)
        host = {
            "ids": [0] * pad + [r.token for r in rows],
            "positions": [0] * pad + [r.position for r in rows],
            "where": [NULL_BLOCK * rt.kv.block_size] * pad + where,
            "table": [[NULL_BLOCK] * nb] * pad + tables,
        }
        if mixed:
            host["groups"] = self._groups(slots)
        if cored:
            host["core_slots"] = core_slots
        statics = [(getattr(g, name), values) for name, values in host.items()]
        for w, (wtables, firsts) in windows.items():
            statics += [(g.narrow[w][0], [[NULL_BLOCK] * len(wtables[0])] * pad + wtables),
                        (g.narrow[w][1], [0] * pad + firsts)]  # fmt: skip
        for buffer, values in statics:
            buffer.copy_(rt._tensor(values, buffer.dtype), non_blocking=True)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.out = rt._decode_core(g.ids, g.positions, g.where, g.table, *self._plans(g), g.narrow, False)
        return rt._logits(g.out[pad:])  # outside the graph: a new tensor, not the static output

    def _groups(self, slots: list[int]) -> list[int]:
        pool = self.runtime.pool
        if pool.grouped:
            return [sum(1 for s in slots if s <= slot) for slot in range(pool.slots)]
        return slots

    @staticmethod
    def members_bucket(members: int) -> int:
        """The member count a step's graph pads its rows to: a power of two (0: no member mix)."""
        return 1 << (members - 1).bit_length() if members else 0

    def _plans(self, g: _Graph) -> tuple[SidePlan | None, MemberPlan | None]:
        """The factor pool's plan with every slot (0 included) as the step's range (static shapes whatever
        the rows' mixes) and the member pool's from the static mix slots. New plans per call: their masks and
        indices are built in the call (so inside the graph when capturing)."""
        pool, side = self.runtime.pool, None
        if g.groups is not None and pool.grouped:
            side = SidePlan(0, 0, pool.slots - 1, True, offs=g.groups)
        elif g.groups is not None:
            side = SidePlan(0, 0, pool.slots - 1, False, own=g.groups, dtype=pool.dtype)
        core = self.runtime.cores.static_plan(g.core_slots, g.members) if g.core_slots is not None else None
        return side, core

    def _new(self, rows: int, nb: int, mixed: bool, cored: int) -> _Graph:
        rt, dev = self.runtime, self.runtime.device
        zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        groups = None
        if mixed:
            groups = zeros(rt.pool.slots, dtype=torch.int32) + rows if rt.pool.grouped else zeros(rows)
        # All-padding contents: a capture only writes to the null block.
        narrow = {w: (zeros(rows, wb) + NULL_BLOCK, zeros(rows)) for w, wb in rt.narrow_windows(nb).items()}
        g = _Graph(zeros(rows), zeros(rows), zeros(rows) + NULL_BLOCK * rt.kv.block_size,
                   zeros(rows, nb) + NULL_BLOCK, groups, zeros(rows) if cored else None, cored, narrow)  # fmt: skip
        if not self.capture:
            return g
        args = (g.ids, g.positions, g.where, g.table)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy kernel and workspace set-up stays out of the graph
                rt._decode_core(*args, *self._plans(g), g.narrow, False)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: merges copying mixes to the device on their own thread may run meanwhile.
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            g.out = rt._decode_core(*args, *self._plans(g), g.narrow, False)
        g.graph = graph
        return g
