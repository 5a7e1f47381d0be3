"""Loading PEFT adapter directories: factors match PEFT's own deltas; bad input gets clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.adapters import AdapterError, load_adapter, save_adapter
from merging.basemodel import read_shapes


def test_loaded_deltas_equal_peft_get_delta_weight(tiny_base, peft_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name, path in peft_adapters.items():
        ours = load_adapter(path)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), path)
        seen = 0
        for module_name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                key = module_name.removeprefix("base_model.model.")
                torch.testing.assert_close(
                    ours.modules[key].dense(), module.get_delta_weight("default"), rtol=1e-6, atol=1e-7
                )
                seen += 1
        assert seen == len(ours.modules) > 0, name
    json_adapter = load_adapter(peft_adapters["json"])
    assert json_adapter.use_rslora and next(iter(json_adapter.modules.values())).scale == pytest.approx(4 / 2**0.5)


def test_adapter_shapes_checked_against_the_base(tiny_base, peft_adapters):
    shapes = read_shapes(tiny_base)
    load_adapter(peft_adapters["sql"]).check_base_shapes(shapes)
    wrong = dict(shapes)
    wrong["model.layers.0.self_attn.q_proj.weight"] = (33, 32)
    with pytest.raises(AdapterError, match=r"model.layers.0.self_attn.q_proj.*33x32"):
        load_adapter(peft_adapters["sql"]).check_base_shapes(wrong)
    del wrong["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(AdapterError, match="is not an adaptable projection of the base model"):
        load_adapter(peft_adapters["sql"]).check_base_shapes(wrong)


def test_save_then_load_round_trips_with_mixed_ranks(tmp_path):
    g = torch.Generator().manual_seed(0)
    modules = {
        "model.layers.0.self_attn.q_proj": (torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g)),
        "model.layers.0.mlp.up_proj": (torch.randn(5, 8, generator=g), torch.randn(12, 5, generator=g)),
        "model.layers.1.mlp.up_proj": (torch.randn(3, 8, generator=g), torch.randn(12, 3, generator=g)),
    }
    save_adapter(tmp_path / "a", modules)
    loaded = load_adapter(tmp_path / "a")
    for m, (A, B) in modules.items():
        torch.testing.assert_close(loaded.modules[m].dense(), B @ A)


@pytest.fixture
def adapter_copy(peft_adapters, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(peft_adapters["code"], dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def test_missing_directory_and_files(tmp_path, adapter_copy):
    with pytest.raises(AdapterError, match="not a directory"):
        load_adapter(tmp_path / "nowhere")
    (adapter_copy / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json: missing"):
        load_adapter(adapter_copy)


def test_pickle_adapters_are_refused_without_being_opened(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").unlink()
    # Not even a valid pickle: opening it would raise something else than our message.
    (adapter_copy / "adapter_model.bin").write_bytes(b"\x80\x04 this would run code if unpickled")
    with pytest.raises(AdapterError, match=r"only safetensors.*adapter_model.bin"):
        load_adapter(adapter_copy)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"r": 0}, "r must be a positive number"),
        ({"lora_alpha": "big"}, "lora_alpha must be"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_unsupported_or_malformed_config(adapter_copy, changes, message):
    _edit_config(adapter_copy, **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapter(adapter_copy)


def test_config_that_is_not_json(adapter_copy):
    (adapter_copy / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(adapter_copy)


def test_truncated_safetensors(adapter_copy):
    f = adapter_copy / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(adapter_copy)


def test_huge_declared_header_size(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(adapter_copy)


def _first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def test_nan_weights_are_refused_naming_the_module(adapter_copy):
    def poison(t):
        k = _first_key(t, "lora_B.weight")
        t[k] = t[k].clone()
        t[k][0, 0] = float("nan")

    _edit_tensors(adapter_copy, poison)
    with pytest.raises(AdapterError, match=r"module 'model.layers.0.*lora_B contains NaN or Inf"):
        load_adapter(adapter_copy)


def test_rank_mismatch_between_factors(adapter_copy):
    def cut(t):
        k = _first_key(t, "lora_B.weight")
        t[k] = t[k][:, :3].contiguous()

    _edit_tensors(adapter_copy, cut)
    with pytest.raises(AdapterError, match="ranks differ"):
        load_adapter(adapter_copy)


def test_missing_factor_and_unexpected_keys(adapter_copy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(adapter_copy, other)
    _edit_tensors(adapter_copy, lambda t: t.pop(_first_key(t, "lora_A.weight")))
    with pytest.raises(AdapterError, match="not both lora_A and lora_B"):
        load_adapter(adapter_copy)
    _edit_tensors(
        other,
        lambda t: t.update({"base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector": torch.ones(32)}),
    )
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(other)


def test_integer_factors_are_refused(adapter_copy):
    def to_int(t):
        k = _first_key(t, "lora_A.weight")
        t[k] = t[k].to(torch.int32)

    _edit_tensors(adapter_copy, to_int)
    with pytest.raises(AdapterError, match="floating point"):
        load_adapter(adapter_copy)
