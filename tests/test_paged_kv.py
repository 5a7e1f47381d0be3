"""Paged KV cache and the mix pool: allocation, freeing, sizing, slots; admission by free blocks."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import pytest
import torch

from server.adapters.lora_pool import LoraPool, prepare_lora
from server.adapters.slots import PoolFullError
from server.worker.architectures import LLAMA_GROUPS
from server.worker.kv_cache import (
    NULL_BLOCK,
    OutOfBlocksError,
    PagedKVCache,
    bytes_per_block,
    check_fits,
    cpu_kv_budget,
    cuda_kv_budget,
)

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")


def test_blocks_are_handed_out_once_and_come_back():
    kv = PagedKVCache(layers=2, num_blocks=9, block_size=4, kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    assert kv.usable_blocks == kv.free_blocks == 8 and kv.capacity_tokens == 32
    assert kv.blocks_for(1) == 1 and kv.blocks_for(4) == 1 and kv.blocks_for(5) == 2
    a, b = kv.allocate(3), kv.allocate(5)
    assert NULL_BLOCK not in a + b and len(set(a + b)) == 8 and kv.free_blocks == 0
    with pytest.raises(OutOfBlocksError):
        kv.allocate(1)
    kv.free(a)
    with pytest.raises(ValueError, match="twice"):
        kv.free(a)
    with pytest.raises(ValueError):
        kv.free([NULL_BLOCK])
    assert sorted(kv.allocate(3)) == sorted(a)
    assert kv.layer(1).shape == (9 * 4, 4, 8)  # [positions, 2 * kv heads, head dim]
    with pytest.raises(ValueError, match="lower --max-len to at most 32"):
        check_fits(33, kv, "test budget")
    check_fits(32, kv, "test budget")


def test_defaults_size_a_mistral_7b_cache_to_a_full_context_on_an_80_gb_gpu():
    """The arithmetic `--device cuda --dtype bfloat16` runs at start (no GPU needed to check it): after
    14.5 GB of bf16 weights on an 80 GB card, the default budget holds many 32k-token contexts."""
    gib = 2**30
    total, weights = 80 * gib, int(14.5e9)
    budget, reserve, note = cuda_kv_budget(total - weights - gib // 2, total, 0.9, None)  # + CUDA context
    per_block = bytes_per_block(32, 16, 8, 128, torch.bfloat16)  # Mistral-7B: 32 layers, 8 KV heads of 128
    tokens = (budget // per_block - 1) * 16
    assert tokens >= 32768 * 8 and reserve > 4 * gib and "90% of 80.0 GiB" in note
    assert budget + reserve + weights + gib // 2 <= 0.9 * total + 1


def test_the_cpu_default_takes_at_most_a_quarter_of_available_memory():
    per_block = bytes_per_block(32, 16, 8, 128, torch.float32)  # a 7B model in fp32: 2 MiB a block
    budget, note = cpu_kv_budget(per_block, 16, 32 * 4096, available=24 * 2**30)
    assert budget == 6 * 2**30 and "quarter" in note
    budget, note = cpu_kv_budget(per_block, 16, 4096, available=24 * 2**30)
    assert budget == per_block * 257 and note == "default: 4096 tokens"


@needs_demo
def test_a_context_the_cache_cannot_hold_is_refused_at_start_saying_what_fits():
    from server.worker.runtime import ModelRuntime, ServingError

    per_block = 4 * 16 * 2 * 4 * 64 * 4  # demo: layers x block x (k, v) x kv heads x head dim x fp32
    with pytest.raises(ServingError, match=r"does not fit the KV cache: 10 blocks of 16 tokens hold 160 .*at most 160"):
        ModelRuntime(DEMO / "base", kv_cache_bytes=11 * per_block)  # the demo's context is 320
    runtime = ModelRuntime(DEMO / "base", kv_cache_bytes=11 * per_block, max_len=160)
    assert runtime.kv.capacity_tokens == 160 and runtime.kv.nbytes == 11 * per_block


def _mix(rank: int, seed: int, width: int = 8) -> object:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for p, (o, i) in {"self_attn.q_proj": (width, width), "self_attn.v_proj": (4, width),
                      "mlp.down_proj": (width, 12)}.items():  # fmt: skip
        factors[f"model.layers.0.{p}"] = (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g))
    return prepare_lora(factors, _LAYOUT, torch.device("cpu"), torch.float32)


_LAYOUT = {f"0.{g}": [f"model.layers.0.{p}" for p in names] for g, names in LLAMA_GROUPS}


def _pool(max_loras: int) -> LoraPool:
    ins, outs = {"0.qkv": 8, "0.o": 8, "0.gateup": 8, "0.down": 12}, {"0.qkv": (8, 4, 4), "0.o": (8,),
                                                                       "0.gateup": (12, 12), "0.down": (8,)}  # fmt: skip
    groups = {key: (ins[key], _LAYOUT[key], outs[key]) for key in _LAYOUT}
    return LoraPool(groups, max_loras, torch.float32, torch.device("cpu"))


def _side(pool: LoraPool, x: torch.Tensor, slots: list[int]) -> list[torch.Tensor]:
    out = torch.zeros(len(slots), 8 + 4 + 4)
    plan = pool.plan(slots, lambda values, dtype: torch.tensor(values, dtype=dtype))
    if plan is not None:
        pool.add_side("0.qkv", x, out, plan)
    return list(out.split((8, 4, 4), dim=1))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "masked"])
def test_the_pool_adds_each_rows_own_mix_and_keeps_slots_until_needed(grouped):
    pool = _pool(max_loras=2)
    pool.grouped = grouped
    small, big, third = _mix(4, 0), _mix(20, 1), _mix(8, 2)
    s_small = pool.acquire(small)
    assert pool.rank == 16 and pool.acquire(None) == 0
    x = torch.randn(5, 8)
    before = _side(pool, x, [0, s_small, s_small, s_small, s_small])
    s_big = pool.acquire(big)  # a larger rank: every buffer regrows, the loaded mix is copied back
    assert pool.rank == 32 and s_big != s_small
    rows = sorted([0, s_small, s_small, s_big, s_big])
    got = _side(pool, x, rows)
    for row, slot in enumerate(rows):  # against each row's own factors
        mix = {0: None, s_small: small, s_big: big}[slot]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            want = torch.zeros(got[j].shape[1])
            if mix is not None and f"model.layers.0.self_attn.{proj}" in mix.module_factors():
                A, B = mix.module_factors()[f"model.layers.0.self_attn.{proj}"]
                want = x[row] @ A.T @ B.T
            torch.testing.assert_close(got[j][row], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(before[0][1:], _side(pool, x, [0] + [s_small] * 4)[0][1:])
    # Both slots in use: a third mix must wait; once one is released it takes that slot (LRU).
    assert not pool.can_acquire(third)
    with pytest.raises(PoolFullError):
        pool.acquire(third)
    pool.release(s_small)
    assert pool.acquire(small) == s_small  # still loaded: no copy, same slot
    pool.release(s_small)
    assert pool.can_acquire(third) and pool.acquire(third) == s_small and pool.slot_of(small) is None
    with pytest.raises(ValueError, match="released more often"):
        pool.release(s_small)
        pool.release(s_small)


@needs_demo
def test_admission_waits_for_free_blocks_and_every_block_comes_back():
    """A cache with room for two requests at a time: six concurrent ones queue, all finish with the text
    they get alone, at most two ran together, and afterwards every block is free."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.config import ServeConfig
    from tests.server_harness import running_server

    per_block = 4 * 16 * 2 * 4 * 64 * 4
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", admin_token="t", max_len=160,
                         kv_cache_bytes=13 * per_block, pin_file=None)  # fmt: skip
    prompts = [f"### task: json\n### input: meet pudo{i}, a pifu aged 3{i} from boto.\n### output:\n" for i in range(6)]
    with running_server(config) as (url, _app):

        def gen(p: str) -> str:
            r = httpx.post(url + "/generate", json={"prompt": p, "mix": "json", "max_tokens": 40}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["text"]

        alone = [gen(p) for p in prompts]
        with cf.ThreadPoolExecutor(6) as ex:
            together = list(ex.map(gen, prompts))
        assert together == alone
        cache = httpx.get(url + "/admin/cache", headers={"Authorization": "Bearer t"}).json()
        assert cache["kv_blocks"] == 12 and cache["kv_blocks_free"] == 12
        batch = {s.labels.get("le"): s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                 if f.name == "mixserve_batch_size" for s in f.samples if s.name.endswith("_bucket")}  # fmt: skip
        assert batch["2.0"] == batch["+Inf"] > 0  # never more than two sequences decoding together


def test_a_failed_load_leaves_the_pool_usable_and_idle_slots_do_not_keep_mixes_alive(monkeypatch):
    import gc
    import weakref

    pool = _pool(max_loras=1)
    first = _mix(4, 0)
    slot = pool.acquire(first)
    pool.release(slot)
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None  # the idle slot held it only weakly: its memory was the mix cache's to free
    big = _mix(20, 1)

    def out_of_memory(rank):
        raise MemoryError("device")

    monkeypatch.setattr(pool, "_grow", out_of_memory)
    with pytest.raises(MemoryError):
        pool.acquire(big)  # growing to rank 32 fails: nothing changed
    assert pool.rank == 16 and pool.can_acquire(big)
    monkeypatch.undo()
    assert pool.acquire(big) == slot and pool.rank == 32
    assert pool.acquire(prepare_lora({}, _LAYOUT, torch.device("cpu"), torch.float32)) == 0  # a mix with no factors


@needs_demo
def test_a_failed_admission_fails_only_its_request_and_frees_its_blocks():
    from server.config import ServeConfig
    from tests.server_harness import running_server

    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", admin_token="t", pin_file=None)
    with running_server(config) as (url, app):
        runtime = app.state.server.runtime
        real = runtime.acquire
        calls = []

        def fails_once(mix):
            calls.append(mix)
            if len(calls) == 1:
                raise MemoryError("out of device memory copying the mix in")
            return real(mix)

        runtime.acquire = fails_once
        body = {"prompt": "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n",
                "mix": "json", "max_tokens": 8}  # fmt: skip
        r = httpx.post(url + "/generate", json=body, timeout=60)
        assert r.status_code == 500 and "out of device memory" in r.json()["error"]["message"]
        assert httpx.post(url + "/generate", json=body, timeout=60).status_code == 200  # still serving
        cache = httpx.get(url + "/admin/cache", headers={"Authorization": "Bearer t"}).json()
        assert cache["kv_blocks_free"] == cache["kv_blocks"]


@needs_demo
def test_the_server_refuses_a_context_its_kv_cache_cannot_hold_and_says_why():
    from server.config import ServeConfig
    from tests.server_harness import running_server

    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", pin_file=None, kv_cache_bytes=1 << 20)
    with pytest.raises(RuntimeError, match=r"lower --max-len to at most 112"), running_server(config):
        pass


def test_serve_flags_reject_sizes_that_cannot_work(capsys):
    from mixserve.cli import build_parser

    for flags, needle in ((["--block-size", "0"], "--block-size: must be positive"),
                          (["--max-loras", "-1"], "--max-loras: must be positive"),
                          (["--memory-utilization", "1.5"], "must be in (0, 1]")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["serve", *flags])  # parsing only: nothing is started
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_shared_blocks_return_to_the_free_list_with_their_last_holder_and_copies_are_exact():
    """The choices of one request share the prompt's full blocks (reference counts) and copy its last one."""
    cache = PagedKVCache(2, 8, 4, 1, 2, torch.float32, "cpu")
    blocks = cache.allocate(3)
    shared = cache.share(blocks[:2])
    own = cache.allocate(1)
    cache.data[:, blocks[2]] = torch.randn(2, 4, 2, 2)
    cache.copy_block(blocks[2], own[0])
    assert torch.equal(cache.data[:, own[0]], cache.data[:, blocks[2]])
    free = cache.free_blocks
    cache.free(blocks)  # the first holder: only its unshared block comes back
    assert cache.free_blocks == free + 1
    cache.free(shared + own)
    assert cache.free_blocks == cache.usable_blocks
    with pytest.raises(ValueError):
        cache.free(shared)  # freed twice
    with pytest.raises(ValueError):
        cache.share([5])  # never allocated
