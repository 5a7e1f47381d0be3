"""MixSpec: the JSON tree that names a mix, its canonical form and its hash.

A leaf names an adapter: ``{"adapter": "sql", "weight": 1.0}``. A node merges its children:
``{"method": "ties", "density": 0.2, "majority_sign": "total", "space": "lowrank",
"children": [...], "weight": 0.8}``. Nodes nest (``ties(dare_linear(python, java), sql)``). A
child's ``weight`` is its ``w_i`` in the parent's merge; the root's weight scales the whole delta.

Which hyper-parameters a node takes is declared by its method in ``methods.METHODS``; giving one the
method does not take is an error, and the ones it takes are filled with defaults, so the canonical
form (and hash) of a mix does not depend on key order or on defaults being spelled out.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from merging import mergekit
from merging.mergekit import ChildSparsity
from merging.methods import METHODS, PARAM_DEFAULTS, MergeParams

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Space = Literal["dense", "lowrank"]
# Derived from the registry, so the JSON schema (and the server's OpenAPI) lists exactly the methods.
MethodName = Literal[tuple(METHODS)]
DEFAULT_SPACE: Space = "lowrank"
MAX_LAMBDA = 100.0
# Hyper-parameters whose JSON name is not a Python identifier.
_ATTR = {"lambda": "lambda_"}
# Per-child parameters a leaf may carry under a mergekit-convention parent (mergekit's per-model ones).
PER_CHILD = ("density", "gamma", "epsilon")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("weight must be a finite number")
    return value


class AdapterLeaf(BaseModel):
    """A leaf of the mix tree: one adapter and its weight in the parent's merge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = Field(pattern=ADAPTER_NAME_PATTERN, description="registered adapter name")
    weight: float = Field(1.0, description="w_i in the parent's merge (or the overall scale at the root)")
    # mergekit's per-model parameters: only under a parent with convention 'mergekit' (else its own).
    density: float | None = Field(None, description="mergekit convention: this adapter's density in the parent")
    gamma: float | None = Field(None, description="mergekit convention: this adapter's breadcrumbs gamma")
    epsilon: float | None = Field(None, description="mergekit convention: this adapter's DELLA epsilon")

    _check_weight = field_validator("weight")(_finite)

    @property
    def sparsity(self) -> dict[str, float]:
        """The per-child parameters given on this leaf."""
        return {k: v for k in PER_CHILD if (v := getattr(self, k)) is not None}


