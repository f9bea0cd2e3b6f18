"""summary.json's accuracies (issue 15): the last-20% mean of each accuracy, and a "best" that exists only
with a validation split and is chosen on it, never on the test set."""

from __future__ import annotations

import pytest

from fedgma.config import load_config
from fedgma.simulation import summarize


def _config(rounds: int):
    return load_config(None, ["data.dataset=digits", f"rounds={rounds}"])


def test_best_is_chosen_on_validation_and_last_20pct_averages_the_window():
    # test accuracy peaks at round 20; validation accuracy peaks at round 30 (ties later are not chosen)
    history = [
        {"round": 10, "test_accuracy": 0.5, "validation_accuracy": 0.4, "test_loss": 1.0},
        {"round": 20, "test_accuracy": 0.9, "validation_accuracy": 0.5, "test_loss": 1.0},
        {"round": 30, "test_accuracy": 0.6, "validation_accuracy": 0.8, "test_loss": 1.0},
        {"round": 40, "test_accuracy": 0.7, "validation_accuracy": 0.6, "test_loss": 1.0},
        {"round": 50, "test_accuracy": 0.8, "validation_accuracy": 0.8, "test_loss": 1.0},
    ]
    summary = summarize(_config(50), history, total_steps=7, wall_s=1.0)
    assert summary["best"] == {"round": 30, "validation_accuracy": 0.8, "test_accuracy": 0.6}
    # the window (40, 50] holds only round 50
    assert summary["last_20pct"] == {"test_accuracy": 0.8, "validation_accuracy": 0.8}
    assert summary["final"]["round"] == 50 and summary["total_local_steps"] == 7


def test_no_validation_split_means_no_best():
    history = [{"round": r, "test_accuracy": a} for r, a in [(5, 0.9), (8, 0.2), (9, 0.4), (10, 0.6)]]
    summary = summarize(_config(10), history, total_steps=1, wall_s=0.0)
    assert "best" not in summary  # the test set's maximum (0.9) is never reported as "best"
    assert summary["last_20pct"]["test_accuracy"] == pytest.approx((0.4 + 0.6) / 2)  # rounds 9 and 10 lie in (8, 10]


def test_no_evaluation_in_the_window_leaves_last_20pct_out():
    history = [{"round": 50, "test_accuracy": 0.5}]  # the run stopped evaluating long before its last round
    assert "last_20pct" not in summarize(_config(100), history, total_steps=1, wall_s=0.0)
