"""The serving forward pass: equal to transformers' with the delta folded in, and batch-invariant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")


@pytest.fixture(scope="module")
def runtime():
    from server.worker.runtime import ModelRuntime

    return ModelRuntime(DEMO / "base", max_loras=4)


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


def _fold(mix) -> torch.nn.Module:
    """transformers' model with ``mix``'s delta folded into the weights: the per-mix reference."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(DEMO / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, (A, B) in mix.module_factors().items() if mix is not None else ():
            hf.get_submodule(name).weight += B @ A
    return hf


def test_logits_match_transformers_with_the_delta_folded_in(runtime, mixes):
    from server.worker.runtime import DecodeRow, PrefillChunk

    ids = _prompt(runtime, "### task: sql\n### input: how many books have author bemi\n### output:\nSELECT")
    with torch.no_grad():
        ref = _fold(mixes["ties"])(torch.tensor([ids])).logits[0]
    blocks = runtime.kv.allocate(runtime.kv.blocks_for(len(ids)))
    slot = runtime.pool.acquire(mixes["ties"])
    try:
        # The prompt in two chunks (the second reads the first's keys from the cache), then decode.
        n = len(ids) - 3
        got = runtime.prefill([PrefillChunk(ids[:7], 0, blocks, slot)])[0]
        torch.testing.assert_close(got, ref[6], atol=1e-4, rtol=1e-4)
        got = runtime.prefill([PrefillChunk(ids[7:n], 7, blocks, slot)])[0]
        torch.testing.assert_close(got, ref[n - 1], atol=1e-4, rtol=1e-4)
        for j in range(n, len(ids)):  # decode the rest one by one from the KV cache
            got = runtime.decode([DecodeRow(ids[j], j, blocks, slot)])[0]
            torch.testing.assert_close(got, ref[j], atol=1e-4, rtol=1e-4)
    finally:
        runtime.kv.free(blocks)
        runtime.pool.release(slot)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "masked"])
def test_pooled_side_path_matches_the_per_mix_reference(runtime, mixes, grouped):
    """Rows on four mixes (and the base) in one prefill and one decode step, given in mixed order:
    each row's logits equal transformers' with its own mix folded in."""
    from server.worker.runtime import DecodeRow, PrefillChunk

    names = ["dense", None, "sql", "ties", "sql", None, "dense", "ties"]
    texts = ["### task: sql\n### input: how many books have author bemi\n### output:\n",
             "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n",
             "the word zasago reversed is"]  # fmt: skip
    prompts = [[*_prompt(runtime, texts[i % 3]), 5 + i] for i in range(len(names))]
    refs = {}
    for m in set(names):
        hf = _fold(mixes.get(m) if m else None)
        with torch.no_grad():
            refs[m] = [hf(torch.tensor([p])).logits[0] for p in prompts]
    saved, runtime.pool.grouped = runtime.pool.grouped, grouped
    tables = [runtime.kv.allocate(runtime.kv.blocks_for(len(p))) for p in prompts]
    slots = [runtime.pool.acquire(mixes.get(m) if m else None) for m in names]
    try:
        chunks = [PrefillChunk(p[:-1], 0, t, s) for p, t, s in zip(prompts, tables, slots, strict=True)]
        got = runtime.prefill(chunks)
        for row, (p, m) in enumerate(zip(prompts, names, strict=True)):
            torch.testing.assert_close(got[row], refs[m][row][len(p) - 2], atol=1e-4, rtol=1e-4)
        rows = [DecodeRow(p[-1], len(p) - 1, t, s) for p, t, s in zip(prompts, tables, slots, strict=True)]
        got = runtime.decode(rows)
        for row, (p, m) in enumerate(zip(prompts, names, strict=True)):
            torch.testing.assert_close(got[row], refs[m][row][len(p) - 1], atol=1e-4, rtol=1e-4)
    finally:
        runtime.pool.grouped = saved
        for t, s in zip(tables, slots, strict=True):
            runtime.kv.free(t)
            runtime.pool.release(s)


