"""A family beyond Llama's, end to end: `mixserve serve --model <id>` from a local Hugging Face cache
(offline) through uvicorn, the official ``openai`` client, a base row, an adapter row and an ad-hoc TIES
mix in one batch, each equal to transformers + PEFT greedy decoding."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from tests.conftest import make_peft_adapter
from tests.server_harness import running_server
from tests.test_families import CONFIGS, SMALL, _randomise

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "tokenizer.json").is_file(), reason="mixserve/demo not trained")
REPO, REVISION = "acme/tiny-gemma3", "0123456789abcdef0123456789abcdef01234567"
TIES = {"method": "ties", "density": 0.5, "children": [{"adapter": "a"}, {"adapter": "b", "weight": 0.8}]}
PROMPT = "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n"


@pytest.fixture(scope="module")
def cached_model(tmp_path_factory):
    """A random Gemma 3 (the demo's tokenizer) laid out as the hub cache holds a download, and two adapters."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("hf")
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "base")
    shape = {**SMALL, "vocab_size": len(tokenizer), "max_position_embeddings": 256}
    config = AutoConfig.for_model("gemma3_text", **shape, **CONFIGS["gemma3_text"])
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(hf, 0)
    repo = root / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    hf.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    adapters = root / "adapters"
    for name, seed in (("a", 1), ("b", 2)):
        make_peft_adapter(snapshot, adapters / name, seed=seed, r=4, alpha=8,
                          targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    return root / "hub", snapshot, adapters


def test_a_model_id_resolves_from_the_cache_and_a_missing_one_is_one_sentence(cached_model, monkeypatch):
    from server.worker.model_source import ModelNotFoundError, locate_model

    hub, snapshot, _ = cached_model
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert locate_model(REPO) == (snapshot, REPO)
    with pytest.raises(ModelNotFoundError, match=r"^--model acme/absent: no such directory, and no model 'acme/absent' "
                                                 r"in the local Hugging Face cache \(.*\); mixserve downloads nothing"):  # fmt: skip
        locate_model("acme/absent")
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        locate_model(str(snapshot / "config.json"))


def test_served_from_the_cache_id_the_openai_client_gets_transformers_and_peft_tokens(cached_model, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.adapters import load_adapter
    from merging.export import merge_to_disk
    from merging.spec import parse_mix
    from mixserve.cli import build_parser
    from server.entrypoints.serve_cli import config_from_args

    hub, snapshot, adapters = cached_model
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    args = build_parser().parse_args(["serve", "--model", REPO, "--adapters", str(adapters), "--max-batch", "4",
                                      "--block-size", "4"])  # fmt: skip
    config = config_from_args(args)
    assert config.model == snapshot and config.model_name == REPO
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    ids = tokenizer(PROMPT)["input_ids"]
    merge_to_disk(parse_mix(TIES), {n: load_adapter(adapters / n, n) for n in "ab"}, hub.parent / "ties", fmt="peft")

    def reference(adapter: Path | None) -> str:
        model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter).eval()
        seq = list(ids)
        with torch.no_grad():
            for _ in range(20):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        # As the server's detokenizer (and vLLM's) writes it: special tokens skipped, and an incomplete
        # UTF-8 character at the end held back for a token that never comes.
        return tokenizer.decode(seq[len(ids) :], skip_special_tokens=True).rstrip("\ufffd")

    with running_server(config) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} >= {REPO, "a", "b"}
        requests = [(REPO, None), ("a", None), (REPO, TIES)]  # concurrent: one batch, three mixes
        with ThreadPoolExecutor(len(requests)) as pool:
            texts = list(pool.map(lambda r: client.completions.create(
                model=r[0], prompt=PROMPT, max_tokens=20, temperature=0,
                extra_body={"mix": r[1], "ignore_eos": True} if r[1] else {"ignore_eos": True},
            ).choices[0].text, requests))  # fmt: skip
    want = [reference(None), reference(adapters / "a"), reference(hub.parent / "ties")]
    assert texts == want
    assert len(set(want)) == 3
    shutil.rmtree(hub.parent / "ties")


def test_merge_takes_a_cached_model_id_as_its_base(cached_model, monkeypatch, tmp_path, capsys):
    """`mixserve merge --format full --base <id>` folds a mix into the cached Gemma 3, offline."""
    from safetensors.torch import load_file

    from mixserve.cli import main

    hub, snapshot, adapters = cached_model
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert main(["merge", "--base", REPO, "--adapter", f"a={adapters / 'a'}", "--adapter", f"b={adapters / 'b'}",
                 "--method", "ties", "--density", "0.5", "--format", "full", "--out", str(tmp_path / "full")]) == 0  # fmt: skip
    merged, base = load_file(tmp_path / "full" / "model.safetensors"), load_file(snapshot / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].shape == base[key].shape and not torch.equal(merged[key], base[key])
    capsys.readouterr()
    assert main(["merge", "--base", "acme/absent", "--adapter", f"a={adapters / 'a'}", "--format", "full",
                 "--out", str(tmp_path / "none")]) == 2  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1].startswith("mixserve merge: --base acme/absent: no such directory")
