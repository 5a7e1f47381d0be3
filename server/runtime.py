"""The model runtime: the resident base model, its paged KV cache and the pooled LoRA side path.

It owns every tensor of the serving path; it knows nothing about requests, HTTP or scheduling.

The forward pass is written here (gpt-fast style) over the weights of a Hugging Face Llama-family
model (Llama, Mistral, Qwen2: the same module names). A step's tokens are packed into one
``[tokens, hidden]`` batch (decode: one token per sequence; prefill: chunks of several prompts), so
every linear layer is one GEMM over all of them, plus every row's own mix through the pool:

    y = x W^T (+ b) + (x A_slot(row)^T) B_slot(row)^T       (two grouped products per input group)

whatever the number of distinct mixes in the step (``lora_pool.py``). Fewer ops per layer: [q|k|v]
and [gate|up] run as one GEMM each (weights concatenated at load, the projections' own weights turned
into views of them), RMSNorm is one fused op, rotary cos / sin are computed once per step and applied
to q's and k's heads in place (three ops), and keys and values go to the cache in one write.

Nothing in a step reads a device value back to the host: positions, block tables and row groups are
known on the host and copied in. Batch invariance: greedy tokens must not depend on the rest of the
batch. Decode attention reads each row's own blocks, padded to the batch's widest row rounded up to a
power of two (at least ``MIN_KEYS`` keys), the tail masked; masked keys add exact zeros and the kernels
walk keys in fixed blocks from position 0, so only the batch size of the products varies (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from merging.core_merge import CoreMix
from server.core_pool import CorePlan, CorePool, PreparedCores, prepare_cores
from server.fused_linear import fuse_linears
from server.kv_cache import NULL_BLOCK, PagedKVCache, bytes_per_block, check_fits, cpu_kv_budget, cuda_kv_budget
from server.lora_pool import (
    GROUPS,
    LoraFactorsByModule,
    LoraPool,
    PreparedLora,
    SidePlan,
    group_prefix,
    prepare_lora,
)
from server.paged_attention import chunk_attention, decode_attention, key_mask

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
MIN_KEYS = 64  # decode attention reads at least this many keys per row
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


class ServingError(RuntimeError):
    """The model cannot be served (unsupported architecture, no room, prompt too long)."""


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``ids`` of one sequence at positions ``start ...``; earlier ones are in its blocks."""

    ids: Sequence[int]
    start: int
    blocks: Sequence[int]  # the sequence's block table
    lora_slot: int = 0  # its mix's slot in the factor pool (0: none)
    core_slot: int = 0  # its mix's slot in the core pool (0: none)


@dataclass(frozen=True)
class DecodeRow:
    """One running sequence's next input token at ``position`` (that many tokens are in its blocks)."""

    token: int
    position: int
    blocks: Sequence[int]
    lora_slot: int = 0
    core_slot: int = 0


