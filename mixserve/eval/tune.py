"""Automatic mix tuning (``mixserve tune`` and the server's ``/admin/mixes/tune`` jobs).

A gradient-free search (Optuna's TPE sampler, seeded) over the merge method, per-adapter weights, the
method's knobs (density, drop rate, gamma, epsilon, kept singular fraction, common fraction) and an
overall scale (the root node's weight, the papers' lambda), maximising the mean normalized retention
on the **validation** split: each task's score under the mix divided by its own adapter's score on
the same split (LoraHub, Huang et al. 2023, https://arxiv.org/abs/2307.13269, searched adapter
weights with a gradient-free optimizer the same way). The test split is never looked at here: the
CLI scores the winner on it once, at the end.

The tuner is ask / tell: :meth:`MixTuner.ask` proposes a MixSpec dict, the caller scores it however
it generates (the CLI folds it into a transformers model, the server runs it through its own engine)
and hands the scores to :meth:`MixTuner.tell`. The first trials are the fixed rows of the quality
table (every method at its defaults, task arithmetic also at lambda 0.5), so the search starts from
the best fixed mix instead of having to rediscover it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from merging.methods import METHODS

# The methods the search chooses among by default: one of each family (linear, trim + elect,
# drop + elect, rank-sampled, outlier-trimmed, spectral).
TUNABLE_METHODS = ("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "tsv", "iso_c", "iso_cts")
MAX_BUDGET = 1000
# What an all-tasks mix should keep of every single adapter on every task (normalized retention): the
# recommended mix is chosen to reach it on the validation split (``benchmark._recommend_key``).
KEEP_EVERY_TASK = 0.85
MAX_N_VAL = 500


def mean_retention(scores: dict[str, float], reference: dict[str, float]) -> tuple[float, float, dict]:
    """(mean, worst, per task) of ``score / reference`` over the tasks whose adapter scores above 0."""
    kept = {t: scores[t] / reference[t] for t in scores if reference.get(t)}
    if not kept:
        return 0.0, 0.0, {}
    return sum(kept.values()) / len(kept), min(kept.values()), kept


@dataclass
class Trial:
    number: int
    mix: dict
    scores: dict[str, float] = field(default_factory=dict)
    retention: dict[str, float] = field(default_factory=dict)
    mean: float | None = None
    worst: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class SearchSpace:
    """What the search may choose; bounds are the ones the papers and our quality table explored."""

    methods: tuple[str, ...] = TUNABLE_METHODS
    space: str = "lowrank"  # or "dense", or "both" (the space is searched too)
    weight: tuple[float, float] = (0.25, 1.5)
    scale: tuple[float, float] = (0.2, 3.0)  # the papers' lambda grids (TSV, Iso) go up to 3

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METHODS)}")
        if self.space not in ("dense", "lowrank", "both"):
            raise ValueError(f"space must be 'dense', 'lowrank' or 'both', got {self.space!r}")

    @property
    def spaces(self) -> list[str]:
        return ["dense", "lowrank"] if self.space == "both" else [self.space]


def suggest_mix(trial, names: Sequence[str], search: SearchSpace) -> dict:
    """One mix from an Optuna trial: method, weights and that method's knobs (names per method, so
    each method keeps its own ranges in the sampler's model)."""
    method = trial.suggest_categorical("method", list(search.methods))
    children = [{"adapter": n, "weight": trial.suggest_float(f"w.{n}", *search.weight, step=0.05)} for n in names]
    space = trial.suggest_categorical("space", search.spaces) if search.space == "both" else search.space
    node: dict = {"method": method, "space": space, "children": children}
    p = f"{method}."
    if method in ("ties", "magnitude_prune"):
        node["density"] = trial.suggest_float(p + "density", 0.05, 1.0, step=0.05)
    elif method in ("dare_ties", "dare_linear"):
        node["drop_rate"] = trial.suggest_float(p + "drop_rate", 0.0, 0.9, step=0.05)
    elif method in ("della", "della_linear"):
        density = trial.suggest_float(p + "density", 0.2, 0.8, step=0.05)
        # epsilon as a share of what keeps density +- epsilon inside (0, 1).
        share = trial.suggest_float(p + "epsilon_share", 0.0, 0.9, step=0.1)
        node["density"], node["epsilon"] = density, round(share * min(density, 1 - density), 4)
    elif method in ("breadcrumbs", "breadcrumbs_ties"):
        node["density"] = trial.suggest_float(p + "density", 0.1, 1.0, step=0.05)
        node["gamma"] = trial.suggest_float(p + "gamma", 0.0, 0.05, step=0.005)
    elif method == "tsv":
        # Each adapter keeps sv_fraction x (sum of ranks) components, at most its own rank: with n
        # equal ranks everything above 1/n keeps all, so search the share of each adapter's own rank.
        # (Exact for equal ranks on modules every adapter touches; share 1 is the default, 1 / the
        # children that touch each module.)
        share = trial.suggest_float(p + "rank_share", 0.1, 1.0, step=0.05)
        if share < 1.0:  # share 1 leaves the key out: the default, exactly the table's TSV row
            node["sv_fraction"] = share / len(names)
    elif method == "iso_cts":
        node["common_fraction"] = trial.suggest_float(p + "common_fraction", 0.3, 1.0, step=0.05)
    node["weight"] = trial.suggest_float("scale", *search.scale, step=0.05)
    return _rounded(node)


