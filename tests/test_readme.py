"""The README's examples, sent as written to a real server: the README cannot drift from what mixserve answers.

Every ``curl`` in the README's "Try it" section is parsed (URL path, headers, ``-d`` body) and sent to
a real mixserve on the demo model with the demo's default pins; the line ``# -> "..."`` under a
request is the exact text the README promises (a JSON string), and the Python example's printed
output is the ```text block that follows it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import shlex
from pathlib import Path

import httpx
import pytest

from server.config import DEMO_DIR, ServeConfig
from tests.server_harness import running_server

README = Path(__file__).resolve().parents[1] / "README.md"
TOKEN = "change-me"  # what the README exports
pytestmark = pytest.mark.skipif(
    not (DEMO_DIR / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained"
)


def try_it_section() -> str:
    text = README.read_text()
    start = text.index("### Try it")
    return text[start : text.index("\n## ", start)]


def curl_examples(section: str) -> list[tuple[list[str], str | None]]:
    """``(curl argv, promised text or None)`` for every curl in the section's bash blocks, in order."""
    out: list[tuple[list[str], str | None]] = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].lstrip().startswith("curl "):
                i += 1
                continue
            command = lines[i]
            while command.count("'") % 2:  # a single-quoted body spans lines
                i += 1
                command += "\n" + lines[i]
            promised = None
            if i + 1 < len(lines) and lines[i + 1].startswith("# -> "):
                promised = json.loads(lines[i + 1][len("# -> ") :])
            out.append((shlex.split(command, comments=True), promised))
            i += 1
    return out


def send(url: str, argv: list[str]) -> tuple[int, str]:
    """Send one parsed curl to ``url``; the generated text (streamed chunks joined) or the raw body."""
    target = next(a for a in argv if "localhost:8000" in a)
    path = target.split("localhost:8000", 1)[1]
    headers, body = {}, None
    for flag, value in itertools.pairwise(argv):
        if flag == "-H":
            key, val = value.split(":", 1)
            headers[key.strip()] = val.strip().replace("$MIXSERVE_ADMIN_TOKEN", TOKEN)
        elif flag == "-d":
            body = json.loads(value)
    r = httpx.post(url + path, headers=headers, json=body, timeout=120)
    if r.status_code != 200 or path.startswith("/admin"):
        return r.status_code, r.text
    if body.get("stream"):
        text = ""
        for line in r.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += _text_of(json.loads(line[len("data: ") :]))
        return 200, text
    return 200, _text_of(r.json())


def _text_of(payload: dict) -> str:
    if "choices" in payload:
        if not payload["choices"]:
            return ""
        choice = payload["choices"][0]
        return choice.get("text") or (choice.get("delta") or {}).get("content") or (choice.get("message") or {}).get(
            "content"
        ) or ""  # fmt: skip
    return payload.get("text", "")


@pytest.fixture(scope="module")
def server():
    config = ServeConfig(pin_file=DEMO_DIR / "pins.yaml", admin_token=TOKEN, max_batch=8)
    with running_server(config) as (url, _):
        yield url


def test_every_readme_request_gets_the_answer_the_readme_shows(server):
    models = {m["id"] for m in httpx.get(server + "/v1/models").json()["data"]}
    assert "all-tasks" in models  # the demo's recommended mix, pinned by default
    examples = curl_examples(try_it_section())
    assert len(examples) >= 6 and sum(p is not None for _, p in examples) >= 5
    for argv, promised in examples:
        status, text = send(server, argv)
        assert status == 200, (argv, text)
        if promised is not None:
            assert text == promised, argv


def test_the_readme_python_example_prints_what_the_readme_shows(server):
    section = try_it_section()
    code, printed = re.search(r"```python\n(.*?)```\n.*?```text\n(.*?)```", section, re.S).groups()
    code = code.replace("http://127.0.0.1:8000/v1", server + "/v1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().strip() == printed.strip()


def test_all_tasks_is_pinned_by_default_and_listed():
    from mixserve.cli import build_parser
    from server.entrypoints.serve_cli import config_from_args

    args = build_parser().parse_args(["serve"])
    assert config_from_args(args).pin_file == DEMO_DIR / "pins.yaml"
    args = build_parser().parse_args(["serve", "--adapters", "/elsewhere"])
    assert config_from_args(args).pin_file is None  # the demo's pins name the demo's adapters only


def test_the_default_pin_is_the_recommended_mix_of_the_committed_table():
    import yaml

    pins = yaml.safe_load((DEMO_DIR / "pins.yaml").read_text())
    recommended = json.loads((README.parent / "mixserve" / "eval" / "results" / "recommended_mix.json").read_text())
    assert pins == {"all-tasks": recommended}
