"""lm-eval-harness against a served mix: its ``generate_until`` over the demo's test prompts, scored by
mixserve's own scorers, next to what ``mixserve eval`` scored for the same mix on the same examples.

    python -m bench.lm_eval_demo --lm-eval /path/to/venv/bin/lm_eval [--model all-tasks] [--n 200]

lm-eval installs beside its own pins, so it runs from another venv (``pip install torch==2.13.0`` first,
then ``lm_eval[api]==0.4.13``); this script starts ``mixserve serve`` on the demo (127.0.0.1, a free
port), writes a task per demo task (the test split's prompts; lm-eval's ``until`` stop list, which it
always sends), runs lm-eval's ``local-completions`` client and prints each task's score with the score
of the committed quality table's row for the same mix (``mixserve/eval/results/quality.json``; its
first ``--n`` examples per task). Issue 33: with the stop list, answers that ended on EOS lost their
last characters and lm-eval scored ``all-tasks`` 0/10.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.lm_eval_harness import GENERATE_UNTIL, LOCAL_TASK, metric
from mixserve.eval.tasks import TASKS, make_split
from server.readiness import free_port

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "mixserve" / "eval" / "results" / "quality.json"
TASK_YAML = (
    LOCAL_TASK.replace("{name}", "mixserve_demo_{task}")
    + GENERATE_UNTIL
    + "process_results: !function utils.process_results\n"
    + metric("accuracy")
)
UTILS = """import sys
sys.path.insert(0, {root!r})
from mixserve.eval.scorers import score
from mixserve.eval.tasks import Example


def process_results(doc, results):
    example = Example(doc["task"], doc["prompt"], doc["answer"], json.loads(doc["check"]))
    return {{"accuracy": score(doc["task"], [example], [results[0]]).accuracy}}


import json  # noqa: E402
"""


def write_tasks(where: Path, n: int) -> list[str]:
    names = []
    (where / "utils.py").write_text(UTILS.format(root=str(ROOT)))
    for task in TASKS:
        rows = [dataclasses.asdict(e) | {"check": json.dumps(e.check)} for e in make_split(task, "test", n)]
        data = where / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (where / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data))
        names.append(f"mixserve_demo_{task}")
    return names


def table_scores(model: str, n: int) -> dict[str, float]:
    """The committed quality table's scores of the row serving ``model`` (all-tasks: the recommended row),
    over its first ``n`` test examples per task."""
    rows = json.loads(QUALITY.read_text())["rows"]
    row = next(r for r in rows if r["group"] == "recommended") if model == "all-tasks" else \
        next(r for r in rows if r["row"] == f"adapter {model} alone")  # fmt: skip
    return {t: bits[:n].count("1") / len(bits[:n]) for t, bits in row["correct"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval", required=True, help="the lm_eval executable (in its own venv)")
    parser.add_argument("--model", default="all-tasks", help="the served model to evaluate (default all-tasks)")
    parser.add_argument("--n", type=int, default=200, help="test examples per task (default 200: the table's)")
    parser.add_argument("--out", default="bench/results/lm-eval-demo.json")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mixserve.cli", "serve", "--state", "none", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            names = write_tasks(Path(tmp), args.n)
            t0 = time.perf_counter()
            done = subprocess.run(
                [args.lm_eval, "--model", "local-completions", "--model_args",
                 f"model={args.model},base_url={url}/v1/completions,num_concurrent=8,max_retries=1,"
                 "tokenized_requests=False,tokenizer_backend=None", "--tasks", ",".join(names), "--include_path", tmp,
                 "--output_path", f"{tmp}/out", "--log_samples"],
                capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            if done.returncode != 0:
                raise SystemExit(f"lm_eval failed:\n{done.stderr[-3000:]}")
            results = json.loads(next(Path(tmp, "out").rglob("results_*.json")).read_text())["results"]
    finally:
        server.terminate()
        server.wait(30)
    table = table_scores(args.model, args.n)
    rows = {t: {"lm_eval": results[f"mixserve_demo_{t}"]["accuracy,none"], "mixserve_eval": table[t]} for t in TASKS}
    for t, r in rows.items():
        print(f"{t:8s} lm-eval {r['lm_eval']:.3f}   mixserve eval (quality.json) {r['mixserve_eval']:.3f}")
    Path(args.out).write_text(json.dumps({"model": args.model, "n": args.n, "seconds": seconds, "tasks": rows},
                                         indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
