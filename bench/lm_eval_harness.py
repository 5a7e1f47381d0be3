"""lm-eval-harness as a real client of a served mix, checked against the same harness's ``hf`` backend
on the same mix exported as a full model (issue 35).

    python -m bench.lm_eval_harness --lm-eval-venv /tmp/lmeval-venv [--model all-tasks] [--n 200]

lm-eval 0.4.13 installs beside its own pins, so it runs from another venv (``pip install torch==2.13.0``
first: the CPU build; then ``lm_eval[api]==0.4.13``, ``accelerate==1.16.0``, which lm-eval's ``hf`` backend
imports, and ``pip install -e .`` for the pinned ``transformers``). The script, run from mixserve's own venv:

1. exports the mix (a pin of ``mixserve/demo/pins.yaml``, or one demo adapter by name) as a full model
   with ``mixserve merge --format full`` (the tokenizer copied beside it if the export lacks it);
2. writes two local tasks over the demo's test split (``dataset_path: json``, nothing downloaded): a
   ``generate_until`` task (``--gen-task``, default JSON: exact match after stripping, lm-eval's stop
   list ``\\n\\n`` / ``### input``) and a ``multiple_choice`` task (``--mc-task``, default python: the
   reference among 4 choices, the other 3 the most similar other test answers of the same task;
   ``acc``), ``--n`` examples each;
3. runs lm-eval ``--model hf`` (``pretrained=<export>,dtype=float32`` and ``--device cpu``) and ``--model
   local-completions`` with its defaults against a ``mixserve serve`` it starts (127.0.0.1, a free
   port; ``tokenizer_backend=huggingface`` on the demo base's tokenizer, so token-id prompts
   ``[[ids]]``, and loglikelihoods from ``echo`` + ``logprobs``), both with ``--log_samples``;
4. compares per task the scores, per request the loglikelihoods (``filtered_resps``; within
   ``--tolerance``) and greedy flags, per example the generations, and writes ``<out>.json`` +
   ``<out>.md`` (default ``bench/results/lm-eval-harness-cpu``).

Before lm-eval runs against the server, one of its loglikelihood requests is sent as is: if the server
refuses it, the report keeps the ``hf`` side and the server's answer, and the script exits with status 1.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.report import cpu_model, write_report
from mixserve.eval.tasks import TASKS, Example, make_split
from server.readiness import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mixserve" / "demo"
BASE, ADAPTERS, PINS = DEMO / "base", DEMO / "adapters", DEMO / "pins.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHOICES = 4
# A local JSON-lines task: its head, a generate_until body (the demo's prompts, lm-eval's stop list),
# and the metric lines; `bench/lm_eval_demo.py` builds its tasks from the same pieces.
LOCAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
"""
GENERATE_UNTIL = """output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "### input"]
  max_gen_toks: 64
  do_sample: false
  temperature: 0.0
"""


def metric(name: str) -> str:
    return f"metric_list:\n  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n"


GEN_YAML = LOCAL_TASK + GENERATE_UNTIL + "process_results: !function utils.exact_match\n" + metric("exact_match")
MC_YAML = (
    LOCAL_TASK
    + """output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: target
target_delimiter: ""
"""
    + metric("acc")
)
UTILS = '''def exact_match(doc, results):
    """The generation equals the reference once both are stripped."""
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}
'''
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def mix_spec(model: str) -> dict[str, Any]:
    """The MixSpec served as ``model``: a pin of the demo's pin file, or one demo adapter by name."""
    pins = yaml.safe_load(PINS.read_text())
    if model in pins:
        spec = pins[model]
        return json.loads(spec) if isinstance(spec, str) else spec
    if (ADAPTERS / model).is_dir():
        return {"adapter": model}
    raise SystemExit(f"--model: {model!r} is neither a pin of {PINS} nor a demo adapter")


