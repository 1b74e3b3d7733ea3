import math

import numpy as np
import pytest

from prunetune.search.pareto import (
    Objective,
    dominates,
    hypervolume_2d,
    non_dominated_sort,
    pareto_front,
    reference_point,
)

ACC_MACS = ["max", "min"]


def test_dominates_mixed_modes():
    assert dominates([0.9, 10], [0.8, 20], ACC_MACS)
    assert dominates([0.9, 10], [0.9, 20], ACC_MACS)
    assert not dominates([0.9, 10], [0.9, 10], ACC_MACS)
    assert not dominates([0.9, 30], [0.8, 20], ACC_MACS)
    assert not dominates([0.8, 20], [0.9, 10], ACC_MACS)
    assert dominates([1, 1], [2, 2], ["min", "min"])
    assert dominates([2, 2], [1, 1], ["max", "max"])


def test_dominates_nan_and_none_are_incomparable():
    assert not dominates([math.nan, 0], [0.5, 10], ACC_MACS)
    assert not dominates([0.9, 1], [math.nan, 10], ACC_MACS)
    assert not dominates([None, 1], [0.5, 10], ACC_MACS)


def test_dominates_rejects_bad_input():
    with pytest.raises(ValueError):
        dominates([1, 2], [1, 2], ["max", "up"])
    with pytest.raises(ValueError):
        dominates([1, 2, 3], [1, 2, 3], ["max", "min"])
    with pytest.raises(ValueError):
        Objective("acc", "maximise")


def test_non_dominated_sort_hand_checked():
    # (acc max, macs min)
    points = [
        [0.90, 100],  # 0: front
        [0.80, 50],  # 1: front
        [0.85, 100],  # 2: dominated by 0 -> rank 1
        [0.80, 50],  # 3: duplicate of 1 -> front
        [0.70, 60],  # 4: dominated by 1/3 -> rank 1
        [0.60, 200],  # 5: dominated by 0,2,4 (rank 1) -> rank 2
        [math.nan, 10],  # 6: invalid
        [0.95, 300],  # 7: front
        [None, 1],  # 8: invalid
    ]
    assert non_dominated_sort(points, ACC_MACS) == [0, 0, 1, 0, 1, 2, -1, 0, -1]


def test_non_dominated_sort_empty_and_single():
    assert non_dominated_sort([], ACC_MACS) == []
    assert non_dominated_sort([[0.5, 5]], ACC_MACS) == [0]


def test_non_dominated_sort_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 6, size=(80, 3)).tolist()  # small ints -> many ties
    modes = ["max", "min", "min"]
    ranks = non_dominated_sort(pts, modes)
    remaining, expected, rank = set(range(len(pts))), [None] * len(pts), 0
    while remaining:
        front = {i for i in remaining if not any(dominates(pts[j], pts[i], modes) for j in remaining)}
        for i in front:
            expected[i] = rank
        remaining -= front
        rank += 1
    assert ranks == expected


def test_pareto_front_ignores_missing_and_sorts_by_first_objective():
    objectives = [Objective("macs", "min"), Objective("val_acc", "max")]
    records = [
        {"trial_id": "a", "macs": 300, "val_acc": 0.95},
        {"trial_id": "b", "macs": 100, "val_acc": 0.80},
        {"trial_id": "c", "macs": 200, "val_acc": 0.70},  # dominated by b
        {"trial_id": "d", "macs": 10},  # missing val_acc
        {"trial_id": "e", "macs": 5, "val_acc": None},
        {"trial_id": "f", "macs": 1, "val_acc": math.nan},
        {"trial_id": "g", "macs": 150, "val_acc": 0.90},
    ]
    assert pareto_front(records, objectives) == [1, 6, 0]
    assert pareto_front([], objectives) == []


def test_hypervolume_single_point_is_its_rectangle():
    assert hypervolume_2d([[0.9, 50]], ACC_MACS, [0.0, 110]) == pytest.approx(0.9 * 60)
    assert hypervolume_2d([[1, 2]], ["min", "min"], [4, 5]) == pytest.approx(9)


def test_hypervolume_two_points_hand_computed():
    # minimise both, ref (10, 10): (2,6) -> 8*4=32, (5,3) -> 5*7=35, overlap 5*4=20 -> 47
    assert hypervolume_2d([[2, 6], [5, 3]], ["min", "min"], [10, 10]) == pytest.approx(47)
    # same in (acc max, macs min): acc=-x
    assert hypervolume_2d([[0.8, 20], [0.5, 10]], ACC_MACS, [0.0, 40]) == pytest.approx(
        0.8 * 20 + 0.5 * 10
    )


def test_hypervolume_ignores_points_not_improving_on_reference():
    ref = [0.0, 100]
    assert hypervolume_2d([], ACC_MACS, ref) == 0.0
    assert hypervolume_2d([[0.9, 100]], ACC_MACS, ref) == 0.0
    assert hypervolume_2d([[0.9, 150], [0.0, 10], [-0.1, 5]], ACC_MACS, ref) == 0.0
    assert hypervolume_2d([[0.5, 50], [0.9, 150], [math.nan, 1]], ACC_MACS, ref) == pytest.approx(25)


def test_hypervolume_invariant_to_dominated_and_duplicate_points():
    base = [[0.9, 80], [0.7, 30], [0.5, 10]]
    hv = hypervolume_2d(base, ACC_MACS, [0.0, 100])
    more = base + [[0.6, 40], [0.7, 30], [0.9, 90]]
    assert hypervolume_2d(more, ACC_MACS, [0.0, 100]) == pytest.approx(hv)


def test_hypervolume_needs_two_objectives():
    with pytest.raises(ValueError):
        hypervolume_2d([[1, 2, 3]], ["min", "min", "min"], [4, 4, 4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hypervolume_matches_grid_estimate(seed):
    rng = np.random.default_rng(seed)
    acc = rng.uniform(0.0, 1.0, 30)
    macs = rng.uniform(0.0, 100.0, 30)
    ref = [0.1, 90.0]
    hv = hypervolume_2d(np.column_stack([acc, macs]).tolist(), ACC_MACS, ref)

    n = 800
    ga = (np.arange(n) + 0.5) / n * (1.0 - ref[0]) + ref[0]
    gm = (np.arange(n) + 0.5) / n * ref[1]
    A, M = np.meshgrid(ga, gm, indexing="ij")
    covered = np.zeros_like(A, dtype=bool)
    for a, m in zip(acc, macs):
        covered |= (A <= a) & (M >= m)
    estimate = covered.mean() * (1.0 - ref[0]) * ref[1]
    assert hv > 0
    assert hv == pytest.approx(estimate, rel=0.02)


def test_reference_point():
    objectives = [Objective("val_acc", "max"), Objective("macs", "min")]
    assert reference_point(objectives, parent={"macs": 200.0, "val_acc": 0.9}) == pytest.approx([0.0, 220.0])
    assert reference_point(objectives, parent={"macs": 200.0}) == pytest.approx([0.0, 220.0])
    with pytest.raises(KeyError, match="macs"):
        reference_point(objectives, parent={"val_acc": 0.9})
    with pytest.raises(ValueError):
        reference_point(objectives, parent={"macs": 0.0})


def test_parent_cost_counts_against_reference():
    objectives = [Objective("val_acc", "max"), Objective("macs", "min")]
    ref = reference_point(objectives, parent={"macs": 100.0})
    assert hypervolume_2d([[0.01, 100.0]], ACC_MACS, ref) > 0
