"""Adapter geometry: relative norms, cosines and sign agreement on deltas with known answers."""

from __future__ import annotations

import math

import torch

from merging.adapters import LoraAdapter
from merging.delta import LowRankDelta
from mixserve.eval.geometry import adapter_geometry, geometry_markdown


def _adapter(name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> LoraAdapter:
    return LoraAdapter(name, {m: LowRankDelta(A, B, s) for m, (A, B, s) in factors.items()})


def test_known_geometry():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    A2, B2 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    base = {"m.weight": torch.ones(5, 6), "n.weight": torch.ones(5, 6)}
    adapters = {
        "a": _adapter("a", {"m": (A, B, 2.0)}),
        "same_dir": _adapter("same_dir", {"m": (A, B, 0.5)}),  # a positive multiple of a
        "negated": _adapter("negated", {"m": (A, -B, 1.0)}),
        "other_module": _adapter("other_module", {"n": (A2, B2, 1.0)}),
    }
    geo = adapter_geometry(base, adapters)
    dw = 2.0 * B @ A
    assert math.isclose(geo["relative_norm"]["a"], float(dw.norm() / base["m.weight"].norm()), rel_tol=1e-6)
    pairs = {(p["a"], p["b"]): p for p in geo["pairs"]}
    assert math.isclose(pairs["a", "same_dir"]["cosine"], 1.0, rel_tol=1e-5)
    assert pairs["a", "same_dir"]["sign_agreement"] == 1.0
    assert math.isclose(pairs["a", "negated"]["cosine"], -1.0, rel_tol=1e-5)
    assert pairs["a", "negated"]["sign_agreement"] == 0.0
    # No module in common: nothing to compare, and the report says so instead of a made-up 0.
    assert math.isnan(pairs["a", "other_module"]["cosine"])
    assert math.isnan(pairs["a", "other_module"]["sign_agreement"])
    text = geometry_markdown(geo)
    assert "| a / negated | -1.000 | 0.0% |" in text
