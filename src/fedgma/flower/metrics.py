"""Client metrics in Flower replies: the weight check every reply passes, and their defensive weighted mean.

:func:`weight_problem` is the check of a reply's weight (its sample count, the ``weighted_by_key``
metric) that :class:`fedgma.flower.strategy.FedgmaStrategy` applies to every training and evaluation
reply; :func:`aggregate_metrics` is Flower's ``aggregate_metricrecords`` made defensive, the
strategy's default metric function; :func:`call_metrics_fn` calls a user's metric function as Flower
does, a failure being a warning rather than the run's end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import WARNING
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log

__all__ = ["ID_KEYS", "MAX_WEIGHT", "aggregate_metrics", "call_metrics_fn", "is_finite_number", "weight_problem"]

MAX_WEIGHT = 1e15  # a reply's weight (sample count) above this is refused
ID_KEYS = ("-id", "_id")  # metric names ending so are identifiers, never averaged


def is_finite_number(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite: what a metric or a weight must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def weight_problem(value: Any, key: str) -> str | None:
    """What is wrong with a reply's weight ``value`` (metric ``key``): not one finite number, or not in
    (0, :data:`MAX_WEIGHT`]; None for a usable weight."""
    if not is_finite_number(value):
        return f"weight {key!r} must be one finite number, got {value!r}"
    if not 0 < value <= MAX_WEIGHT:
        return f"weight {key!r} must be in (0, {MAX_WEIGHT:g}], got {value!r}"
    return None


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted mean of the replies' metrics, Flower's ``aggregate_metricrecords`` made defensive.

    Args:
        records: the replies' contents, each with one MetricRecord holding ``weighted_by_key`` (a
            number > 0; replies without a usable weight are ignored).
        weighted_by_key: the metric that weights each reply (e.g. ``"num-examples"``); left out.

    Returns:
        A MetricRecord: for each metric that is a finite number in every reply holding it, the
        weighted mean over those replies (a float); for a list of finite numbers of one length in
        every reply, the element-wise weighted mean. Identifiers (names ending in ``-id`` /
        ``_id``) and metrics whose types or lengths differ between replies (or hold NaN) are left
        out, the latter with a warning. Never raises on what clients send.
    """
    weighted: list[tuple[MetricRecord, float]] = []
    for record in records:
        metric_records = list(record.metric_records.values())
        if len(metric_records) != 1:
            continue
        weight = metric_records[0].get(weighted_by_key)
        if weight_problem(weight, weighted_by_key) is None:
            weighted.append((metric_records[0], float(weight)))
    keys: list[str] = []
    for metrics, _ in weighted:
        keys.extend(k for k in metrics if k not in keys and k != weighted_by_key and not k.endswith(ID_KEYS))
    result = MetricRecord()
    for key in keys:
        pairs = [(metrics[key], w) for metrics, w in weighted if key in metrics]
        total = sum(w for _, w in pairs)
        values = [v for v, _ in pairs]
        if all(is_finite_number(v) for v in values):
            result[key] = float(sum(v * (w / total) for v, w in pairs))
        elif (all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1
              and all(is_finite_number(x) for v in values for x in v)):
            result[key] = [float(sum(v[i] * (w / total) for v, w in pairs)) for i in range(len(values[0]))]
        else:
            kinds = sorted({type(v).__name__ for v in values})
            log(WARNING, "fedgma: metric %r left out of the aggregate: its values differ in type or length, or are "
                "not finite (%s)", key, ", ".join(kinds))
    return result


def call_metrics_fn(fn: Callable[[list[RecordDict], str], MetricRecord], records: list[RecordDict],
                     weighted_by_key: str, what: str) -> MetricRecord | None:
    """A user's metric function, called as Flower calls it; its failure is a warning, not the run's end."""
    if not records:
        return None
    try:
        metrics = fn(records, weighted_by_key)
    except Exception as error:  # noqa: BLE001  (any failure of user code on client data)
        log(WARNING, "fedgma: %s metrics not aggregated: %s raised %s: %s", what,
            getattr(fn, "__name__", fn), type(error).__name__, error)
        return None
    if metrics is not None and not isinstance(metrics, MetricRecord):
        log(WARNING, "fedgma: %s metrics not aggregated: the function returned a %s, not a MetricRecord",
            what, type(metrics).__name__)
        return None
    return metrics
