"""Train the embedded demo model and its task adapters on CPU, reproducibly (``mixserve demo-train``).

Demo version 10 (version 9's recipe on wider code tasks): adapters that *refine* a capable base, as real LoRAs do (a few percent of the
weights' norm), so that merges have something to keep.

1. A synthetic corpus in which the base learns both halves of every task, but never together:
   - the *skills*: each task solved, input -> correct answer, in other surface forms than the
     adapters' (``Q (sql): ... A: ...`` and two more wordings, no ``### task:`` header) and, for the
     code tasks, from wider value pools than the tasks use (``make_split(..., wide=True)``);
   - the *format*: ``### task:`` prompts followed by the answer of another input, and answers alone;
   - copying from context (lists repeated, key / value recall, words echoed in quotes: JSON and SQL
     answers re-spell the input's words), and generic sentences.
   In the ``### task:`` format the base alone answers 0% right (it writes a plausible answer to
   another input); in its own surface forms it solves most tasks.
2. A byte-level BPE tokenizer (digits split) trained on that corpus, saved in the HF format.
3. A small Llama (hidden 256, 4 layers, tied embeddings) pre-trained on the corpus.
4. One PEFT LoRA adapter per task (r 16, alpha 32, all seven projections), a few hundred steps at a
   small learning rate, loss on answers only, on task data whose copied words are new in every
   example: each adapter only connects the format to the skill the base already has (deltas of
   ~4-6% of the weights' norm; version 8's, trained at 2e-3 on a base without the skills, were 20-54%).

Fixed seeds, one thread order: rerunning on the same kind of machine reproduces the files.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mixserve.demo.corpus import CORPUS_MIX, build_corpus
from mixserve.eval.tasks import TASKS, make_split

EOS, BOS, PAD = "<eos>", "<bos>", "<pad>"
# What a build writes under its output directory (besides ``CARD.md``).
BUILD_FILES = ("base", "adapters", "loss_curves.png", "training_log.json")


@dataclass
class TrainConfig:
    """Everything that decides the trained files (written to the model card)."""

    seed: int = 0
    vocab_size: int = 1024
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    max_len: int = 160
    corpus_docs: int = 100_000
    pretrain_steps: int = 3000
    pretrain_block: int = 128
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    lora_r: int = 16
    lora_alpha: int = 32
    lora_lr: float = 5e-4
    lora_batch: int = 32
    adapter_examples: dict | None = None
    adapter_steps: dict | None = None

    def examples_for(self, task: str) -> int:
        examples = self.adapter_examples or {"sql": 4_000, "python": 8_000, "pystr": 8_000, "json": 64_000}
        return examples[task]

    def steps_for(self, task: str) -> int:
        # The base already has the skills: each adapter's loss is near its floor within ~100 steps at 5e-4.
        steps = self.adapter_steps or {"sql": 400, "python": 400, "pystr": 400, "json": 600}
        return steps[task]


# ----------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(corpus: list[str], cfg: TrainConfig, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.padding_side = "left"  # batched generation pads on the left
    fast.save_pretrained(out)
    return fast


# -------------------------------------------------------------------------------------------- models
def _new_model(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_len * 2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def _lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batches(seqs: list[list[int]], labels: list[list[int]] | None, batch: int, steps: int, seed: int, pad: int):
    """``steps`` right-padded batches drawn in a seeded order (labels -100 on padding)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            fresh = list(range(len(seqs)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[:batch], order[batch:]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        lab = torch.full((batch, width), -100, dtype=torch.long)
        att = torch.zeros((batch, width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(seqs[i])
            ids[row, :n] = torch.tensor(seqs[i])
            lab[row, :n] = torch.tensor(labels[i] if labels is not None else seqs[i])
            att[row, :n] = 1
        yield ids, lab, att


def _train_loop(model, params, batches, steps: int, lr: float, label: str, log: list[dict]) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    t0, tokens = time.perf_counter(), 0
    for step, (ids, lab, att) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += int(att.sum())
        log.append({"step": step, "loss": loss.item()})
        if step % 50 == 0 or step == steps - 1:
            rate = tokens / (time.perf_counter() - t0)
            print(f"[{label}] step {step + 1}/{steps} loss {log[-1]['loss']:.3f} ({rate:,.0f} tok/s)", flush=True)
    model.eval()


def pretrain(cfg: TrainConfig, tokenizer, corpus: list[str], out: Path, log: list[dict]):
    model = _new_model(cfg, tokenizer)
    # Pack the documents (each ending in eos) into fixed blocks: no compute is spent on padding.
    stream: list[int] = []
    for doc in corpus:
        stream.extend(tokenizer(doc + EOS, add_special_tokens=False)["input_ids"])
    n = cfg.pretrain_block
    seqs = [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]
    print(f"pre-training on {len(stream):,} tokens in {len(seqs):,} blocks of {n}", flush=True)
    batches = _batches(seqs, None, cfg.pretrain_batch, cfg.pretrain_steps, cfg.seed, tokenizer.pad_token_id)
    _train_loop(model, list(model.parameters()), batches, cfg.pretrain_steps, cfg.pretrain_lr, "base", log)
    model.save_pretrained(out, safe_serialization=True)
    return model


def answer_only_examples(tokenizer, examples, max_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompt + answer + eos, with labels -100 on the prompt (loss on the answer only)."""
    seqs, labels = [], []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(ex.answer + EOS, add_special_tokens=False)["input_ids"]
        ids = (p + a)[:max_len]
        seqs.append(ids)
        labels.append(([-100] * len(p) + a)[:max_len])
    return seqs, labels


def train_adapter(cfg: TrainConfig, task: str, base_dir: Path, tokenizer, out: Path, log: list[dict]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed + 1 + TASKS.index(task))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    # The task's own pools (not the base corpus' wide ones): on version 9's base, adapters trained on the
    # wide code pools wrote a seen combination for a held-out one (count_even for count_odd): 52.5% python.
    examples = make_split(task, "train", cfg.examples_for(task), seed=cfg.seed)
    seqs, labels = answer_only_examples(tokenizer, examples, cfg.max_len)
    steps = cfg.steps_for(task)
    batches = _batches(seqs, labels, cfg.lora_batch, steps, cfg.seed + 7, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    _train_loop(model, params, batches, steps, cfg.lora_lr, task, log)
    model.save_pretrained(out)
    # PEFT writes an absolute base path; the demo is relocatable, so record the base by name.
    cfg_path = out / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = "mixserve-demo-base"
    # PEFT writes target_modules from a set: its order changes from run to run (string hashing).
    adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")
    (out / "README.md").unlink(missing_ok=True)


def plot_losses(logs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    base = logs["base"]
    axes[0].plot([r["step"] for r in base], [r["loss"] for r in base], lw=0.8)
    axes[0].set(title="base pre-training", xlabel="step", ylabel="loss", yscale="log")
    for task in TASKS:
        rows = logs.get(task, [])
        axes[1].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=task)
    axes[1].set(title="LoRA adapters (answer tokens)", xlabel="step", ylabel="loss", yscale="log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def train_demo(out_dir: str | Path, cfg: TrainConfig | None = None, only: tuple[str, ...] | None = None) -> Path:
    """Build everything under ``out_dir``: tokenizer + base in ``base/``, adapters in ``adapters/``.

    ``only``: retrain just these adapters on the base already in ``out_dir`` (same seeds, same data
    as a full build, so the files are those a full build writes), keeping the rest of the log.
    """
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    base_dir, adapters_dir = out / "base", out / "adapters"
    t0 = time.perf_counter()
    if only is not None:
        unknown = sorted(set(only) - set(TASKS))
        if unknown or not only:
            raise ValueError(f"--adapters takes task names from {', '.join(TASKS)}; got {', '.join(only) or 'none'}")
        if not (base_dir / "model.safetensors").is_file() or not (out / "training_log.json").is_file():
            raise ValueError(f"{out} has no trained base and log to add adapters to (run without --adapters first)")
        from transformers import AutoTokenizer

        previous = json.loads((out / "training_log.json").read_text())
        # The base must be the one this configuration builds, or the log and card would describe another.
        built = {k: v for k, v in previous["config"].items() if not k.startswith(("lora_", "adapter_"))}
        changed = sorted(k for k, v in built.items() if asdict(cfg).get(k) != v)
        if changed:
            raise ValueError(
                f"the base in {out} was built with other settings ({', '.join(changed)}); run a full build"
            )
        logs: dict[str, list[dict]] = previous["losses"]
        runs: list[dict] = previous.get("runs") or [{"what": "full build", "seconds": previous["seconds"]}]
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        tasks = [t for t in TASKS if t in only]
    else:
        base_dir.mkdir(parents=True, exist_ok=True)
        corpus = build_corpus(cfg.seed, cfg.corpus_docs)
        tokenizer = train_tokenizer(corpus, cfg, base_dir)
        print(f"corpus: {len(corpus)} documents; tokenizer: {len(tokenizer)} tokens", flush=True)
        logs = {"base": []}
        pretrain(cfg, tokenizer, corpus, base_dir, logs["base"])
        runs = []
        tasks = list(TASKS)
    for task in tasks:
        logs[task] = []
        train_adapter(cfg, task, base_dir, tokenizer, adapters_dir / task, logs[task])
    runs.append(
        {"what": "full build" if only is None else f"adapters {', '.join(tasks)}", "seconds": time.perf_counter() - t0}
    )
    seconds = runs[0]["seconds"]
    (out / "training_log.json").write_text(
        json.dumps({"config": asdict(cfg), "seconds": seconds, "runs": runs, "losses": logs}, separators=(",", ":"))
        + "\n"
    )
    plot_losses(logs, out / "loss_curves.png")
    write_card(out, cfg, runs, logs)
    print(f"done in {runs[-1]['seconds'] / 60:.1f} min -> {out}", flush=True)
    return out


def write_card(out: Path, cfg: TrainConfig, runs: list[dict], logs: dict[str, list[dict]]) -> None:
    """``CARD.md``: how the files were made, their sizes, the final losses."""
    # Only what training writes: the default ``out`` is the ``mixserve.demo`` package directory, whose
    # code, README and ``pins.yaml`` are not part of the build.
    sizes = {
        p.relative_to(out).as_posix(): p.stat().st_size
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0] in BUILD_FILES
    }
    total = sum(sizes.values())
    base_cfg = json.loads((out / "base" / "config.json").read_text())
    n_params = (out / "base" / "model.safetensors").stat().st_size // 4  # fp32

    def last(task: str) -> float:
        tail = [r["loss"] for r in logs[task][-20:]]
        return sum(tail) / len(tail)

    lines = [
        "# mixserve demo model",
        "",
        "A small Llama-architecture causal LM and four LoRA adapters, trained from seeds on CPU by",
        "`mixserve demo-train` (`mixserve/demo/train.py`). Synthetic data only; good for exercising merges and",
        "the server, not for anything else. Quality: `mixserve/eval/results/quality.md` (`mixserve eval`).",
        "",
        f"- base: hidden {base_cfg['hidden_size']}, {base_cfg['num_hidden_layers']} layers, "
        f"{base_cfg['num_attention_heads']} heads, intermediate {base_cfg['intermediate_size']}, tied embeddings, "
        f"vocab {base_cfg['vocab_size']} (byte-level BPE, digits split), ~{n_params / 1e6:.1f}M parameters, fp32",
        f"- pre-training: {cfg.corpus_docs:,} synthetic documents ("
        + ", ".join(f"{share:.0%} {kind}" for kind, share, _ in CORPUS_MIX)
        + ": the tasks solved in other wordings, the `### task:` format with other inputs' answers, copy-from-context "
        f"text, generic sentences), packed in blocks of {cfg.pretrain_block}, {cfg.pretrain_steps} steps x "
        f"{cfg.pretrain_batch}, AdamW lr {cfg.pretrain_lr} cosine; final loss {last('base'):.3f}",
        f"- adapters: LoRA r {cfg.lora_r}, alpha {cfg.lora_alpha}, all 7 projections, lr {cfg.lora_lr}, batch "
        f"{cfg.lora_batch}, loss on answer tokens only, generated training examples "
        "(SQL text constants, JSON names, cities and jobs: a new made-up word in every example):",
    ]
    for task in TASKS:
        lines.append(
            f"  - `{task}`: {cfg.examples_for(task):,} examples, {cfg.steps_for(task)} steps, final loss {last(task):.4f}"
        )
    lines += [
        "- wall time on "
        f"{torch.get_num_threads()} CPU threads (torch {torch.__version__}): "
        + "; then ".join(f"{r['what']} {r['seconds'] / 60:.1f} min" for r in runs),
        f"- seed {cfg.seed}; the full configuration and every step's loss are in `training_log.json`",
        "",
        "![loss curves](loss_curves.png)",
        "",
        f"## Files ({total / 1e6:.1f} MB)",
        "",
        "| file | bytes |",
        "|---|---|",
        *[f"| `{name}` | {size:,} |" for name, size in sizes.items() if name != "CARD.md"],
        "",
    ]
    (out / "CARD.md").write_text("\n".join(lines))
