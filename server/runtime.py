"""The model runtime: the resident base model, its KV cache slots and the batched LoRA side path.

It owns every tensor of the serving path; it knows nothing about requests, HTTP or scheduling.

The forward pass is written here (gpt-fast style) over the weights of a Hugging Face Llama-family
model (Llama, Mistral, Qwen2: the same module names), so that one decode step can run sequences of
different lengths, each in its own KV-cache slot, and each adapted linear layer can add every
sequence's own mix:

    y = x W^T (+ b) + sum over mixes m of  (x_m A_m^T) B_m^T      (x_m: the rows of the sequences on m)

Rows are grouped by mix into contiguous segments (the scheduler sorts them), so each mix costs two
small matrix products per layer (Punica / S-LoRA's segmented gather, without a custom kernel).
Fewer ops per layer: [q|k|v] and [gate|up] run as one GEMM each (weights concatenated at load, the
projections' own weights turned into views of them), RMSNorm is one fused op, and the rotary cos / sin
are computed once per forward and applied to q's and k's heads in one pass (``bench/ops.py`` counts).

Batch invariance: greedy tokens must not depend on the rest of the batch. Decode attention reads each
slot up to the batch's longest sequence (rounded up to a block) with the tail masked; masked keys add
exact zeros, so only the batch size of the matrix products varies (tests check the tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
WINDOW_BLOCK = 64  # decode attention reads keys in multiples of this
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip

# module name -> (A [r, in], B [out, r] with the LoRA scale folded in)
LoraFactorsByModule = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
# Projections that read the same input share one A product: [q|k|v] and [gate|up].
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gateup": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}  # fmt: skip


@dataclass(frozen=True)
class LoraGroup:
    """One layer's projections that share an input: ``t = x A_cat^T`` once, then ``y_j += t_j B_j^T``."""

    A_T: torch.Tensor  # [in, sum of the members' ranks]
    members: tuple[tuple[str, int, int, torch.Tensor], ...]  # (projection, rank start, rank end, B_j^T [r_j, out])


class PreparedLora:
    """A merged mix laid out for the side path: per layer and input group, on the serving device."""

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
        out = {}
        for key, g in self.groups.items():
            layer, group = key.split(".")
            prefix = "self_attn" if group in ("qkv", "o") else "mlp"
            for proj, r0, r1, B_T in g.members:
                out[f"model.layers.{layer}.{prefix}.{proj}"] = (g.A_T[:, r0:r1].T, B_T.T)
        return out


@dataclass(frozen=True)
class FusedLinear:
    """Projections that read the same input as one weight (``[q|k|v]``, ``[gate|up]``): one GEMM, not three."""

    weight: torch.Tensor  # [sum of outs, in]
    bias: torch.Tensor | None
    sizes: tuple[int, ...]  # each member's output features, in ``GROUPS`` order


def fuse_linears(linears: Sequence[torch.nn.Linear]) -> FusedLinear:
    """Concatenate the members' weights (and biases) and make each member's parameters views into the
    result, so the fused copy does not double the weights' memory."""
    with torch.no_grad():
        sizes = tuple(lin.out_features for lin in linears)
        weight = torch.cat([lin.weight for lin in linears])
        biased = [lin.bias is not None for lin in linears]
        bias = None
        if any(biased):
            zero = linears[0].weight.new_zeros
            bias = torch.cat([lin.bias if lin.bias is not None else zero(lin.out_features) for lin in linears])
        biases = bias.split(sizes) if bias is not None else [None] * len(linears)
        for lin, w, b, has_bias in zip(linears, weight.split(sizes), biases, biased, strict=True):
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            if has_bias:
                lin.bias = torch.nn.Parameter(b, requires_grad=False)
    return FusedLinear(weight, bias, sizes)


class ServingError(RuntimeError):
    """The model cannot be served (unsupported architecture, no free KV slot, prompt too long)."""


@dataclass(frozen=True)
class Segment:
    """Rows ``start:end`` of a batch share one mix (``None``: the base model alone)."""

    start: int
    end: int
    lora: PreparedLora | None


