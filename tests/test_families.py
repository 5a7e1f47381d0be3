"""Every model family of server/worker/architectures.py against transformers + PEFT, token for token.

Per family: a tiny random model (3 layers, random weights and norms strong enough that greedy tokens are
stable) with the features its checkpoints use switched on and small (a 12-token sliding window, soft-caps
that bite, partial rotary, rope scaling), and two random PEFT LoRA adapters on every projection PEFT can
target there. The runtime's greedy tokens, with prompts prefilled in 7-token chunks and decoded past the
window in one batch with other rows on other mixes, equal transformers' (base) and PEFT's (adapter) greedy
tokens from a full forward at every step; a TIES mix of the two adapters, served as cores over its members'
cores and from factors, equals its `mixserve merge --format peft` export loaded in PEFT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_peft_adapter
from tests.runtime_harness import greedy as _greedy

WINDOW = 12
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
CONFIGS = {
    "llama": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    ),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
    ),
    "qwen3": dict(head_dim=24, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma": dict(head_dim=16),
    "gemma2": dict(
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=6.0,
    ),
    "gemma3_text": dict(
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        final_logit_softcapping=6.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    "phi3": dict(sliding_window=WINDOW, partial_rotary_factor=0.5, pad_token_id=0),
}
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIES = {"method": "ties", "density": 0.5, "children": [{"adapter": "a"}, {"adapter": "b", "weight": 0.8}]}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are far apart (greedy tokens do not hinge on rounding); norms off 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms scale by (1 + w), the others by w: both off the identity
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "gemma" in model.config.model_type else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    """``(model type, model dir, {adapter: dir})`` for one family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    config = AutoConfig.for_model(model_type, **SMALL, **CONFIGS[model_type])
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(hf, 0)
    hf.save_pretrained(root / "base")
    targets = TARGETS.get(model_type, LLAMA_TARGETS)
    adapters = {name: make_peft_adapter(root / "base", root / name, seed=seed, r=4, alpha=8, targets=targets)
                for name, seed in (("a", 1), ("b", 2))}  # fmt: skip
    return model_type, root / "base", adapters


def _hf(model_dir: Path, adapter: Path | None = None) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, adapter).eval() if adapter is not None else model


