"""The model runtime: the resident base model, its paged KV cache and the pooled LoRA side path.

It owns every tensor of the serving path; it knows nothing about requests, HTTP or scheduling. The
decoder's math (one forward for every family of ``architectures.py``) is in ``decoder.py``; this module
lays out each step: packed tokens, cache positions, block tables, the pools' plans, attention per layer.

Nothing in a step reads a device value back to the host: positions, block tables and row groups are
known on the host and copied in. Batch invariance: greedy tokens must not depend on the rest of the
batch. Decode attention reads each row's own blocks, padded to the batch's widest row rounded up to a
power of two (at least ``MIN_KEYS`` keys), the tail masked; masked keys add exact zeros and the kernels
walk keys in fixed blocks from position 0, so only the batch size of the products varies (tested).
Sliding-window layers read a narrower table: the ``window_blocks(w)`` blocks that reach back over the
window from each row's last block (all its blocks stay allocated: full-attention layers, and the
engine's reservation of prompt + ``max_tokens`` at admission, still need them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.adapters import LoraAdapter
from merging.member_merge import MemberMix
from server.adapters.lora_pool import LoraFactorsByModule, LoraPool, PreparedLora, SidePlan, prepare_lora
from server.adapters.member_pool import MemberPlan, MemberPool, PreparedMembers, prepare_members
from server.worker.architectures import UnsupportedModelError, resolve
from server.worker.decoder import Decoder
from server.worker.kv_cache import NULL_BLOCK, PagedKVCache, bytes_per_block, check_fits, cpu_kv_budget, cuda_kv_budget
from server.worker.paged_attention import chunk_attention, decode_attention, key_mask

MIN_KEYS = 64  # decode attention reads at least this many keys per row
# window -> (each row's window table [rows, window blocks], the position of its first key [rows])
WindowTables = dict[int, tuple[torch.Tensor, torch.Tensor]]


class ServingError(RuntimeError):
    """The model cannot be served (unsupported architecture, no room, prompt too long)."""


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``ids`` of one sequence at positions ``start ...``; earlier ones are in its blocks."""

    ids: Sequence[int]
    start: int
    blocks: Sequence[int]  # the sequence's block table
    lora_slot: int = 0  # its mix's slot in the factor pool (0: none)
    core_slot: int = 0  # its mix's slot in the member pool (0: none)


@dataclass(frozen=True)
class DecodeRow:
    """One running sequence's next input token at ``position`` (that many tokens are in its blocks)."""

    token: int
    position: int
    blocks: Sequence[int]
    lora_slot: int = 0
    core_slot: int = 0


