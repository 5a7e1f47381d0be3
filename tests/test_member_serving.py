"""Member-core serving: lowrank mixes served as cores over their members' own factors (the member pool) give
the tokens of the same mix through full factors and through its `mixserve merge --format peft` export,
in any batch, and with members evicted and loaded again between requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.runtime_harness import greedy as _greedy

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")

NAMES = ("sql", "python", "pystr", "json")
MIXES = {
    "sql": "sql",
    "linear": {"method": "linear", "children": [{"adapter": "sql"}, {"adapter": "json", "weight": 0.7}]},
    "ties": {"method": "ties", "density": 0.5, "children": [{"adapter": n} for n in NAMES]},
    "dare_ties": {"method": "dare_ties", "drop_rate": 0.3, "seed": 3, "children": [{"adapter": "sql"}, {"adapter": "python"}]},
    "nested": {"method": "ties", "density": 0.4, "children": [
        {"method": "linear", "children": [{"adapter": "python"}, {"adapter": "pystr"}]},
        {"adapter": "sql"}, {"adapter": "json"}]},
    "tsv": {"method": "tsv", "children": [{"adapter": "pystr"}, {"adapter": "json"}]},
}  # fmt: skip
PROMPTS = [
    "### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; "
    "how many books have author bemi\n### output:\n",
    "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n",
    "### task: pystr\n### input: write replace_m(s) that returns s with every m replaced by z\n### output:\n",
    "the word zasago reversed is",
]


@pytest.fixture(scope="module")
def served():
    """A runtime of the demo, and every mix both as member cores and as full factors."""
    from merging.adapters import load_adapter
    from merging.member_merge import merge_members
    from merging.merge import merge_mix
    from merging.spec import parse_mix
    from server.worker.runtime import ModelRuntime

    runtime = ModelRuntime(DEMO / "base", max_loras=8, core_slots=8, adapter_slots=16)
    adapters = {n: load_adapter(DEMO / "adapters" / n, n) for n in NAMES}
    specs = {k: parse_mix(v) for k, v in MIXES.items()}
    cores = {k: runtime.members_to_device(merge_members(s, adapters), adapters) for k, s in specs.items()}
    factors = {
        k: runtime.lora_to_device(merge_mix(s, adapters).to_lowrank().lowrank_factors()) for k, s in specs.items()
    }
    return runtime, adapters, specs, cores, factors


def _ids(runtime, text: str) -> list[int]:
    return runtime.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("name", list(MIXES))
def test_a_member_mix_generates_what_its_factors_generate(served, name):
    runtime, _, _, cores, factors = served
    for text in PROMPTS[:3]:
        ids = _ids(runtime, text)
        assert _greedy(runtime, [(ids, cores[name])]) == _greedy(runtime, [(ids, factors[name])]), text


def test_member_mix_logits_match_the_factor_path(served):
    from server.worker.runtime import PrefillChunk

    runtime, _, _, cores, factors = served
    ids = _ids(runtime, PROMPTS[0])
    out, used = {}, {}
    for kind, mix in (("core", cores["ties"]), ("factors", factors["ties"])):
        blocks = runtime.kv.allocate(runtime.kv.blocks_for(len(ids)))
        used[kind] = slots = runtime.acquire(mix)
        try:
            out[kind] = runtime.prefill([PrefillChunk(ids, 0, blocks, *slots)])[0]
        finally:
            runtime.kv.free(blocks)
            runtime.release(*slots)
    assert used["core"][0] == 0 < used["core"][1] and used["factors"][0] > 0 == used["factors"][1]
    # One delta served two ways (B_cat C A_cat, merged factors): float32 rounding in different orders, ~1e-5
    # on logits of ~20 on any kernel set. (Its predecessor failed at atol 1e-3 on an AVX-512 Xeon when two
    # merges' float32 bases trimmed different core entries; decisions are float64 now, merging/README.md.)
    torch.testing.assert_close(out["core"], out["factors"], rtol=1e-5, atol=1e-4)


def test_one_batch_of_member_factor_and_base_rows(served):
    """Rows on six member mixes, factor mixes and the base in one prefill and decode: each generates what it
    generates alone (and the mixes differ from each other)."""
    runtime, _, _, cores, factors = served
    batch = []
    for i, name in enumerate(MIXES):
        ids = _ids(runtime, PROMPTS[i % len(PROMPTS)])
        batch += [(ids, cores[name]), (ids, factors[name])]
    batch.append((_ids(runtime, PROMPTS[3]), None))
    together = _greedy(runtime, batch)
    alone = [_greedy(runtime, [b])[0] for b in batch]
    assert together == alone
    assert together[0::2][: len(MIXES)] == together[1::2][: len(MIXES)]  # core == factors, row by row
    assert len({tuple(t) for t in together}) > 3


def test_the_static_buffer_decode_serves_member_rows(served):
    """The decode a CUDA graph captures (padded bucket, rows padded to a power of two of members, the plan
    built on the device from the mix slots alone), run eagerly."""
    from server.worker.cuda_graphs import DecodeGraphs

    runtime, adapters, _, cores, factors = served
    batch = [(_ids(runtime, PROMPTS[0]), cores["ties"]), (_ids(runtime, PROMPTS[1]), factors["dare_ties"]),
             (_ids(runtime, PROMPTS[3]), None), (_ids(runtime, PROMPTS[2]), cores["nested"]),
             (_ids(runtime, PROMPTS[1]), cores["linear"])]  # fmt: skip
    plain = _greedy(runtime, batch, steps=8)
    runtime.graphs = DecodeGraphs(runtime, capture=False)
    try:
        # Every bucket and key width up front for base-only steps (the server does it at start).
        assert runtime.graphs.capture_buckets(8) == 4 * 4  # buckets 1, 2, 4, 8 x widths 4, 8, 16, 32
        assert _greedy(runtime, batch, steps=8) == plain
        assert _greedy(runtime, batch[:1], steps=8) == plain[:1]
        assert (8, 4, True, 4) in runtime.graphs._graphs  # factor rows and 4-member rows: on first use
        assert (1, 4, False, 4) in runtime.graphs._graphs
        assert _greedy(runtime, batch[4:], steps=4) == [plain[4][:4]]
        assert (1, 4, False, 2) in runtime.graphs._graphs
        # A mix of 3 members alone (the widest loaded): its rows are padded to 4 members in the static plan,
        # so the pool keeps 4 members' worth of core rows for it.
        from merging.member_merge import merge_members
        from merging.spec import parse_mix
        from server.adapters.member_pool import MemberPool

        pool = runtime.cores
        runtime.cores = MemberPool(pool.groups, 8, 4, pool.dtype, pool.device, max_members=4)
        try:
            three = {"method": "ties", "density": 0.5, "children": [{"adapter": n} for n in ("sql", "python", "json")]}
            mix = runtime.members_to_device(merge_members(parse_mix(three), adapters), adapters)
            ids = _ids(runtime, PROMPTS[0])
            runtime.graphs = DecodeGraphs(runtime, capture=False)
            static = _greedy(runtime, [(ids, mix)], steps=6)
            assert (1, 4, False, 4) in runtime.graphs._graphs
            runtime.graphs = None
            assert static == _greedy(runtime, [(ids, mix)], steps=6)
        finally:
            runtime.cores = pool
    finally:
        runtime.graphs = None


@pytest.mark.parametrize("name", ["ties", "nested"])
def test_a_member_mix_generates_what_its_peft_export_generates(served, name, tmp_path):
    """`mixserve merge --format peft` of the same mix, loaded in PEFT, greedy-decodes the same tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merging.export import merge_to_disk

    runtime, adapters, specs, cores, _ = served
    merge_to_disk(specs[name], adapters, tmp_path / "merged", fmt="peft", base=DEMO / "base")
    base = AutoModelForCausalLM.from_pretrained(DEMO / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "merged").eval()
    for text in PROMPTS[:3]:
        ids = _ids(runtime, text)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                 pad_token_id=0)  # fmt: skip
        assert _greedy(runtime, [(ids, cores[name])])[0] == out[0, len(ids) :].tolist(), text


