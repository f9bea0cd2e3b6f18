"""fedgma.flower.metrics: the reply weight check and the defensive weighted mean of client metrics."""

from __future__ import annotations

import logging
import math

import pytest

pytest.importorskip("flwr")

from flwr.app import MetricRecord, RecordDict  # noqa: E402

from fedgma.flower import aggregate_metrics  # noqa: E402
from fedgma.flower.metrics import MAX_WEIGHT, call_metrics_fn, is_finite_number, weight_problem  # noqa: E402

pytestmark = pytest.mark.flower


@pytest.mark.parametrize("value", [1, 0.5, -3, 1e300])
def test_finite_ints_and_floats_are_numbers(value):
    assert is_finite_number(value)


@pytest.mark.parametrize("value", [True, False, math.nan, math.inf, -math.inf, "1", None, [1.0]])
def test_bools_non_finite_values_and_other_types_are_not(value):
    assert not is_finite_number(value)


@pytest.mark.parametrize("value", [1, 0.001, MAX_WEIGHT])
def test_a_positive_weight_up_to_the_limit_is_usable(value):
    assert weight_problem(value, "num-examples") is None


@pytest.mark.parametrize(("value", "message"), [
    (0, "weight 'num-examples' must be in (0, 1e+15], got 0"),
    (-2.5, "weight 'num-examples' must be in (0, 1e+15], got -2.5"),
    (MAX_WEIGHT * 2, "weight 'num-examples' must be in (0, 1e+15], got 2000000000000000.0"),
    (math.nan, "weight 'num-examples' must be one finite number, got nan"),
    (True, "weight 'num-examples' must be one finite number, got True"),
    ("10", "weight 'num-examples' must be one finite number, got '10'"),
])
def test_a_bad_weight_is_named_with_what_is_expected(value, message):
    assert weight_problem(value, "num-examples") == message


def test_aggregate_metrics_matches_flower_on_consistent_replies_and_leaves_out_ids_and_mixed_types():
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    records = [RecordDict({"m": MetricRecord({"w": w, "a": a, "b": [a, 2 * a]})})
               for w, a in ((0.25, 1.0), (0.4, 2), (0.35, 3.5))]
    ours, flowers = aggregate_metrics(records, "w"), aggregate_metricrecords(records, "w")
    assert sorted(ours) == sorted(flowers) == ["a", "b"]
    assert ours["a"] == pytest.approx(flowers["a"], rel=1e-12)
    assert ours["b"] == pytest.approx(flowers["b"], rel=1e-12)
    mixed = [RecordDict({"m": MetricRecord({"w": 1, "x": [1.0], "client-id": 3, "y": 2.0})}),
             RecordDict({"m": MetricRecord({"w": 1, "x": 2.0, "client-id": 4, "y": 4.0})})]
    assert dict(aggregate_metrics(mixed, "w")) == {"y": 3.0}


def test_replies_without_one_metric_record_or_a_usable_weight_are_left_out():
    records = [RecordDict({"m": MetricRecord({"w": 1, "a": 1.0})}),
               RecordDict({"m": MetricRecord({"w": 0, "a": 100.0})}),  # weight 0: unusable
               RecordDict({"m": MetricRecord({"a": 100.0})}),  # no weight
               RecordDict({"m": MetricRecord({"w": 1, "a": 100.0}), "n": MetricRecord({"w": 1})}),  # two records
               RecordDict({"m": MetricRecord({"w": 3, "a": 5.0})})]
    assert dict(aggregate_metrics(records, "w")) == {"a": 4.0}


def test_a_metric_function_that_raises_or_returns_no_metric_record_is_a_warning(caplog):
    records = [RecordDict({"m": MetricRecord({"w": 1, "a": 1.0})})]

    def broken(records, key):
        raise KeyError("a")

    with caplog.at_level(logging.WARNING):
        assert call_metrics_fn(broken, records, "w", "train") is None
        assert call_metrics_fn(lambda r, k: {"a": 1.0}, records, "w", "evaluate") is None
    assert "train metrics not aggregated: broken raised KeyError" in caplog.text
    assert "evaluate metrics not aggregated: the function returned a dict, not a MetricRecord" in caplog.text
    assert call_metrics_fn(broken, [], "w", "train") is None  # no replies: not called
    assert dict(call_metrics_fn(aggregate_metrics, records, "w", "train")) == {"a": 1.0}
