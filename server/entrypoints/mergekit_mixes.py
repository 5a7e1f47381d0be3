"""``POST /admin/mixes`` with a mergekit config: its models found among the server's adapters.

A model is the served base (its name, the directory or model id it was started with), a registered
adapter's name, an adapter directory under the adapter root (registered under the directory's name if it
is not yet), or mergekit's LoRA syntax ``BASE+ADAPTER`` over those. Nothing outside the adapter root is
read, nothing is downloaded; the translation itself is ``merging/mergekit_config.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from merging.adapters import AdapterError
from merging.mergekit_config import MergekitConfigError, MergekitMix, from_mergekit, lora_resolver
from server.adapters.registry import NAME, confined
from server.entrypoints.state import RequestError, ServerState


def parse_config(raw: str | dict[str, Any]) -> Any:
    """The config as a mapping: given as one, or as YAML text (mergekit's format)."""
    if isinstance(raw, dict):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RequestError(400, f"mergekit: not valid YAML ({str(exc).splitlines()[0]})", "mergekit") from None


def mix_from_mergekit(state: ServerState, raw: str | dict[str, Any], space: str | None) -> MergekitMix:
    """Translate a config (worker thread: it may register adapter directories); 400 naming the field."""
    config = parse_config(raw)
    limit = state.config.limits.max_mix_adapters + 1  # the adapters, and the base listed among them
    if isinstance(config, dict) and isinstance(config.get("models"), list) and len(config["models"]) > limit:
        raise RequestError(400, f"mergekit config: models: {len(config['models'])} models (limit max_mix_adapters="
                           f"{limit - 1}, plus the base)", "mergekit", "mix_too_large")  # fmt: skip
    model = Path(state.config.model)
    bases = {state.base_name, str(state.config.model), state.config.model_name or state.base_name}

    def is_base(ref: str) -> bool:
        if ref in bases:
            return True
        try:
            return Path(ref).is_dir() and Path(ref).resolve() == model.resolve()
        except (OSError, ValueError):
            return False

    def adapter(ref: str) -> str:
        if ref in state.registry:
            return ref
        try:
            directory = confined(state.registry.root, ref)
        except AdapterError:
            raise MergekitConfigError(f"{ref!r} is neither a registered adapter nor a directory under the adapter "
                                      "root (nothing outside it is read, nothing is downloaded)") from None  # fmt: skip
        for name in state.registry.names():
            known = state.registry[name].path
            if known is not None and Path(known).resolve() == directory:
                return name
        name = directory.name
        if not NAME.match(name) or name in state.registry:
            raise MergekitConfigError(f"{ref!r}: register it first (POST /admin/adapters): its directory name "
                                      f"{name!r} is taken or not a valid name")  # fmt: skip
        try:
            state.register_adapter(name, str(directory))
        except AdapterError as exc:
            raise MergekitConfigError(f"{ref!r}: {exc}") from None
        return name

    try:
        return from_mergekit(config, lora_resolver(is_base, adapter, repr(state.base_name)), space=space)
    except MergekitConfigError as exc:
        raise RequestError(400, f"mergekit config: {exc}", "mergekit", "invalid_mergekit_config") from None
