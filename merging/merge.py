"""Evaluate a mix tree into a MergedDelta, module by module, in the dense or the low-rank space.

``dense``: form each child's ``dW_i`` and merge the full matrices (exact reference semantics; the
differential tests hold it to ``peft.utils.merge_utils``).

``lowrank``: merge the children's cores in a shared basis of their factors (``lowrank.py``); the
result has rank <= the sum of the children's ranks. Linear methods are exact there, and so are the
spectral ones (TSV-M, Iso-C, Iso-CTS: SVD-based, hence basis-equivariant); TIES, DARE, DELLA and
Breadcrumbs trim or drop *core* entries, a different (basis-dependent) operator whose distance to the
dense result is measured in ``bench/``, not assumed.

Modules are merged one at a time, so peak memory is one module's dense tensors, not the model's.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from merging.adapters import LoraAdapter
from merging.delta import DenseDelta, LowRankDelta, MergedDelta, ModuleDelta
from merging.lowrank import as_lowrank, concat_weighted, from_core, shared_basis
from merging.methods import get_method, linear_weights, merge_tensors
from merging.spec import AdapterLeaf, MixNode, leaves, mix_hash

ProgressFn = Callable[[int, int, str], None]  # (done, total, module name)


class MergeError(ValueError):
    """A mix that cannot be merged with the given adapters (unknown name, incompatible shapes)."""


def mix_key(mix: AdapterLeaf | MixNode, adapters: Mapping[str, LoraAdapter]) -> str:
    """Cache key: the canonical mix plus the content fingerprint of every adapter it uses.

    Two adapters registered under one name at different times must not share merged results.
    """
    h = hashlib.sha256(mix_hash(mix).encode())
    for name in sorted({leaf.adapter for leaf in leaves(mix)}):
        h.update(f"\0{name}\0{adapters[name].fingerprint}".encode())
    return h.hexdigest()


def mask_generator(seed: int, path: str, module: str) -> torch.Generator:
    """The generator DARE / DELLA masks of node ``path`` at ``module`` are drawn from."""
    # One stream per (seed, node, module): masks do not depend on module order or on other nodes. Always
    # a CPU generator, whatever device merges: CUDA's streams differ, and a mix must not change with it.
    digest = hashlib.sha256(f"{seed}/{path}/{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class _ModuleContext:
    module: str
    shape: tuple[int, int]
    energy_kept: float = 1.0  # fraction kept by SVD truncations inside the tree (multiplied if several)
    refactored: bool = False


@dataclass
class _Evaluator:
    adapters: Mapping[str, LoraAdapter]
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    keep_masks: dict[tuple[str, str], list[torch.Tensor]] = field(default_factory=dict)

    def eval(self, node: AdapterLeaf | MixNode, ctx: _ModuleContext, path: str) -> ModuleDelta | None:
        """The node's delta for ``ctx.module`` before its own weight; ``None`` when it is zero."""
        if isinstance(node, AdapterLeaf):
            f = self.adapters[node.adapter].modules.get(ctx.module)
            if f is None:
                return None
            return LowRankDelta(A=f.A.to(self.dtype), B=f.B.to(self.dtype), scale=f.scale)
        children = [self.eval(c, ctx, f"{path}.{i}") for i, c in enumerate(node.children)]
        if all(c is None for c in children):
            return None
        weights = [c.weight for c in node.children]
        method, params = get_method(node.method), node.params()
        random = method.sparsify in ("random", "magnitude_sampling")
        gen = mask_generator(node.seed or 0, path, ctx.module) if random else None
        masks = self.keep_masks.get((path, ctx.module))
        linear = method.linear
        coefficients, divisor = linear_weights(weights, params)
        hint = max(1, node.rank or sum(_rank(c) for c in children))
        if node.space == "dense":
            if linear and not any(isinstance(c, DenseDelta) for c in children):
                # sum_i w_i s_i B_i A_i is one [out, R] @ [R, in] product: no per-child dW needed (and no
                # decision taken on it: the product in the working dtype will do).
                factors = [self._as_lowrank(c, ctx) for c in children]
                W = concat_weighted(factors, coefficients, divisor).dense(exact=False).to(self.dtype)
                return DenseDelta(W=W, rank_hint=hint)
            if method.family == "spectral" and not any(isinstance(c, DenseDelta) for c in children):
                # Spectral merges commute with orthonormal changes of basis: on the children's cores they
                # give the full matrices' result (tested), from float64 SVDs of R x R cores instead of
                # out x in matrices.
                factors = [self._as_lowrank(c, ctx) for c in children]
                basis = shared_basis(factors, orthogonalize="qr")
                core = merge_tensors(method, basis.cores, weights, params)
                return DenseDelta(W=from_core(basis, core)[0].dense().to(self.dtype), rank_hint=hint)
            # Each dW_i formed in float64 and rounded once (LowRankDelta.dense): trims and elections on it
            # do not depend on the kernels; the merge's elementwise steps are exact-rounded operations.
            tensors = [c.dense().to(self.dtype) if c is not None else self._zeros(ctx.shape) for c in children]
            merged = merge_tensors(method, tensors, weights, params, generator=gen, keep_masks=masks)
            return DenseDelta(W=merged, rank_hint=hint)
        factors = [self._as_lowrank(c, ctx) for c in children]
        if linear and node.rank is None:
            # Linear in the factors: concatenation is exact and needs no basis.
            return concat_weighted(factors, coefficients, divisor)
        # Spectral methods are basis-equivariant: any orthonormal basis (a cheaper QR) gives the same delta.
        # Bases, cores and the node's result are float64 (DECISION_DTYPE) until the root rounds them.
        basis = shared_basis(factors, orthogonalize="qr" if method.family == "spectral" else "svd")
        core = merge_tensors(method, basis.cores, weights, params, generator=gen, keep_masks=masks)
        # A child's result is stacked again by its parent: balanced factors (see from_core).
        delta, kept = from_core(basis, core, node.rank, balanced=path != "0")
        if kept < 1.0:
            ctx.energy_kept *= kept
            ctx.refactored = True
        return delta

    def _zeros(self, shape: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _as_lowrank(self, d: ModuleDelta | None, ctx: _ModuleContext) -> LowRankDelta:
        if d is None:  # an untouched module contributes zero: a rank-0 block
            return LowRankDelta(A=self._zeros((0, ctx.shape[1])), B=self._zeros((ctx.shape[0], 0)))
        low, kept = as_lowrank(d)
        if kept < 1.0:
            ctx.energy_kept *= kept
            ctx.refactored = True
        return low


def _rank(d: ModuleDelta | None) -> int:
    return 0 if d is None else d.rank


def _module_shapes(mix: AdapterLeaf | MixNode, adapters: Mapping[str, LoraAdapter]) -> dict[str, tuple[int, int]]:
    names = sorted({leaf.adapter for leaf in leaves(mix)})
    unknown = [n for n in names if n not in adapters]
    if unknown:
        known = ", ".join(sorted(adapters)) or "none"
        raise MergeError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; registered: {known}")
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for n in names:
        for module, f in adapters[n].modules.items():
            if module in shapes and shapes[module] != f.shape:
                raise MergeError(
                    f"module {module!r}: adapter {owner[module]!r} adapts a {shapes[module]} weight but "
                    f"{n!r} a {f.shape} one (were they trained on different base models?)"
                )
            shapes.setdefault(module, f.shape)
            owner.setdefault(module, n)
    return shapes


class MixMerger:
    """Merges one mix module by module: all at once (:func:`merge_mix`) or on demand.

    On-demand merging lets an export hold one module's dense tensors at a time: a 7B model's dense
    deltas in fp32 would not fit in memory together. Construction validates the mix against the
    adapters (unknown names, incompatible shapes) before any arithmetic.
    """

    def __init__(
        self,
        mix: AdapterLeaf | MixNode,
        adapters: Mapping[str, LoraAdapter],
        *,
        dtype: torch.dtype = torch.float32,
        keep_masks: dict[tuple[str, str], list[torch.Tensor]] | None = None,
    ) -> None:
        self.mix = mix
        self.shapes = _module_shapes(mix, adapters)
        used = sorted({leaf.adapter for leaf in leaves(mix)})
        device = next((f.A.device for n in used for f in adapters[n].modules.values()), torch.device("cpu"))
        self._evaluator = _Evaluator(adapters, dtype, device, keep_masks or {})

    @property
    def method(self) -> str:
        return self.mix.method if isinstance(self.mix, MixNode) else "adapter"

    @property
    def space(self) -> str:
        return self.mix.space if isinstance(self.mix, MixNode) else "lowrank"

    def merge_module(self, module: str) -> tuple[ModuleDelta | None, float | None]:
        """The merged delta of one module (``None`` if zero) and the SVD energy kept inside the tree."""
        ctx = _ModuleContext(module, self.shapes[module])
        d = self._evaluator.eval(self.mix, ctx, "0")
        if d is None:
            return None, None
        d = _scaled(d, self.mix.weight, self._evaluator.dtype)
        for t in (d.A, d.B) if isinstance(d, LowRankDelta) else (d.W,):
            if not torch.isfinite(t).all():
                raise MergeError(f"module {module!r}: the merge produced NaN or Inf")
        return d, (ctx.energy_kept if ctx.refactored else None)


def merge_mix(
    mix: AdapterLeaf | MixNode,
    adapters: Mapping[str, LoraAdapter],
    *,
    progress: ProgressFn | None = None,
    dtype: torch.dtype = torch.float32,
    keep_masks: dict[tuple[str, str], list[torch.Tensor]] | None = None,
) -> MergedDelta:
    """Merge ``mix`` over every module any of its adapters touches.

    ``keep_masks`` (tests only) overrides the DARE masks of node ``path`` ("0" is the root, "0.1" its
    second child) at ``module``. Raises :class:`MergeError` for unknown adapters, incompatible
    shapes and non-finite results; the result tensors are fresh, never views of adapter weights.
    """
    t0 = time.perf_counter()
    merger = MixMerger(mix, adapters, dtype=dtype, keep_masks=keep_masks)
    modules: dict[str, ModuleDelta] = {}
    energy: dict[str, float] = {}
    names = sorted(merger.shapes)
    for i, module in enumerate(names):
        d, kept = merger.merge_module(module)
        if d is not None:
            modules[module] = d
        if kept is not None:
            energy[module] = kept
        if progress is not None:
            progress(i + 1, len(names), module)
    return MergedDelta(modules, mix_hash(mix), merger.method, merger.space, time.perf_counter() - t0, energy)


def _scaled(d: ModuleDelta, weight: float, dtype: torch.dtype) -> ModuleDelta:
    """The root's delta times its weight, in the working ``dtype`` (fresh tensors)."""
    if isinstance(d, LowRankDelta):
        # A leaf at the root hands back the adapter's own A: copy so results never alias adapters.
        A = d.A.clone() if d.A.dtype == dtype else d.A.to(dtype)
        return LowRankDelta(A=A, B=(d.B * (d.scale * weight)).to(dtype))
    return d if weight == 1.0 else DenseDelta(W=d.W * weight, rank_hint=d.rank_hint)
