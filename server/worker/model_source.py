"""Where ``--model`` points: a model directory, or a Hugging Face model id already in the local cache.

Offline, as transformers is with ``HF_HUB_OFFLINE=1``: nothing is downloaded. An id resolves to its cached
snapshot (``HF_HUB_CACHE`` / ``HF_HOME`` say where the cache is, as for transformers); a missing one is
refused in one sentence that says what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelNotFoundError(ValueError):
    """``--model`` is neither a model directory nor a model id in the local cache."""


def locate_model(value: str | Path, revision: str | None = None) -> tuple[Path, str | None]:
    """``(model directory, the id it came from or None)`` for a directory or a cached model id."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path, None
    text = str(value)
    if path.exists() or not MODEL_ID.match(text):
        raise ModelNotFoundError(f"--model {text} is not a directory")
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    try:
        snapshot = Path(snapshot_download(text, revision=revision, cache_dir=cache, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and its kin: not cached (or no such id); nothing was fetched
        raise ModelNotFoundError(
            f"--model {text}: no such directory, and no model {text!r} in the local Hugging Face cache ({cache}); "
            f"mixserve downloads nothing: fetch it first (`hf download {text}`) or pass its directory"
        ) from None
    if not (snapshot / "config.json").is_file():
        raise ModelNotFoundError(f"--model {text}: the cached snapshot {snapshot} has no config.json")
    return snapshot, text


def hub_cache() -> Path:
    """The Hugging Face hub cache as transformers finds it: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read at each call, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"
