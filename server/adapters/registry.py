"""Adapters the server knows, loaded only from inside the configured adapter root."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from merging.adapters import WEIGHTS_NAME, AdapterError, LoraAdapter, load_adapter

log = logging.getLogger("mixserve.registry")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def confined(root: Path, path: str | Path) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, symlinks followed; refused if it leaves ``root``."""
    root = root.resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise AdapterError(f"adapter path {str(path)!r} is outside the adapter root")
    return resolved


class AdapterRegistry:
    """Name -> loaded adapter, every one checked against the base model's shapes."""

    def __init__(self, root: Path, base_shapes: dict[str, tuple[int, ...]], max_bytes: int = 4 << 30) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._base_shapes = base_shapes
        self._adapters: dict[str, LoraAdapter] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __getitem__(self, name: str) -> LoraAdapter:
        return self._adapters[name]

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def snapshot(self) -> dict[str, LoraAdapter]:
        """A copy a merge can use while admins register more (no shared mutable state)."""
        return dict(self._adapters)

    def load_root(self) -> dict[str, str]:
        """Register every adapter directory directly under the root; returns {name: error} for the bad ones."""
        errors = {}
        if not self.root.is_dir():
            return {str(self.root): "adapter root is not a directory"}
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                self.register(sub.name, sub.name)
            except AdapterError as exc:
                errors[sub.name] = str(exc)
                log.warning("skipping adapter %s: %s", sub.name, exc)
        return errors

    def register(self, name: str, path: str | Path, *, replace: bool = False) -> LoraAdapter:
        adapter = self.load(name, path, replace=replace)
        self.add(adapter)
        return adapter

    def add(self, adapter: LoraAdapter) -> None:
        """Serve ``adapter`` under its name (replacing any adapter of that name)."""
        self._adapters[adapter.name] = adapter

    def relative(self, path: str | Path) -> str:
        """``path`` as the store keeps it: relative to the root (which may move between hosts)."""
        return confined(self.root, path).relative_to(self.root.resolve()).as_posix()

    def load(self, name: str, path: str | Path, *, replace: bool = True) -> LoraAdapter:
        """Read and check an adapter without serving it (:meth:`add` does); refuses a taken name unless
        ``replace``."""
        if not NAME.match(name):
            raise AdapterError(f"adapter name {name!r} must match {NAME.pattern}")
        if name in self._adapters and not replace:
            raise AdapterError(f"adapter {name!r} is already registered")
        try:
            directory = confined(self.root, path)
        except AdapterError:
            raise
        except (ValueError, OSError) as exc:  # NUL bytes, over-long names, loops: not a path we can use
            raise AdapterError(f"adapter path {str(path)[:200]!r} is not usable ({type(exc).__name__})") from None
        weights = directory / WEIGHTS_NAME
        if weights.is_file() and weights.stat().st_size > self.max_bytes:
            raise AdapterError(f"{weights.name} is {weights.stat().st_size:,} bytes (limit {self.max_bytes:,})")
        adapter = load_adapter(directory, name)
        adapter.check_base_shapes(self._base_shapes)
        return adapter
