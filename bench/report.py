"""Writing a benchmark's result: ``<out>.json`` and ``<out>.md``, and the table on stdout."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """``<cpu model>, <n> cores``: the machine a CPU result was measured on."""
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores"


def write_report(out: str | Path, result: dict, to_markdown: Callable[[dict], str]) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
