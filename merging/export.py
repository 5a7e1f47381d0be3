"""Offline merge: adapters on disk -> a merged PEFT adapter or a full merged model on disk."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from merging.adapters import LoraAdapter, save_adapter
from merging.basemodel import read_shapes, write_merged_model
from merging.merge import ProgressFn, merge_mix
from merging.spec import AdapterLeaf, MixNode, canonical_json

ExportFormat = Literal["peft", "full"]


@dataclass
class ExportReport:
    """What an offline merge did, for the CLI's summary line and for scripts."""

    out: Path
    format: str
    method: str
    space: str
    modules: int
    ranks: dict[str, int]
    merge_seconds: float
    write_seconds: float
    bytes_written: int
    energy_kept: dict[str, float] = field(default_factory=dict)

    @property
    def min_energy_kept(self) -> float | None:
        return min(self.energy_kept.values()) if self.energy_kept else None


def merge_to_disk(
    mix: AdapterLeaf | MixNode,
    adapters: Mapping[str, LoraAdapter],
    out: str | Path,
    *,
    fmt: ExportFormat = "peft",
    base: str | Path | None = None,
    rank: int | None = None,
    progress: ProgressFn | None = None,
) -> ExportReport:
    """Merge ``mix`` and write it as a PEFT adapter (``fmt="peft"``) or a full model (``"full"``).

    ``base`` is required for ``full`` and, when given, every adapter is checked against its weight
    shapes first. A dense result written as ``peft`` is re-factored by truncated SVD to ``rank``
    (default: the sum of the children's ranks) and the energy kept is reported.
    """
    out = Path(out)
    if fmt == "full" and base is None:
        raise ValueError("--format full needs --base (the model to fold the merged delta into)")
    if base is not None:
        shapes = read_shapes(base)
        for adapter in adapters.values():
            adapter.check_base_shapes(shapes)
    merged = merge_mix(mix, adapters, progress=progress)
    t0 = time.perf_counter()
    if fmt == "peft":
        merged = merged.to_lowrank(rank)
        base_name = next((a.base_model for a in adapters.values() if a.base_model), None)
        save_adapter(
            out,
            merged.lowrank_factors(),
            base_model=str(base) if base is not None else base_name,
            metadata={"mixserve_mix": canonical_json(mix)},
        )
    elif fmt == "full":
        write_merged_model(base, merged, out)
    else:
        raise ValueError(f"unknown format {fmt!r}; use 'peft' or 'full'")
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportReport(
        out=out,
        format=fmt,
        method=merged.method,
        space=merged.space,
        modules=len(merged.modules),
        ranks=merged.ranks,
        merge_seconds=merged.seconds,
        write_seconds=time.perf_counter() - t0,
        bytes_written=written,
        energy_kept=merged.energy_kept,
    )
