"""MixSpec validation, canonical form and hash."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from merging.spec import AdapterLeaf, MixNode, canonical_json, depth, leaves, mix_hash, parse_mix


def test_same_mix_in_another_key_order_or_with_defaults_spelled_out_has_the_same_hash():
    a = {"method": "ties", "children": [{"adapter": "sql"}, {"adapter": "code", "weight": 0.8}]}
    b = json.loads(
        '{"children": [{"weight": 1.0, "adapter": "sql"}, {"weight": 0.8, "adapter": "code"}],'
        ' "space": "lowrank", "majority_sign": "total", "density": 0.2, "method": "ties", "weight": 1}'
    )
    assert mix_hash(parse_mix(a)) == mix_hash(parse_mix(b))
    assert canonical_json(parse_mix(a)) == canonical_json(parse_mix(json.dumps(b)))


def test_anything_that_changes_the_result_changes_the_hash():
    base = {"method": "dare_ties", "children": [{"adapter": "sql"}, {"adapter": "code"}]}
    variants = [
        {**base, "drop_rate": 0.3},
        {**base, "seed": 1},
        {**base, "space": "dense"},
        {**base, "majority_sign": "frequency"},
        {**base, "children": [{"adapter": "sql", "weight": 0.9}, {"adapter": "code"}]},
        {**base, "children": [{"adapter": "code"}, {"adapter": "sql"}]},  # child order decides DARE streams
        {**base, "method": "dare_linear"},
    ]
    hashes = {mix_hash(parse_mix(v)) for v in [base, *variants]}
    assert len(hashes) == len(variants) + 1


def test_defaults_are_filled_only_for_declared_params():
    node = parse_mix({"method": "ties", "children": [{"adapter": "a"}]})
    assert node.density == 0.2 and node.majority_sign == "total" and node.drop_rate is None and node.seed is None
    lin = parse_mix({"method": "linear", "children": [{"adapter": "a"}]})
    assert lin.normalize is True and lin.density is None


@pytest.mark.parametrize(
    "mix,message",
    [
        ({"method": "slerp", "children": [{"adapter": "a"}]}, "Input should be 'linear', 'task_arithmetic'"),
        ({"method": "ties", "density": 0, "children": [{"adapter": "a"}]}, r"density must be in \(0, 1\]"),
        ({"method": "ties", "density": 1.5, "children": [{"adapter": "a"}]}, "density must be"),
        ({"method": "dare_linear", "drop_rate": 1.0, "children": [{"adapter": "a"}]}, r"drop_rate must be in \[0, 1\)"),
        ({"method": "dare_ties", "density": 0.5, "children": [{"adapter": "a"}]}, "drop_rate = 1 - density"),
        ({"method": "linear", "drop_rate": 0.5, "children": [{"adapter": "a"}]}, "does not take 'drop_rate'"),
        ({"method": "linear", "children": []}, "at least 1 item"),
        ({"method": "linear", "children": [{"adapter": "a", "weight": float("inf")}]}, "finite"),
        (
            {"method": "linear", "children": [{"adapter": "a", "weight": 1}, {"adapter": "b", "weight": -1}]},
            "sum to zero",
        ),
        ({"method": "linear", "children": [{"adapter": "../etc/passwd"}]}, "pattern"),
        ({"method": "linear", "children": [{"adapter": "a", "typo": 1}]}, "Extra inputs"),
        ({"method": "ties", "children": [{"adapter": "a"}], "seed": 3}, "does not take 'seed'"),
    ],
)
def test_bad_specs_are_rejected_with_a_message(mix, message):
    with pytest.raises(ValidationError, match=message):
        parse_mix(mix)


def test_nested_trees_parse_and_report_leaves_and_depth():
    mix = parse_mix(
        {
            "method": "ties",
            "children": [
                {"method": "dare_linear", "drop_rate": 0.3, "children": [{"adapter": "python"}, {"adapter": "java"}]},
                {"adapter": "sql", "weight": 0.8},
            ],
        }
    )
    assert (
        isinstance(mix, MixNode) and isinstance(mix.children[0], MixNode) and isinstance(mix.children[1], AdapterLeaf)
    )
    assert [leaf.adapter for leaf in leaves(mix)] == ["python", "java", "sql"]
    assert depth(mix) == 3
    assert parse_mix("sql") == AdapterLeaf(adapter="sql")
