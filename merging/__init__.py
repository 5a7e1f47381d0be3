"""mixserve's merging core: LoRA adapters in, merged weight sets out. Pure tensor code, no web stack."""

from merging.adapters import AdapterError, LoraAdapter, LoraFactors, load_adapter, save_adapter
from merging.delta import DenseDelta, LowRankDelta, MergedDelta, refactor_lowrank
from merging.merge import MergeError, merge_mix, mix_key
from merging.methods import METHODS, MergeMethod, MergeParams, merge_tensors
from merging.spec import AdapterLeaf, MixNode, canonical_json, mix_hash, parse_mix

__all__ = [
    "METHODS",
    "AdapterError",
    "AdapterLeaf",
    "DenseDelta",
    "LoraAdapter",
    "LoraFactors",
    "LowRankDelta",
    "MergeError",
    "MergeMethod",
    "MergeParams",
    "MergedDelta",
    "MixNode",
    "canonical_json",
    "load_adapter",
    "merge_mix",
    "merge_tensors",
    "mix_hash",
    "mix_key",
    "parse_mix",
    "refactor_lowrank",
    "save_adapter",
]
