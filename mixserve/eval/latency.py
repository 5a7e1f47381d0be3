"""The quality table's latency column, measured through the serving path.

Folding a merge into the weights makes every row the same compute, so a folded ms/token measures only
noise. What a mix costs when served is its side path: ``mixserve serve`` keeps the base weights and
adds each row's mix through the member pool (a lowrank mix: its adapters' own factors, resident once,
and the mix's small cores) or the factor pool (dense-space mixes, PEFT's merges: factors at the mix's rank). So each
row here is timed as the server runs it: :class:`~server.worker.runtime.ModelRuntime` decode steps at batch 1
with the mix in its pool, against the base model's steps taken in turns with it (base, mix, base, ...),
median step time of each; the ratio is what the row costs a user over the base model.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from merging.adapters import LoraAdapter
from merging.core_merge import dense_node
from merging.delta import MergedDelta
from merging.member_merge import merge_members
from merging.spec import parse_mix


class ServingLatency:
    """A :class:`ModelRuntime` of the base, timing decode at batch 1."""

    def __init__(self, model_dir: Path, adapters: dict[str, LoraAdapter], *, steps: int = 24, rounds: int = 5) -> None:
        from server.worker.runtime import ModelRuntime

        self.runtime = ModelRuntime(model_dir, max_loras=1, core_slots=1, adapter_slots=max(16, len(adapters)))
        self.adapters, self.steps, self.rounds = adapters, steps, rounds
        self.prompt = self.runtime.tokenizer("### task: sql\n### input: how many books are there\n### output:\n")[
            "input_ids"
        ]

    def prepare(self, mix: dict | str | None, merged: MergedDelta | None):
        """The mix as the server would hold it: cores over its members, else factors (None: the base)."""
        try:
            spec = parse_mix(mix) if mix is not None else None
        except ValueError:  # PEFT's merges are not mixserve specs: served from their factors
            spec = None
        if spec is not None and not dense_node(spec):
            return self.runtime.members_to_device(merge_members(spec, self.adapters), self.adapters)
        if merged is None:
            return None
        return self.runtime.lora_to_device(merged.to_lowrank().lowrank_factors())

    def _step_ms(self, prepared) -> float:
        """Median ms of ``steps`` decode steps for one sequence on ``prepared`` (after its prefill)."""
        from server.worker.runtime import DecodeRow, PrefillChunk

        rt = self.runtime
        blocks = rt.kv.allocate(rt.kv.blocks_for(len(self.prompt) + self.steps))
        slots = rt.acquire(prepared)
        try:
            token = int(rt.prefill([PrefillChunk(self.prompt, 0, blocks, *slots)])[0].argmax())
            times = []
            for i in range(self.steps):
                t0 = time.perf_counter()
                token = int(rt.decode([DecodeRow(token, len(self.prompt) + i, blocks, *slots)])[0].argmax())
                times.append(time.perf_counter() - t0)
            return 1e3 * statistics.median(times)
        finally:
            rt.kv.free(blocks)
            rt.release(*slots)

    def measure(self, prepared) -> tuple[float, float]:
        """``(ms per token on the mix, ms per token on the base)``, medians over rounds taken in turns."""
        self._step_ms(prepared)  # warm-up: first use of a slot, lazy kernels
        mix, base = [], []
        for _ in range(self.rounds):
            base.append(self._step_ms(None))
            mix.append(self._step_ms(prepared))
        return statistics.median(mix), statistics.median(base)
