"""The decoder stack's math over a transformers model's weights: one forward for every family.

A step's tokens are packed into one ``[tokens, hidden]`` batch (decode: one token per sequence; prefill:
chunks of several prompts), so every linear layer is one GEMM over all of them, plus every row's own mix
through the pools' side paths (``lora_pool.py``, ``member_pool.py``). A layer, with the switches of
``architectures.py`` in brackets:

    x = norm(h);  qkv = x W_qkv (+ b) + side;  [q, k] = norm per head [qk_norm];  rotary (partial: Phi-3)
    keys and values -> the paged cache;  a = attention (scale, soft-cap [attn_softcap], window per layer)
    o = a W_o + side;  [o = norm(o): sandwich_norms];  h += o
    x = norm(h);  g, u = x W_gateup + side;  d = (act(g) * u) W_down + side;  [d = norm(d)];  h += d

Fewer ops per layer than transformers' modules: [q|k|v] and [gate|up] are one GEMM each (weights
concatenated at load, the projections' own weights turned into views of them), RMSNorm is one fused op,
rotary cos / sin are computed once per step (per layer type) and applied to q's and k's heads in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from transformers.activations import ACT2FN

from server.worker.architectures import ModelSpec
from server.worker.fused_linear import FusedLinear, fuse_linears

# attend(layer, q [N, H, d], heads [N, H + 2 KV, d]) -> [N, H * d], called once the keys are cached
Attend = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Norm:
    """An RMSNorm as one fused op: ``rms_norm(x) * w`` (Llama, Qwen) or, with ``upcast``, in fp32 and cast
    back (Gemma's ``(1 + w)``, folded into ``weight`` at load). ``weight`` may cover several heads
    (``[heads, d]``: q and k normalised in one call). In fp32 equal to transformers' modules; in bf16 it
    rounds once where they round twice (at most 1 ulp apart)."""

    weight: torch.Tensor
    eps: float
    upcast: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = (x.shape[-1],)
        if self.upcast and x.dtype != torch.float32:
            return Norm(self.weight, self.eps, False)(x.float()).to(x.dtype)
        if self.weight.dim() == 1:
            return F.rms_norm(x, d, self.weight, self.eps)
        return F.rms_norm(x, d, eps=self.eps) * self.weight


def make_norm(module: torch.nn.Module, unit_offset: bool, rows: int = 0) -> Norm:
    """A :class:`Norm` from a transformers RMSNorm module (``rows``: repeat the weight for that many heads)."""
    eps = getattr(module, "variance_epsilon", None) or module.eps
    w = module.weight.detach()
    w = (1.0 + w.float()) if unit_offset else w
    return Norm(w.expand(rows, -1).contiguous() if rows else w, eps, unit_offset)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's norms and fused projections, as the forward reads them."""

    attn_norm: Norm
    mlp_norm: Norm  # post_attention_layernorm (Llama) or pre_feedforward_layernorm (sandwich norms)
    qkv: FusedLinear
    o: torch.nn.Linear
    gateup: FusedLinear
    down: torch.nn.Linear
    qk_norm: Norm | None = None  # [H + KV, d]: q_norm's weight on q's heads, k_norm's on k's
    attn_out_norm: Norm | None = None  # sandwich norms: post_attention_layernorm
    mlp_out_norm: Norm | None = None  # sandwich norms: post_feedforward_layernorm


class Decoder:
    """A transformers causal LM's decoder stack served through the runtime's cache and pools."""

    def __init__(self, hf: torch.nn.Module, spec: ModelSpec) -> None:
        self.spec = spec
        fam = spec.family
        inner = hf.model
        self.embed_tokens = inner.embed_tokens  # Gemma's scales by sqrt(hidden): its own module does it
        self.final_norm = make_norm(inner.norm, fam.unit_offset_norms)
        self.lm_head = hf.lm_head.weight
        self.rotary = inner.rotary_emb
        self._rope_kinds = tuple(dict.fromkeys(spec.rope_keys))  # the distinct rotary frequency sets
        self.act = ACT2FN[spec.activation]
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.layers_hf = list(inner.layers)
        n = len(self.layers_hf)
        self.groups = spec.projections(n)  # "<layer>.<group>" -> module names
        self.linears: dict[str, torch.nn.Linear] = {
            name: hf.get_submodule(name) for names in self.groups.values() for name in names
        }
        # [q|k|v] and [gate|up] as one GEMM each (Phi-3's checkpoints have them fused already).
        self.fused = {key: fuse_linears([self.linears[m] for m in self.groups[key]])
                      for key in self.groups if key.endswith((".qkv", ".gateup"))}  # fmt: skip
        self.layers = [self._layer_weights(i, layer) for i, layer in enumerate(self.layers_hf)]

    def _layer_weights(self, i: int, layer: torch.nn.Module) -> LayerWeights:
        fam, unit = self.spec.family, self.spec.family.unit_offset_norms
        qk_norm = None
        if fam.qk_norm:
            q = make_norm(layer.self_attn.q_norm, unit, self.heads)
            k = make_norm(layer.self_attn.k_norm, unit, self.kv_heads)
            qk_norm = Norm(torch.cat([q.weight, k.weight]), q.eps, unit)
        sandwich = fam.sandwich_norms
        return LayerWeights(
            attn_norm=make_norm(layer.input_layernorm, unit),
            mlp_norm=make_norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm, unit),
            qkv=self.fused[f"{i}.qkv"],
            o=self.linears[self.groups[f"{i}.o"][0]],
            gateup=self.fused[f"{i}.gateup"],
            down=self.linears[self.groups[f"{i}.down"][0]],
            qk_norm=qk_norm,
            attn_out_norm=make_norm(layer.post_attention_layernorm, unit) if sandwich else None,
            mlp_out_norm=make_norm(layer.post_feedforward_layernorm, unit) if sandwich else None,
        )

    # ----------------------------------------------------------------------------------------- rotary
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """Per rotary key (layer type, or None): ``cos [N, 1, r]`` and ``sin [N, 1, r]`` with rotate_half's
        sign folded into ``sin``'s first half, ``r`` the rotary width (< head_dim: partial rotary). The
        frequencies are the ones transformers' rotary module computed for the config (rope scaling
        included); computed here so nothing depends on the batch's longest position."""
        out = {}
        for key in self._rope_kinds:
            prefix = f"{key}_" if key is not None else ""
            inv_freq = getattr(self.rotary, f"{prefix}inv_freq")
            scaling = getattr(self.rotary, f"{prefix}attention_scaling")
            freqs = positions[:, None].float() * inv_freq.to(positions.device, torch.float32)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
            half = emb.shape[-1] // 2
            out[key] = cos[:, None], torch.cat((-sin[:, :half], sin[:, half:]), -1)[:, None]
        return out

    def _rotate(self, heads: torch.Tensor, norm: Norm | None, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """q's and k's heads (``heads[:, :H + KV]``) normalised per head (qk_norm) and rotated, in place."""
        qk = heads[:, : self.heads + self.kv_heads]
        src = norm(qk) if norm is not None else qk
        r = cos.shape[-1]
        if r == self.head_dim:  # rotate_half(x) = roll(x, half) with the first half's sign in sin
            torch.addcmul(src * cos, src.roll(r // 2, -1), sin, out=qk)
            return
        if norm is not None:
            qk.copy_(src)
        rot = qk[..., :r]  # partial rotary (Phi-3 / Phi-4 mini): the rest passes through
        rot.copy_(torch.addcmul(rot * cos, rot.roll(r // 2, -1), sin))

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, where: torch.Tensor, kv_tokens: list[torch.Tensor],
                sides: list, attend: Attend) -> torch.Tensor:  # fmt: skip
        """Packed tokens (``where``: their cache positions) through every layer; ``sides``: ``(pool, plan)``
        pairs adding each row's mix to every input group's output (empty: base model only).
        ``attend(i, q, heads)``: layer ``i``'s attention, called once the tokens' keys and values are in
        ``kv_tokens[i]``. Returns the last hidden states. Device tensors in, so a graph can capture it."""
        h = self.embed_tokens(ids)  # [N, hidden]
        ropes = self.rope(positions, h.dtype)
        for i, w in enumerate(self.layers):
            x = w.attn_norm(h)
            qkv = F.linear(x, w.qkv.weight, w.qkv.bias)
            for pool, plan in sides:
                pool.add_side(f"{i}.qkv", x, qkv, plan)
            heads = qkv.view(len(h), self.heads + 2 * self.kv_heads, self.head_dim)
            self._rotate(heads, w.qk_norm, *ropes[self.spec.rope_keys[i]])
            kv_tokens[i][where] = heads[:, self.heads :]  # keys and values of every token, one write
            attn = attend(i, heads[:, : self.heads], heads)
            o = F.linear(attn, w.o.weight, w.o.bias)
            for pool, plan in sides:
                pool.add_side(f"{i}.o", attn, o, plan)
            h = h + (w.attn_out_norm(o) if w.attn_out_norm is not None else o)
            x = w.mlp_norm(h)
            gate_up = F.linear(x, w.gateup.weight, w.gateup.bias)
            for pool, plan in sides:
                pool.add_side(f"{i}.gateup", x, gate_up, plan)
            gate, up = gate_up.chunk(2, dim=-1)  # [gate|up], fused at load or in the checkpoint (Phi-3)
            act = self.act(gate) * up
            down = F.linear(act, w.down.weight, w.down.bias)
            for pool, plan in sides:
                pool.add_side(f"{i}.down", act, down, plan)
            h = h + (w.mlp_out_norm(down) if w.mlp_out_norm is not None else down)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the last hidden states (with Gemma's final soft-cap)."""
        logits = F.linear(self.final_norm(h), self.lm_head).float()
        cap = self.spec.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits
