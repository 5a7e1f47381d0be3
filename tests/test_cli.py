"""`mixserve merge` end to end: outputs load in PEFT / transformers and match the merged delta."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merging.adapters import load_adapter
from merging.merge import merge_mix
from merging.spec import parse_mix
from mixserve.cli import main

TOKENS = torch.tensor([[1, 5, 17, 42, 99, 3, 7, 64]])


def _adapter_args(peft_adapters) -> list[str]:
    return [a for n, p in peft_adapters.items() for a in ("--adapter", f"{n}={p}")]


def _logits_with_delta(base_dir: Path, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference: load the base, add dW to each weight by hand, run it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, dW in deltas.items():
            params[f"{module}.weight"] += dW
        return model(TOKENS).logits


def _reference(peft_adapters, mix_dict) -> dict[str, torch.Tensor]:
    adapters = {n: load_adapter(p, n) for n, p in peft_adapters.items()}
    merged = merge_mix(parse_mix(mix_dict), adapters)
    return {m: d.dense() for m, d in merged.modules.items()}


def test_peft_format_loads_in_peft_and_matches_the_merged_delta(tiny_base, peft_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    args = [
        "merge",
        "--base",
        str(tiny_base),
        *_adapter_args(peft_adapters),
        "--weights",
        "1.0,0.8,1.2",
        "--method",
        "linear",
        "--out",
        str(out),
        "--format",
        "peft",
    ]
    assert main(args) == 0
    mix = {
        "method": "linear",
        "space": "lowrank",
        "children": [
            {"adapter": "sql", "weight": 1.0},
            {"adapter": "code", "weight": 0.8},
            {"adapter": "json", "weight": 1.2},
        ],
    }
    expected = _logits_with_delta(tiny_base, _reference(peft_adapters, mix))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), out).eval()
    with torch.no_grad():
        got = model(TOKENS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # and the merge did something: the base alone differs
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(TOKENS).logits
    assert (got - base_logits).abs().max() > 1e-3


def test_full_format_loads_in_transformers_and_matches(tiny_base, peft_adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    args = [
        "merge",
        "--base",
        str(tiny_base),
        *_adapter_args(peft_adapters),
        "--method",
        "ties",
        "--density",
        "0.3",
        "--out",
        str(out),
        "--format",
        "full",
    ]
    assert main(args) == 0
    mix = {"method": "ties", "density": 0.3, "space": "dense", "children": [{"adapter": n} for n in peft_adapters]}
    expected = _logits_with_delta(tiny_base, _reference(peft_adapters, mix))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, expected, rtol=1e-4, atol=1e-5)
    assert (out / "config.json").is_file() and not list(out.glob("*.bin"))


def test_dense_ties_as_peft_is_refactored_and_reports_energy(tiny_base, peft_adapters, tmp_path, capsys):
    out = tmp_path / "ties"
    assert (
        main(
            [
                "merge",
                "--base",
                str(tiny_base),
                *_adapter_args(peft_adapters),
                "--method",
                "ties",
                "--rank",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out
    assert "SVD energy kept >=" in summary and "ties (dense)" in summary
    merged = load_adapter(out)
    assert set(merged.ranks.values()) == {4}


def test_hierarchical_mix_file(tiny_base, peft_adapters, tmp_path):
    mix = {
        "method": "ties",
        "density": 0.5,
        "children": [
            {
                "method": "dare_linear",
                "drop_rate": 0.3,
                "seed": 3,
                "children": [{"adapter": "code"}, {"adapter": "json"}],
            },
            {"adapter": "sql", "weight": 0.8},
        ],
    }
    (tmp_path / "mix.json").write_text(json.dumps(mix))
    out = tmp_path / "h"
    assert (
        main(
            [
                "merge",
                "--base",
                str(tiny_base),
                *_adapter_args(peft_adapters),
                "--mix",
                str(tmp_path / "mix.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = load_adapter(out)
    expected = _reference(peft_adapters, mix)
    assert set(saved.modules) == set(expected)
    for m, f in saved.modules.items():
        torch.testing.assert_close(f.dense(), expected[m], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "ties", "--drop-rate", "0.5"], "does not take 'drop_rate'"),
        (["--method", "nope"], "Input should be 'linear'"),
        (["--weights", "1,2"], "2 weights for 3 adapters"),
        (["--format", "full", "--base", "/nonexistent"], "not a directory"),
        (["--mix", "mix.json", "--method", "ties"], "--mix already defines the merge; drop --method"),
        (["--method", "tsv", "--density", "0.5"], "invalid mix: method 'tsv' does not take 'density'"),
        (["--method", "della", "--epsilon", "0.6"], "density +- epsilon inside (0, 1)"),
        (["--method", "iso_c", "--lambda", "inf"], "lambda must be a finite number"),
    ],
)
def test_bad_arguments_fail_with_a_message_not_a_traceback(peft_adapters, tmp_path, extra, message):
    args = [
        sys.executable,
        "-m",
        "mixserve.cli",
        "merge",
        *_adapter_args(peft_adapters),
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "pydantic.dev" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("mixserve")]) == 1


def test_rank_option_truncates_a_lowrank_merge(tiny_base, peft_adapters, tmp_path, capsys):
    out = tmp_path / "r2"
    args = [
        "merge",
        "--base",
        str(tiny_base),
        *_adapter_args(peft_adapters),
        "--method",
        "linear",
        "--rank",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "SVD energy kept >=" in capsys.readouterr().out
    saved = load_adapter(out)
    assert set(saved.ranks.values()) == {2}
    full = _reference(peft_adapters, {"method": "linear", "children": [{"adapter": n} for n in peft_adapters]})
    for m, f in saved.modules.items():
        U, S, Vh = torch.linalg.svd(full[m])
        best = (U[:, :2] * S[:2]) @ Vh[:2]  # Eckart-Young: the best rank-2 approximation
        torch.testing.assert_close(f.dense(), best, rtol=1e-4, atol=1e-5)


def test_refuses_to_write_into_a_non_empty_directory(peft_adapters, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("precious")
    assert main(["merge", *_adapter_args(peft_adapters), "--out", str(tmp_path / "o")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "precious"


def test_example_command_writes_mergeable_inputs(tmp_path):
    assert main(["example", "--out", str(tmp_path / "ex")]) == 0
    adapters = {n: str(tmp_path / "ex" / "adapters" / n) for n in ("sql", "code", "json")}
    args = [
        "merge",
        "--base",
        str(tmp_path / "ex" / "base"),
        *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")],
        "--method",
        "dare_ties",
        "--out",
        str(tmp_path / "m"),
        "--format",
        "full",
    ]
    assert main(args) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--adapters", "/nonexistent-dir", "--no-peft"], "--adapters /nonexistent-dir is not a directory"),
        (["eval", "--tuned-mix", "FILE", "--no-peft"], "--tuned-mix"),  # not JSON: refused before any scoring
        (["eval", "--tuned-mix", "missing.json"], "No such file"),
        (["merge", "--adapter", "a=/nonexistent-adapter", "--out", "OUT"], "nonexistent-adapter"),
        (["merge", "--adapter", "a=/nonexistent-adapter", "--mix", "missing.json", "--out", "OUT"], "missing.json"),
        (["tune", "--model", "/nonexistent-model", "--budget", "1", "--out", "OUT/x.json"], "is not a model directory"),
        (["example", "--out", "FILE/sub"], "error:"),
    ],
)
def test_common_mistakes_are_one_line_for_every_command(tmp_path, argv, message):
    (tmp_path / "FILE").write_text("a file, not a directory")
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("FILE", str(tmp_path / "FILE")) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "mixserve.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin"}, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("Loading", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith(f"mixserve {argv[0]}: "), proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr and "pydantic.dev" not in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "mixserve.cli", *argv, "--debug"], capture_output=True, text=True,
                           cwd=tmp_path, env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin"},
                           timeout=300)  # fmt: skip
    assert debug.returncode != 0


def test_debug_shows_the_traceback_of_a_merge_error(tmp_path):
    argv = ["merge", "--adapter", "a=/nonexistent-adapter", "--out", str(tmp_path / "o")]
    env = {"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin"}
    plain = subprocess.run([sys.executable, "-m", "mixserve.cli", *argv], capture_output=True, text=True, env=env)
    debug = subprocess.run([sys.executable, "-m", "mixserve.cli", "--debug", *argv], capture_output=True, text=True,
                           env=env)  # fmt: skip
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "(--debug shows the traceback)" in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "nonexistent-adapter" in debug.stderr
