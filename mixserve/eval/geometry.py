"""How large and how alike the adapters' deltas are: what decides how much a merge can keep.

Real LLM LoRAs change their weights by roughly 1-5% (relative Frobenius norm); the demo's adapters
change a tiny base a lot more, so its merges interfere more than real ones would. The table states
this next to the quality numbers rather than leaving readers to assume real-LLM conditions:

- relative norm of adapter t: ``||dW_t||_F / ||W||_F`` over the modules it adapts;
- cosine of two adapters: ``<dW_s, dW_t> / (||dW_s|| ||dW_t||)`` over all their shared entries;
- sign agreement: the share of entries (non-zero in both) where ``sign(dW_s) == sign(dW_t)``, which
  TIES' sign election works on (Yadav et al., 2023, arXiv:2306.01708); 0.5 is what unrelated
  deltas give.

Computed one module at a time, so a 7B base needs one dense module per adapter in memory, not the
whole delta.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from merging.adapters import LoraAdapter


def adapter_geometry(base: Mapping[str, torch.Tensor], adapters: Mapping[str, LoraAdapter]) -> dict:
    """``{"relative_norm": {name: x}, "pairs": [{"a", "b", "cosine", "sign_agreement"}]}``.

    ``base`` maps ``"<module>.weight"`` to the base weight (any device); pairs are taken over the
    modules both adapters adapt.
    """
    names = list(adapters)
    sq_delta = dict.fromkeys(names, 0.0)
    sq_base = dict.fromkeys(names, 0.0)
    pairs = {
        (a, b): {"dot": 0.0, "sq_a": 0.0, "sq_b": 0.0, "same": 0, "both": 0}
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    modules = sorted({m for ad in adapters.values() for m in ad.modules})
    with torch.no_grad():
        for module in modules:
            w = base[f"{module}.weight"].float()
            dense = {
                n: adapters[n].modules[module].dense().float().to(w.device)
                for n in names
                if module in adapters[n].modules
            }
            sq = {n: float(d.square().sum()) for n, d in dense.items()}
            w_sq = float(w.square().sum())
            for n in dense:
                sq_delta[n] += sq[n]
                sq_base[n] += w_sq
            for (a, b), acc in pairs.items():
                if a in dense and b in dense:
                    da, db = dense[a], dense[b]
                    acc["dot"] += float((da * db).sum())
                    acc["sq_a"] += sq[a]
                    acc["sq_b"] += sq[b]
                    both = (da != 0) & (db != 0)
                    acc["both"] += int(both.sum())
                    acc["same"] += int((both & (da.sign() == db.sign())).sum())
    norm = {n: sq_delta[n] ** 0.5 for n in names}
    return {
        "relative_norm": {n: norm[n] / sq_base[n] ** 0.5 if sq_base[n] else float("nan") for n in names},
        "pairs": [
            {
                "a": a,
                "b": b,
                "cosine": acc["dot"] / (acc["sq_a"] * acc["sq_b"]) ** 0.5
                if acc["sq_a"] and acc["sq_b"]
                else float("nan"),
                "sign_agreement": acc["same"] / acc["both"] if acc["both"] else float("nan"),
            }
            for (a, b), acc in pairs.items()
        ],
    }


def geometry_markdown(geometry: dict) -> str:
    """Two small markdown tables: relative norms, then pairwise cosine / sign agreement."""
    lines = ["| adapter | relative norm ‖ΔW‖/‖W‖ |", "|---|---|"]
    lines += [f"| {n} | {x:.1%} |" for n, x in geometry["relative_norm"].items()]
    lines += ["", "| pair | cosine | sign agreement |", "|---|---|---|"]
    lines += [f"| {p['a']} / {p['b']} | {p['cosine']:.3f} | {p['sign_agreement']:.1%} |" for p in geometry["pairs"]]
    return "\n".join(lines) + "\n"
