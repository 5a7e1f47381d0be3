"""``mixserve demo-train`` is reproducible: the same seed gives byte-identical files (a tiny config)."""

from __future__ import annotations

import hashlib

import pytest


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors")) + sorted(root.rglob("*_config.json"))
            + sorted(root.rglob("tokenizer.json"))}  # fmt: skip


def _tiny_config():
    from mixserve.demo.train import TrainConfig

    return TrainConfig(vocab_size=300, hidden=32, layers=2, heads=2, intermediate=64, corpus_docs=400,
                       pretrain_steps=3, pretrain_batch=4, lora_r=4, lora_alpha=8, lora_batch=4,
                       adapter_examples=dict.fromkeys(("sql", "python", "pystr", "json"), 32),
                       adapter_steps={"sql": 2, "python": 2, "pystr": 2, "json": 2})  # fmt: skip


@pytest.mark.slow
def test_two_runs_with_one_seed_write_identical_models(tmp_path):
    pytest.importorskip("peft")
    from mixserve.demo.train import TrainConfig, train_demo

    cfg = _tiny_config()
    a = _digests(train_demo(tmp_path / "a", cfg))
    b = _digests(train_demo(tmp_path / "b", cfg))
    assert len(a) == 12 and a == b  # base, tokenizer and their configs, four adapters and theirs
    c = _digests(train_demo(tmp_path / "c", TrainConfig(**{**cfg.__dict__, "seed": 1})))
    assert c["base/model.safetensors"] != a["base/model.safetensors"]


@pytest.mark.slow
def test_retraining_some_adapters_writes_what_a_full_build_writes(tmp_path):
    pytest.importorskip("peft")
    from mixserve.demo.train import TrainConfig, train_demo

    cfg = _tiny_config()
    full = _digests(train_demo(tmp_path / "a", cfg))
    sql = tmp_path / "a" / "adapters" / "sql" / "adapter_model.safetensors"
    sql.write_bytes(b"stale")
    again = _digests(train_demo(tmp_path / "a", cfg, only=("sql",)))
    assert again == full
    log = (tmp_path / "a" / "training_log.json").read_text()
    assert '"what":"full build"' in log and '"what":"adapters sql"' in log
    with pytest.raises(ValueError, match="task names"):
        train_demo(tmp_path / "a", cfg, only=("sqlx",))
    with pytest.raises(ValueError, match=r"other settings \(seed\)"):
        train_demo(tmp_path / "a", TrainConfig(**{**cfg.__dict__, "seed": 1}), only=("sql",))
    with pytest.raises(ValueError, match="no trained base"):
        train_demo(tmp_path / "empty", cfg, only=("sql",))
