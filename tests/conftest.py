"""Shared fixtures: a tiny random Llama on disk and real PEFT adapters trained on nothing.

Everything is built from seeds; no test downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from merging.synthetic import LlamaShape, write_tiny_llama

# Deterministic by default (the same examples every run, CI included); HYPOTHESIS_PROFILE=explore
# draws new ones when hunting for bugs.
settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# `mixserve serve` keeps admin state in a file under the user's data directory by default: servers the
# tests start as subprocesses keep it in memory instead, so no test sees another's (or an earlier run's)
# pins. The state store's own tests pass --state explicitly.
os.environ["MIXSERVE_STATE"] = "none"

TINY = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=128)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("base"), TINY, seed=0)


def make_peft_adapter(
    base_dir: Path, out: Path, *, seed: int, r: int, alpha: float, targets: list[str], **lora_kwargs
) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B, as `save_pretrained` writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Three PEFT adapters with different ranks and target modules (sql touches everything)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": make_peft_adapter(
            tiny_base,
            root / "sql",
            seed=1,
            r=4,
            alpha=8,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        "code": make_peft_adapter(
            tiny_base, root / "code", seed=2, r=8, alpha=8, targets=["q_proj", "v_proj", "down_proj"]
        ),
        "json": make_peft_adapter(
            tiny_base, root / "json", seed=3, r=2, alpha=4, targets=["up_proj", "o_proj"], use_rslora=True
        ),
    }
