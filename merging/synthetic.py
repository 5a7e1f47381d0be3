"""Random Llama-shaped base models and LoRA adapters, for examples, tests and benchmarks.

Nothing can be downloaded here, so the merge CLI's example, the tests and ``bench/merge`` build their
inputs from a seed. The base model is written in the Hugging Face Llama layout (``config.json`` +
``model.safetensors``) that ``transformers.AutoModelForCausalLM`` loads; adapters are PEFT LoRA
directories. Their deltas are random, not trained: good for exercising merges, not for quality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from merging.adapters import LoraAdapter, LoraFactors, save_adapter

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTN + MLP


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that decide every projection's shape."""

    hidden: int = 64
    intermediate: int = 172
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def module_shapes(
        self, targets: tuple[str, ...] = ALL_LINEAR, layers: int | None = None
    ) -> dict[str, tuple[int, int]]:
        """``{module name: (out, in)}`` for the targeted projections of the first ``layers`` layers."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        per = {
            "q_proj": ("self_attn", h, h),
            "k_proj": ("self_attn", kv, h),
            "v_proj": ("self_attn", kv, h),
            "o_proj": ("self_attn", h, h),
            "gate_proj": ("mlp", i, h),
            "up_proj": ("mlp", i, h),
            "down_proj": ("mlp", h, i),
        }
        out = {}
        for layer in range(self.layers if layers is None else layers):
            for t in targets:
                block, o, n = per[t]
                out[f"model.layers.{layer}.{block}.{t}"] = (o, n)
        return out


# Mistral-7B-v0.1: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads (kv dim 1024).
MISTRAL_7B = LlamaShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32000)
# Qwen3-8B: hidden 4096, intermediate 12288, 36 layers, 32 heads of 128, 8 KV heads, a 151,936-token vocabulary.
QWEN3_8B = LlamaShape(hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, vocab=151936)


def write_tiny_llama(path: str | Path, shape: LlamaShape = LlamaShape(), seed: int = 0) -> Path:
    """Write a random Llama model (``LlamaForCausalLM`` layout, fp32, untied head) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(shape.vocab, shape.hidden, generator=g) * 0.02,
        "model.norm.weight": torch.ones(shape.hidden),
        "lm_head.weight": torch.randn(shape.vocab, shape.hidden, generator=g) * 0.02,
    }
    for name, (o, n) in shape.module_shapes().items():
        tensors[f"{name}.weight"] = torch.randn(o, n, generator=g) / n**0.5
    for layer in range(shape.layers):
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(shape.hidden)
        tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(shape.hidden)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def random_factors(
    shapes: dict[str, tuple[int, int]],
    rank: int,
    alpha: float,
    seed: int,
    *,
    b_std: float = 0.02,
    device: str | torch.device = "cpu",
) -> dict[str, LoraFactors]:
    """Random factors per module. B is non-zero (unlike a fresh LoRA), so every delta is non-trivial.

    Drawn on the CPU from ``seed`` (the same factors on every device), then moved to ``device``.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (o, n) in shapes.items():
        A = torch.randn(rank, n, generator=g) / n**0.5
        B = torch.randn(o, rank, generator=g) * b_std
        out[module] = LoraFactors(A=A.to(device), B=B.to(device), scale=alpha / rank)
    return out


def random_adapter(
    name: str,
    shapes: dict[str, tuple[int, int]],
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LoraAdapter:
    """An in-memory adapter with random factors (no files); fingerprint derived from the seed."""
    modules = random_factors(shapes, rank, alpha, seed, device=device)
    return LoraAdapter(name=name, modules=modules, fingerprint=f"random:{name}:{rank}:{alpha}:{seed}")


def write_random_adapter(
    path: str | Path,
    shapes: dict[str, tuple[int, int]],
    *,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    base_model: str | None = None,
) -> Path:
    """Write a random PEFT LoRA adapter directory (``alpha`` kept in the config, not folded in)."""
    factors = random_factors(shapes, rank, alpha, seed)
    save_adapter(path, {m: (f.A, f.B) for m, f in factors.items()}, base_model=base_model)
    cfg_path = Path(path) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"r": rank, "lora_alpha": alpha, "rank_pattern": {}, "alpha_pattern": {}})
    cfg["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in shapes})
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(path)


def write_example(out_dir: str | Path, shape: LlamaShape = LlamaShape(), rank: int = 8) -> dict[str, Path]:
    """A tiny base model and three adapters (``sql``, ``code``, ``json``) with different targets.

    ``sql`` adapts every linear layer, ``code`` only attention, ``json`` only the MLP, so merges
    exercise modules that some children leave untouched.
    """
    out = Path(out_dir)
    base = write_tiny_llama(out / "base", shape)
    targets = {"sql": ALL_LINEAR, "code": ATTN, "json": MLP}
    paths = {"base": base}
    for seed, (name, t) in enumerate(targets.items(), start=1):
        paths[name] = write_random_adapter(
            out / "adapters" / name,
            shape.module_shapes(t),
            rank=rank,
            alpha=2.0 * rank,
            seed=seed,
            base_model=str(base),
        )
    return paths