class KVCache:
    """Fixed slots of ``max_len`` positions per layer: memory is bounded at construction."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self._free = list(range(slots - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise ServingError("no free KV-cache slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"KV slot {slot} released twice")
        self._free.append(slot)


class ModelRuntime:
    """A Llama-family causal LM kept resident, with ``max_seqs`` KV slots of ``max_len`` tokens."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_seqs: int = 32,
        max_len: int | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(model_dir)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ServingError(
                f"model type {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.name = Path(model_dir).name
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
            f"{i}.{group}": fuse_linears([self.linears[f"model.layers.{i}.{sub}.{p}"] for p in GROUPS[group]])
            for i in range(len(self.layers))
            for group, sub in (("qkv", "self_attn"), ("gateup", "mlp"))
        }
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
        self.kv = KVCache(len(self.layers), max_seqs, self.kv_heads, self.max_len, self.head_dim, dtype, self.device)
        self._hf = hf  # keeps the parameters alive

    # ----------------------------------------------------------------------------------- inspection
    def base_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{"<module>.weight": shape}`` of every adaptable projection (what adapters are checked against)."""
        return {f"{name}.weight": tuple(lin.weight.shape) for name, lin in self.linears.items()}

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._hf.parameters())

    # -------------------------------------------------------------------------------------- forward
    def _base(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lin = self.linears[name]
        return F.linear(x, lin.weight, lin.bias)

    def _side(self, key: str, x: torch.Tensor, outs: dict[str, torch.Tensor], segments: Sequence[Segment]) -> None:
        """Add each segment's mix to the outputs of one input group, in place."""
        for seg in segments:
            group = seg.lora.groups.get(key) if seg.lora is not None else None
            if group is None:
                continue
            whole = seg.start == 0 and seg.end == x.shape[0]
            t = (x if whole else x[seg.start : seg.end]) @ group.A_T
            for proj, r0, r1, B_T in group.members:
                out = outs[proj] if whole else outs[proj][seg.start : seg.end]
                out.add_(t[..., r0:r1] @ B_T)

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[B, T, 1, d]`` for ``positions``: once per forward, shared by every layer and head."""
        cos, sin = self.rotary(x, positions)  # [B, T, d]
        return cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)

    @staticmethod
    def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm as one fused op (HF's module runs eight: casts, pow, mean, rsqrt, muls).
        Equal in fp32; in bf16 it rounds once where HF rounds twice (at most 1 ulp apart)."""
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)

    def _qkv(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: Sequence[Segment]):
        """q [B, H, T, d], k and v [B, KV, T, d] with rotary embeddings (``rope``: cos, sin) applied."""
        b, t, _ = x.shape
        fused = self.fused[f"{i}.qkv"]
        qkv = F.linear(x, fused.weight, fused.bias)
        self._side(f"{i}.qkv", x, dict(zip(GROUPS["qkv"], qkv.split(fused.sizes, dim=-1), strict=True)), segments)
        heads = qkv.view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
        cos, sin = rope
        qk = _rope(heads[:, :, : self.heads + self.kv_heads], cos, sin)  # q's and k's heads in one pass
        q = qk[:, :, : self.heads].transpose(1, 2)
        k = qk[:, :, self.heads :].transpose(1, 2)
        return q, k, heads[:, :, self.heads + self.kv_heads :].transpose(1, 2)

    def _mlp_block(self, i: int, h: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        layer, p = self.layers[i], f"model.layers.{i}.mlp."
        x = self._norm(layer.post_attention_layernorm, h)
        fused = self.fused[f"{i}.gateup"]
        outs = dict(
            zip(GROUPS["gateup"], F.linear(x, fused.weight, fused.bias).split(fused.sizes, dim=-1), strict=True)
        )
        self._side(f"{i}.gateup", x, outs, segments)
        act = F.silu(outs["gate_proj"]) * outs["up_proj"]
        down = {"down_proj": self._base(p + "down_proj", act)}
        self._side(f"{i}.down", act, down, segments)
        return h + down["down_proj"]

    def _attn_out(self, i: int, attn: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        x = _merge_heads(attn)
        out = {"o_proj": self._base(f"model.layers.{i}.self_attn.o_proj", x)}
        self._side(f"{i}.o", x, out, segments)
        return out["o_proj"]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(self.final_norm, h), self.lm_head).float()

    @torch.inference_mode()
    def prefill(self, slot: int, ids: Sequence[int], lora: PreparedLora | None) -> torch.Tensor:
        """Run a whole prompt in KV slot ``slot``; the logits of its last position, ``[vocab]`` fp32."""
        t = len(ids)
        if not 0 < t < self.max_len:
            raise ServingError(f"prompt of {t} tokens does not fit the {self.max_len}-token context")
        segments = [Segment(0, 1, lora)]
        h = self.embed[torch.tensor([list(ids)], device=self.device)]
        positions = torch.arange(t, device=self.device).unsqueeze(0)
        rope = self._rotary(h, positions)
        mask = None
        if self.window is not None and self.window < t:
            j = torch.arange(t, device=self.device)
            mask = (j[None, :] <= j[:, None]) & (j[None, :] > j[:, None] - self.window)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, self._norm(layer.input_layernorm, h), rope, segments)
            self.kv.k[i, slot, :, :t] = k[0]
            self.kv.v[i, slot, :, :t] = v[0]
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.kv_heads != self.heads
            )
            h = h + self._attn_out(i, attn, segments)
            h = self._mlp_block(i, h, segments)
        return self._logits(h[0, -1])

    @torch.inference_mode()
    def decode(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int], segments: Sequence[Segment]
    ) -> torch.Tensor:
        """One token for each sequence (its slot holds ``positions[j]`` earlier tokens): logits ``[B, vocab]``."""
        dev = self.device
        slot_t = torch.tensor(list(slots), device=dev)
        pos_t = torch.tensor(list(positions), device=dev)
        if int(pos_t.max()) >= self.max_len:
            raise ServingError(f"a sequence reached the {self.max_len}-token context")
        h = self.embed[torch.tensor(list(tokens), device=dev)].unsqueeze(1)  # [B, 1, hidden]
        # Keys up to the batch's longest sequence, rounded up to a block, are read (not the whole
        # slot): the masked tail contributes exact zeros, and the kernels walk keys in fixed blocks
        # from position 0, so a row's result does not depend on the others (tested).
        window = min(self.max_len, -(-(int(pos_t.max()) + 1) // WINDOW_BLOCK) * WINDOW_BLOCK)
        j = torch.arange(window, device=dev)
        valid = j[None, :] <= pos_t[:, None]
        if self.window is not None:
            valid &= j[None, :] > pos_t[:, None] - self.window
        mask = valid[:, None, None, :]  # [B, 1, 1, window]
        rope = self._rotary(h, pos_t.unsqueeze(1))
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, self._norm(layer.input_layernorm, h), rope, segments)
            self.kv.k[i, slot_t, :, pos_t] = k[:, :, 0]
            self.kv.v[i, slot_t, :, pos_t] = v[:, :, 0]
            keys, values = self.kv.k[i][slot_t, :, :window], self.kv.v[i][slot_t, :, :window]  # [B, KV, window, d]
            attn = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=self.kv_heads != self.heads
            )
            h = h + self._attn_out(i, attn, segments)
            h = self._mlp_block(i, h, segments)
        return self._logits(h[:, -1])

    def lora_to_device(self, factors: LoraFactorsByModule) -> PreparedLora:
        """Merged factors checked against the base shapes, grouped by shared input, in the runtime's
        device and dtype (A's of one group concatenated; B's transposed for ``t @ B^T``)."""
        by_module = {}
        for name, (A, B) in factors.items():
            lin = self.linears.get(name)
            if lin is None:
                raise ServingError(f"module {name!r} is not an adaptable projection of the base model")
            if (B.shape[0], A.shape[1]) != tuple(lin.weight.shape):
                raise ServingError(
                    f"module {name!r}: delta {B.shape[0]}x{A.shape[1]} vs weight {tuple(lin.weight.shape)}"
                )
            by_module[name] = (A, B)
        groups = {}
        for i in range(len(self.layers)):
            for group, projections in GROUPS.items():
                prefix = f"model.layers.{i}.{'self_attn' if group in ('qkv', 'o') else 'mlp'}."
                present = [(p, *by_module[prefix + p]) for p in projections if prefix + p in by_module]
                if not present:
                    continue
                A_cat = torch.cat([A for _, A, _ in present], dim=0)
                members, r0 = [], 0
                for p, A, B in present:
                    members.append((p, r0, r0 + A.shape[0], B.T.to(self.device, self.dtype).contiguous()))
                    r0 += A.shape[0]
                groups[f"{i}.{group}"] = LoraGroup(A_cat.T.to(self.device, self.dtype).contiguous(), tuple(members))
        return PreparedLora(groups)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _merge_heads(attn: torch.Tensor) -> torch.Tensor:
    b, h, t, d = attn.shape
    return attn.transpose(1, 2).reshape(b, t, h * d)
