"""Core-space serving: mixes over the adapter family served from shared bases and per-mix cores give
the tokens of the same mix through full factors and through its `mixserve merge --format peft` export."""

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
    """A runtime with the demo's family installed, and every mix both as cores and as full factors."""
    from merging.adapters import load_adapter
    from merging.core_merge import merge_core
    from merging.family import AdapterFamily
    from merging.merge import merge_mix
    from merging.spec import parse_mix
    from server.runtime import ModelRuntime

    runtime = ModelRuntime(DEMO / "base", max_loras=8, core_slots=8)
    adapters = {n: load_adapter(DEMO / "adapters" / n, n) for n in NAMES}
    family, refused = AdapterFamily().extend_all(adapters.values())
    assert not refused
    runtime.cores.install(family)
    specs = {k: parse_mix(v) for k, v in MIXES.items()}
    cores = {k: runtime.cores_to_device(merge_core(s, family)) for k, s in specs.items()}
    factors = {
        k: runtime.lora_to_device(merge_mix(s, adapters).to_lowrank().lowrank_factors()) for k, s in specs.items()
    }
    return runtime, adapters, specs, cores, factors, family


def _ids(runtime, text: str) -> list[int]:
    return runtime.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("name", list(MIXES))
def test_a_core_mix_generates_what_its_factors_generate(served, name):
    runtime, _, _, cores, factors, _ = served
    for text in PROMPTS[:3]:
        ids = _ids(runtime, text)
        assert _greedy(runtime, [(ids, cores[name])]) == _greedy(runtime, [(ids, factors[name])]), text


def test_core_mix_logits_match_the_factor_path(served):
    from server.runtime import PrefillChunk

    runtime, _, _, cores, factors, _ = served
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
    # One delta served two ways (U C V^T, factors): float32 rounding in different orders, ~1e-5 on logits
    # of ~20 on any kernel set. (It failed at atol 1e-3 on an AVX-512 Xeon when the two merges' float32
    # bases trimmed different core entries; their decisions are float64 now, merging/README.md.)
    torch.testing.assert_close(out["core"], out["factors"], rtol=1e-5, atol=1e-4)


def test_one_batch_of_core_factor_and_base_rows(served):
    """Rows on six core mixes, factor mixes and the base in one prefill and decode: each generates what it
    generates alone (and the mixes differ from each other)."""
    runtime, _, _, cores, factors, _ = served
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


def test_the_static_buffer_decode_serves_core_rows(served):
    """The decode a CUDA graph captures (padded bucket, every slot's cores in the static plan), run eagerly."""
    from server.cuda_graphs import DecodeGraphs

    runtime, _, _, cores, factors, _ = served
    batch = [(_ids(runtime, PROMPTS[0]), cores["ties"]), (_ids(runtime, PROMPTS[1]), factors["dare_ties"]),
             (_ids(runtime, PROMPTS[3]), None), (_ids(runtime, PROMPTS[2]), cores["nested"]),
             (_ids(runtime, PROMPTS[1]), cores["linear"])]  # fmt: skip
    plain = _greedy(runtime, batch, steps=8)
    runtime.graphs = DecodeGraphs(runtime, capture=False)
    try:
        # Every bucket and key width up front, base-only and with core rows (the server does it at start).
        assert runtime.graphs.capture_buckets(8) == 4 * 4 * 2  # buckets 1, 2, 4, 8 x widths 4, 8, 16, 32
        assert _greedy(runtime, batch, steps=8) == plain
        assert _greedy(runtime, batch[:1], steps=8) == plain[:1]
        assert (8, 4, True, True) in runtime.graphs._graphs  # factor-pool rows: captured on first use
        assert (1, 4, False, True) in runtime.graphs._graphs
    finally:
        runtime.graphs = None


@pytest.mark.parametrize("name", ["ties", "nested"])
def test_a_core_mix_generates_what_its_peft_export_generates(served, name, tmp_path):
    """`mixserve merge --format peft` of the same mix, loaded in PEFT, greedy-decodes the same tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merging.export import merge_to_disk

    runtime, adapters, specs, cores, _, _ = served
    merge_to_disk(specs[name], adapters, tmp_path / "merged", fmt="peft", base=DEMO / "base")
    base = AutoModelForCausalLM.from_pretrained(DEMO / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "merged").eval()
    for text in PROMPTS[:3]:
        ids = _ids(runtime, text)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                 pad_token_id=0)  # fmt: skip
        assert _greedy(runtime, [(ids, cores[name])])[0] == out[0, len(ids) :].tolist(), text


def test_the_pool_regrows_when_the_family_does_and_keeps_older_cores(served):
    """A family extended past the pool's padded rank: buffers reallocated, the loaded cores (merged at the
    older version) generate what they did."""
    from merging.adapters import LoraAdapter
    from merging.core_merge import merge_core
    from merging.synthetic import random_factors
    from server.core_pool import CorePool

    runtime, adapters, specs, cores, _, _ = served
    ids = _ids(runtime, PROMPTS[0])
    before = _greedy(runtime, [(ids, cores["ties"])])
    pool = runtime.cores
    runtime.cores = CorePool(pool.groups, 4, pool.dtype, pool.device)  # a fresh pool for this test
    try:
        family = served[5]
        runtime.cores.install(family)
        slot = runtime.cores.acquire(cores["ties"])
        shapes = {m: f.shape for m, f in adapters["sql"].modules.items()}
        extra = LoraAdapter("extra", random_factors(shapes, 16, 32.0, seed=5), fingerprint="extra")
        grown = family.extend(extra)
        assert grown.rank == 80 and runtime.cores.rank == 64
        version = runtime.cores.version
        newer = runtime.cores_to_device(merge_core(specs["sql"], grown))
        with pytest.raises(ValueError, match="never offered"):
            runtime.cores.acquire(newer)
        runtime.cores.offer(grown)
        assert runtime.cores.rank == 64  # offered, not installed yet
        second = runtime.cores.acquire(newer)  # installs the grown family: the buffers regrow to 80
        assert runtime.cores.rank == 80 and runtime.cores.version == version + 1
        assert _greedy(runtime, [(ids, cores["ties"])]) == before
        assert _greedy(runtime, [(ids, newer)]) == _greedy(runtime, [(ids, cores["sql"])])
        runtime.cores.release(slot)
        runtime.cores.release(second)
    finally:
        runtime.cores = pool