def _reference(model: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens from a full forward over the whole sequence at every step (no cache to get wrong)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.fixture(scope="module")
def served(family):
    """The family's runtime (4-token KV blocks), its adapters loaded, and mixes (member cores and factors)."""
    from merging.adapters import load_adapter
    from merging.member_merge import merge_members
    from merging.merge import merge_mix
    from merging.spec import parse_mix
    from server.worker.runtime import ModelRuntime

    _model_type, model_dir, paths = family
    hf = _hf(model_dir)
    runtime = ModelRuntime.from_model(hf, block_size=4, max_loras=4, core_slots=4)
    adapters = {n: load_adapter(p, n) for n, p in paths.items()}
    for adapter in adapters.values():
        adapter.check_base_shapes(runtime.base_shapes())
    specs = {"a": parse_mix("a"), "b": parse_mix("b"), "ties": parse_mix(TIES)}
    factors = {
        k: runtime.lora_to_device(merge_mix(s, adapters).to_lowrank().lowrank_factors()) for k, s in specs.items()
    }
    cores = {k: runtime.members_to_device(merge_members(s, adapters), adapters) for k, s in specs.items()}
    return runtime, adapters, specs, factors, cores


PROMPTS = [list(range(5, 25)), [7, 3, 9, 11, 200, 17, 5, 5, 30], [(13 * i + 1) % 256 for i in range(30)]]
STEPS = 24  # every prompt + 24 tokens passes the 12-token window (and the 7-token chunks cross it)


def test_base_and_adapters_match_transformers_and_peft_in_one_mixed_batch(family, served):
    _model_type, model_dir, paths = family
    runtime, _, _, factors, cores = served
    rows = [(PROMPTS[0], None, None), (PROMPTS[1], factors["a"], "a"), (PROMPTS[2], cores["b"], "b"),
            (PROMPTS[2], None, None), (PROMPTS[0], cores["a"], "a"), (PROMPTS[1], factors["b"], "b")]  # fmt: skip
    got = _greedy(runtime, [(ids, mix) for ids, mix, _ in rows], STEPS, chunk=7)
    models = {None: _hf(model_dir), "a": _hf(model_dir, paths["a"]), "b": _hf(model_dir, paths["b"])}
    want = [_reference(models[name], ids, STEPS) for ids, _, name in rows]
    assert got == want
    assert len({tuple(t) for t in want}) >= 4  # the adapters change the tokens: the comparison has teeth


def test_logits_match_transformers_through_prefill_chunks_and_decode(family, served):
    """Logits, not only greedy tokens: a final soft-cap (Gemma) keeps the argmax but changes sampling."""
    from server.worker.runtime import DecodeRow, PrefillChunk

    runtime = served[0]
    ids = PROMPTS[2]
    with torch.no_grad():
        want = _hf(family[1])(torch.tensor([ids])).logits[0]
    blocks = runtime.kv.allocate(runtime.kv.blocks_for(len(ids)))
    try:
        got = [
            runtime.prefill([PrefillChunk(ids[:9], 0, blocks)])[0],
            runtime.prefill([PrefillChunk(ids[9:20], 9, blocks)])[0],
        ]
        got += [runtime.decode([DecodeRow(ids[p], p, blocks)])[0] for p in range(20, len(ids))]
    finally:
        runtime.kv.free(blocks)
    torch.testing.assert_close(torch.stack(got), want[[8, *range(19, len(ids))]], rtol=1e-4, atol=1e-4)


def test_the_static_buffer_decode_of_cuda_graphs_generates_the_same_tokens(served):
    """The path a CUDA graph captures (padded bucket, static tables incl. the windows'), run eagerly."""
    from server.worker.cuda_graphs import DecodeGraphs

    runtime, _, _, factors, cores = served
    batch = [(PROMPTS[0], cores["ties"]), (PROMPTS[1], factors["a"]), (PROMPTS[2], None)]
    plain = _greedy(runtime, batch, STEPS, chunk=64)
    runtime.graphs = DecodeGraphs(runtime, capture=False)
    try:
        assert _greedy(runtime, batch, STEPS, chunk=64) == plain
    finally:
        runtime.graphs = None


def test_a_merged_mix_generates_what_its_peft_export_generates(family, served, tmp_path):
    from merging.export import merge_to_disk

    _, model_dir, _ = family
    runtime, adapters, specs, factors, cores = served
    merge_to_disk(specs["ties"], adapters, tmp_path / "ties", fmt="peft", base=model_dir)
    want = _reference(_hf(model_dir, tmp_path / "ties"), PROMPTS[2], STEPS)
    assert _greedy(runtime, [(PROMPTS[2], cores["ties"])], STEPS, chunk=7)[0] == want
    assert _greedy(runtime, [(PROMPTS[2], factors["ties"])], STEPS, chunk=7)[0] == want


def test_sliding_window_layers_never_read_blocks_outside_their_window(served):
    """Poison (NaN) every block of a sliding-window layer that lies wholly before the window of the row's
    next positions: decoding is unchanged, so those blocks are never read (even masked, a NaN would show)."""
    from server.worker.runtime import DecodeRow, PrefillChunk

    runtime = served[0]
    sliding = [i for i, w in enumerate(runtime.windows) if w is not None]
    if not sliding:
        pytest.skip(f"{runtime.spec.model_type} has no sliding-window layer here")
    ids, steps, bs = PROMPTS[2], 8, runtime.kv.block_size
    blocks = runtime.kv.allocate(runtime.kv.blocks_for(len(ids) + steps))
    try:
        clean = runtime.prefill([PrefillChunk(ids, 0, blocks)])[0]
        assert not clean.isnan().any()
        for i in sliding:  # blocks ending before the first key the window reaches from the prompt's end
            for b in blocks[: (len(ids) - WINDOW + 1) // bs]:
                runtime._kv_blocks[i][b] = float("nan")
        token, out = int(clean.argmax()), []
        for p in range(len(ids), len(ids) + steps):
            logits = runtime.decode([DecodeRow(token, p, blocks)])[0]
            assert not logits.isnan().any(), f"position {p}"
            token = int(logits.argmax())
            out.append(token)
        # A chunk after the poisoned blocks reads only its window's too.
        more = runtime.prefill([PrefillChunk([3, 4], len(ids) + steps, blocks)])[0]
        assert not more.isnan().any()
    finally:
        runtime.kv.free(blocks)


def test_an_adapter_on_a_module_the_family_does_not_have_is_refused_naming_it(family, served, tmp_path):
    """Refused when checked against the base (as the registry does on registration), naming the module and
    the family's adaptable projections."""
    import shutil

    from safetensors.torch import load_file, save_file

    from merging.adapters import AdapterError, load_adapter

    paths = family[2]
    runtime = served[0]
    renamed = tmp_path / "renamed"
    shutil.copytree(paths["a"], renamed)
    weights = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("o_proj", "out_proj"): v for k, v in weights.items()}, renamed / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"module 'model\.layers\.\d\.self_attn\.out_proj' is not an adaptable"):
        load_adapter(renamed, "renamed").check_base_shapes(runtime.base_shapes())


