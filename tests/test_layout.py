"""The package layout: the online service imports neither the trainer nor the benchmark harness."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"^\s*(from|import)\s+(models\b|eval\.(harness|benchmark|tune_run|humaneval|peft_rows)\b)", re.M)


def test_server_sources_do_not_import_the_trainer_or_the_harness():
    offenders = [p.name for p in (ROOT / "server").glob("*.py") if FORBIDDEN.search(p.read_text())]
    assert not offenders, offenders


def test_importing_the_app_loads_neither():
    prefixes = ("models", "eval.harness", "eval.benchmark", "transformers.trainer")
    code = (
        f"import sys, server.api, server.tune_jobs; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_console_script_lives_outside_server():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'mixserve = "mixserve.cli:main"' in text
    assert not (ROOT / "server" / "cli.py").exists()
