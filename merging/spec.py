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

from merging.methods import METHODS, PARAM_DEFAULTS, MergeParams

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Space = Literal["dense", "lowrank"]
# Derived from the registry, so the JSON schema (and the server's OpenAPI) lists exactly the methods.
MethodName = Literal[tuple(METHODS)]
DEFAULT_SPACE: Space = "lowrank"


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("weight must be a finite number")
    return value


class AdapterLeaf(BaseModel):
    """A leaf of the mix tree: one adapter and its weight in the parent's merge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = Field(pattern=ADAPTER_NAME_PATTERN, description="registered adapter name")
    weight: float = Field(1.0, description="w_i in the parent's merge (or the overall scale at the root)")

    _check_weight = field_validator("weight")(_finite)


class MixNode(BaseModel):
    """An inner node: merge the children with ``method``; hyper-parameters as the method declares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MethodName = Field(description="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    children: list[MixTree] = Field(min_length=1)
    weight: float = 1.0
    space: Space = Field(DEFAULT_SPACE, description="'lowrank' (shared factor basis) or 'dense' (exact dW)")
    density: float | None = Field(None, description="fraction kept by magnitude (ties, magnitude_prune)")
    drop_rate: float | None = Field(None, description="fraction dropped at random (dare_linear, dare_ties)")
    majority_sign: Literal["total", "frequency"] | None = None
    normalize: bool | None = Field(None, description="linear: divide by the sum of weights")
    seed: int | None = Field(None, ge=0, lt=2**63, description="DARE drop masks are drawn from this seed")
    rank: int | None = Field(None, ge=1, le=65536, description="serve this node's delta at this rank (SVD)")

    _check_weight = field_validator("weight")(_finite)

    @model_validator(mode="after")
    def _fill_declared_params(self) -> MixNode:
        method = METHODS[self.method]
        for param in PARAM_DEFAULTS:
            given = getattr(self, param)
            if param not in method.params:
                if given is not None:
                    hint = (
                        " (DARE takes drop_rate = 1 - density)"
                        if param == "density" and "drop_rate" in method.params
                        else ""
                    )
                    raise ValueError(f"method {self.method!r} does not take {param!r}{hint}")
            elif given is None:
                object.__setattr__(self, param, PARAM_DEFAULTS[param])
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.drop_rate is not None and not 0 <= self.drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.normalize and sum(c.weight for c in self.children) == 0:
            raise ValueError("linear with normalize=true needs child weights that do not sum to zero")
        return self

    def params(self) -> MergeParams:
        """The node's hyper-parameters as the merge functions take them."""
        return MergeParams(
            density=self.density if self.density is not None else 1.0,
            drop_rate=self.drop_rate if self.drop_rate is not None else 0.0,
            majority_sign=self.majority_sign or "total",
            normalize=bool(self.normalize),
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
        return value
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("{"):
            return _MIX_ADAPTER.validate_json(stripped)
        return AdapterLeaf(adapter=stripped)
    return _MIX_ADAPTER.validate_python(value)


def canonical_json(mix: AdapterLeaf | MixNode) -> str:
    """One string per mix: keys sorted, defaults filled in, parameters the method ignores left out."""
    return json.dumps(mix.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))


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
