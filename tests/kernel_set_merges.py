"""Merge a fixed set of mixes and record their outcome, to compare runs under different CPU kernel sets.

    python -m tests.kernel_set_merges OUT.pt [--source demo|mistral7b|both] [--random-adapters DIR]
        [--dense-modules N]

Run it twice, under two kernel sets (e.g. once as is and once with ``MKL_CBWR=COMPATIBLE
MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1``), then
:func:`compare` the two records: ``tests/test_kernel_sets.py`` does exactly that. A record holds, per
mix and module:

* ``signs``: the sha256 of the sign pattern (-1 / 0 / +1) of a dense-space result of a trimming,
  dropping or electing method: which entries it kept and with which sign; equal hashes are equal
  decisions;
* ``sketch``: the delta applied to 8 fixed random probe vectors, ``dW x`` (and ``dW^T y``), in float64:
  enough to tell two deltas' relative distance without keeping 7B-shaped matrices around.

Every method of the registry is merged in both spaces (``merge_mix``) and, for the lowrank space, on
the adapter family's coordinates (``merge_core``) and as cores over the mix's own members
(``merge_members``, the server's path). Sources: the demo's sql /
python / json adapters, and three random rank-16 adapters on one Mistral-7B-shaped layer (the
dense space on its ``--dense-modules`` smallest modules only, k_proj and v_proj by default, and for the
spectral methods only with ``--spectral-dense``: a dense merge of a 14336 x 4096 module takes seconds,
a spectral one minutes).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from merging.adapters import load_adapter
from merging.core_merge import merge_core
from merging.family import AdapterFamily
from merging.member_merge import merge_members
from merging.merge import merge_mix
from merging.methods import METHODS
from merging.spec import parse_mix
from merging.synthetic import MISTRAL_7B, write_random_adapter

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
# Each method with knobs where its decisions bite (well inside their ranges), and a nested mix.
PARAMS: dict[str, dict] = {
    "linear": {},
    "task_arithmetic": {},
    "magnitude_prune": {"density": 0.3},
    "ties": {"density": 0.3},
    "dare_linear": {"drop_rate": 0.5, "seed": 1},
    "dare_ties": {"drop_rate": 0.5, "seed": 1},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.2, "seed": 1},
    "della_linear": {"density": 0.5, "epsilon": 0.2, "seed": 1},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {},
}
WEIGHTS = (1.0, 0.7, 0.5)
RANDOM_NAMES = ("a", "b", "c")
PROBES = 8


def mixes(names: list[str]) -> dict[str, dict]:
    """``{label: mix}``: every method in both spaces over ``names`` (weighted), and a nested TIES."""
    children = [{"adapter": n, "weight": w} for n, w in zip(names, WEIGHTS, strict=False)]
    out = {}
    for method, params in PARAMS.items():
        assert method in METHODS, method
        for space in ("lowrank", "dense"):
            out[f"{method}/{space}"] = {"method": method, "space": space, **params, "children": children}
    out["nested/lowrank"] = {"method": "ties", "density": 0.4, "children": [
        {"method": "dare_linear", "drop_rate": 0.3, "children": children[:2]}, children[2]]}  # fmt: skip
    return out


def write_random_adapters(where: Path) -> Path:
    """Three random rank-16 adapters on one Mistral-7B-shaped layer, written once under ``where``.

    Written, not drawn in each run: ``torch.randn`` itself draws differently under another kernel set
    (its vectorised normal sampler), and the runs must merge the same adapters.
    """
    shapes = MISTRAL_7B.module_shapes(layers=1)
    for i, name in enumerate(RANDOM_NAMES):
        if not (where / name / "adapter_model.safetensors").is_file():
            write_random_adapter(where / name, shapes, rank=16, alpha=32, seed=i)
    return where


def sources(which: str, random_dir: Path | None) -> dict[str, dict]:
    """``{source: {name: adapter}}``."""
    out = {}
    if which in ("demo", "both"):
        out["demo"] = {n: load_adapter(DEMO / "adapters" / n, n) for n in ("sql", "python", "json")}
    if which in ("mistral7b", "both"):
        if random_dir is None:
            raise SystemExit("--random-adapters DIR is needed for the mistral7b source")
        where = write_random_adapters(random_dir)
        out["mistral7b"] = {n: load_adapter(where / n, n) for n in RANDOM_NAMES}
    return out


def _probes(shape: tuple[int, int], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(module.encode()).digest()[:7], "little"))
    return (torch.randn(shape[1], PROBES, generator=g, dtype=torch.float64),
            torch.randn(shape[0], PROBES, generator=g, dtype=torch.float64))  # fmt: skip


def _record(delta, module: str, signs: bool) -> dict:
    """A module's outcome: its probes' images (and, for a dense result, the hash of its sign pattern when
    ``signs``: for the methods whose zeros and signs are their decisions; a linear or spectral result's
    near-zero entries take the sign of their rounding)."""
    x, y = _probes(delta.shape, module)
    out = {}
    if hasattr(delta, "W"):
        W = delta.W.to(torch.float64)
        if signs:
            out["signs"] = hashlib.sha256(delta.W.sign().to(torch.int8).numpy().tobytes()).hexdigest()
        out["sketch"] = torch.cat([W @ x, W.mT @ y]).flatten()
    else:
        A, B = delta.A.to(torch.float64), delta.scaled_B().to(torch.float64)
        out["sketch"] = torch.cat([B @ (A @ x), A.mT @ (B.mT @ y)]).flatten()
    return out


def record(which: str = "both", random_dir: Path | None = None, dense_modules: int = 2,
           spectral_dense: bool = False) -> dict[str, dict]:  # fmt: skip
    """``{"source/mix/path": {module: outcome}}`` for every mix of every source (on the Mistral-shaped
    layer, the spectral methods' dense space only with ``spectral_dense``: float64 SVDs of full
    matrices, tens of seconds a module)."""
    out: dict[str, dict] = {}
    for source, adapters in sources(which, random_dir).items():
        names = sorted(adapters)
        family, refused = AdapterFamily().extend_all(adapters.values())
        assert not refused
        first = next(iter(adapters.values())).modules
        smallest = sorted(first, key=lambda m: (first[m].shape[0] * first[m].shape[1], m))[:dense_modules]
        dense_only = smallest if source != "demo" else None
        for label, raw in mixes(names).items():
            spec = parse_mix(raw)
            pick = adapters
            if dense_only is not None and spec.space == "dense":
                if METHODS[spec.method].family == "spectral" and not spectral_dense:
                    continue
                pick = {n: _only(a, dense_only) for n, a in adapters.items()}
            # Sign patterns are decisions for the trimming / dropping / electing methods only: a linear
            # merge's near-zero entries take the sign of their rounding (its product is not exact).
            signs = METHODS[spec.method].family == "elementwise" and not METHODS[spec.method].linear
            merged = merge_mix(spec, pick)
            out[f"{source}/{label}/merge_mix"] = {m: _record(d, m, signs) for m, d in merged.modules.items()}
            if spec.space == "lowrank":
                core = merge_core(spec, family).to_merged(family)
                out[f"{source}/{label}/merge_core"] = {m: _record(d, m, signs) for m, d in core.modules.items()}
                served = merge_members(spec, adapters).to_merged(adapters)  # what the server serves
                out[f"{source}/{label}/merge_members"] = {m: _record(d, m, signs) for m, d in served.modules.items()}
    return out


def _only(adapter, modules: list[str]):
    from dataclasses import replace

    return replace(adapter, modules={m: adapter.modules[m] for m in modules})


def compare(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Per mix: ``rel`` (the largest relative distance of a module's sketches) and ``signs_differ`` (dense
    modules whose sign patterns differ)."""
    a, b = ({k: v for k, v in r.items() if not k.startswith("_")} for r in (a, b))
    assert a.keys() == b.keys(), set(a) ^ set(b)
    out = {}
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        rel, differ = 0.0, []
        for module, ra in a[key].items():
            rb = b[key][module]
            sa, sb = ra["sketch"], rb["sketch"]
            rel = max(rel, float((sa - sb).norm() / sa.norm().clamp(min=1e-300)))
            if ra.get("signs") != rb.get("signs"):
                differ.append(module)
        out[key] = {"rel": rel, "signs_differ": differ}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="where to write the record (torch.save)")
    parser.add_argument("--source", choices=["demo", "mistral7b", "both"], default="both")
    parser.add_argument("--random-adapters", type=Path, help="mistral7b: where its random adapters are (written "
                        "there on the first run)")  # fmt: skip
    parser.add_argument("--dense-modules", type=int, default=2,
                        help="mistral7b: merge the dense space on this many of its smallest modules (default 2)")  # fmt: skip
    parser.add_argument("--spectral-dense", action="store_true",
                        help="mistral7b: merge TSV-M / Iso-C / Iso-CTS in the dense space too (slow)")  # fmt: skip
    args = parser.parse_args()
    rec = record(args.source, args.random_adapters, args.dense_modules, args.spectral_dense)
    rec["_env"] = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    torch.save(rec, args.out)


if __name__ == "__main__":
    main()
