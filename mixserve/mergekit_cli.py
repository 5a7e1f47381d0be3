"""``mixserve merge --config mergekit.yml``: a mergekit config's models found on disk, translated to a mix.

mergekit names models by path (or hub id); here a model is the base (``base_model``, or ``--base``), an
adapter given as ``--adapter NAME=PATH`` (by name or by its path), an adapter directory, or mergekit's
LoRA syntax ``BASE+ADAPTER``. A full model that is no adapter, and a hub id that is not the base (nothing
is downloaded), are refused with the field that names them (``merging/mergekit_config.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from merging.adapters import CONFIG_NAME
from merging.mergekit_config import MergekitConfigError, from_mergekit, lora_resolver
from merging.spec import MixNode, leaves

DTYPES = {"float64": torch.float64}  # what the config's dtype changes here: float64 merges in float64


@dataclass
class ConfigMerge:
    """What ``mixserve merge`` needs to run a mergekit config."""

    mix: MixNode
    adapters: dict[str, Path]  # the adapters the mix names -> their directories
    base: str | None  # --base, or the config's base_model when it is a directory
    dtype: torch.dtype = torch.float32
    notes: list[str] = field(default_factory=list)


def _same_dir(a: str | Path, b: str | Path) -> bool:
    pa, pb = Path(a), Path(b)
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def load_config(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MergekitConfigError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise MergekitConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def from_config_file(path: Path, given: dict[str, Path], base: str | None, space: str | None) -> ConfigMerge:
    """Read and translate a mergekit config; adapters named by path get their directory's name."""
    config = load_config(path)
    base_ref = config.get("base_model") if isinstance(config, dict) else None
    bases = [b for b in (base, base_ref) if isinstance(b, str)]
    found: dict[str, Path] = {}

    def adapter(ref: str) -> str:
        if ref in given:
            found[ref] = given[ref]
            return ref
        for name, p in given.items():
            if _same_dir(p, ref):
                found[name] = p
                return name
        directory = Path(ref)
        if (directory / CONFIG_NAME).is_file():
            name = directory.resolve().name
            while name in given or (name in found and not _same_dir(found[name], directory)):
                name += "_"
            found[name] = directory
            return name
        if (directory / "config.json").is_file():
            raise MergekitConfigError(f"{ref!r} is a full model, not a LoRA adapter (mixserve merges adapters' deltas:"
                                      " write BASE+ADAPTER or an adapter directory)")  # fmt: skip
        raise MergekitConfigError(f"{ref!r} is neither an --adapter name nor an adapter directory ({CONFIG_NAME}); "
                                  "nothing is downloaded")  # fmt: skip

    def is_base(ref: str) -> bool:
        return any(ref == b or _same_dir(ref, b) for b in bases)

    resolve = lora_resolver(is_base, adapter, bases[0] if bases else "")
    translated = from_mergekit(config, resolve, space=space)
    names = {leaf.adapter for leaf in leaves(translated.mix)}
    base_dir = base if base is not None else base_ref if base_ref and Path(base_ref).is_dir() else None
    return ConfigMerge(translated.mix, {n: found[n] for n in names}, base_dir,
                       DTYPES.get(translated.dtype or "", torch.float32), translated.notes)  # fmt: skip
