"""PEFT LoRA adapter directories: load into per-module factors, validate, save.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys as PEFT writes
them (``base_model.model.<module>.lora_A.weight`` of shape ``r x in`` and ``...lora_B.weight`` of
shape ``out x r``). The delta a module receives is ``dW = scale * B @ A`` with ``scale = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA). Pickled ``.bin`` adapters are refused without being opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from merging.delta import LowRankDelta

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be used, with the file (and module) that is wrong."""


# An adapter's factors for one module are a low-rank delta: dW = scale * B @ A.
LoraFactors = LowRankDelta


@dataclass
class LoraAdapter:
    """A loaded LoRA adapter: factors per module (by the module's name in the base model)."""

    name: str
    modules: dict[str, LoraFactors]
    base_model: str | None = None
    use_rslora: bool = False
    path: Path | None = None
    fingerprint: str = ""  # sha256 of config + weights: part of any cache key built on this adapter
    config: dict = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: f.rank for m, f in self.modules.items()}

    def check_base_shapes(self, base_shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise :class:`AdapterError` unless every module exists in the base with the same shape."""
        for module, f in self.modules.items():
            key = f"{module}.weight"
            if key not in base_shapes:
                known = sorted({".".join(k.split(".")[-3:-1]) for k in base_shapes})
                raise AdapterError(f"adapter {self.name!r}: module {module!r} is not an adaptable projection of the "
                                   f"base model (adaptable: {', '.join(known)})")  # fmt: skip
            if tuple(base_shapes[key]) != f.shape:
                raise AdapterError(
                    f"adapter {self.name!r}: module {module!r} adapts a {f.shape[0]}x{f.shape[1]} weight "
                    f"but the base model's is {'x'.join(map(str, base_shapes[key]))}"
                )


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    # PEFT's get_pattern_key: a pattern matches the end of the module name at a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing (a PEFT LoRA adapter directory needs {CONFIG_NAME})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {peft_type!r} is not supported (only LORA)")
    unsupported = {
        "use_dora": "DoRA adapters",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
        "modules_to_save": "modules_to_save (full module copies cannot be merged as LoRA deltas)",
        "trainable_token_indices": "trainable tokens",
        "lora_bias": "LoRA bias terms",
        "target_parameters": "adapters on nn.Parameter targets",
        "layer_replication": "layer replication",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise AdapterError(f"{cfg_path}: {what} are not supported ({key}={cfg[key]!r})")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: LoRA bias {cfg['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{cfg_path}: {key} must be a positive number, got {value!r}")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickled:
            raise AdapterError(
                f"{path}: only safetensors adapters are accepted; refusing pickle file(s) {pickled} "
                "without opening them (convert with safetensors.torch.save_file in a trusted environment)"
            )
        raise AdapterError(f"{weights}: missing")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from None


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Load a PEFT LoRA adapter directory; raise :class:`AdapterError` naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory")
    name = name or path.name
    cfg = _read_config(path)
    tensors = _read_tensors(path)
    weights_file = path / WEIGHTS_NAME

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_magnitude_vector" in key:
                raise AdapterError(f"{weights_file}: {key}: DoRA adapters are not supported")
            if "lora_embedding" in key:
                raise AdapterError(f"{weights_file}: {key}: LoRA on embeddings is not supported")
            raise AdapterError(f"{weights_file}: unexpected tensor {key!r} (only lora_A / lora_B weights)")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if not pairs:
        raise AdapterError(f"{weights_file}: no LoRA weights found")

    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[str, LoraFactors] = {}
    for module, ab in sorted(pairs.items()):
        where = f"{weights_file}: module {module!r}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterError(f"{where}: expected 2-D factors (only Linear layers), got {A.dim()}-D / {B.dim()}-D")
        if A.shape[0] != B.shape[1]:
            raise AdapterError(f"{where}: lora_A is {tuple(A.shape)} but lora_B is {tuple(B.shape)} (ranks differ)")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterError(f"{where}: factors must be floating point, got {A.dtype} / {B.dtype}")
        A, B = A.float(), B.float()
        for label, t in (("lora_A", A), ("lora_B", B)):
            if not torch.isfinite(t).all():
                raise AdapterError(f"{where}: {label} contains NaN or Inf")
        r = A.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        modules[module] = LoraFactors(A=A, B=B, scale=float(scale))

    digest = hashlib.sha256()
    digest.update(json.dumps(cfg, sort_keys=True).encode())
    with open(weights_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return LoraAdapter(
        name=name,
        modules=modules,
        base_model=cfg.get("base_model_name_or_path"),
        use_rslora=use_rslora,
        path=path,
        fingerprint=digest.hexdigest(),
        config=cfg,
    )


def save_adapter(
    path: str | Path,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``{module: (A [r, in], B [out, r])}`` as a PEFT LoRA adapter with scale 1 per module.

    Ranks may differ per module: the config gets ``r`` = the most common rank and ``rank_pattern`` /
    ``alpha_pattern`` for the others, with ``alpha = r`` everywhere so that ``scale = 1`` and the
    delta is exactly ``B @ A``. Modules with rank 0 (nothing to add) are left out. ``metadata``
    (e.g. the mix that produced the adapter) goes into the safetensors header, where PEFT ignores it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules = {m: ab for m, ab in modules.items() if ab[0].shape[0] > 0}
    if not modules:
        raise ValueError("nothing to save: every module's delta has rank 0")
    ranks = {m: int(A.shape[0]) for m, (A, _) in modules.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_main = max(counts, key=lambda r: (counts[r], r))
    # Full, escaped module names as patterns: they match only their own module.
    pattern = {re.escape(m): r for m, r in ranks.items() if r != r_main}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r_main,
        "lora_alpha": r_main,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {}
    for m, (A, B) in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = B.to(dtype).contiguous()
    save_file(tensors, path / WEIGHTS_NAME, metadata={**(metadata or {}), "format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return path
