"""The evaluation protocol (fedgma.report.protocol) on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from fedgma.report.protocol import (
    check_seeds,
    curve_area,
    holm,
    holm_correct,
    last_fraction_mean,
    paired_difference,
    run_metrics,
    select_lr,
)


def curve(values, every=10, key="test_accuracy"):
    return [{"round": every * (i + 1), key: v} for i, v in enumerate(values)]


def test_last_fraction_mean_averages_the_last_20_percent_of_rounds():
    metrics = curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])  # rounds 10..100
    assert last_fraction_mean(metrics) == pytest.approx((0.9 + 1.0) / 2, abs=1e-15)  # rounds 90, 100; not 80
    assert last_fraction_mean(metrics, fraction=0.3) == pytest.approx((0.8 + 0.9 + 1.0) / 3, abs=1e-15)
    assert last_fraction_mean(metrics, horizon=50) == 0.5  # rounds (40, 50]
    assert last_fraction_mean(curve([0.2, 0.4, 0.6], every=1), fraction=1.0) == pytest.approx(0.4, abs=1e-15)


def test_last_fraction_mean_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="no evaluation holds 'validation_accuracy'"):
        last_fraction_mean(curve([0.5]), "validation_accuracy")
    with pytest.raises(ValueError, match=r"no evaluation of 'test_accuracy' in rounds \(80, 100\]"):
        last_fraction_mean([{"round": 50, "test_accuracy": 0.5}], horizon=100)
    with pytest.raises(ValueError, match="fraction must lie in"):
        last_fraction_mean(curve([0.5]), fraction=0)
    with pytest.raises(ValueError, match="increasing round order"):
        last_fraction_mean([{"round": 2, "test_accuracy": 0.1}, {"round": 1, "test_accuracy": 0.2}])


def test_curve_area_is_the_trapezoid_area_over_the_horizon():
    metrics = curve([0.5, 0.7])  # rounds 10, 20
    # from round 0 at 0.1: 10 · (0.1 + 0.5) / 2 + 10 · (0.5 + 0.7) / 2 = 3 + 6 = 9; / 20
    assert curve_area(metrics, initial=0.1) == pytest.approx(0.45, abs=1e-15)
    assert curve_area(metrics) == pytest.approx(0.6, abs=1e-15)  # from round 10: 6 / 10
    assert curve_area(curve([0.5, 0.7, 0.9]), initial=0.1, horizon=20) == pytest.approx(0.45, abs=1e-15)
    with pytest.raises(ValueError, match="has 1 point"):
        curve_area(curve([0.5]))


def test_run_metrics_gathers_the_three_numbers():
    metrics = curve([0.3, 0.6, 0.5, 0.8, 0.7])  # rounds 10..50
    result = run_metrics(metrics, initial=0.1, target=0.6)
    assert result["last"] == 0.7  # round 50 only (rounds (40, 50])
    assert result["area"] == pytest.approx((10 * 0.4 / 2 + 10 * 0.9 / 2 + 10 * 1.1 / 2 + 10 * 1.3 / 2 + 10 * 1.5 / 2)
                                           / 50, abs=1e-15)
    assert result["rounds_to_target"] == 20
    assert run_metrics(metrics, target=0.9)["rounds_to_target"] is None


def test_paired_difference_hand_computed():
    # differences 1, 2, 3: mean 2, s = 1, half-width t_{0.975,2} / sqrt(3) with t_{0.975,2} = 4.3027;
    # t statistic 2 / (1 / sqrt 3) = 2 sqrt 3; with 2 degrees of freedom p = 1 - t / sqrt(t^2 + 2)
    result = paired_difference({0: 3.0, 1: 5.0, 2: 7.0}, {0: 2.0, 1: 3.0, 2: 4.0})
    assert result.mean == 2.0 and result.n == 3 and result.seeds == (0, 1, 2)
    assert result.half_width == pytest.approx(4.302652729749462 / math.sqrt(3), rel=1e-12)
    assert (result.low, result.high) == pytest.approx((2 - 2.4841377, 2 + 2.4841377), abs=1e-6)
    t_stat = 2 * math.sqrt(3)
    assert result.p_value == pytest.approx(1 - t_stat / math.sqrt(t_stat**2 + 2), rel=1e-9)
    assert result.p_value == pytest.approx(0.0741799, abs=1e-7)
    assert not result.excludes_zero


def test_paired_difference_refuses_unpaired_or_single_seeds():
    with pytest.raises(ValueError, match=r"unpaired seeds: only in A \[2\], only in B \[3\]"):
        paired_difference({1: 0.0, 2: 0.0}, {1: 0.0, 3: 0.0})
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_difference({1: 0.5}, {1: 0.4})
    constant = paired_difference({1: 0.6, 2: 0.7}, {1: 0.5, 2: 0.6})
    assert constant.half_width == 0.0 and constant.p_value == 0.0 and constant.excludes_zero


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []
    with pytest.raises(ValueError, match="p-values must lie in"):
        holm([0.1, float("nan")])


def test_holm_with_ties_by_hand():
    # statsmodels' multipletests(method="holm") case, computed by hand (no optional dependency, so it runs in CI):
    # sorted 0.001, 0.013, 0.04, 0.04, 0.2, 0.9 times 6, 5, 4, 3, 2, 1 = 0.006, 0.065, 0.16, 0.12, 0.4, 0.9
    # -> running max 0.006, 0.065, 0.16, 0.16, 0.4, 0.9, back in the input order
    p = [0.001, 0.2, 0.013, 0.04, 0.04, 0.9]
    assert holm(p) == pytest.approx([0.006, 0.4, 0.065, 0.16, 0.16, 0.9], abs=1e-15)


def test_holm_correct_marks_what_survives():
    a = {s: 1.0 + 0.1 * s for s in range(5)}
    clear = paired_difference(a, {s: 0.0 for s in range(5)})
    noise = paired_difference({s: 0.1 * (-1) ** s for s in range(5)}, {s: 0.0 for s in range(5)})
    table = holm_correct({"clear": clear, "noise": noise})
    assert table["clear"]["significant"] and not table["noise"]["significant"]
    assert table["clear"]["p_holm"] == pytest.approx(2 * clear.p_value, rel=1e-12)


def test_check_seeds():
    check_seeds([0, 1], [2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match=r"seeds \[2\] are both tuning and evaluation seeds"):
        check_seeds([1, 2], [2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="at least 2 tuning seeds"):
        check_seeds([0], [2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="at least 5 evaluation seeds"):
        check_seeds([0, 1], [2, 3, 4, 5])


def val(values):
    return curve(values, key="validation_accuracy")


def test_select_lr_on_last_20_percent_of_validation_over_seeds():
    runs = {
        0.5: {0: val([0.1, 0.6, 0.6, 0.6, 0.6]), 1: val([0.1, 0.6, 0.6, 0.6, 0.7])},  # last: 0.6, 0.7 -> 0.65
        1.0: {0: val([0.1, 0.2, 0.3, 0.4, 0.9]), 1: val([0.1, 0.2, 0.3, 0.4, 0.5])},  # 0.9, 0.5 -> 0.7
        2.0: {0: val([0.9, 0.9, 0.9, 0.9, 0.3]), 1: None},  # 0.3 and a divergence (0) -> 0.15
    }
    choice = select_lr(runs)
    assert choice.lr == 1.0 and choice.edge is None
    assert choice.scores == pytest.approx({0.5: 0.65, 1.0: 0.7, 2.0: 0.15}, abs=1e-15)
    del runs[2.0]
    assert select_lr(runs).edge == "high"
    runs[1.0] = runs[0.5]
    assert select_lr(runs).lr == 0.5 and select_lr(runs).edge == "low"  # a tie: the smaller lr


def test_select_lr_refuses_the_test_set_and_too_few_seeds():
    with pytest.raises(ValueError, match="chosen on validation only, not on 'test_accuracy'"):
        select_lr({1.0: {0: curve([0.5]), 1: curve([0.5])}}, key="test_accuracy")
    with pytest.raises(ValueError, match="server lr 1 has 1 tuning seed"):
        select_lr({1.0: {0: val([0.5])}})
    with pytest.raises(ValueError, match="validation_fraction"):
        select_lr({1.0: {0: curve([0.5]), 1: curve([0.5])}})


# -- server-lr grids on a log2 scale that widen at an edge (fedgma.sweep) -----------------------------------------


def test_log2_grid():
    from fedgma.sweep import log2_grid

    assert log2_grid(1.0, 2, 3) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    with pytest.raises(ValueError, match="center > 0"):
        log2_grid(0.0, 1, 1)


def test_widen_lr_grid_adds_doublings_beyond_the_edge_only():
    from fedgma.sweep import widen_lr_grid

    assert widen_lr_grid({0.5: 0.7, 1.0: 0.8, 2.0: 0.9}) == [4.0]  # top edge
    assert widen_lr_grid({0.5: 0.9, 1.0: 0.8, 2.0: 0.7}, steps=2) == [0.125, 0.25]  # bottom edge, two halvings
    assert widen_lr_grid({0.5: 0.7, 1.0: 0.9, 2.0: 0.8}) == []  # interior
    assert widen_lr_grid({1.0: 0.5}) == [0.5, 2.0]  # one lr: both edges
    assert widen_lr_grid({0.5: 0.9, 1.0: 0.9, 2.0: 0.1}) == [0.25]  # a tie goes to the smaller lr
    assert widen_lr_grid({64.0: 0.1, 128.0: 0.2, 256.0: 0.3}) == []  # at the cap 2^8
    assert widen_lr_grid({64.0: 0.1, 128.0: 0.2}, steps=3) == [256.0]  # stops at the cap
    assert widen_lr_grid({0.5: 0.7, 1.0: 0.9, 2.0: 0.8}, best=2.0) == [4.0]  # a pick made elsewhere
    with pytest.raises(ValueError, match="not in the grid"):
        widen_lr_grid({1.0: 0.5}, best=3.0)


def test_tune_lr_widens_until_the_best_is_interior():
    from fedgma.sweep import tune_lr

    asked = []

    def score(lrs):  # a validation score peaking at lr 8 (the Synthetic case: the top of a grid up to 2)
        asked.append(list(lrs))
        return {lr: -abs(math.log2(lr) - 3) for lr in lrs}

    best, scores = tune_lr(score, [0.5, 1.0, 2.0])
    assert best == 8.0
    assert asked == [[0.5, 1.0, 2.0], [4.0], [8.0], [16.0]]
    assert sorted(scores) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    with pytest.raises(RuntimeError, match="still on an edge"):
        tune_lr(score, [0.5, 1.0, 2.0], max_widenings=2)