def export_full(model: str, out: Path) -> list[str]:
    """``mixserve merge --format full`` of ``model``'s MixSpec into ``out``, with the base's tokenizer
    files copied in if the export lacks them; returns the command."""
    mix = out.parent / f"{model}.mix.json"
    mix.write_text(json.dumps(mix_spec(model)))
    adapters = [a for p in sorted(ADAPTERS.iterdir()) if p.is_dir() for a in ("--adapter", f"{p.name}={p}")]
    cmd = [sys.executable, "-m", "mixserve.cli", "merge", "--base", str(BASE), *adapters, "--mix", str(mix),
           "--format", "full", "--out", str(out), "--force"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"mixserve merge failed:\n{done.stdout}{done.stderr}")
    for name in TOKENIZER_FILES:
        if (BASE / name).exists() and not (out / name).exists():
            log(f"the export lacks {name}: copied from {BASE}")
            shutil.copy(BASE / name, out / name)
    return cmd


def mc_choices(example: Example, pool: list[str], seed: str) -> tuple[list[str], int]:
    """The reference answer and the ``CHOICES - 1`` most similar other answers of ``pool``, in a
    seeded order; returns the choices and the reference's index."""
    ref = example.answer
    others = sorted({a for a in pool if a.strip() != ref.strip()},
                    key=lambda a: (-difflib.SequenceMatcher(None, ref, a).ratio(), a))  # fmt: skip
    choices = [ref, *others[: CHOICES - 1]]
    random.Random(seed).shuffle(choices)
    return choices, choices.index(ref)