class ModelRuntime:
    """A Llama-family causal LM kept resident, a paged KV cache and a pool of ``max_loras`` mix slots."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **options) -> None:  # fmt: skip
        """Load a model directory; ``options`` as :meth:`from_model`'s."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(model_dir)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ServingError(
                f"model type {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
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
        default_kv_tokens: int = 32 * 4096,
        memory_utilization: float = 0.9,
        reserve_bytes: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        """``max_loras``: slots of the factor pool (mixes outside the adapter family); ``core_slots``: slots
        of the core pool (mixes over the family, a few hundred KB to MB each).
        ``kv_cache_bytes`` None: on CUDA, ``memory_utilization`` of the device less what the weights use
        and ``reserve_bytes`` for merged mixes, the mix pool and activations (default: 15% of what the
        weights leave); elsewhere room for ``default_kv_tokens`` tokens (at most 32 full contexts).
        ``cuda_graphs``: on CUDA, decode steps replay captured graphs (``cuda_graphs.py``)."""
        config = hf.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ServingError(f"model type {config.model_type!r} is not supported")
        self.tokenizer, self.name, self.config = tokenizer, name, config
        self.device, self.dtype = hf.lm_head.weight.device, hf.lm_head.weight.dtype
        inner = hf.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm
        self.lm_head = hf.lm_head.weight
        self.rotary = inner.rotary_emb
        self.layers = list(inner.layers)
        self.linears: dict[str, torch.nn.Linear] = {
            f"model.layers.{i}.{p}": layer.get_submodule(p) for i, layer in enumerate(self.layers) for p in PROJECTIONS
        }
        # [q|k|v] and [gate|up] as one GEMM each; the per-projection linears stay as views (shapes, o / down).
        self.fused = {
            f"{i}.{group}": fuse_linears([self.linears[group_prefix(i, group) + p] for p in GROUPS[group]])
            for i in range(len(self.layers))
            for group in ("qkv", "gateup")
        }
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
        self._hf = hf  # keeps the parameters alive
        self.kv = self._make_kv_cache(kv_cache_bytes, block_size, default_kv_tokens, memory_utilization, reserve_bytes)
        self._kv_tokens = [self.kv.layer(i) for i in range(len(self.layers))]  # [positions, 2 KV, d] views
        self._kv_blocks = [t.view(self.kv.num_blocks, block_size, *t.shape[1:]) for t in self._kv_tokens]
        shapes = {k: tuple(lin.weight.shape) for k, lin in self.linears.items()}
        groups = {f"{i}.{g}": (shapes[group_prefix(i, g) + names[0]][1], names,
                               [shapes[group_prefix(i, g) + n][0] for n in names])
                  for i in range(len(self.layers)) for g, names in GROUPS.items()}  # fmt: skip
        self.pool = LoraPool(groups, max_loras, self.dtype, self.device)
        self.cores = CorePool(groups, core_slots, self.dtype, self.device)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from server.cuda_graphs import DecodeGraphs

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
        return prepare_lora(factors, len(self.layers), self.device, self.dtype)

    def cores_to_device(self, core_mix: CoreMix) -> PreparedCores:
        """A core-space merge laid out by input group on the serving device (its family's shapes are the
        base model's: adapters are checked against them when registered)."""
        return prepare_cores(core_mix, len(self.layers), self.device, self.dtype)

    # ----------------------------------------------------------------------------------------- mixes
    def can_acquire(self, mix: PreparedLora | PreparedCores | None) -> bool:
        """Whether a slot for ``mix`` is free (or it is loaded already): admission waits otherwise."""
        if isinstance(mix, PreparedCores):
            return self.cores.can_acquire(mix)
        return self.pool.can_acquire(mix)

    def acquire(self, mix: PreparedLora | PreparedCores | None) -> tuple[int, int]:
        """``(factor slot, core slot)`` for a sequence on ``mix`` (0 where it uses neither pool). Pair with
        :meth:`release`."""
        if isinstance(mix, PreparedCores):
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

    @staticmethod
    def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm as one fused op (HF's module runs eight: casts, pow, mean, rsqrt, muls).
        Equal in fp32; in bf16 it rounds once where HF rounds twice (at most 1 ulp apart)."""
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, where: torch.Tensor, side: SidePlan | None,
                 core: CorePlan | None, attend) -> torch.Tensor:  # fmt: skip
        """Packed tokens (``where``: their cache positions; rows sorted by factor-pool slot) through every
        layer; ``side`` / ``core``: the factor and core pools' plans for the step (None: no row uses that
        pool). ``attend(i, q, heads)`` is layer ``i``'s attention, called after the tokens' keys and values
        are in the cache. Returns the last hidden states. Device tensors in, so a graph can capture it."""
        h = self.embed[ids]  # [N, hidden]
        cos, sin = self.rotary(h, positions[None])  # [1, N, d]
        half = self.head_dim // 2  # rotate_half(x) = roll(x, half) with the first half's sign in sin
        cos, sin = (
            cos[0, :, None].to(h.dtype),
            torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1)[:, None].to(h.dtype),
        )
        for i, layer in enumerate(self.layers):
            x = self._norm(layer.input_layernorm, h)
            fused = self.fused[f"{i}.qkv"]
            qkv = F.linear(x, fused.weight, fused.bias)
            if side is not None:
                self.pool.add_side(f"{i}.qkv", x, qkv, side)
            if core is not None:
                self.cores.add_side(f"{i}.qkv", x, qkv, core)
            heads = qkv.view(len(h), self.heads + 2 * self.kv_heads, self.head_dim)
            qk = heads[:, : self.heads + self.kv_heads]
            torch.addcmul(qk * cos, qk.roll(half, -1), sin, out=qk)  # rotary, in place
            self._kv_tokens[i][where] = heads[:, self.heads :]  # keys and values of every token, one write
            attn = attend(i, heads[:, : self.heads], heads)
            o = self._base(f"model.layers.{i}.self_attn.o_proj", attn)
            if side is not None:
                self.pool.add_side(f"{i}.o", attn, o, side)
            if core is not None:
                self.cores.add_side(f"{i}.o", attn, o, core)
            h = h + o
            x = self._norm(layer.post_attention_layernorm, h)
            fused = self.fused[f"{i}.gateup"]
            gate_up = F.linear(x, fused.weight, fused.bias)
            if side is not None:
                self.pool.add_side(f"{i}.gateup", x, gate_up, side)
            if core is not None:
                self.cores.add_side(f"{i}.gateup", x, gate_up, core)
            gate, up = gate_up.split(fused.sizes, dim=-1)
            act = F.silu(gate) * up
            down = self._base(f"model.layers.{i}.mlp.down_proj", act)
            if side is not None:
                self.pool.add_side(f"{i}.down", act, down, side)
            if core is not None:
                self.cores.add_side(f"{i}.down", act, down, core)
            h = h + down
        return h

    def _base(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lin = self.linears[name]
        return F.linear(x, lin.weight, lin.bias)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(self.final_norm, h), self.lm_head).float()

    def _slot_mapping(self, blocks: Sequence[int], start: int, end: int) -> list[int]:
        bs = self.kv.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]) -> torch.Tensor:
        """Several prompts' chunks in one forward: the logits after each chunk's last token, ``[chunks, vocab]``
        fp32 (in the order given). Each chunk's keys and values go to its blocks."""
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

        history = [self._chunk_blocks(ch, b - a) for a, b, ch in spans]  # once, not per layer

        def attend(i: int, q: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
            outs = [chunk_attention(self._kv_blocks[i], blocks, q[a:b], heads[a:b, self.heads :], ch.start, self.window)
                    for (a, b, ch), blocks in zip(spans, history, strict=True)]  # fmt: skip
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        side, core = self.pool.plan(slots, self._tensor), self.cores.plan(core_slots, self._tensor)
        h = self._forward(self._tensor(ids), self._tensor(positions), self._tensor(where), side, core, attend)
        last = self._tensor([b - 1 for _, b, _ in spans])
        logits = self._logits(h[last])
        return logits if order == sorted(order) else logits[self._tensor(_inverse(order))]

    def _chunk_blocks(self, ch: PrefillChunk, n: int) -> torch.Tensor | None:
        """The blocks a chunk of ``n`` tokens attends over (None for a first chunk: its own keys suffice)."""
        return self._tensor(list(ch.blocks[: self.kv.blocks_for(ch.start + n)])) if ch.start else None

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
        if self.graphs is not None:
            logits = self.graphs.run(rows, tables, where)
        else:
            side = self.pool.plan([r.lora_slot for r in rows], self._tensor)
            core = self.cores.plan([r.core_slot for r in rows], self._tensor)
            logits = self._decode_core(self._tensor([r.token for r in rows]), self._tensor([r.position for r in rows]),
                                       self._tensor(where), self._tensor(tables), side, core)  # fmt: skip
        return logits if order == sorted(order) else logits[self._tensor(_inverse(order))]

    def key_blocks(self, position: int) -> int:
        """Blocks every row of a decode step reads when its furthest row is at ``position``: the batch's
        widest, rounded up to a power of two of keys (at least ``MIN_KEYS``) so the key width takes few
        values (and graph buckets); rows read their own blocks, then the null block."""
        return -(-max(MIN_KEYS, 1 << position.bit_length()) // self.kv.block_size)

    def key_widths(self) -> list[int]:
        """Every value :meth:`key_blocks` takes within the context."""
        return sorted({self.key_blocks((1 << k) - 1) for k in range(self.max_len.bit_length() + 1)
                       if (1 << k) - 1 < self.max_len} | {self.key_blocks(self.max_len - 1)})  # fmt: skip

    def _decode_core(self, ids: torch.Tensor, positions: torch.Tensor, where: torch.Tensor, table: torch.Tensor,
                     side: SidePlan | None, core: CorePlan | None, logits: bool = True) -> torch.Tensor:  # fmt: skip
        """The decode step on device tensors (what a CUDA graph captures): ``table`` ``[rows, blocks]``.
        Logits, or with ``logits=False`` the last hidden states (graphs stop there: ``[rows, vocab]`` fp32
        per captured shape would be memory no budget counts)."""
        mask = key_mask(table.shape[1] * self.kv.block_size, positions, self.window)[:, None, None, :]

        def attend(i: int, q: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
            return decode_attention(self._kv_blocks[i], table, q, mask)

        h = self._forward(ids, positions, where, side, core, attend)
        return self._logits(h) if logits else h


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for row, original in enumerate(order):
        inverse[original] = row
    return inverse
