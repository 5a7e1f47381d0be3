"""Writing a benchmark's result: ``<out>.json`` and ``<out>.md``, and the table on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(out: str | Path, result: dict, to_markdown: Callable[[dict], str]) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
