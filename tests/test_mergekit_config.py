"""mergekit configs as a way to write a mix: the translation, ``mixserve merge --config`` and ``POST
/admin/mixes`` with ``mergekit``; every config mixserve cannot honour refused in one sentence naming
the field. (That the translated mixes give mergekit's own result: ``test_mergekit_parity.py``.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from merging.adapters import load_adapter
from merging.merge import merge_mix
from merging.mergekit_config import MergekitConfigError, from_mergekit
from merging.spec import AdapterLeaf, canonical_json, parse_mix

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
TOKEN = "mergekit-test-token"


def resolve(ref: str) -> str | None:
    """A test resolver: 'base' is the base, 'base+X' and 'X' name adapter X, 'org/...' is a full model."""
    if ref == "base":
        return None
    model, plus, lora = ref.partition("+")
    if plus and model != "base":
        raise MergekitConfigError(f"{model!r} is not the base model")
    name = lora if plus else ref
    if "/" in name:
        raise MergekitConfigError(f"{name!r} is not a LoRA adapter")
    return name


def config(method="ties", params=None, models=None, **extra) -> dict:
    models = models or [{"model": "base+sql", "parameters": {"weight": 1.0}},
                        {"model": "json", "parameters": {"weight": 0.7, "density": 0.3}}]  # fmt: skip
    return {"merge_method": method, "base_model": "base", "parameters": params or {}, "models": models, **extra}


def test_a_config_becomes_one_mergekit_node_with_mergekits_defaults():
    mix = from_mergekit(config(params={"density": 0.5}), resolve).mix
    assert mix.convention == "mergekit" and mix.space == "dense"
    assert (mix.density, mix.normalize, mix.rescale, mix.lambda_) == (1.0, True, False, 1.0)  # mergekit's ties
    assert mix.children == [AdapterLeaf(adapter="sql", weight=1.0, density=0.5),
                            AdapterLeaf(adapter="json", weight=0.7, density=0.3)]  # fmt: skip
    assert [c.density for c in mix.params().children] == [0.5, 0.3]
    dare = from_mergekit(config("dare_ties", {"density": 0.5, "lambda": 0.9}), resolve).mix
    assert (dare.normalize, dare.rescale, dare.lambda_, dare.seed) == (False, True, 0.9, 0)
    della = from_mergekit(config("della", {"density": 0.5}), resolve).mix
    assert (della.normalize, della.rescale, della.epsilon) == (True, True, 0.15)
    # Exact in the low-rank space, and served at the adapters' own rank there.
    assert from_mergekit(config("task_arithmetic"), resolve).mix.space == "lowrank"
    assert from_mergekit(config("ties"), resolve, space="lowrank").mix.space == "lowrank"
    # The canonical form (the cache key) round-trips.
    assert canonical_json(parse_mix(mix.model_dump(exclude_none=True, by_alias=True))) == canonical_json(mix)


def test_linear_takes_the_base_model_as_an_input_as_mergekit_does():
    models = [{"model": "base", "parameters": {"weight": 2.0}}, {"model": "sql", "parameters": {"weight": 1.0}},
              {"model": "json", "parameters": {"weight": 1.0}}]  # fmt: skip
    mix = from_mergekit(config("linear", models=models), resolve).mix
    # (2 base + sql + json) / 4 = base + sql / 4 + json / 4
    assert [c.weight for c in mix.children] == [0.25, 0.25] and mix.normalize is False
    plain = from_mergekit({"merge_method": "linear", "models": models[1:]}, resolve).mix
    assert plain.normalize is True and [c.weight for c in plain.children] == [1.0, 1.0]
    with pytest.raises(MergekitConfigError, match=r"^base_model: linear merges the base model as one more"):
        from_mergekit(config("linear", models=models[1:]), resolve)
    with pytest.raises(MergekitConfigError, match=r"^parameters.normalize: linear without normalize scales the base"):
        from_mergekit(config("linear", {"normalize": False}, models=models[1:]) | {"base_model": None}, resolve)


REFUSED = [
    (config(slices=[{"sources": []}]), "slices: layer slices"),
    (config(modules={"text": {}}), "modules: per-module merges"),
    (config("passthrough"), "merge_method: passthrough stacks"),
    (config("slerp"), "merge_method: 'slerp' is not supported"),
    (config(tokenizer_source="union"), "tokenizer_source: tokenizer surgery"),
    (config(tokenizer={"source": "union"}), "tokenizer: tokenizer surgery"),
    (config(chat_template="chatml"), "chat_template: mixserve serves the base model's chat template"),
    (config(params={"density": [0.2, 0.8]}), "parameters.density: per-layer gradients"),
    (config(params={"density": [{"filter": "mlp", "value": 0.2}]}), "parameters.density: per-tensor filters"),
    (config(params={"drop_rate": 0.5}), "parameters.drop_rate: mergekit's ties does not take 'drop_rate'"),
    (config(params={"density": 1.5}), "parameters: density must be in (0, 1]"),
    (config(params={"weight": "heavy"}), "parameters.weight: must be a number"),
    (config(models=[{"model": "sql", "parameters": {"weight": 1, "lambda": 2}}]), "models[0].parameters.lambda: applies"),
    (config(models=[{"model": "sql"}]), "models[0].parameters.weight: mergekit needs a weight"),
    (config(models=[{"model": "org/full-finetune", "parameters": {"weight": 1}}]), "models[0].model: 'org/full-finetune' is not"),
    (config(models=[{"model": "other+sql", "parameters": {"weight": 1}}]), "models[0].model: 'other' is not the base"),
    (config(models=[{"model": "sql", "params": {}}]), "models[0].params: not a field"),
    (config(models=[{"model": "base", "parameters": {"weight": 1}}]), "models: no adapter to merge"),
    (config(base_model="sql"), "base_model: 'sql' is an adapter"),
    (config(base_model=None), "base_model: ties merges deltas from the base model"),
    (config(merge_dtype="float32"), "merge_dtype: not a mergekit 0.1.5 config field"),
    (config(dtype="int8"), "dtype: 'int8' is not one of"),
    (["not", "a", "mapping"], "a mergekit config is a YAML mapping"),
]  # fmt: skip


@pytest.mark.parametrize("bad,message", REFUSED, ids=[m.split(":")[0] for _, m in REFUSED])
def test_what_mixserve_cannot_honour_is_refused_naming_the_field(bad, message):
    with pytest.raises(MergekitConfigError) as info:
        from_mergekit(bad, resolve)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


@needs_demo
def test_mixserve_merge_config_writes_the_translated_mix(tmp_path, capsys):
    from mixserve.cli import main

    base, adapters = DEMO / "base", DEMO / "adapters"
    (tmp_path / "ties.yml").write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base), "dtype": "float64", "parameters": {"density": 0.4},
        "models": [{"model": f"{base}+{adapters / 'sql'}", "parameters": {"weight": 1.0}},
                   {"model": "json", "parameters": {"weight": 0.6}}]}))  # fmt: skip
    out = tmp_path / "merged"
    rc = main(["merge", "--config", str(tmp_path / "ties.yml"), "--adapter", f"json={adapters / 'json'}",
               "--out", str(out), "--space", "lowrank"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    written = load_adapter(out, "merged")
    loaded = {n: load_adapter(adapters / n, n) for n in ("sql", "json")}
    mix = parse_mix({"method": "ties", "convention": "mergekit", "density": 0.4, "space": "lowrank",
                     "children": [{"adapter": "sql"}, {"adapter": "json", "weight": 0.6}]})  # fmt: skip
    want = merge_mix(mix, loaded, dtype=torch.float64)  # the config's dtype: float64
    for module, d in want.modules.items():
        torch.testing.assert_close(written.modules[module].dense().double(), d.dense(), rtol=1e-5, atol=1e-7)
    # A refusal is one line naming the field, exit status 2; the config replaces --method and friends.
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"merge_method": "slerp", "models": [{"model": "x"}]}))
    assert main(["merge", "--config", str(tmp_path / "bad.yml"), "--out", str(tmp_path / "o2")]) == 2
    assert "merge_method: 'slerp' is not supported" in capsys.readouterr().err
    clash = ["merge", "--config", str(tmp_path / "ties.yml"), "--method", "ties", "--out", str(tmp_path / "o3")]
    assert main(clash) == 2
    assert "--config already defines the merge; drop --method" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server.config import ServeConfig
    from tests.server_harness import running_server

    root = tmp_path_factory.mktemp("adapters")
    for name in ("sql", "json"):
        shutil.copytree(DEMO / "adapters" / name, root / name)
    config = ServeConfig(model=DEMO / "base", adapters=root, admin_token=TOKEN)
    with running_server(config) as (url, _):
        yield url, root


@needs_demo
def test_admin_pins_a_mergekit_config_and_serves_it(server):
    url, root = server
    admin = {"Authorization": f"Bearer {TOKEN}"}
    shutil.copytree(DEMO / "adapters" / "python", root / "py_dir")  # a directory not registered yet
    text = yaml.safe_dump({"merge_method": "ties", "base_model": "mixserve-demo", "parameters": {"density": 0.5},
                           "models": [{"model": "mixserve-demo+sql", "parameters": {"weight": 1.0}},
                                      {"model": "py_dir", "parameters": {"weight": 0.7, "density": 0.3}},
                                      {"model": "mixserve-demo", "parameters": {"weight": 1.0}}]})  # fmt: skip
    r = httpx.post(url + "/admin/mixes", json={"name": "mk-ties", "mergekit": text, "space": "lowrank"}, headers=admin,
                   timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pinned"] and body["method"] == "ties" and body["space"] == "lowrank" and body["path"] == "members"
    assert body["mix"]["convention"] == "mergekit"
    assert [c["adapter"] for c in body["mix"]["children"]] == ["sql", "py_dir"]
    listed = httpx.get(url + "/admin/adapters", headers=admin).json()["adapters"]
    assert "py_dir" in [a["name"] for a in listed]  # registered
    prompt = "### task: sql\n### input: CREATE TABLE t (a INT) ; how many rows\n### output:\n"
    pinned = httpx.post(url + "/generate", json={"prompt": prompt, "mix": "mk-ties", "max_tokens": 24}, timeout=60)
    adhoc = httpx.post(url + "/generate", json={"prompt": prompt, "mix": body["mix"], "max_tokens": 24}, timeout=60)
    assert pinned.status_code == adhoc.status_code == 200
    assert pinned.json()["text"] == adhoc.json()["text"] and adhoc.json()["mix_key"] == body["key"]
    # Refusals: 400 with the field, nothing pinned; a path outside the adapter root is not read.
    for bad, message in ((text.replace("ties", "slerp"), "merge_method: 'slerp' is not supported"),
                         (text.replace("py_dir", "/etc"), "models[1].model: '/etc' is neither a registered adapter"),
                         ("merge_method: [", "mergekit: not valid YAML")):  # fmt: skip
        r = httpx.post(url + "/admin/mixes", json={"name": "mk-bad", "mergekit": bad}, headers=admin, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    many = yaml.safe_dump({"merge_method": "linear", "models": [{"model": "sql", "parameters": {"weight": 1}}] * 40})
    r = httpx.post(url + "/admin/mixes", json={"name": "mk-bad", "mergekit": many}, headers=admin, timeout=60)
    assert r.status_code == 400 and "models: 40 models (limit max_mix_adapters=16" in r.text, r.text
    r = httpx.post(url + "/admin/mixes", json={"name": "x", "mix": "sql", "mergekit": text}, headers=admin, timeout=60)
    assert r.status_code in (400, 422) and "exactly one of 'mix'" in r.text
    assert "mk-bad" not in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
