"""A random-weight Mistral-7B- or Qwen3-8B-shaped model directory and four random rank-16 adapters.

Nothing can be downloaded here, so realistic-width serving runs (``bench.serve --model``, ``bench.ops
--model``) use random weights of the real shapes: the step costs what a 7B's costs, the text is noise.
The tokenizer is a 32,000-word whitespace vocabulary (``w3`` ... ``w31999``; unknown words map to
``<unk>``), so prompts tokenize and generated ids decode; the adapters are named like the demo's
(``sql``, ``python``, ``pystr``, ``json``) so ``bench.serve``'s mixes apply to them.

    python -m bench.random_model --out /tmp/m7b --layers 32 --dtype bfloat16 --device cuda   # a GPU run
    python -m bench.random_model --out /tmp/mistral2l --layers 2                             # CPU, fp32
    python -m bench.random_model --out /tmp/qwen3l2 --family qwen3 --layers 2                # Qwen3-8B's layers

The vocabulary is 32,000 words for both (Qwen3's is 151,936: a 2-layer model's step would be mostly its
output layer, which says nothing about the layers' side paths).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from merging.synthetic import MISTRAL_7B, QWEN3_8B, LlamaShape, write_random_adapter
from mixserve.eval.tasks import TASKS as ADAPTERS  # named like the demo's: bench.serve's mixes use these names
from server.config import DTYPES


def write_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer over ``vocab`` ids: <unk>, <s>, </s>, then w3 ... w{vocab - 1}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 1 << 30}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


VOCAB = 32000
SHAPES = {"mistral": MISTRAL_7B, "qwen3": QWEN3_8B}
EXTRA = {"mistral": {"sliding_window": None}, "qwen3": {"head_dim": 128, "rope_theta": 1e6}}


def write_model(out: Path, layers: int, dtype: torch.dtype, device: str, max_len: int, seed: int = 0,
                family: str = "mistral") -> None:  # fmt: skip
    from transformers import AutoConfig, AutoModelForCausalLM

    s = SHAPES[family]
    config = AutoConfig.for_model(
        family, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=VOCAB,
        max_position_embeddings=max_len, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **EXTRA[family],
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU takes seconds where a CPU takes minutes at 7B
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the model directory (adapters go to OUT-adapters)")
    ap.add_argument(
        "--family",
        default="mistral",
        choices=sorted(SHAPES),
        help="mistral: Mistral-7B's shapes (default); qwen3: Qwen3-8B's (q/k norms, head_dim 128)",
    )
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the whole model's)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (default cpu)")
    ap.add_argument("--max-len", dest="max_len", type=int, default=4096, help="context (default 4096)")
    ap.add_argument("--rank", type=int, default=16, help="the adapters' LoRA rank (default 16)")
    args = ap.parse_args(argv)
    shape: LlamaShape = SHAPES[args.family]
    layers = args.layers or shape.layers
    if not 1 <= layers <= shape.layers:
        ap.error(f"--layers must be 1 to {shape.layers}")
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    write_model(args.out, layers, getattr(torch, args.dtype), args.device, args.max_len, family=args.family)
    write_tokenizer(args.out, VOCAB)
    adapters = args.out.with_name(args.out.name + "-adapters")
    shapes = shape.module_shapes(layers=layers)
    for seed, name in enumerate(ADAPTERS, start=1):
        write_random_adapter(adapters / name, shapes, rank=args.rank, alpha=2.0 * args.rank, seed=seed)
    print(f"wrote {args.out} and {adapters} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