class MixNode(BaseModel):
    """An inner node: merge the children with ``method``; hyper-parameters as the method declares."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    method: MethodName = Field(description="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    children: list[MixTree] = Field(min_length=1)
    weight: float = 1.0
    space: Space = Field(DEFAULT_SPACE, description="'lowrank' (shared factor basis) or 'dense' (exact dW)")
    density: float | None = Field(None, description="fraction kept by magnitude (ties, magnitude_prune)")
    drop_rate: float | None = Field(None, description="fraction dropped at random (dare_linear, dare_ties)")
    majority_sign: Literal["total", "frequency"] | None = None
    normalize: bool | None = Field(None, description="linear: divide by the sum of weights")
    seed: int | None = Field(None, ge=0, lt=2**63, description="DARE / DELLA masks are drawn from this seed")
    gamma: float | None = Field(None, description="breadcrumbs: fraction of the largest magnitudes dropped")
    epsilon: float | None = Field(None, description="della: keep probabilities span density +- epsilon")
    lambda_: float | None = Field(
        None, alias="lambda", description="scales the merged delta (breadcrumbs, della, tsv, iso_c, iso_cts)"
    )
    sv_fraction: float | None = Field(
        None,
        description="tsv: each task keeps this fraction of the space's singular components (default: 1 / the "
        "children that touch the module)",
    )
    common_fraction: float | None = Field(None, description="iso_cts: fraction of the space for the common subspace")
    rank: int | None = Field(None, ge=1, le=65536, description="serve this node's delta at this rank (SVD)")
    convention: Literal["mergekit"] | None = Field(
        None,
        description="'mergekit': merge as mergekit 0.1.5 does (per-adapter density, exact-k trims, DARE's L1 "
        "rescale, election on the weighted deltas, the agreeing weights as divisor, its defaults); leave it out "
        "for mixserve's semantics (merging/README.md)",
    )
    rescale: bool | None = Field(None, description="mergekit convention: rescale sparsified deltas to their L1 norm")

    _check_weight = field_validator("weight")(_finite)

    @model_validator(mode="after")
    def _fill_declared_params(self) -> MixNode:
        if self.convention == "mergekit":
            return self._fill_mergekit()
        if self.rescale is not None:
            raise ValueError("'rescale' is a mergekit parameter: set convention 'mergekit' to use it")
        for child in self.children:
            if isinstance(child, AdapterLeaf) and child.sparsity:
                raise ValueError(f"adapter {child.adapter!r}: a per-adapter {', '.join(child.sparsity)} needs a parent "
                                 "with convention 'mergekit' (mixserve's nodes take one for all children)")  # fmt: skip
        method = METHODS[self.method]
        for param in PARAM_DEFAULTS:
            attr = _ATTR.get(param, param)
            given = getattr(self, attr)
            if param not in method.params:
                if given is not None:
                    hint = (
                        " (DARE takes drop_rate = 1 - density)"
                        if param == "density" and "drop_rate" in method.params
                        else ""
                    )
                    raise ValueError(f"method {self.method!r} does not take {param!r}{hint}")
            elif given is None:
                # (sv_fraction's default, None, is decided per module at merge time: 1 / the children
                # that touch the module.)
                object.__setattr__(self, attr, method.default(param))
        if self.drop_rate is not None and not 0 <= self.drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        _check_sparsity(self.density, self.gamma, self.epsilon)
        self._check_common()
        return self

    def _fill_mergekit(self) -> MixNode:
        """mergekit 0.1.5's parameters and defaults for its methods (``merging/mergekit.py``)."""
        if self.method not in mergekit.DEFAULTS:
            raise ValueError(f"convention 'mergekit' covers {', '.join(mergekit.DEFAULTS)}; {self.method!r} is "
                             "mixserve's own method (leave the convention out)")  # fmt: skip
        declared = mergekit.params_of(self.method)
        normalize, rescale = mergekit.DEFAULTS[self.method]
        defaults = {"density": mergekit.DEFAULT_DENSITY, "gamma": mergekit.DEFAULT_GAMMA,
                    "epsilon": mergekit.DEFAULT_EPSILON, "normalize": normalize, "rescale": rescale, "lambda": 1.0,
                    "seed": 0}  # fmt: skip
        for param in (*PARAM_DEFAULTS, "rescale"):
            attr = _ATTR.get(param, param)
            if param not in declared:
                if getattr(self, attr) is not None:
                    hint = (
                        " (it takes density = 1 - drop_rate)" if param == "drop_rate" and "dare" in self.method else ""
                    )
                    raise ValueError(f"mergekit's {self.method!r} does not take {param!r}{hint}")
            elif getattr(self, attr) is None:
                object.__setattr__(self, attr, defaults[param])
        for child in self.children:
            given = child.sparsity if isinstance(child, AdapterLeaf) else {}
            extra = [k for k in given if k not in declared]
            if extra:
                raise ValueError(f"adapter {child.adapter!r}: mergekit's {self.method!r} does not take {extra[0]!r}")
            _check_sparsity(*(given.get(k, getattr(self, k)) for k in PER_CHILD))
        self._check_common()
        return self

    def _check_common(self) -> None:
        if self.lambda_ is not None and not (math.isfinite(self.lambda_) and abs(self.lambda_) <= MAX_LAMBDA):
            raise ValueError(f"lambda must be a finite number with |lambda| <= {MAX_LAMBDA}, got {self.lambda_}")
        for name in ("sv_fraction", "common_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.method == "linear" and self.normalize and sum(c.weight for c in self.children) == 0:
            raise ValueError("linear with normalize=true needs child weights that do not sum to zero")

    def params(self) -> MergeParams:
        """The node's hyper-parameters as the merge functions take them."""
        return MergeParams(
            density=self.density if self.density is not None else 1.0,
            drop_rate=self.drop_rate if self.drop_rate is not None else 0.0,
            majority_sign=self.majority_sign or "total",
            normalize=bool(self.normalize),
            gamma=self.gamma if self.gamma is not None else 0.0,
            epsilon=self.epsilon if self.epsilon is not None else 0.0,
            lam=self.lambda_ if self.lambda_ is not None else 1.0,
            sv_fraction=self.sv_fraction,
            common_fraction=self.common_fraction if self.common_fraction is not None else 0.8,
            convention=self.convention or "mixserve",
            rescale=bool(self.rescale),
            children=self._child_sparsity() if self.convention == "mergekit" else None,
        )

    def _child_sparsity(self) -> tuple[ChildSparsity, ...]:
        """Each child's density / gamma / epsilon: its own where the leaf gives one, else the node's."""
        out = []
        for child in self.children:
            given = child.sparsity if isinstance(child, AdapterLeaf) else {}
            values = {k: given.get(k, getattr(self, k)) for k in PER_CHILD}
            out.append(ChildSparsity(**{k: v for k, v in values.items() if v is not None}))
        return tuple(out)


def _check_sparsity(density: float | None, gamma: float | None, epsilon: float | None) -> None:
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if gamma is not None and not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    # (density 1 keeps everything, whatever epsilon: mergekit's no-op)
    if epsilon is not None and not (epsilon >= 0 and (density >= 1 or 0 < density - epsilon < 1 - 2 * epsilon)):
        raise ValueError(
            f"della needs 0 <= epsilon and density +- epsilon inside (0, 1); got density {density}, epsilon {epsilon}"
        )


def _tree_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "leaf" if "adapter" in value else "node"
    return "leaf" if isinstance(value, AdapterLeaf) else "node"


MixTree = Annotated[
    Annotated[AdapterLeaf, Tag("leaf")] | Annotated[MixNode, Tag("node")],
    Discriminator(_tree_kind),
]
MixNode.model_rebuild()
_MIX_ADAPTER: TypeAdapter[AdapterLeaf | MixNode] = TypeAdapter(MixTree)


def parse_mix(value: dict | str | AdapterLeaf | MixNode) -> AdapterLeaf | MixNode:
    """Validate a mix from a dict, a JSON string or a bare adapter name (= that adapter alone)."""
    if isinstance(value, (AdapterLeaf, MixNode)):
        mix = value
    elif isinstance(value, str):
        stripped = value.strip()
        mix = _MIX_ADAPTER.validate_json(stripped) if stripped.startswith("{") else AdapterLeaf(adapter=stripped)
    else:
        mix = _MIX_ADAPTER.validate_python(value)
    if isinstance(mix, AdapterLeaf) and mix.sparsity:
        raise ValueError(f"adapter {mix.adapter!r} alone takes no {', '.join(mix.sparsity)} (a per-adapter parameter "
                         "of a mergekit-convention parent)")  # fmt: skip
    return mix


def canonical_json(mix: AdapterLeaf | MixNode) -> str:
    """One string per mix: keys sorted, defaults filled in, parameters the method ignores left out."""
    return json.dumps(mix.model_dump(exclude_none=True, by_alias=True), sort_keys=True, separators=(",", ":"))


def mix_hash(mix: AdapterLeaf | MixNode) -> str:
    """sha256 of the canonical JSON (adapter *contents* are not in it: see ``merge.mix_key``)."""
    return hashlib.sha256(canonical_json(mix).encode()).hexdigest()


def leaves(mix: AdapterLeaf | MixNode) -> list[AdapterLeaf]:
    """The adapter leaves, left to right."""
    if isinstance(mix, AdapterLeaf):
        return [mix]
    return [leaf for child in mix.children for leaf in leaves(child)]


def depth(mix: AdapterLeaf | MixNode) -> int:
    """1 for a leaf, 1 + the deepest child for a node (servers bound this)."""
    if isinstance(mix, AdapterLeaf):
        return 1
    return 1 + max(depth(c) for c in mix.children)