def test_members_evicted_and_loaded_again_serve_the_same_tokens(served):
    """A pool with room for 4 adapters: mixes over 6 adapters (two of them copies with other weights) take
    turns, evicting idle members; every mix generates what it generated first, and a pool that cannot fit
    a mix's members while others run refuses it without holding anything."""
    from merging.adapters import LoraAdapter
    from merging.member_merge import merge_members
    from merging.merge import merge_mix
    from merging.spec import parse_mix
    from server.adapters.member_pool import MemberPool
    from server.adapters.slots import PoolFullError

    runtime, adapters, _, _, _ = served
    more = dict(adapters)
    for name, src in (("sql2", "sql"), ("json2", "json")):
        a = adapters[src]
        more[name] = LoraAdapter(name, {m: type(f)(A=f.A.flip(0), B=f.B * 0.5, scale=f.scale) for m, f in a.modules.items()},
                                 fingerprint=name)  # fmt: skip
    specs = [
        parse_mix({"method": "ties", "density": 0.5, "children": [{"adapter": n} for n in names]})
        for names in (("sql", "json"), ("sql2", "json2", "python"), ("pystr", "sql2"), ("sql", "json2", "pystr"))
    ]
    ids = _ids(runtime, PROMPTS[0])
    pool = runtime.cores
    runtime.cores = MemberPool(pool.groups, 4, 4, pool.dtype, pool.device, max_members=4)
    try:
        mixes = [runtime.members_to_device(merge_members(s, more), more) for s in specs]
        first = [_greedy(runtime, [(ids, m)], steps=6)[0] for m in mixes]
        assert runtime.cores.adapters.evictions >= 3
        for s, want in zip(specs, first, strict=True):  # each is its own mix: the same as its merged factors
            factors = runtime.lora_to_device(merge_mix(s, more).to_lowrank().lowrank_factors())
            assert _greedy(runtime, [(ids, factors)], steps=6)[0] == want
        for m, want in zip(mixes[::-1] + mixes, first[::-1] + first, strict=True):
            assert _greedy(runtime, [(ids, m)], steps=6)[0] == want
        held = runtime.cores.acquire(mixes[1])  # 3 adapters held by a running row
        assert not runtime.cores.can_acquire(mixes[3])  # needs 2 more: only 1 free slot
        with pytest.raises(PoolFullError):
            runtime.cores.acquire(mixes[3])
        assert runtime.cores.adapters.in_use() == 3
        assert runtime.cores.can_acquire(mixes[2])  # pystr + the resident sql2
        runtime.cores.release(held)
        assert runtime.cores.adapters.in_use() == 0
    finally:
        runtime.cores = pool


def test_the_gathered_and_the_per_adapter_side_paths_agree(served):
    """Steps reading few distinct adapters run plain products per adapter, others gathered ones
    (``MemberPool.dense_max``): the same batch generates the same tokens either way."""
    runtime, _, _, cores, factors = served
    batch = [(_ids(runtime, PROMPTS[i % 4]), cores[name]) for i, name in enumerate(MIXES)]
    batch.insert(2, (_ids(runtime, PROMPTS[1]), factors["ties"]))
    batch.append((_ids(runtime, PROMPTS[3]), None))
    pool = runtime.cores
    dense = _greedy(runtime, batch, steps=6)
    old, pool.dense_max = pool.dense_max, 0
    try:
        gathered = _greedy(runtime, batch, steps=6)
    finally:
        pool.dense_max = old
    assert gathered == dense
