"""95% intervals for the quality table: a bootstrap over held-out units, not only examples.

Examples of one held-out unit are not independent: a model that cannot write ``count_odd`` fails every
``count_odd`` example, so a test split of 200 python examples over 3 held-out combinations (demo version 9) measures 3
things, not 200. The unit (``tasks.held_out_unit``) is a python (reducer x predicate) combination, a
string (operation x parameter) pair, and for SQL and JSON, whose held-out values are drawn afresh per
example, the example itself. Each bootstrap draw resamples a task's units with replacement, every
example of a drawn unit counted as often as its unit was drawn (a cluster bootstrap: Davison and
Hinkley 1997, *Bootstrap Methods and their Application*, section 3.8; Field and Welsh 2007). The same
draws serve every row of a split, so a row's retention (its score / the single adapter's, both on the
drawn units) and the difference between two rows are paired. Intervals are the 2.5 and 97.5
percentiles of the draws; two rows are *separated* when the 95% interval of their difference in mean
kept excludes 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DRAWS = 2000


def unit_weights(units: Sequence[str], draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """``[draws, examples]``: how many times each example counts in each draw (its unit's draw count)."""
    names, index = np.unique(np.asarray(units), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=draws)  # [draws, units]
    return counts[:, index].astype(np.float64)


def split_weights(units: Mapping[str, Sequence[str]], draws: int = DRAWS) -> dict[str, np.ndarray]:
    """``unit_weights`` for every task of a split, seeded by the task's position: the quality table and
    ``mixserve tune``'s test report draw the same resamples of the same split."""
    return {t: unit_weights(u, draws, seed=i) for i, (t, u) in enumerate(units.items())}


def accuracy_draws(correct: Sequence[bool] | str, weights: np.ndarray) -> np.ndarray:
    """The accuracy in every draw: ``sum(w * correct) / sum(w)`` (``correct`` as bools or a '0'/'1' string)."""
    c = np.frombuffer(correct.encode(), dtype=np.uint8) - ord("0") if isinstance(correct, str) else np.asarray(correct)
    return weights @ c.astype(np.float64) / weights.sum(axis=1)


def interval(samples: np.ndarray) -> tuple[float, float]:
    """The central 95% of the draws (NaN draws, e.g. a reference of 0, left out)."""
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def retention_draws(row_correct: Mapping[str, str], reference_correct: Mapping[str, str],
                    weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # fmt: skip
    """Per task, the draws of kept = the row's accuracy / the single adapter's, on the same drawn units."""
    out = {}
    for task, correct in row_correct.items():
        ref = accuracy_draws(reference_correct[task], weights[task])
        with np.errstate(divide="ignore", invalid="ignore"):
            out[task] = np.where(ref > 0, accuracy_draws(correct, weights[task]) / ref, np.nan)
    return out


def mean_kept_draws(kept: Mapping[str, np.ndarray]) -> np.ndarray:
    """The draws of mean kept (the average over the row's tasks, each draw on its own units)."""
    return np.mean(np.stack(list(kept.values())), axis=0)


def row_intervals(row_correct: Mapping[str, str], reference_correct: Mapping[str, str] | None,
                  weights: Mapping[str, np.ndarray]) -> tuple[dict, np.ndarray | None]:  # fmt: skip
    """One row's 95% intervals: ``{"scores": {task: ci}}``, and with a reference (the single adapters)
    ``"retention": {task: ci}`` and ``"mean_retention": ci``; plus the mean-kept draws (None without one)."""
    ci: dict = {"scores": {t: interval(accuracy_draws(c, weights[t])) for t, c in row_correct.items()}}
    if reference_correct is None:
        return ci, None
    kept = retention_draws(row_correct, reference_correct, weights)
    mean = mean_kept_draws(kept)
    ci["retention"] = {t: interval(k) for t, k in kept.items()}
    ci["mean_retention"] = interval(mean)
    return ci, mean


def separated(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the 95% interval of the paired difference ``a - b`` excludes 0."""
    lo, hi = interval(a - b)
    return lo > 0 or hi < 0
