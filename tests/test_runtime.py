"""The serving forward pass: equal to transformers' with the delta folded in, and batch-invariant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="models/demo not trained")


@pytest.fixture(scope="module")
def runtime():
    from server.runtime import ModelRuntime

    return ModelRuntime(DEMO / "base", max_seqs=8)


@pytest.fixture(scope="module")
def mixes(runtime):
    from merging.adapters import load_adapter
    from merging.merge import merge_mix
    from merging.spec import parse_mix

    adapters = {n: load_adapter(DEMO / "adapters" / n, n) for n in ("sql", "json", "python")}
    specs = {
        "sql": parse_mix("sql"),
        "ties": parse_mix({"method": "ties", "density": 0.5, "children": [{"adapter": "sql"}, {"adapter": "json"}]}),
        "dense": parse_mix(
            {"method": "ties", "space": "dense", "children": [{"adapter": "python"}, {"adapter": "json"}]}
        ),
    }
    return {k: runtime.lora_to_device(merge_mix(s, adapters).to_lowrank().lowrank_factors()) for k, s in specs.items()}


def _prompt(runtime, text: str) -> list[int]:
    return runtime.tokenizer(text)["input_ids"]


def test_logits_match_transformers_with_the_delta_folded_in(runtime, mixes):
    from transformers import AutoModelForCausalLM

    from server.runtime import Segment

    ids = _prompt(runtime, "### task: sql\n### input: how many books have author bemi\n### output:\nSELECT")
    hf = AutoModelForCausalLM.from_pretrained(DEMO / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, (A, B) in mixes["ties"].module_factors().items():
            hf.get_submodule(name).weight += B @ A
        ref = hf(torch.tensor([ids])).logits[0]
    slot = runtime.kv.allocate()
    try:
        got = runtime.prefill(slot, ids[:-3], mixes["ties"])
        torch.testing.assert_close(got, ref[len(ids) - 4], atol=1e-4, rtol=1e-4)
        for j in range(len(ids) - 3, len(ids)):  # decode the rest one by one from the KV cache
            got = runtime.decode([slot], [ids[j]], [j], [Segment(0, 1, mixes["ties"])])[0]
            torch.testing.assert_close(got, ref[j], atol=1e-4, rtol=1e-4)
    finally:
        runtime.kv.release(slot)


def _greedy(runtime, batch: list[tuple[list[int], str | None]], mixes, steps: int = 12) -> list[list[int]]:
    """Greedy tokens for sequences decoded together; rows grouped by mix into segments."""
    from server.runtime import Segment

    slots = [runtime.kv.allocate() for _ in batch]
    try:
        tokens = [
            [int(runtime.prefill(s, ids, mixes.get(m)).argmax())] for s, (ids, m) in zip(slots, batch, strict=True)
        ]
        order = sorted(range(len(batch)), key=lambda i: str(batch[i][1]))
        segments, start = [], 0
        for m in sorted({str(b[1]) for b in batch}):
            n = sum(1 for i in order if str(batch[i][1]) == m)
            segments.append(Segment(start, start + n, mixes.get(m)))
            start += n
        for _ in range(steps - 1):
            logits = runtime.decode(
                [slots[i] for i in order],
                [tokens[i][-1] for i in order],
                [len(batch[i][0]) + len(tokens[i]) - 1 for i in order],
                segments,
            )
            for row, i in enumerate(order):
                tokens[i].append(int(logits[row].argmax()))
        return tokens
    finally:
        for s in slots:
            runtime.kv.release(s)


def test_greedy_tokens_do_not_depend_on_the_rest_of_the_batch(runtime, mixes):
    prompts = [
        ("### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; "
         "list the title of books with pages above 300\n### output:\n", "sql"),
        ("### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n", "ties"),
        ("### task: python\n### input: write sum_even(xs) that returns the sum of the numbers in xs that are even"
         "\n### output:\n", "dense"),
        ("the word zasago reversed is", None),
        # Longer than a 64-key attention block: in a batch with it, the short prompts' decode reads a
        # wider (masked) key window than alone.
        ("### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; "
         "CREATE TABLE students (name TEXT, grade INT, school TEXT, score INT) ; CREATE TABLE cities "
         "(city TEXT, country TEXT, population INT, area INT) ; how many books have author bemi\n### output:\n", "sql"),
        ("### task: json\n### input: kupo works as a kevi in tukuta and is 44.\n### output:\n", "ties"),
    ]  # fmt: skip
    batch = [(_prompt(runtime, p), m) for p, m in prompts]
    assert max(len(ids) for ids, _ in batch) > 64 > min(len(ids) for ids, _ in batch) + 12
    alone = [_greedy(runtime, [b], mixes)[0] for b in batch]
    together = _greedy(runtime, batch, mixes)
    assert together == alone
    # And the mixes matter: the same prompt on another mix generates something else.
    assert _greedy(runtime, [(batch[0][0], None)], mixes)[0] != alone[0]


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_gqa_and_biased_projections_match_transformers(tmp_path, model_type):
    """Fused [q|k|v] / [gate|up] GEMMs with grouped KV heads (both) and q/k/v biases (Qwen2)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from server.runtime import ModelRuntime

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    hf = AutoModelForCausalLM.from_config(config).eval()
    if model_type == "qwen2":  # random biases: zeros would hide a misplaced one
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "base" / name, tmp_path / name)
    runtime = ModelRuntime(tmp_path, max_seqs=2)
    fused = runtime.fused["0.qkv"]
    q_proj = runtime.linears["model.layers.0.self_attn.q_proj"]
    assert q_proj.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()  # views, no copy
    ids = list(range(3, 40))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    slot = runtime.kv.allocate()
    got = runtime.prefill(slot, ids[:-4], None)
    torch.testing.assert_close(got, want[len(ids) - 5], rtol=1e-4, atol=1e-4)
    for j in range(len(ids) - 4, len(ids)):
        got = runtime.decode([slot], [ids[j]], [j], [_segment(None)])[0]
        torch.testing.assert_close(got, want[j], rtol=1e-4, atol=1e-4)


def _segment(lora):
    from server.runtime import Segment

    return Segment(0, 1, lora)