class ModelRuntime:
    """A causal LM of a supported family kept resident, a paged KV cache and the two mix pools."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **options) -> None:  # fmt: skip
        """Load a model directory; ``options`` as :meth:`from_model`'s."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(model_dir)
        try:
            resolve(config)  # refuse before loading any weight
        except UnsupportedModelError as exc:
            raise ServingError(str(exc)) from None
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self._setup(hf, AutoTokenizer.from_pretrained(model_dir), Path(model_dir).name, **options)

    @classmethod
    def from_model(cls, hf: torch.nn.Module, tokenizer=None, name: str = "model", **options) -> ModelRuntime:
        """Serve a transformers model already in memory (its device and dtype), e.g. random weights."""
        runtime = cls.__new__(cls)
        runtime._setup(hf.eval(), tokenizer, name, **options)
        return runtime

    def _setup(
        self,
        hf: torch.nn.Module,
        tokenizer,
        name: str,
        *,
        max_len: int | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        max_loras: int = 8,
        core_slots: int = 64,
        adapter_slots: int = 32,
        max_members: int = 16,
        default_kv_tokens: int = 32 * 4096,
        memory_utilization: float = 0.9,
        reserve_bytes: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        """``max_loras``: slots of the factor pool (dense-space mixes); ``core_slots``: mix slots of the member
        pool (lowrank mixes as cores over their members, a few hundred KB to MB each); ``adapter_slots``:
        adapters resident in the member pool; ``max_members``: the most adapters of one mix.
        ``kv_cache_bytes`` None: on CUDA, ``memory_utilization`` of the device less what the weights use
        and ``reserve_bytes`` for merged mixes, the mix pool and activations (default: 15% of what the
        weights leave); elsewhere room for ``default_kv_tokens`` tokens (at most 32 full contexts).
        ``cuda_graphs``: on CUDA, decode steps replay captured graphs (``cuda_graphs.py``)."""
        config = hf.config
        try:
            self.spec = resolve(config)
        except UnsupportedModelError as exc:
            raise ServingError(str(exc)) from None
        self.tokenizer, self.name, self.config = tokenizer, name, config
        self.device, self.dtype = hf.lm_head.weight.device, hf.lm_head.weight.dtype
        self.decoder = Decoder(hf, self.spec)
        self.embed = hf.model.embed_tokens.weight
        self.vocab_size = hf.lm_head.weight.shape[0]  # the logits' width (may exceed the tokenizer's)
        self.layers = self.decoder.layers_hf
        self.linears, self.fused = self.decoder.linears, self.decoder.fused
        self.heads, self.kv_heads, self.head_dim = self.spec.heads, self.spec.kv_heads, self.spec.head_dim
        self.windows = self.spec.windows  # per layer (None: full attention)
        self.max_len = min(max_len or self.spec.max_positions, self.spec.max_positions)
        self._hf = hf  # keeps the parameters alive
        self.kv = self._make_kv_cache(kv_cache_bytes, block_size, default_kv_tokens, memory_utilization, reserve_bytes)
        self._kv_tokens = [self.kv.layer(i) for i in range(len(self.layers))]  # [positions, 2 KV, d] views
        self._kv_blocks = [t.view(self.kv.num_blocks, block_size, *t.shape[1:]) for t in self._kv_tokens]
        self._window_kinds = tuple(dict.fromkeys(self.windows))  # the distinct windows (None: full attention)
        # A window of w keys spans at most ceil((w - 1) / block_size) + 1 blocks, whatever the row's position.
        self._window_blocks = {w: -(-(w - 1) // block_size) + 1 for w in self._window_kinds if w is not None}
        shapes = {k: tuple(lin.weight.shape) for k, lin in self.linears.items()}
        groups = {key: (shapes[names[0]][1], names, [shapes[n][0] for n in names])
                  for key, names in self.decoder.groups.items()}  # fmt: skip
        self.pool = LoraPool(groups, max_loras, self.dtype, self.device)
        self.cores = MemberPool(groups, adapter_slots, core_slots, self.dtype, self.device, max_members)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from server.worker.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, capture=True)

    def _make_kv_cache(self, budget: int | None, block_size: int, default_tokens: int, utilization: float,
                       reserve: int | None) -> PagedKVCache:  # fmt: skip
        per_block = bytes_per_block(len(self.layers), block_size, self.kv_heads, self.head_dim, self.dtype)
        self.reserved_bytes = 0
        if budget is not None:
            note = f"--kv-cache-mb {budget / 2**20:g}"
        elif self.device.type == "cuda":
            budget, self.reserved_bytes, note = cuda_kv_budget(*torch.cuda.mem_get_info(self.device), utilization,
                                                               reserve)  # fmt: skip
        else:
            budget, note = cpu_kv_budget(per_block, block_size, min(default_tokens, 32 * self.max_len))
        blocks = budget // per_block
        if blocks < 2:
            raise ServingError(f"the KV cache gets {budget / 2**20:.1f} MiB ({note}): not even one block of "
                               f"{per_block / 2**20:.2f} MiB; give it more memory (--kv-cache-mb)")  # fmt: skip
        cache = PagedKVCache(
            len(self.layers), blocks, block_size, self.kv_heads, self.head_dim, self.dtype, self.device
        )
        try:
            check_fits(self.max_len, cache, note)
        except ValueError as exc:
            raise ServingError(str(exc)) from None
        return cache

    # ----------------------------------------------------------------------------------- inspection
    def base_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{"<module>.weight": shape}`` of every adaptable projection (what adapters are checked against)."""
        return {f"{name}.weight": tuple(lin.weight.shape) for name, lin in self.linears.items()}

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._hf.parameters())

    def lora_to_device(self, factors: LoraFactorsByModule) -> PreparedLora:
        """Merged factors checked against the base shapes, laid out by input group on the serving device."""
        for name, (A, B) in factors.items():
            lin = self.linears.get(name)
            if lin is None:
                raise ServingError(f"module {name!r} is not an adaptable projection of the base model")
            if (B.shape[0], A.shape[1]) != tuple(lin.weight.shape):
                raise ServingError(
                    f"module {name!r}: delta {B.shape[0]}x{A.shape[1]} vs weight {tuple(lin.weight.shape)}"
                )
        return prepare_lora(factors, self.decoder.groups, self.device, self.dtype)

    def members_to_device(self, mix: MemberMix, adapters: dict[str, LoraAdapter]) -> PreparedMembers:
        """A member-core merge laid out by input group on the serving device (its members' shapes are the
        base model's: adapters are checked against them when registered)."""
        return prepare_members(mix, adapters, self.decoder.groups, self.device, self.dtype)

    # ----------------------------------------------------------------------------------------- mixes
    def can_acquire(self, mix: PreparedLora | PreparedMembers | None) -> bool:
        """Whether a slot for ``mix`` is free (or it is loaded already): admission waits otherwise."""
        if isinstance(mix, PreparedMembers):
            return self.cores.can_acquire(mix)
        return self.pool.can_acquire(mix)

    def acquire(self, mix: PreparedLora | PreparedMembers | None) -> tuple[int, int]:
        """``(factor slot, core slot)`` for a sequence on ``mix`` (0 where it uses neither pool). Pair with
        :meth:`release`."""
        if isinstance(mix, PreparedMembers):
            return 0, self.cores.acquire(mix)
        return self.pool.acquire(mix), 0

    def release(self, lora_slot: int, core_slot: int) -> None:
        self.pool.release(lora_slot)
        self.cores.release(core_slot)

    # -------------------------------------------------------------------------------------- forward
    def _tensor(self, values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Host ints to the device without waiting for it (pinned memory, asynchronous copy on CUDA)."""
        t = torch.tensor(values, dtype=dtype)
        return t if self.device.type == "cpu" else t.pin_memory().to(self.device, non_blocking=True)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, where: torch.Tensor, side: SidePlan | None,
                 core: MemberPlan | None, attend) -> torch.Tensor:  # fmt: skip
        """The decoder over packed tokens (rows sorted by factor-pool slot) with the pools' plans for the step
        (None: no row uses that pool); ``attend(i, q, heads)``: layer ``i``'s attention."""
        sides = [(pool, plan) for pool, plan in ((self.pool, side), (self.cores, core)) if plan is not None]
        return self.decoder.forward(ids, positions, where, self._kv_tokens, sides, attend)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(h)

    def _slot_mapping(self, blocks: Sequence[int], start: int, end: int) -> list[int]:
        bs = self.kv.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def prefill(self, chunks: Sequence[PrefillChunk]) -> torch.Tensor:
        """Several prompts' chunks in one forward: the logits after each chunk's last token, ``[chunks, vocab]``
        fp32 (in the order given). Each chunk's keys and values go to its blocks."""
        return self.prefill_positions(chunks)[0]

    @torch.inference_mode()
    def prefill_positions(self, chunks: Sequence[PrefillChunk], every: Sequence[int] = ()
                          ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:  # fmt: skip
        """:meth:`prefill`, and for the chunks numbered in ``every`` the logits after each of their tokens
        (``{chunk: [len(ids), vocab]}``, what a prompt's logprobs need)."""
        order = sorted(range(len(chunks)), key=lambda c: chunks[c].lora_slot)
        ids, positions, where, slots, core_slots, spans = [], [], [], [], [], []
        for c in order:
            ch = chunks[c]
            end = ch.start + len(ch.ids)
            if not ch.ids or end > self.max_len or -(-end // self.kv.block_size) > len(ch.blocks):
                raise ServingError(f"a prompt chunk {ch.start}:{end} does not fit its blocks or the "
                                   f"{self.max_len}-token context")  # fmt: skip
            spans.append((len(ids), len(ids) + len(ch.ids), ch))
            ids += ch.ids
            positions += range(ch.start, end)
            where += self._slot_mapping(ch.blocks, ch.start, end)
            slots += [ch.lora_slot] * len(ch.ids)
            core_slots += [ch.core_slot] * len(ch.ids)

        # Per chunk and distinct window: the blocks its attention reads (once, not per layer).
        history = [{w: self._chunk_blocks(ch, b - a, w) for w in self._window_kinds} for a, b, ch in spans]
        scale, softcap = self.spec.attn_scale, self.spec.attn_softcap

        def attend(i: int, q: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
            w = self.windows[i]
            outs = [chunk_attention(self._kv_blocks[i], hist[w][0], q[a:b], heads[a:b, self.heads :], ch.start, w,
                                    hist[w][1], scale, softcap)
                    for (a, b, ch), hist in zip(spans, history, strict=True)]  # fmt: skip
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        side, core = self.pool.plan(slots, self._tensor), self.cores.plan(core_slots, self._tensor)
        h = self._forward(self._tensor(ids), self._tensor(positions), self._tensor(where), side, core, attend)
        last = self._tensor([b - 1 for _, b, _ in spans])
        logits = self._logits(h[last])
        logits = logits if order == sorted(order) else logits[self._tensor(_inverse(order))]
        at = {c: row for row, c in enumerate(order)}
        return logits, {c: self._logits(h[spans[at[c]][0] : spans[at[c]][1]]) for c in every}

    def _chunk_blocks(self, ch: PrefillChunk, n: int, window: int | None) -> tuple[torch.Tensor | None, int]:
        """The blocks a chunk of ``n`` tokens attends over and the first one's index (None for a first
        chunk: its own keys suffice); with a window, from the block holding the first key it reaches."""
        if not ch.start:
            return None, 0
        first = max(0, ch.start - window + 1) // self.kv.block_size if window is not None else 0
        return self._tensor(list(ch.blocks[first : self.kv.blocks_for(ch.start + n)])), first

    @torch.inference_mode()
    def decode(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """One token for each running sequence: logits ``[rows, vocab]`` fp32, in the order given."""
        order = sorted(range(len(rows)), key=lambda r: rows[r].lora_slot)
        rows = [rows[r] for r in order]
        if max(r.position for r in rows) >= self.max_len:
            raise ServingError(f"a sequence reached the {self.max_len}-token context")
        bs = self.kv.block_size
        if any(len(r.blocks) <= r.position // bs for r in rows):
            raise ServingError("a sequence outgrew the KV blocks it was given")
        nb = self.key_blocks(max(r.position for r in rows))
        tables = [list(r.blocks[:nb]) + [NULL_BLOCK] * (nb - len(r.blocks[:nb])) for r in rows]
        where = [r.blocks[r.position // bs] * bs + r.position % bs for r in rows]  # each row's new cache slot
        windows = self.window_tables(rows, nb)
        if self.graphs is not None:
            logits = self.graphs.run(rows, tables, where, windows)
        else:
            side = self.pool.plan([r.lora_slot for r in rows], self._tensor)
            core = self.cores.plan([r.core_slot for r in rows], self._tensor)
            narrow = {w: (self._tensor(t), self._tensor(f)) for w, (t, f) in windows.items()}
            logits = self._decode_core(self._tensor([r.token for r in rows]), self._tensor([r.position for r in rows]),
                                       self._tensor(where), self._tensor(tables), side, core, narrow)  # fmt: skip
        return logits if order == sorted(order) else logits[self._tensor(_inverse(order))]

    def key_blocks(self, position: int) -> int:
        """Blocks every row of a decode step reads when its furthest row is at ``position``: the batch's
        widest, rounded up to a power of two of keys (at least ``MIN_KEYS``) so the key width takes few
        values (and graph buckets); rows read their own blocks, then the null block."""
        return -(-max(MIN_KEYS, 1 << position.bit_length()) // self.kv.block_size)

    def narrow_windows(self, nb: int) -> dict[int, int]:
        """``{window: blocks}`` for the layers' windows narrower than a decode step's ``nb`` key blocks:
        those layers read a table of ``blocks`` blocks per row instead (a row's window spans at most
        ``ceil((w - 1) / block_size) + 1`` blocks, whatever its position)."""
        return {w: b for w, b in self._window_blocks.items() if b < nb}

    def window_tables(self, rows: Sequence[DecodeRow], nb: int) -> dict[int, tuple[list[list[int]], list[int]]]:
        """Per narrow window (:meth:`narrow_windows`): each row's table from the block holding the first key
        its window reaches (null-padded), and that block's first position. A row's table depends on its
        own position only (batch invariance)."""
        bs, out = self.kv.block_size, {}
        for w, wb in self.narrow_windows(nb).items():
            firsts = [max(0, r.position // bs - wb + 1) for r in rows]
            tables = [list(r.blocks[f : f + wb]) + [NULL_BLOCK] * (wb - len(r.blocks[f : f + wb]))
                      for r, f in zip(rows, firsts, strict=True)]  # fmt: skip
            out[w] = (tables, [f * bs for f in firsts])
        return out

    def key_widths(self) -> list[int]:
        """Every value :meth:`key_blocks` takes within the context."""
        return sorted({self.key_blocks((1 << k) - 1) for k in range(self.max_len.bit_length() + 1)
                       if (1 << k) - 1 < self.max_len} | {self.key_blocks(self.max_len - 1)})  # fmt: skip

    def _decode_core(self, ids: torch.Tensor, positions: torch.Tensor, where: torch.Tensor, table: torch.Tensor,
                     side: SidePlan | None, core: MemberPlan | None, narrow: WindowTables,
                     logits: bool = True) -> torch.Tensor:  # fmt: skip
        """The decode step on device tensors (what a CUDA graph captures): ``table`` ``[rows, blocks]``,
        ``narrow`` the narrow windows' tables. Logits, or with ``logits=False`` the last hidden states
        (graphs stop there: ``[rows, vocab]`` fp32 per captured shape would be memory no budget counts)."""
        bs = self.kv.block_size
        views = {}  # per distinct window: the table its layers read and their mask, once per step
        for w in self._window_kinds:
            t, first = narrow.get(w, (table, 0))
            views[w] = t, key_mask(t.shape[1] * bs, positions, w, first)[:, None, None, :]
        scale, softcap = self.spec.attn_scale, self.spec.attn_softcap

        def attend(i: int, q: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
            t, mask = views[self.windows[i]]
            return decode_attention(self._kv_blocks[i], t, q, mask, scale, softcap)

        h = self._forward(ids, positions, where, side, core, attend)
        return self._logits(h) if logits else h


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for row, original in enumerate(order):
        inverse[original] = row
    return inverse