def test_an_unsupported_model_type_is_refused_at_start_naming_the_supported_ones(tmp_path):
    from transformers import AutoConfig

    from server.worker.runtime import ModelRuntime, ServingError

    AutoConfig.for_model("qwen3_moe", **SMALL).save_pretrained(tmp_path)
    with pytest.raises(
        ServingError,
        match=r"^model type 'qwen3_moe' is not supported \(supported: llama, .*phi3\): mixture-of-experts layers are not served$",
    ):
        ModelRuntime(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_cuda_graphs_generate_the_eager_tokens(family):
    """On a GPU: the family's decode steps replayed from captured graphs (windows' tables included) give
    the eager step's tokens, in bf16."""
    from server.worker.runtime import ModelRuntime

    hf = _hf(family[1]).to("cuda", torch.bfloat16)
    runtime = ModelRuntime.from_model(hf, block_size=4, max_loras=2, core_slots=2, kv_cache_bytes=64 << 20)
    assert runtime.graphs is not None
    runtime.graphs.capture_buckets(4)
    batch = [(PROMPTS[0], None), (PROMPTS[1], None), (PROMPTS[2], None)]
    captured = _greedy(runtime, batch, STEPS, chunk=7)
    runtime.graphs = None
    assert _greedy(runtime, batch, STEPS, chunk=7) == captured


def test_length_dependent_rope_is_served_up_to_its_original_context():
    """Phi-3.5's longrope (and dynamic NTK) change frequencies with the sequence's length: the context is
    capped where they still equal the unscaled ones; static scalings keep the full context."""
    from transformers import AutoConfig

    from server.worker.architectures import resolve

    half = [1.0] * 4  # head_dim 16 x partial 0.5 = 8 rotary dims, 4 factors
    longrope = {"rope_type": "longrope", "short_factor": half, "long_factor": [2.0] * 4,
                "original_max_position_embeddings": 64}  # fmt: skip
    config = AutoConfig.for_model(
        "phi3", **SMALL, partial_rotary_factor=0.5, rope_scaling=longrope, original_max_position_embeddings=64
    )  # as Phi-3.5's config.json has it
    assert resolve(config).max_positions == 64
    dynamic = AutoConfig.for_model("llama", **SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert resolve(dynamic).max_positions == 128  # its original context is max_position_embeddings
    assert resolve(AutoConfig.for_model("llama", **SMALL, **CONFIGS["llama"])).max_positions == 128
