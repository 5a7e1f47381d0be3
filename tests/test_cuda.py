"""On a CUDA device: captured decode graphs give the eager step's tokens, also after the mix pool grows,
and ``mixserve serve --device cuda`` answers base and mixed requests over HTTP. Skipped without a GPU
(the static-buffer path itself is tested on CPU in ``test_runtime.py``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from server.config import DEMO_DIR

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not (DEMO_DIR / "base" / "model.safetensors").is_file(), reason="the demo model is missing"),
]
PROMPTS = [
    "### task: sql\n### input: how many books have author bemi\n### output:\n",
    "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n",
    "the word zasago reversed is",
]


def _mix(runtime, spec):
    from merging.adapters import load_adapter
    from merging.merge import merge_mix
    from merging.spec import parse_mix

    adapters = {n: load_adapter(DEMO_DIR / "adapters" / n, n) for n in ("sql", "json")}
    return runtime.lora_to_device(merge_mix(parse_mix(spec), adapters).to_lowrank().lowrank_factors())


def _greedy(
    runtime, prompts: list[str], slots: list[int], steps: int = 8, cores: list[int] | None = None
) -> list[list[int]]:
    from server.worker.runtime import DecodeRow, PrefillChunk

    ids = [runtime.tokenizer(p)["input_ids"] for p in prompts]
    cores = cores or [0] * len(ids)
    tables = [runtime.kv.allocate(runtime.kv.blocks_for(len(i) + steps)) for i in ids]
    try:
        logits = runtime.prefill([PrefillChunk(i, 0, t, s, c) for i, t, s, c in zip(ids, tables, slots, cores,
                                                                                    strict=True)])  # fmt: skip
        tokens = [[int(x)] for x in logits.argmax(-1).tolist()]
        for _ in range(steps - 1):
            rows = [DecodeRow(t[-1], len(i) + len(t) - 1, b, s, c)
                    for i, t, b, s, c in zip(ids, tokens, tables, slots, cores, strict=True)]  # fmt: skip
            for t, x in zip(tokens, runtime.decode(rows).argmax(-1).tolist(), strict=True):
                t.append(int(x))
        return tokens
    finally:
        for t in tables:
            runtime.kv.free(t)


@pytest.mark.parametrize(("dtype", "grouped"), [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)],
                         ids=["bf16-masked", "bf16-grouped_mm", "fp32-masked"])  # fmt: skip
def test_captured_graphs_match_the_eager_step_also_after_the_pool_grows(dtype, grouped):
    """Replayed graphs against the same static-buffer step run eagerly (the same kernels: equal tokens),
    with graphs captured before and after the first mix grows the pool. CUDA's default side path is the
    masked one; grouped_mm is tested too (bf16 only)."""
    from server.worker.cuda_graphs import DecodeGraphs
    from server.worker.runtime import ModelRuntime

    runtime = ModelRuntime(DEMO_DIR / "base", device="cuda", dtype=dtype, max_loras=4, kv_cache_bytes=64 << 20,
                           cuda_graphs=True)  # fmt: skip
    assert not runtime.pool.grouped
    if grouped and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    runtime.pool.grouped = grouped
    captured = runtime.graphs
    base = _greedy(runtime, PROMPTS, [0, 0, 0])  # captured with an empty pool
    slots = [runtime.pool.acquire(_mix(runtime, "sql")), 0,
             runtime.pool.acquire(_mix(runtime, {"method": "ties", "density": 0.5,
                                                 "children": [{"adapter": "sql"}, {"adapter": "json"}]}))]  # fmt: skip
    assert runtime.pool.version > 0  # the first mix grew the pool: the graphs are captured again
    mixed = _greedy(runtime, PROMPTS, slots)
    assert captured._graphs and all(g.graph is not None for g in captured._graphs.values())
    runtime.graphs = DecodeGraphs(runtime, capture=False)
    assert _greedy(runtime, PROMPTS, [0, 0, 0]) == base
    assert _greedy(runtime, PROMPTS, slots) == mixed
    if dtype == torch.float32:  # and the plain step (other shapes, no padding rows) agrees in fp32
        runtime.graphs = None
        assert _greedy(runtime, PROMPTS, slots) == mixed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_member_mixes_in_captured_graphs_match_the_eager_step(dtype):
    """Graphs captured at start (every bucket and key width, base-only) and on first use (member rows padded
    to a power of two of members) against the same static step run eagerly, with member mixes beside a
    factor-pool mix and the base; then an adapter of a larger rank grows the pool (buffers reallocated,
    every graph captured again) and they still agree."""
    from merging.adapters import LoraAdapter, load_adapter
    from merging.member_merge import merge_members
    from merging.spec import parse_mix
    from merging.synthetic import random_factors
    from server.worker.cuda_graphs import DecodeGraphs
    from server.worker.runtime import ModelRuntime

    runtime = ModelRuntime(DEMO_DIR / "base", device="cuda", dtype=dtype, max_loras=4, core_slots=8,
                           adapter_slots=16, kv_cache_bytes=64 << 20, cuda_graphs=True)  # fmt: skip
    adapters = {n: load_adapter(DEMO_DIR / "adapters" / n, n) for n in ("sql", "python", "pystr", "json")}
    graphs = runtime.graphs
    assert graphs.capture_buckets(4) == 3 * len(runtime.key_widths())
    assert all(g.graph is not None for g in graphs._graphs.values())

    def core(spec):
        return runtime.cores.acquire(runtime.members_to_device(merge_members(parse_mix(spec), adapters), adapters))

    ties = {"method": "ties", "density": 0.5, "children": [{"adapter": n} for n in ("sql", "python", "pystr", "json")]}
    cores = [core(ties), 0, core("json")]
    factors = [0, runtime.pool.acquire(_mix(runtime, "sql")), 0]
    captured = _greedy(runtime, PROMPTS, factors, cores=cores)
    runtime.graphs = DecodeGraphs(runtime, capture=False)
    assert _greedy(runtime, PROMPTS, factors, cores=cores) == captured
    runtime.graphs = graphs
    shapes = {m: f.shape for m, f in adapters["sql"].modules.items()}
    adapters["extra"] = LoraAdapter("extra", random_factors(shapes, 32, 64.0, seed=5), fingerprint="extra")
    cores[1] = core("extra")  # the pool regrows to rank 32: captured again
    assert runtime.cores.rank == 32
    captured = _greedy(runtime, PROMPTS, [0, 0, 0], cores=cores)
    runtime.graphs = DecodeGraphs(runtime, capture=False)
    assert _greedy(runtime, PROMPTS, [0, 0, 0], cores=cores) == captured


def test_the_server_answers_on_cuda():
    import httpx

    from server.readiness import free_port, wait_until_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mixserve.cli", "serve", "--device", "cuda", "--dtype", "bfloat16",
                             "--port", str(port), "--log-level", "warning"])  # fmt: skip
    try:
        wait_until_ready(url, timeout=180, proc=proc)
        for mix in (None, "sql", {"method": "dare_ties", "drop_rate": 0.3, "children": [{"adapter": "json"},
                                                                                        {"adapter": "sql"}]}):  # fmt: skip
            body = {"prompt": PROMPTS[0], "max_tokens": 8, **({"mix": mix} if mix else {})}
            r = httpx.post(url + "/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["completion_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(30)