def write_tasks(where: Path, gen_task: str, mc_task: str, n: int) -> dict[str, str]:
    """Writes the two task YAMLs, their data and ``utils.py`` into ``where``; returns
    ``{"generate_until": name, "multiple_choice": name}``."""
    (where / "utils.py").write_text(UTILS)
    gen_name, mc_name = f"mixserve_gen_{gen_task}", f"mixserve_mc_{mc_task}"
    rows = [{"task": e.task, "prompt": e.prompt, "answer": e.answer} for e in make_split(gen_task, "test", n)]
    (where / f"{gen_name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (where / f"{gen_name}.yaml").write_text(GEN_YAML.format(name=gen_name, data=where / f"{gen_name}.jsonl"))
    # Distractors from a wider slice of the same test split (other examples' answers, never the reference).
    pool = [e.answer for e in make_split(mc_task, "test", max(4 * n, 200))]
    rows = []
    for i, e in enumerate(make_split(mc_task, "test", n)):
        choices, target = mc_choices(e, pool, f"mixserve/lm-eval-harness/{mc_task}/{i}")
        rows.append({"task": e.task, "prompt": e.prompt, "choices": choices, "target": target})
    (where / f"{mc_name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (where / f"{mc_name}.yaml").write_text(MC_YAML.format(name=mc_name, data=where / f"{mc_name}.jsonl"))
    return {"generate_until": gen_name, "multiple_choice": mc_name}


def lm_eval_env(work: Path) -> dict[str, str]:
    """lm-eval's environment: offline, and one torch thread (the demo model is 256 wide: a second thread
    gains nothing, and on 2 shared cores it made the ``hf`` backend's generation 50x slower under load)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets"),
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def run_lm_eval(venv: Path, backend: str, model_args: str, tasks: dict[str, str], include: Path, out: Path,
                work: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """One lm-eval run; returns its command, wall time, results and logged samples (by task, by doc id)."""
    cmd = [str(venv / "bin" / "lm_eval"), "--model", backend, "--model_args", model_args, *extra,
           "--tasks", ",".join(tasks.values()), "--include_path", str(include), "--output_path", str(out),
           "--log_samples"]  # fmt: skip
    log(f"lm_eval --model {backend} ...")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=lm_eval_env(work))
    seconds = time.perf_counter() - t0
    (work / f"lm-eval-{backend}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"command": cmd, "seconds": seconds, "error": (done.stdout + done.stderr)[-4000:]}
    log(f"lm_eval --model {backend}: {seconds:.1f}s")
    return {"command": cmd, "seconds": seconds, **read_run(out, tasks)}


def read_run(out: Path, tasks: dict[str, str]) -> dict[str, Any]:
    """An lm-eval output folder's (latest) results and logged samples, by task kind and doc id."""
    results = json.loads(max(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for kind, name in tasks.items():
        rows = [json.loads(line) for line in max(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()]
        samples[kind] = {r["doc_id"]: r for r in rows}
    return {"results": results, "samples": samples}


def serve_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mixserve.cli",
        "serve",
        "--state",
        "none",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def start_server(port: int, work: Path) -> subprocess.Popen:
    """``mixserve serve`` on the demo (its pins: ``all-tasks``), once ``/ready`` answers; its log in ``work``."""
    cmd = serve_command(port)
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.poll() is not None:
            tail = (work / "server.log").read_text()[-3000:]
            raise SystemExit(f"mixserve serve exited ({server.returncode}):\n{tail}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit("mixserve serve was not ready in 300 s")


def probe(url: str, model: str) -> dict[str, Any]:
    """Sends one request shaped as lm-eval's local-completions loglikelihood request (token ids of the
    demo tokenizer, as lm-eval tokenizes them); returns the request, the status and the answer."""
    from transformers import AutoTokenizer

    text = make_split("sql", "test", 1)[0].prompt + "SELECT"
    ids = AutoTokenizer.from_pretrained(BASE)(text, add_special_tokens=False).input_ids
    body = {"model": model, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # fmt: skip
    answer = httpx.post(url + "/v1/completions", json=body, timeout=60)
    try:
        content: Any = answer.json()
    except ValueError:
        content = answer.text
    return {"request": body, "status": answer.status_code, "answer": content}


def check_probe(p: dict[str, Any]) -> str | None:
    """What is wrong with the probe's answer for lm-eval, or None."""
    if p["status"] != 200:
        return f"HTTP {p['status']}: {json.dumps(p['answer'])[:600]}"
    try:
        logprobs = p["answer"]["choices"][0]["logprobs"]
        n_tokens = len(p["request"]["prompt"][0])
        token_logprobs, top = logprobs["token_logprobs"], logprobs["top_logprobs"]
    except (KeyError, IndexError, TypeError) as e:
        return f"no choices[0].logprobs.token_logprobs / top_logprobs ({e!r}): {json.dumps(p['answer'])[:600]}"
    if len(token_logprobs) != n_tokens + 1 or len(top) != n_tokens + 1:
        return (f"{len(token_logprobs)} token_logprobs, {len(top)} top_logprobs for {n_tokens} prompt tokens "
                f"(lm-eval reads the prompt's from index ctxlen to -1: wants prompt + 1 generated)")  # fmt: skip
    return None


def compare(hf: dict[str, Any], api: dict[str, Any], tasks: dict[str, str], tolerance: float) -> dict[str, Any]:
    """Scores, per-request loglikelihoods and greedy flags, generations: ``hf`` vs ``local-completions``."""
    out: dict[str, Any] = {"scores": {}}
    for kind, name in tasks.items():
        metric = "acc,none" if kind == "multiple_choice" else "exact_match,none"
        a, b = hf["results"][name][metric], api["results"][name][metric]
        out["scores"][name] = {"metric": metric.split(",")[0], "hf": a, "local-completions": b, "equal": a == b}
    hs, as_ = hf["samples"]["multiple_choice"], api["samples"]["multiple_choice"]
    diffs, greedy_disagree, argmax_disagree, arg_mismatch, margins = [], 0, 0, 0, []
    for doc_id, h in hs.items():
        s = as_[doc_id]
        arg_mismatch += h["arguments"] != s["arguments"]
        # Logged samples hold each choice's (loglikelihood, is_greedy) as strings.
        lls_h, lls_s = [float(r[0]) for r in h["filtered_resps"]], [float(r[0]) for r in s["filtered_resps"]]
        diffs += [abs(x - y) for x, y in zip(lls_h, lls_s, strict=True)]
        greedy_disagree += sum(
            str(r[1]) != str(q[1]) for r, q in zip(h["filtered_resps"], s["filtered_resps"], strict=True)
        )
        argmax_disagree += lls_h.index(max(lls_h)) != lls_s.index(max(lls_s))
        top = sorted(lls_h, reverse=True)
        margins.append(top[0] - top[1])  # how far hf's choice is from flipping
    out["loglikelihood"] = {
        "requests": len(diffs), "docs": len(hs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
        "tolerance": tolerance, "within_tolerance": sum(d <= tolerance for d in diffs),
        "is_greedy_disagreements": greedy_disagree, "argmax_disagreements": argmax_disagree,
        "request_arguments_differ": arg_mismatch, "acc_disagreements": sum(hs[d]["acc"] != as_[d]["acc"] for d in hs),
        "min_top2_margin_hf": min(margins),
    }  # fmt: skip
    hg, ag = hf["samples"]["generate_until"], api["samples"]["generate_until"]
    same = [hg[d]["filtered_resps"][0] == ag[d]["filtered_resps"][0] for d in hg]
    first = next((d for d, ok in zip(hg, same, strict=True) if not ok), None)
    out["generations"] = {
        "docs": len(hg), "identical": sum(same),
        "exact_match_disagreements": sum(hg[d]["exact_match"] != ag[d]["exact_match"] for d in hg),
        "first_difference": None if first is None else {"doc_id": first, "hf": hg[first]["filtered_resps"][0],
                                                       "local-completions": ag[first]["filtered_resps"][0]},
    }  # fmt: skip
    out["pass"] = (all(s["equal"] for s in out["scores"].values()) and max(diffs) <= tolerance
                   and out["generations"]["identical"] == len(hg))  # fmt: skip
    return out


def versions(venv: Path) -> dict[str, str]:
    code = ("import json; from importlib.metadata import version as v; "
            "print(json.dumps({p: v(p) for p in ('lm_eval', 'torch', 'transformers', 'datasets')}))")  # fmt: skip
    theirs = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True,
                                       text=True).stdout)  # fmt: skip
    return {**{f"lm_eval_venv.{k}": x for k, x in theirs.items()},
            **{f"mixserve_venv.{p}": version(p) for p in ("torch", "transformers")}}  # fmt: skip


def machine() -> dict[str, Any]:
    return {"processor": platform.processor(), "cpu_model": cpu_model(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)), "platform": platform.platform()}  # fmt: skip


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "server", "merging", "mixserve").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_in_served_code": dirty}


def to_markdown(r: dict[str, Any]) -> str:
    lines = [f"# lm-eval-harness against a served mix: `{r['model']}` ({r['date']})", "",
             f"lm-eval {r['versions'].get('lm_eval_venv.lm_eval')}, torch {r['versions'].get('lm_eval_venv.torch')}; "
             f"{r['machine']['cpu_model'] or r['machine']['processor']}, {r['machine']['cores_usable']} cores; "
             f"commit {r['git']['commit']}; n = {r['n']} per task; local-completions "
             f"{r['client_args'] or 'defaults'}; wall {r['seconds']:.0f} s.", "",
             "| task | metric | hf (exported full model) | local-completions (mixserve serve) | equal |",
             "|---|---|---|---|---|"]  # fmt: skip
    backends = r["backends"]
    for kind, name in r["tasks"].items():
        metric = "acc" if kind == "multiple_choice" else "exact_match"
        cells = []
        for b in ("hf", "local-completions"):
            res = backends[b].get("results")
            cells.append(f"{res[name][metric + ',none']:.3f}" if res else "error")
        equal = r["comparison"]["scores"][name]["equal"] if r.get("comparison") else ""
        lines.append(f"| `{name}` | {metric} | {cells[0]} | {cells[1]} | {equal} |")
    c = r.get("comparison")
    if c:
        ll, g = c["loglikelihood"], c["generations"]
        lines += ["", f"- loglikelihood requests: {ll['requests']} ({ll['docs']} docs x choices); max |Δ| "
                  f"{ll['max_abs_diff']:.2e}, mean {ll['mean_abs_diff']:.2e} (tolerance {ll['tolerance']:g}: "
                  f"{ll['within_tolerance']}/{ll['requests']} within); is_greedy disagreements "
                  f"{ll['is_greedy_disagreements']}, argmax disagreements {ll['argmax_disagreements']}; smallest gap "
                  f"between hf's best and second choice {ll['min_top2_margin_hf']:.3f}.",
                  f"- generations identical: {g['identical']}/{g['docs']}; exact-match disagreements "
                  f"{g['exact_match_disagreements']}.", f"- **{'PASS' if c['pass'] else 'FAIL'}**"]  # fmt: skip
    if r.get("server_refused"):
        lines += ["", f"- the server refused lm-eval's loglikelihood request: {r['server_refused']}"]
    lines += ["", "Wall time: " + ", ".join(f"{b} {v['seconds']:.0f} s" for b, v in backends.items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval-venv", required=True, type=Path, help="the venv with lm_eval[api]==0.4.13")
    parser.add_argument("--model", default="all-tasks", help="a pinned mix or a demo adapter (default all-tasks)")
    parser.add_argument("--n", type=int, default=200, help="test examples per task (default 200: the quality table's)")
    parser.add_argument("--gen-task", default="json", choices=TASKS, help="the generate_until task (default json)")
    parser.add_argument("--mc-task", default="python", choices=TASKS, help="the multiple_choice task (default python)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="per-request |Δ loglikelihood| allowed")
    parser.add_argument("--out", default="bench/results/lm-eval-harness-cpu", help="<out>.json and <out>.md")
    parser.add_argument("--client-args", default="", help="more local-completions model_args, e.g. "
                        "num_concurrent=8,batch_size=4 (default: none, lm-eval's defaults)")  # fmt: skip
    parser.add_argument("--keep", type=Path, help="work here (export, tasks, lm-eval outputs) and keep it")
    args = parser.parse_args()
    venv = args.lm_eval_venv.resolve()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lm-eval-harness-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        export = work / "export"
        log(f"exporting {args.model} as a full model -> {export}")
        merge_cmd = export_full(args.model, export)
        tasks_dir = work / "tasks"
        tasks_dir.mkdir(exist_ok=True)
        tasks = write_tasks(tasks_dir, args.gen_task, args.mc_task, args.n)
        log(f"tasks {', '.join(tasks.values())}: {args.n} examples each, in {tasks_dir}")
        # lm-eval 0.4.13's CLI passes its own --device (default cuda:0) beside model_args: device=cpu there
        # fails ("got multiple values for keyword argument 'device'"), so the device goes on the command line.
        backends = {"hf": run_lm_eval(venv, "hf", f"pretrained={export},dtype=float32", tasks, tasks_dir,
                                      work / "out-hf", work, ("--device", "cpu"))}  # fmt: skip
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log(f"starting mixserve serve on {url}")
        server = start_server(port, work)
        refused = None
        try:
            probed = probe(url, args.model)
            refused = check_probe(probed)
            if refused:
                log(f"the server does not answer lm-eval's loglikelihood request: {refused}")
                backends["local-completions"] = {"command": [], "seconds": 0.0, "error": refused}
            else:
                # As with --device, lm-eval's CLI passes its own batch_size (default 1): it goes on the command line.
                extra = [a for a in args.client_args.split(",") if a]
                cli = [x for a in extra if a.startswith("batch_size=") for x in ("--batch_size", a.split("=", 1)[1])]
                model_args = ",".join([f"model={args.model}", f"base_url={url}/v1/completions",
                                       "tokenizer_backend=huggingface", f"tokenizer={BASE}",
                                       *(a for a in extra if not a.startswith("batch_size="))])  # fmt: skip
                out = work / "out-local-completions"
                backends["local-completions"] = run_lm_eval(venv, "local-completions", model_args, tasks, tasks_dir,
                                                            out, work, tuple(cli))  # fmt: skip
        finally:
            server.terminate()
            server.wait(30)
        seconds = time.perf_counter() - t0
        ok = all("results" in b for b in backends.values())
        result = {
            "model": args.model, "mix": mix_spec(args.model), "n": args.n, "tasks": tasks,
            "client_args": args.client_args,
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": seconds,
            "machine": machine(), "versions": versions(venv), "git": git_state(),
            "commands": {"export": merge_cmd, "serve": serve_command(port),
                         **{b: v["command"] for b, v in backends.items()}},
            "lm_eval_env": {k: v for k, v in lm_eval_env(work).items() if k not in os.environ or os.environ[k] != v},
            "probe": probed, "server_refused": refused,
            "backends": {b: {k: v[k] for k in ("seconds", "results", "error") if k in v} for b, v in backends.items()},
            "comparison": compare(backends["hf"], backends["local-completions"], tasks, args.tolerance) if ok else None,
        }  # fmt: skip
        for b, v in backends.items():
            if "error" in v:
                log(f"{b} failed:\n{v['error']}")
        write_report(args.out, result, to_markdown)
    if not ok or not result["comparison"]["pass"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