def _greedy(runtime, batch: list[tuple[list[int], str | None]], mixes, steps: int = 12,
            chunk: int | None = None) -> list[list[int]]:  # fmt: skip
    """Greedy tokens for sequences prefilled (in chunks of ``chunk`` tokens) and decoded together."""
    from server.worker.runtime import DecodeRow, PrefillChunk

    tables = [runtime.kv.allocate(runtime.kv.blocks_for(len(ids) + steps)) for ids, _ in batch]
    slots = [runtime.pool.acquire(mixes.get(m)) for _, m in batch]
    try:
        done, first = [0] * len(batch), {}
        while True:
            todo = [i for i, (ids, _) in enumerate(batch) if done[i] < len(ids)]
            if not todo:
                break
            n = [min(len(batch[i][0]) - done[i], chunk or len(batch[i][0])) for i in todo]
            logits = runtime.prefill([PrefillChunk(batch[i][0][done[i] : done[i] + k], done[i], tables[i], slots[i])
                                      for i, k in zip(todo, n, strict=True)])  # fmt: skip
            for row, (i, k) in enumerate(zip(todo, n, strict=True)):
                done[i] += k
                if done[i] == len(batch[i][0]):
                    first[i] = int(logits[row].argmax())
        tokens = [[first[i]] for i in range(len(batch))]
        for _ in range(steps - 1):
            logits = runtime.decode([DecodeRow(tokens[i][-1], len(ids) + len(tokens[i]) - 1, tables[i], slots[i])
                                     for i, (ids, _) in enumerate(batch)])  # fmt: skip
            for i in range(len(batch)):
                tokens[i].append(int(logits[i].argmax()))
        return tokens
    finally:
        for t, s in zip(tables, slots, strict=True):
            runtime.kv.free(t)
            runtime.pool.release(s)


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
    # Chunked prefill (prompts in pieces of 9 tokens, several prompts per forward) generates the same.
    assert _greedy(runtime, batch, mixes, chunk=9) == alone
    # And the mixes matter: the same prompt on another mix generates something else.
    assert _greedy(runtime, [(batch[0][0], None)], mixes)[0] != alone[0]


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_gqa_and_biased_projections_match_transformers(tmp_path, model_type):
    """Fused [q|k|v] / [gate|up] GEMMs with grouped KV heads (both) and q/k/v biases (Qwen2)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from server.worker.runtime import DecodeRow, ModelRuntime, PrefillChunk

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
    runtime = ModelRuntime(tmp_path, block_size=8)
    fused = runtime.fused["0.qkv"]
    q_proj = runtime.linears["model.layers.0.self_attn.q_proj"]
    assert q_proj.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()  # views, no copy
    ids = list(range(3, 40))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    blocks = runtime.kv.allocate(runtime.kv.blocks_for(len(ids)))
    got = runtime.prefill([PrefillChunk(ids[:-4], 0, blocks)])[0]
    torch.testing.assert_close(got, want[len(ids) - 5], rtol=1e-4, atol=1e-4)
    for j in range(len(ids) - 4, len(ids)):
        got = runtime.decode([DecodeRow(ids[j], j, blocks)])[0]
        torch.testing.assert_close(got, want[j], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "masked"])
def test_the_static_buffer_decode_of_cuda_graphs_generates_the_same_tokens(runtime, mixes, grouped):
    """The path a CUDA graph captures (padded batch bucket, padding rows on the null block, every pool
    slot in the side path) run eagerly here: the same greedy tokens as the plain decode, and the padding
    rows disturb no one's KV cache. (The capture itself needs a GPU.)"""
    from server.worker.cuda_graphs import DecodeGraphs

    batch = [(_prompt(runtime, t), m) for t, m in [
        ("### task: sql\n### input: how many books have author bemi\n### output:\n", "sql"),
        ("### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n", "ties"),
        ("the word zasago reversed is", None),
        ("### task: python\n### input: write sum_even(xs) that returns the sum of the even xs\n### output:\n", "dense"),
        ("### task: sql\n### input: list the title of books\n### output:\n", "sql"),
    ]]  # fmt: skip
    saved = runtime.pool.grouped
    runtime.pool.grouped = grouped
    try:
        plain = _greedy(runtime, batch, mixes, steps=8)
        runtime.graphs = DecodeGraphs(runtime, capture=False)
        assert _greedy(runtime, batch, mixes, steps=8) == plain  # 5 rows run in the 8-row bucket
        assert _greedy(runtime, batch[:1], mixes, steps=8) == plain[:1]
        assert {k[:2] for k in runtime.graphs._graphs} >= {(8, 4), (1, 4)}
    finally:
        runtime.graphs = None
        runtime.pool.grouped = saved
