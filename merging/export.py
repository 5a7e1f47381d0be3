"""Offline merge: adapters on disk -> a merged PEFT adapter or a full merged model on disk.

Both formats merge module by module and keep only what they write: a dense delta lives just long
enough to be folded into its weight (``full``) or re-factored to low rank (``peft``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from merging.adapters import LoraAdapter, save_adapter
from merging.basemodel import read_shapes, write_merged_model
from merging.delta import ModuleDelta
from merging.lowrank import as_lowrank
from merging.merge import MixMerger, ProgressFn
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
    seconds: float
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
    dtype: torch.dtype = torch.float32,
) -> ExportReport:
    """Merge ``mix`` and write it as a PEFT adapter (``fmt="peft"``) or a full model (``"full"``).

    ``base`` is required for ``full`` and, when given, every adapter is checked against its weight
    shapes first. A dense result written as ``peft`` is re-factored by truncated SVD to ``rank``
    (default: the sum of the children's ranks) and the energy kept is reported. ``dtype`` is the merge's
    working precision (float64 for a mergekit config that asks for it); what is written keeps its format's.
    """
    if fmt not in ("peft", "full"):
        raise ValueError(f"unknown format {fmt!r}; use 'peft' or 'full'")
    if fmt == "full" and base is None:
        raise ValueError("--format full needs --base (the model to fold the merged delta into)")
    if base is not None:
        shapes = read_shapes(base)
        for adapter in adapters.values():
            adapter.check_base_shapes(shapes)
    t0 = time.perf_counter()
    out = Path(out)
    merger = MixMerger(mix, adapters, dtype=dtype)
    names = sorted(merger.shapes)
    ranks: dict[str, int] = {}
    energy: dict[str, float] = {}

    def merged_module(module: str) -> ModuleDelta | None:
        d, kept = merger.merge_module(module)
        if kept is not None:
            energy[module] = kept
        if d is not None:
            ranks[module] = d.rank
        return d

    if fmt == "full":

        def dense_for(module: str) -> torch.Tensor | None:
            d = merged_module(module)
            return None if d is None else d.dense()

        write_merged_model(base, merger.shapes, dense_for, out, progress=progress)
    else:
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, module in enumerate(names):
            d = merged_module(module)
            if d is not None:
                low, kept = as_lowrank(d, rank)
                if kept < 1.0:
                    energy[module] = energy.get(module, 1.0) * kept
                factors[module] = (low.A, low.scaled_B())
                ranks[module] = low.rank
            if progress is not None:
                progress(i + 1, len(names), module)
        base_name = next((a.base_model for a in adapters.values() if a.base_model), None)
        save_adapter(
            out,
            factors,
            base_model=str(base) if base is not None else base_name,
            metadata={"mixserve_mix": canonical_json(mix)},
        )
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportReport(
        out=out,
        format=fmt,
        method=merger.method,
        space=merger.space,
        modules=len(ranks),
        ranks=ranks,
        seconds=time.perf_counter() - t0,
        bytes_written=written,
        energy_kept=energy,
    )