def _rounded(node: dict) -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, float):
            out[k] = round(v, 4)
        elif k == "children":
            out[k] = [_rounded(c) for c in v]
        else:
            out[k] = v
    return out


# Each method at its defaults, as trial parameters: the quality table's fixed rows.
_DEFAULT_POINTS: dict[str, list[dict]] = {
    "task_arithmetic": [{"scale": 0.5}, {"scale": 1.0}],
    "ties": [{"ties.density": 0.2}],
    "dare_ties": [{"dare_ties.drop_rate": 0.5}],
    "della": [{"della.density": 0.5, "della.epsilon_share": 0.3}],  # epsilon 0.15
    "breadcrumbs": [{"breadcrumbs.density": 0.9, "breadcrumbs.gamma": 0.01}],
    "tsv": [{"tsv.rank_share": 1.0}],
    "iso_c": [{}],
    "iso_cts": [{"iso_cts.common_fraction": 0.8}],
}


def starting_points(names: Sequence[str], search: SearchSpace) -> list[dict]:
    """The quality table's fixed rows (each method at its defaults, weights 1), as trial parameters."""
    weights = {f"w.{n}": 1.0 for n in names}
    spaces = [{"space": sp} for sp in search.spaces] if search.space == "both" else [{}]
    return [
        {"method": m, **weights, "scale": 1.0, **point, **sp}
        for sp in spaces
        for m in search.methods
        for point in _DEFAULT_POINTS.get(m, [{}])
    ]


class MixTuner:
    """Ask / tell mix search over ``names`` (adapters) scored on ``tasks`` against ``reference``."""

    def __init__(
        self,
        names: Sequence[str],
        reference: dict[str, float],
        *,
        budget: int,
        search: SearchSpace | None = None,
        seed: int = 0,
    ) -> None:
        import optuna

        if not 1 <= budget <= MAX_BUDGET:
            raise ValueError(f"budget must be between 1 and {MAX_BUDGET} trials, got {budget}")
        if not names:
            raise ValueError("tuning needs at least one adapter")
        self.names, self.reference, self.budget = list(names), dict(reference), budget
        self.search = search or SearchSpace()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, budget // 4)))
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        for point in starting_points(self.names, self.search):
            self.study.enqueue_trial(point)
        self.trials: list[Trial] = []
        self._pending: dict[int, object] = {}

    @property
    def done(self) -> bool:
        return len(self.trials) >= self.budget

    def ask(self) -> tuple[int, dict]:
        trial = self.study.ask()
        mix = suggest_mix(trial, self.names, self.search)
        self._pending[trial.number] = trial
        return trial.number, mix

    def tell(self, number: int, mix: dict, scores: dict[str, float] | None, seconds: float,
             error: str | None = None) -> Trial:  # fmt: skip
        """Record a trial; ``scores=None`` (with ``error``) marks a mix that could not be scored."""
        import optuna

        trial = self._pending.pop(number)
        rec = Trial(number, mix, seconds=seconds, error=error)
        if scores is None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            rec.scores = dict(scores)
            rec.mean, rec.worst, rec.retention = mean_retention(scores, self.reference)
            # The worst task breaks ties between equal means (a mix that keeps every task a little).
            self.study.tell(trial, rec.mean + 1e-3 * rec.worst)
        self.trials.append(rec)
        return rec

    def best(self) -> Trial | None:
        scored = [t for t in self.trials if t.mean is not None]
        return max(scored, key=lambda t: (t.mean, t.worst, -t.number)) if scored else None

    def summary(self) -> dict:
        best = self.best()
        return {
            "budget": self.budget,
            "trials_done": len(self.trials),
            "methods": list(self.search.methods),
            "space": self.search.space,
            "best": None
            if best is None
            else {
                "trial": best.number,
                "mix": best.mix,
                "mean_kept": best.mean,
                "worst_kept": best.worst,
                "retention": best.retention,
            },
        }


def check_tune_request(tasks: Sequence[str], known_tasks: Sequence[str], budget: int, n_val: int) -> None:
    """The bounds every entry point enforces, with one-sentence errors."""
    unknown = [t for t in tasks if t not in known_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known: {', '.join(known_tasks)}")
    if not tasks:
        raise ValueError("tuning needs at least one task")
    if len(set(tasks)) != len(tasks):
        raise ValueError("a task is named twice")
    if not 1 <= budget <= MAX_BUDGET:
        raise ValueError(f"budget must be between 1 and {MAX_BUDGET} trials, got {budget}")
    if not 1 <= n_val <= MAX_N_VAL:
        raise ValueError(f"n_val must be between 1 and {MAX_N_VAL} examples per task, got {n_val}")


def fmt_kept(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"
