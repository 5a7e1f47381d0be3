"""The model families the runtime serves: one row each, saying only what differs from Llama.

One forward (``runtime.py``, ``decoder.py``) serves every family. A family is a row of switches, in the
spirit of gpt-fast's ``ModelArgs`` table and vLLM's per-architecture config flags, not a copy of its
forward; what varies within a family (head sizes, windows, soft-caps, rope scaling) is read from the
checkpoint's ``config.json`` by :func:`resolve`, which also refuses what the runtime cannot serve in
one sentence.

| family | switches | from the config |
|---|---|---|
| ``llama``, ``mistral``, ``qwen2`` | (the reference) | GQA, q/k/v biases (Qwen2), ``rope_type`` (llama3, YaRN, linear) |
| ``qwen3`` | ``qk_norm`` | explicit ``head_dim``, ``layer_types`` windows |
| ``gemma`` | ``unit_offset_norms`` | GELU-tanh |
| ``gemma2`` | ``unit_offset_norms``, ``sandwich_norms``, ``attn_softcap`` | ``query_pre_attn_scalar``, soft-caps, alternating windows |
| ``gemma3_text`` | as Gemma 2 less ``attn_softcap``, plus ``qk_norm``, ``rope_by_layer_type`` | local / global rope bases, window pattern |
| ``phi3`` | fused ``qkv_proj`` / ``gate_up_proj`` groups | partial rotary, ``sliding_window`` |

Embeddings go through the checkpoint's own embedding module (Gemma's scales by ``sqrt(hidden)``,
rounded to the model's dtype, as transformers does); rotary frequencies are those transformers'
rotary module computed for the config (``inv_freq`` and ``attention_scaling``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("mixserve.runtime")

# Input group -> its projections (module paths under ``model.layers.<i>``): projections that read the same
# input run as one GEMM, and the mix pools add one side path per group.
Groups = tuple[tuple[str, tuple[str, ...]], ...]
LLAMA_GROUPS: Groups = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", ("self_attn.o_proj",)),
    ("gateup", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", ("mlp.down_proj",)),
)
# Phi-3's checkpoints store [q|k|v] and [gate|up] fused (and adapters target the fused modules).
FUSED_GROUPS: Groups = (
    ("qkv", ("self_attn.qkv_proj",)),
    ("o", ("self_attn.o_proj",)),
    ("gateup", ("mlp.gate_up_proj",)),
    ("down", ("mlp.down_proj",)),
)
# Rotary types whose frequencies change with the sequence's length: transformers recomputes them per
# call from the longest position, which a batch of unrelated sequences does not have. Below the
# original context they are the unscaled frequencies, so contexts are capped there.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class UnsupportedModelError(ValueError):
    """A checkpoint the runtime cannot serve (the message is one sentence naming what is supported)."""


@dataclass(frozen=True)
class Family:
    """What a model family's decoder layer does differently from Llama's."""

    groups: Groups = LLAMA_GROUPS
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (q_norm, k_norm)
    unit_offset_norms: bool = False  # RMSNorm scales by (1 + w), computed in fp32
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (before the residual add)
    attn_softcap: bool = False  # the config's attn_logit_softcapping caps attention scores (Gemma 3 ignores it)
    rope_by_layer_type: bool = False  # rotary frequencies per layer type (Gemma 3: local / global bases)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
    "gemma": Family(unit_offset_norms=True),
    "gemma2": Family(unit_offset_norms=True, sandwich_norms=True, attn_softcap=True),
    "gemma3_text": Family(unit_offset_norms=True, sandwich_norms=True, qk_norm=True, rope_by_layer_type=True),
    "phi3": Family(groups=FUSED_GROUPS),
}


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint's family and the config values the forward needs, one entry per layer where they vary."""

    model_type: str
    family: Family
    heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]  # per layer: sliding-window size, or None (full attention)
    rope_keys: tuple[str | None, ...]  # per layer: which rotary frequencies (a layer type, or None: the one set)
    activation: str
    attn_scale: float | None  # None: head_dim ** -0.5
    attn_softcap: float | None
    final_softcap: float | None
    max_positions: int  # the longest context the config's rotary embedding is served for

    def projections(self, layers: int) -> dict[str, list[str]]:
        """``"<layer>.<group>" -> [module names]``: the input groups of every layer."""
        return {f"{i}.{g}": [f"model.layers.{i}.{p}" for p in names]
                for i in range(layers) for g, names in self.family.groups}  # fmt: skip


# Near misses users bring, with what to say about them (still one sentence).
HINTS = {
    "gemma3": "the multimodal Gemma 3 (4B and up); its text-only checkpoints (gemma3_text, e.g. Gemma 3 1B) are served",
    "mixtral": "mixture-of-experts layers are not served",
    "qwen2_moe": "mixture-of-experts layers are not served",
    "qwen3_moe": "mixture-of-experts layers are not served",
    "phimoe": "mixture-of-experts layers are not served",
}


def supported() -> str:
    return ", ".join(FAMILIES)


def resolve(config) -> ModelSpec:
    """The :class:`ModelSpec` of a transformers config; :class:`UnsupportedModelError` when it cannot be served."""
    model_type = config.model_type
    family = FAMILIES.get(model_type)
    if family is None:
        hint = f": {HINTS[model_type]}" if model_type in HINTS else ""
        raise UnsupportedModelError(f"model type {model_type!r} is not supported (supported: {supported()}){hint}")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention is an encoder, not a causal LM")
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    windows = _windows(config, layers)
    rope_keys = tuple(config.layer_types) if family.rope_by_layer_type else (None,) * layers
    scalar = getattr(config, "query_pre_attn_scalar", None)
    return ModelSpec(
        model_type=model_type,
        family=family,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        windows=windows,
        rope_keys=rope_keys,
        activation=getattr(config, "hidden_activation", None) or config.hidden_act,
        attn_scale=scalar**-0.5 if scalar is not None else None,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) if family.attn_softcap else None,
        final_softcap=getattr(config, "final_logit_softcapping", None),
        max_positions=_max_positions(config),
    )


def _windows(config, layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window: ``layer_types`` where the config has them, else every layer (Mistral,
    Phi-3) when ``sliding_window`` is set and not switched off."""
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):
        window = None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(window if t == "sliding_attention" else None for t in types[:layers])
    return (window,) * layers


def _max_positions(config) -> int:
    """``max_position_embeddings``, or the original context for length-dependent rotary types."""
    limit = config.max_position_embeddings
    params = getattr(config, "rope_parameters", None) or {}
    per_type = params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]
    for p in per_type:
        if p.get("rope_type") in LENGTH_DEPENDENT_ROPE:
            original = (p.get("original_max_position_embeddings")
                        or getattr(config, "original_max_position_embeddings", None) or limit)  # fmt: skip
            if original < limit:
                log.warning("rope_type %r: contexts capped at the original %d positions (transformers changes its "
                            "frequencies with the sequence's length past them)", p["rope_type"], original)  # fmt: skip
            limit = min(limit, original)
    return limit
