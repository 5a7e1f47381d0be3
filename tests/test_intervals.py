"""The quality table's intervals: a bootstrap over held-out units (mixserve/eval/intervals.py)."""

from __future__ import annotations

import numpy as np

from mixserve.eval.intervals import (
    accuracy_draws,
    interval,
    mean_kept_draws,
    retention_draws,
    separated,
    unit_weights,
)
from mixserve.eval.tasks import PY_TEST_HOLDOUT, held_out_unit, make_split


def test_resampling_units_not_examples_widens_the_interval_when_examples_share_a_unit():
    # 3 held-out functions x 20 examples; a model that solves two functions and fails the third.
    units = [f"f{i // 20}" for i in range(60)]
    correct = "1" * 40 + "0" * 20
    clustered = interval(accuracy_draws(correct, unit_weights(units)))
    naive = interval(accuracy_draws(correct, unit_weights([str(i) for i in range(60)])))
    assert clustered[0] < 0.35 and clustered[1] == 1.0  # 3 units: a draw can miss the failed one entirely
    assert 0.5 < naive[0] < 0.667 < naive[1] < 0.8  # 60 independent examples: about +-12 points
    # Each draw counts every example of a drawn unit as often as the unit was drawn.
    w = unit_weights(units, draws=50)
    assert w.shape == (50, 60) and (w.sum(axis=1) == 60).all()
    assert all(len(set(row[i * 20 : (i + 1) * 20])) == 1 for row in w for i in range(3))


def test_one_unit_gives_no_spread_and_bools_equal_bit_strings():
    w = unit_weights(["same"] * 10, draws=20)
    assert (w == 1).all()
    flags = [True, False] * 5
    assert np.allclose(accuracy_draws(flags, w), 0.5) and np.allclose(accuracy_draws("10" * 5, w), 0.5)


def test_retention_is_paired_with_the_reference_and_separation_needs_the_difference_to_exclude_zero():
    units = [f"u{i}" for i in range(40)]
    w = {"sql": unit_weights(units, seed=1), "json": unit_weights(units, seed=2)}
    single = {"sql": "1" * 30 + "0" * 10, "json": "1" * 40}
    same = retention_draws(single, single, w)
    assert all(np.allclose(k, 1.0) for k in same.values())  # paired: the same draws, kept exactly 1
    worse = retention_draws({"sql": "1" * 15 + "0" * 25, "json": "1" * 20 + "0" * 20}, single, w)
    assert separated(mean_kept_draws(same), mean_kept_draws(worse))
    slightly = retention_draws({"sql": "1" * 29 + "0" * 11, "json": "1" * 40}, single, w)
    assert not separated(mean_kept_draws(same), mean_kept_draws(slightly))
    assert not separated(mean_kept_draws(same), mean_kept_draws(same))


def test_held_out_units_are_functions_for_code_and_examples_for_sql_and_json():
    py = make_split("python", "test", 200)
    held = {combo.replace("/", "_") for combo in PY_TEST_HOLDOUT}
    assert {held_out_unit(e, i) for i, e in enumerate(py)} == held and len(held) >= 15
    sql = make_split("sql", "test", 5)
    assert [held_out_unit(e, i) for i, e in enumerate(sql)] == [f"sql:{i}" for i in range(5)]
