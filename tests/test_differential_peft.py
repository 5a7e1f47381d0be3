"""Dense-space merges against peft.utils.merge_utils, over generated shapes, ranks, weights, densities.

The reference gets the same dense task vectors dW_i = scale_i * B_i @ A_i (zeros for a module an
adapter does not touch) and, for DARE, draws exactly the masks mixserve is handed.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from merging.adapters import LoraAdapter, LoraFactors
from merging.merge import merge_mix
from merging.spec import MixNode

MODULES = ["m.a", "m.b"]


def _adapters(
    seed: int, n: int, ranks: list[int], out_dim: int, in_dim: int, skip: list[bool]
) -> dict[str, LoraAdapter]:
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for i in range(n):
        modules = {}
        for j, m in enumerate(MODULES):
            if j == 1 and skip[i]:
                continue  # this adapter leaves module m.b untouched
            A = torch.randn(ranks[i], in_dim, generator=g)
            B = torch.randn(out_dim, ranks[i], generator=g)
            modules[m] = LoraFactors(A=A, B=B, scale=float(2 * (i + 1)) / ranks[i])
        adapters[f"a{i}"] = LoraAdapter(name=f"a{i}", modules=modules, fingerprint=str(i))
    return adapters


def _task_tensors(adapters: dict[str, LoraAdapter], module: str, shape: tuple[int, int]) -> list[torch.Tensor]:
    return [a.modules[module].dense() if module in a.modules else torch.zeros(shape) for a in adapters.values()]


cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "n": st.integers(1, 4),
        "ranks": st.lists(st.integers(1, 8), min_size=4, max_size=4),
        "out_dim": st.integers(1, 40),
        "in_dim": st.integers(1, 40),
        "skip": st.lists(st.booleans(), min_size=4, max_size=4),
        "weights": st.lists(
            st.floats(-2.0, 2.0, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=4, max_size=4
        ),
        "density": st.floats(0.05, 1.0),
        "majority_sign": st.sampled_from(["total", "frequency"]),
    }
)


def _node(method: str, c: dict, **params) -> MixNode:
    children = [{"adapter": f"a{i}", "weight": c["weights"][i]} for i in range(c["n"])]
    return MixNode.model_validate({"method": method, "space": "dense", "children": children, **params})


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # 1e-5 relative to the result's scale (entries near zero after cancellation have no relative meaning).
    scale = max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@settings(max_examples=60, deadline=None)
@given(cases)
def test_task_arithmetic_and_linear_match_peft(c):
    adapters = _adapters(c["seed"], c["n"], c["ranks"], c["out_dim"], c["in_dim"], c["skip"])
    w = torch.tensor(c["weights"][: c["n"]])
    ta = merge_mix(_node("task_arithmetic", c), adapters)
    lin = merge_mix(_node("linear", c), adapters) if sum(c["weights"][: c["n"]]) != 0 else None
    for m in MODULES:
        if m not in ta.modules:
            continue
        expected = merge_utils.task_arithmetic(_task_tensors(adapters, m, (c["out_dim"], c["in_dim"])), w)
        _assert_close(ta.modules[m].dense(), expected)
        # Normalising by a weight sum near zero amplifies rounding without bound: compare only when
        # the sum is well away from zero (hypothesis found [1.34375, -1.34375]).
        if lin is not None and abs(w.sum()) > 0.1 * w.abs().sum():
            _assert_close(lin.modules[m].dense(), expected / w.sum())


@settings(max_examples=60, deadline=None)
@given(cases)
def test_magnitude_prune_and_ties_match_peft(c):
    adapters = _adapters(c["seed"], c["n"], c["ranks"], c["out_dim"], c["in_dim"], c["skip"])
    w = torch.tensor(c["weights"][: c["n"]])
    ties = merge_mix(_node("ties", c, density=c["density"], majority_sign=c["majority_sign"]), adapters)
    prune = merge_mix(_node("magnitude_prune", c, density=c["density"]), adapters)
    for m in MODULES:
        if m not in ties.modules:
            continue
        tensors = _task_tensors(adapters, m, (c["out_dim"], c["in_dim"]))
        _assert_close(ties.modules[m].dense(), merge_utils.ties(tensors, w, c["density"], c["majority_sign"]))
        _assert_close(prune.modules[m].dense(), merge_utils.magnitude_prune(tensors, w, c["density"]))


@settings(max_examples=60, deadline=None)
@given(cases, st.floats(0.05, 0.9))
def test_dare_matches_peft_with_the_same_masks(c, drop_rate):
    adapters = _adapters(c["seed"], c["n"], c["ranks"], c["out_dim"], c["in_dim"], c["skip"])
    w = torch.tensor(c["weights"][: c["n"]])
    density = 1.0 - drop_rate
    shape = (c["out_dim"], c["in_dim"])
    for method, peft_fn, extra in (
        ("dare_linear", merge_utils.dare_linear, {}),
        ("dare_ties", merge_utils.dare_ties, {"majority_sign": c["majority_sign"]}),
    ):
        node = _node(method, c, drop_rate=drop_rate, **extra)
        for m in MODULES:
            tensors = _task_tensors(adapters, m, shape)
            # PEFT draws torch.bernoulli(full_like(t, density)) per tensor from the global RNG.
            torch.manual_seed(c["seed"])
            masks = [torch.bernoulli(torch.full_like(t, density)).bool() for t in tensors]
            torch.manual_seed(c["seed"])
            args = (c["majority_sign"],) if extra else ()
            expected = peft_fn(tensors, w, density, *args)
            ours = merge_mix(node, adapters, keep_masks={("0", m): masks})
            if m in ours.modules:
                _assert_close(ours.modules[m].dense(), expected)
            else:
                assert expected.abs().max() == 0
