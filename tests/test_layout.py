"""The package layout: the online service imports neither the trainer nor the benchmark harness, and
the wheel installs no top-level names but ``merging``, ``server`` and ``mixserve``."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(
    r"^\s*(from|import)\s+(mixserve\.demo\b|mixserve\.eval\.(harness|benchmark|tune_run|humaneval|peft_rows)\b)", re.M
)
TOP_LEVEL = {"merging", "server", "mixserve"}


def test_server_sources_do_not_import_the_trainer_or_the_harness():
    offenders = [p.name for p in (ROOT / "server").rglob("*.py") if FORBIDDEN.search(p.read_text())]
    assert not offenders, offenders


def test_server_imports_nothing_of_mixserve():
    """One-way layering: `mixserve` (the command, the tune jobs, the eval) builds on `server`, never back."""
    imports = re.compile(r"^\s*(from|import)\s+mixserve\b", re.M)
    offenders = [p.name for p in (ROOT / "server").rglob("*.py") if imports.search(p.read_text())]
    assert not offenders, offenders
    code = "import sys, server.entrypoints.api, server.entrypoints.serve_cli; print(sorted(m for m in sys.modules if m.startswith('mixserve')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_importing_the_app_loads_neither():
    prefixes = ("mixserve.demo", "mixserve.eval.harness", "mixserve.eval.benchmark", "transformers.trainer")
    code = f"import sys, server.entrypoints.api, mixserve.tune_jobs; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_console_script_lives_outside_server():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'mixserve = "mixserve.cli:main"' in text
    assert not (ROOT / "server" / "cli.py").exists()


def test_the_wheel_installs_only_merging_server_and_mixserve():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert isinstance(packages, list), "an explicit package list, so that no folder is picked up by discovery"
    assert {p.split(".")[0] for p in packages} == TOP_LEVEL, packages
    # Every package with code is listed (setuptools ships no module of an unlisted one).
    inits = [p for top in sorted(TOP_LEVEL) for p in (ROOT / top).rglob("__init__.py")]
    assert {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in inits} == set(packages)
    for name in ("eval", "models"):
        assert not (ROOT / name).exists(), f"top-level {name}/ collides with users' modules"
    # The demo model ships as mixserve.demo's package data; the committed benchmark output does not.
    data = setuptools["package-data"]["mixserve.demo"]
    assert {"base/*", "adapters/*/*", "pins.yaml"} <= set(data), data
    assert "results/*" in setuptools["exclude-package-data"]["mixserve.eval"]
    assert "static/*" in setuptools["package-data"]["server.entrypoints"]  # the /playground page ships too


def test_the_demo_model_lives_in_the_mixserve_package():
    from server.config import DEMO_DIR

    assert DEMO_DIR == ROOT / "mixserve" / "demo"
    assert (DEMO_DIR / "__init__.py").is_file() and (DEMO_DIR / "pins.yaml").is_file()
    assert (DEMO_DIR / "base" / "config.json").is_file() and (DEMO_DIR / "adapters").is_dir()
    from mixserve.cli import build_parser

    assert build_parser().parse_args(["demo-train"]).out == str(DEMO_DIR)  # the CLI rebuilds the same place


# server/ by layer, as vLLM's entrypoints / engine / worker, with the adapter pools under the worker and
# the admin state store at the bottom: each layer imports only the layers below it (and the shared
# leaves config, metrics, readiness).
LAYERS = ["entrypoints", "engine", "worker", "adapters", "store"]
LEAVES = {"config", "metrics", "readiness"}


def test_server_layers_import_one_way():
    imports = re.compile(r"^\s*(?:from|import)\s+server\.(\w+)", re.M)
    offenders = []
    for path in (ROOT / "server").rglob("*.py"):
        rel = path.relative_to(ROOT / "server").parts
        if len(rel) == 1:  # a shared leaf: imports nothing of server
            assert path.stem in LEAVES | {"__init__"}, f"server/{path.name}: put it in a layer ({LAYERS})"
            offenders += [f"{path.name} -> {m}" for m in imports.findall(path.read_text())]
            continue
        level = LAYERS.index(rel[0])
        for target in imports.findall(path.read_text()):
            if target in LEAVES:
                continue
            if target not in LAYERS or LAYERS.index(target) < level:
                offenders.append(f"{'/'.join(rel)} -> {target}")
    assert not offenders, offenders
