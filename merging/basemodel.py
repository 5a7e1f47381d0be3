"""Base model directories in the Hugging Face layout: weight shapes, and folding a delta in.

Only safetensors weights are read (``model.safetensors`` or shards listed in
``model.safetensors.index.json``); a directory with only pickled weights is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class BaseModelError(ValueError):
    """A base model directory that cannot be read or written as asked."""


def weight_files(base_dir: str | Path) -> list[Path]:
    """The safetensors files holding the base model's weights, in a stable order."""
    base = Path(base_dir)
    if not base.is_dir():
        raise BaseModelError(f"{base}: not a directory")
    index = base / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BaseModelError(f"{index}: malformed index ({e})") from None
        files = sorted({base / f for f in weight_map.values()})
    elif (base / SINGLE_NAME).is_file():
        files = [base / SINGLE_NAME]
    else:
        pickled = [p.name for p in base.glob("*.bin")]
        why = f"only pickle weights {pickled}, which are refused" if pickled else "no model.safetensors"
        raise BaseModelError(f"{base}: {why}; convert the model to safetensors")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise BaseModelError(f"{base}: weight files listed in the index are missing: {missing}")
    return files


def read_shapes(base_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from the safetensors headers, without loading any tensor."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(base_dir):
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    shapes[key] = tuple(sf.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise BaseModelError(f"{f}: not a readable safetensors file ({e})") from None
    return shapes


def write_merged_model(
    base_dir: str | Path,
    shapes: Mapping[str, tuple[int, int]],
    delta_for: Callable[[str], torch.Tensor | None],
    out_dir: str | Path,
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write ``base + dW`` for every module in ``shapes`` to ``out_dir``, shard by shard, same layout.

    ``delta_for(module)`` is called once per module, when its shard is written, so a caller can merge
    lazily and only one module's dense delta is alive at a time. Arithmetic is in fp32 and the
    result is cast back to each weight's dtype. Non-weight files (config, tokenizer, generation
    config) are copied; pickled files are not.
    """
    base, out = Path(base_dir), Path(out_dir)
    files = weight_files(base)
    base_shapes = read_shapes(base)
    targets = {f"{m}.weight": m for m in shapes}
    missing = sorted(k for k in targets if k not in base_shapes)
    if missing:
        raise BaseModelError(f"{base}: the merge adapts weights the base model does not have: {missing[:5]}")
    for key, module in targets.items():
        if tuple(base_shapes[key]) != tuple(shapes[module]):
            raise BaseModelError(f"{key}: base shape {base_shapes[key]} != delta shape {shapes[module]}")
    if out.resolve() == base.resolve():
        raise BaseModelError("refusing to overwrite the base model in place; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for p in base.iterdir():
        if p.is_file() and p.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            shutil.copy2(p, out / p.name)
    done = 0
    for f in files:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(f, framework="pt") as sf:
            metadata = sf.metadata() or {}
            for key in sf.keys():
                t = sf.get_tensor(key)
                if key in targets:
                    delta = delta_for(targets[key])
                    if delta is not None:
                        t = (t.float() + delta.float()).to(t.dtype)
                    done += 1
                    if progress is not None:
                        progress(done, len(targets), targets[key])
                tensors[key] = t.contiguous()
        metadata.setdefault("format", "pt")
        save_file(tensors, out / f.name, metadata=metadata)
    return out
