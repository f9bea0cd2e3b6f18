"""GMA inside Flower's own strategies: ``with_gma(FedAdam)`` (Flower's server maths), and reply streaming.

For fedgma's own round on Flower (fedgma's server optimizers, any registered aggregator) use
:class:`fedgma.flower.FedgmaStrategy`; this module is for users who want Flower's server step.

Flower's ``FedAvg`` and its subclasses (``FedAvgM``, ``FedProx``, ``FedAdam``, ``FedYogi``,
``FedAdagrad``) all work the same way in ``aggregate_train``: ``FedAvg.aggregate_train`` takes the
weighted average of the replies' models, and the subclass then applies its server step (momentum,
adaptive moments) to that average. :class:`GMAMixin` replaces only the first part: it folds each
reply's update Δ_k = θ_k − θ (client model minus the global model it was sent) into the core
library's streaming :class:`~fedgma.aggregation.GMAAggregator`, one reply at a time, and hands the
masked result θ + m ⊙ Σ p_k Δ_k to the strategy's own server step as if it were the average.
So ``GMAFedAdam`` is FedAdam's server optimizer on GMA's aggregate, with the maths of GMA in one
place (``fedgma.aggregation``; Tenison et al., "Gradient Masked Averaging for Federated Learning",
TMLR 2023).

Every reply is validated before any of it is used: an error reply, a missing or misnamed array, a
wrong shape or dtype, a non-finite value, a missing/negative/non-finite weight. A bad reply is
dropped with a warning naming its node (``on_invalid="drop"``) or stops the round with
:class:`InvalidReplyError` (``on_invalid="fail"``). A *lost* reply is not a bad one: when a node
vanishes mid-round, Flower's SuperLink answers the server for it with an error reply of its own
(``NODE_UNAVAILABLE`` once the node has missed its heartbeats, ``MESSAGE_UNAVAILABLE`` /
``REPLY_MESSAGE_UNAVAILABLE`` for an expired message, ``CLIENT_APP_CRASHED`` from a SuperNode whose
ClientApp died); such a reply, and a message left unanswered at the round's timeout, is counted as
lost, never fails the round, and the round goes on with the replies that came if there are at least
``min_replies`` of them. Floating-point arrays go through GMA; integer
and boolean arrays (e.g. BatchNorm's ``num_batches_tracked``) are averaged plainly, rounded, keep
their dtype and bypass the server step: a counter is never pushed through a sign or a momentum.

Streaming: replies are consumed from an iterator and discarded once folded in, so the server holds
O(d) state (the global model, two running sums per array) whatever the number of clients. Flower's
own ``send_and_receive`` collects every reply before returning; ``start`` therefore swaps in
:class:`StreamingGrid`, which pushes the messages and yields replies as they are pulled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from torch import Tensor

from fedgma.aggregation import AGREEMENT_BINS, MeanAggregator, make_aggregator

__all__ = [
    "WITH_GMA_SUPPORTED",
    "GMAMixin",
    "InvalidReplyError",
    "ReplyAggregator",
    "StreamingGrid",
    "with_gma",
]


class InvalidReplyError(ValueError):
    """A client reply cannot be used (wrong arrays, shapes, dtypes, non-finite values or weight)."""


def _kind(dtype: str) -> str:
    """'float' for floating-point arrays (aggregated by the rule), 'integer' for int/uint/bool."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return "float"
    if kind in "iub":
        return "integer"
    raise ValueError(f"array dtype {dtype} is not supported (floating-point, integer or boolean arrays only)")


# Error codes with which Flower reports a reply that never came (the node, its ClientApp or the message
# went away), as opposed to a ClientApp that ran and failed (CLIENT_APP_RAISED_EXCEPTION, …). The
# SuperLink makes the first three itself (flwr/server/superlink/linkstate/utils.py), with its own node
# id as the sender; a SuperNode makes CLIENT_APP_CRASHED for a ClientApp that stopped responding.
LOST_REPLY_CODES = frozenset({
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.CLIENT_APP_CRASHED,
})


def _node(message: Message, destinations: Mapping[str, int] | None = None) -> str:
    """The node a reply is about: the destination of the message it answers when known.

    An error reply made by the SuperLink for a vanished node has the SuperLink as its sender, so
    the sender would name the wrong node; the message it replies to names the right one.
    """
    try:
        metadata = message.metadata
        if destinations and metadata.reply_to_message_id in destinations:
            return str(destinations[metadata.reply_to_message_id])
        return str(metadata.src_node_id)
    except Exception:  # noqa: BLE001  (a hand-built message may lack metadata)
        return "?"


class ReplyAggregator:
    """Fold Flower train replies into one aggregate, one reply at a time (O(d) state).

    ``reference`` is the global model the replies were trained from; each reply's update is its
    model minus ``reference``. ``rule`` names a registered aggregator (``"gma"``, ``"mean"``, …)
    and ``options`` are its options (``threshold``, ``hard``, ``weighted_agreement``). Each
    floating-point array has its own streaming aggregator; since the rules act coordinate by
    coordinate with one weight per client, this is the same arithmetic as one aggregator over the
    concatenated flat vector.

    ``destinations`` maps the id of each message sent to the node it was sent to (see
    :attr:`StreamingGrid.destinations`), so that a reply made by the SuperLink for a vanished node
    names that node. Replies whose error code is in :data:`LOST_REPLY_CODES` go to ``lost`` (never
    an error, whatever ``on_invalid``); other bad replies go to ``dropped`` or raise.
    """

    def __init__(
        self,
        reference: ArrayRecord,
        rule: str = "gma",
        options: dict[str, Any] | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        on_invalid: str = "drop",
        destinations: Mapping[str, int] | None = None,
    ) -> None:
        if on_invalid not in ("drop", "fail"):
            raise ValueError(f"on_invalid must be 'drop' or 'fail', got {on_invalid!r}")
        if len(reference) == 0:
            raise ValueError("the global ArrayRecord is empty: nothing to aggregate")
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.on_invalid = on_invalid
        self.dtypes = {key: array.dtype for key, array in reference.items()}
        self.shapes = {key: tuple(array.shape) for key, array in reference.items()}
        self.kinds = {key: _kind(dtype) for key, dtype in self.dtypes.items()}
        self.reference: dict[str, Tensor] = {
            key: torch.from_numpy(np.asarray(array.numpy(), order="C")).reshape(-1) for key, array in reference.items()
        }
        options = dict(options or {})
        self._rules = {
            key: make_aggregator(rule, **options) if kind == "float" else MeanAggregator()
            for key, kind in self.kinds.items()
        }
        self.rule = rule
        self.count = 0
        self.total_weight = 0.0
        self.destinations = dict(destinations or {})
        self.dropped: list[tuple[str, str]] = []  # (node id, reason): bad replies
        self.lost: list[tuple[str, str]] = []  # (node id, reason): replies that never came
        self.metrics: list[MetricRecord] = []  # each admitted reply's metrics (small), for metric aggregation
        self.updates: dict[str, Tensor] = {}  # the aggregated update u of each float array, set by result()

    # -- validation --------------------------------------------------------------------------

    def _lose(self, message: Message, reason: str) -> bool:
        node = _node(message, self.destinations)
        log(WARNING, "GMA: no reply from node %s (going on without it): %s", node, reason)
        self.lost.append((node, reason))
        return False

    def _reject(self, message: Message, reason: str) -> bool:
        node = _node(message, self.destinations)
        if self.on_invalid == "fail":
            raise InvalidReplyError(f"reply from node {node}: {reason}")
        log(WARNING, "GMA: dropping the reply from node %s: %s", node, reason)
        self.dropped.append((node, reason))
        return False

    def _arrays_of(self, content: RecordDict) -> ArrayRecord:
        records = content.array_records
        if self.arrayrecord_key in records:
            return records[self.arrayrecord_key]
        if len(records) == 1:
            return next(iter(records.values()))
        raise InvalidReplyError(
            f"expected one ArrayRecord (key {self.arrayrecord_key!r}), found {len(records)}: {sorted(records)}"
        )

    def _weight_of(self, content: RecordDict) -> tuple[float, MetricRecord]:
        records = content.metric_records
        if len(records) != 1:
            raise InvalidReplyError(f"expected exactly one MetricRecord, found {len(records)}")
        metrics = next(iter(records.values()))
        if self.weighted_by_key not in metrics:
            raise InvalidReplyError(f"its MetricRecord has no weight {self.weighted_by_key!r}")
        value = metrics[self.weighted_by_key]
        if isinstance(value, (list, bool)) or not isinstance(value, (int, float)):
            raise InvalidReplyError(f"weight {self.weighted_by_key!r} must be one number, got {value!r}")
        weight = float(value)
        if not math.isfinite(weight) or weight < 0:
            raise InvalidReplyError(f"weight {self.weighted_by_key!r} must be finite and ≥ 0, got {value!r}")
        return weight, metrics

    def _updates_of(self, arrays: ArrayRecord) -> dict[str, Tensor]:
        missing = sorted(set(self.shapes) - set(arrays))
        extra = sorted(set(arrays) - set(self.shapes))
        if missing or extra:
            raise InvalidReplyError(f"arrays do not match the global model (missing {missing}, unexpected {extra})")
        updates: dict[str, Tensor] = {}
        for key, array in arrays.items():
            if array.dtype != self.dtypes[key]:
                raise InvalidReplyError(f"array {key!r} has dtype {array.dtype}, expected {self.dtypes[key]}")
            if tuple(array.shape) != self.shapes[key]:
                raise InvalidReplyError(
                    f"array {key!r} has shape {tuple(array.shape)}, expected {self.shapes[key]}"
                )
            try:
                values = np.asarray(array.numpy(), order="C")
            except Exception as error:  # noqa: BLE001  (corrupt bytes: say which array)
                raise InvalidReplyError(f"array {key!r} cannot be decoded: {error}") from None
            if values.dtype != np.dtype(self.dtypes[key]) or values.shape != self.shapes[key]:
                raise InvalidReplyError(
                    f"array {key!r} decodes to {values.dtype}{values.shape}, "
                    f"expected {self.dtypes[key]}{self.shapes[key]}"
                )
            tensor = torch.from_numpy(values).reshape(-1)
            if self.kinds[key] == "float":
                if not bool(torch.isfinite(tensor).all()):
                    raise InvalidReplyError(f"array {key!r} contains NaN or infinite values")
                update = tensor - self.reference[key]
                if not bool(torch.isfinite(update).all()):
                    raise InvalidReplyError(f"array {key!r} is too far from the global model (update overflows)")
                updates[key] = update
            else:
                updates[key] = tensor.to(torch.float64)  # integers: the values themselves, averaged plainly
        return updates

    # -- folding -----------------------------------------------------------------------------

    def add(self, message: Message) -> bool:
        """Validate one reply and fold it in; False if it was dropped (see ``dropped``)."""
        if message.has_error():
            error = message.error
            if error.code in LOST_REPLY_CODES:
                return self._lose(message, f"Flower error code {error.code}: {error.reason}")
            return self._reject(message, f"the client reported an error (code {error.code}): {error.reason}")
        if not message.has_content():
            return self._reject(message, "the reply has no content")
        try:
            content = message.content
            weight, metrics = self._weight_of(content)
            updates = self._updates_of(self._arrays_of(content))
        except InvalidReplyError as error:
            return self._reject(message, str(error))
        for key, update in updates.items():
            self._rules[key].add(update, weight)
        self.count += 1
        self.total_weight += weight
        self.metrics.append(metrics)
        return True

    def add_all(self, replies: Iterable[Message]) -> int:
        """Fold every reply of an iterable (consumed lazily); the number admitted."""
        for message in replies:
            self.add(message)
            del message  # drop our reference before the iterator produces the next reply
        return self.count

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The aggregated model θ + u as numpy arrays (dtypes and shapes as the global model), and stats.

        Integer arrays are the plain weighted average of the replies' values, rounded.
        """
        if self.count == 0:
            raise ValueError("cannot aggregate: no valid reply was received")
        if self.total_weight <= 0:
            raise ValueError(f"cannot aggregate: the replies' weights {self.weighted_by_key!r} sum to zero")
        arrays: dict[str, np.ndarray] = {}
        per_key: dict[str, dict[str, Any]] = {}
        for key, rule in self._rules.items():
            aggregate, stats = rule.result()
            dtype, shape = np.dtype(self.dtypes[key]), self.shapes[key]
            if self.kinds[key] == "float":
                per_key[key] = stats
                self.updates[key] = aggregate
                values = (self.reference[key] + aggregate).numpy()
            else:
                values = aggregate.round().numpy()
            arrays[key] = values.astype(dtype, copy=False).reshape(shape)
        return arrays, self._statistics(per_key)

    def _statistics(self, per_key: dict[str, dict[str, Any]]) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "num_clients": self.count, "num_dropped": len(self.dropped), "num_lost": len(self.lost),
        }
        if not per_key or "mask_density" not in next(iter(per_key.values())):
            return stats
        numel = {key: self.reference[key].numel() for key in per_key}
        total = sum(numel.values())
        for name in ("mask_density", "mask_pass_fraction", "agreement_mean"):
            stats[name] = sum(per_key[k][name] * numel[k] for k in per_key) / total
        histogram = [0] * AGREEMENT_BINS
        for key, key_stats in per_key.items():
            histogram = [a + b for a, b in zip(histogram, key_stats["agreement_histogram"], strict=True)]
            stats[f"mask_density/{key}"] = key_stats["mask_density"]
        stats["agreement_histogram"] = histogram
        return stats


# --------------------------------------------------------------------------------------------
# Streaming replies from a Grid
# --------------------------------------------------------------------------------------------


def _check_reply_options(on_invalid: str, min_replies: int, pull_interval: float, max_pull_interval: float) -> None:
    """Options every fedgma Flower strategy shares (with_gma's, FedgmaStrategy's); ValueError naming a bad one."""
    if on_invalid not in ("drop", "fail"):
        raise ValueError(f"on_invalid must be 'drop' or 'fail', got {on_invalid!r}")
    if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
        raise ValueError(f"min_replies must be an integer ≥ 1, got {min_replies!r}")
    _check_pull_intervals(pull_interval, max_pull_interval)


def _check_pull_intervals(pull_interval: float, max_pull_interval: float) -> None:
    if not 0 < pull_interval <= max_pull_interval:
        raise ValueError(f"need 0 < pull_interval ≤ max_pull_interval, got {pull_interval} and {max_pull_interval}")


class StreamingGrid:
    """A Grid whose ``send_and_receive`` yields replies as they arrive instead of collecting them.

    Messages are pushed at once; replies are pulled and yielded one by one until every message is
    answered or ``timeout`` seconds have passed. The pause between pulls starts at ``pull_interval``
    and doubles after each pull that brought nothing, up to ``max_pull_interval`` (back to
    ``pull_interval`` when replies come): on a deployment every pull is an HTTPS request to the
    SuperLink and a database query there, which a 0.1 s loop over a minute-long round would make
    hundreds of times. Everything else is delegated to the wrapped grid.

    After each ``send_and_receive``, ``destinations`` maps each pushed message's id to the node it
    was sent to, and once the replies are consumed ``unanswered`` lists the nodes whose message had
    no reply (not even an error reply from the SuperLink) when the timeout came. A message the grid
    could not push (``None`` id) is left out of both with a warning, instead of being waited for.
    """

    def __init__(self, grid: Grid, pull_interval: float = 0.1, max_pull_interval: float = 2.0) -> None:
        _check_pull_intervals(pull_interval, max_pull_interval)
        self._grid = grid
        self.pull_interval = pull_interval
        self.max_pull_interval = max_pull_interval
        self.destinations: dict[str, int] = {}
        self.unanswered: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        messages = list(messages)  # Flower's push_messages iterates them twice; they share the model's arrays
        nodes = [getattr(getattr(m, "metadata", None), "dst_node_id", None) for m in messages]
        ids = list(self._grid.push_messages(messages))
        del messages
        self.destinations = {mid: node for mid, node in zip(ids, nodes, strict=False) if mid is not None}
        self.unanswered = []
        if len(self.destinations) < len(nodes):
            log(WARNING, "%d of %d message(s) could not be pushed to the SuperLink; not waiting for them",
                len(nodes) - len(self.destinations), len(nodes))
        return self._pull(set(self.destinations), timeout)

    def _pull(self, pending: set[str], timeout: float | None) -> Iterator[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = self.pull_interval
        while pending:
            got = 0
            for reply in self._grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                got += 1
                yield reply
            if not pending:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.unanswered = sorted((self.destinations[m] for m in pending), key=str)
                log(WARNING, "no reply to %d message(s) within %.0f s (nodes %s); going on without them",
                    len(pending), timeout, self.unanswered)
                return
            wait = self.pull_interval if got else min(2 * wait, self.max_pull_interval)
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - now)))


# --------------------------------------------------------------------------------------------
# The mixin and the ready-made strategies
# --------------------------------------------------------------------------------------------


def _aggregate_reply(arrays: dict[str, np.ndarray], weighted_by_key: str) -> Message:
    """A stand-in reply carrying the aggregate, handed to the base strategy's server step."""
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({weighted_by_key: 1.0})})
    metadata = Metadata(
        run_id=0, message_id="", src_node_id=0, dst_node_id=0, reply_to_message_id="", group_id="",
        created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


class GMAMixin:
    """Put Gradient Masked Averaging in place of the weighted average of a Flower FedAvg-family strategy.

    Use as the first base: ``class MyStrategy(GMAMixin, FedAdam)``, or ``with_gma(FedAdam)``.
    Keyword options (the rest go to the Flower strategy):

    * ``aggregator``: a fedgma aggregation rule, ``"gma"`` (default) or ``"mean"`` (plain averaging
      with the same validation), or any rule registered with ``fedgma.aggregation.register_aggregator``;
    * ``threshold`` (τ, default 0.4), ``hard`` (AND-mask), ``weighted_agreement``: GMA's options
      (used only with ``aggregator = "gma"``); ``aggregator_options``: any rule's own options
      (e.g. ``{"trim_fraction": 0.2}`` for ``trimmed_mean``), checked by the rule;
    * ``on_invalid``: ``"drop"`` (default) a bad reply with a warning naming its node, or ``"fail"``;
    * ``min_replies``: fewest valid replies a round needs (default 1); with fewer, the round leaves
      the global model unchanged and says so. Lost replies (a node that vanished mid-round, a
      message unanswered at ``start``'s ``timeout``) simply do not count towards it;
    * ``pull_interval`` / ``max_pull_interval``: first and longest pause between pulls of replies
      while streaming (default 0.1 s and 2 s; see :class:`StreamingGrid`).

    After each round ``last_round`` holds the aggregation statistics (mask density, agreement
    histogram), the dropped (bad) and lost (never came) replies as (node id, reason) pairs, and the
    admitted replies' metrics; the aggregated MetricRecord carries the scalar statistics too
    (``gma-mask-density``, ``gma-num-dropped``, ``gma-num-lost``, …).
    """

    def __init__(
        self,
        *args: Any,
        aggregator: str = "gma",
        threshold: float = 0.4,
        hard: bool = False,
        weighted_agreement: bool = False,
        aggregator_options: dict[str, Any] | None = None,
        on_invalid: str = "drop",
        min_replies: int = 1,
        pull_interval: float = 0.1,
        max_pull_interval: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_reply_options(on_invalid, min_replies, pull_interval, max_pull_interval)
        gma_options = {"threshold": threshold, "hard": hard, "weighted_agreement": weighted_agreement}
        options = {**(gma_options if aggregator == "gma" else {}), **(aggregator_options or {})}
        make_aggregator(aggregator, **options)  # fail now on a bad name or option
        self.gma_rule = aggregator
        self.gma_options = options
        self.on_invalid = on_invalid
        self.min_replies = min_replies
        self.pull_interval = pull_interval
        self.max_pull_interval = max_pull_interval
        self.last_round: dict[str, Any] = {}
        self._stream: StreamingGrid | None = None
        self._global_arrays: ArrayRecord | None = None
        self._in_server_step = False

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Any:
        """Flower's round loop, with replies streamed into the aggregator as they arrive."""
        if not isinstance(grid, StreamingGrid):
            grid = StreamingGrid(grid, self.pull_interval, self.max_pull_interval)  # type: ignore[assignment]
        self._stream = grid  # type: ignore[assignment]
        return super().start(grid, *args, **kwargs)  # type: ignore[misc]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global_arrays = arrays  # the model every reply of this round was trained from
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global_arrays is None:  # as Flower's FedAvgM / FedOpt: the model set as current_arrays
            current = getattr(self, "current_arrays", None)
            if isinstance(current, dict):  # FedOpt keeps {name: ndarray}
                current = ArrayRecord({k: Array(np.asarray(v)) for k, v in current.items()})
            self._global_arrays = current
        if self._global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train: the global model is unknown")
        fold = ReplyAggregator(
            self._global_arrays,
            rule=self.gma_rule,
            options=self.gma_options,
            weighted_by_key=self.weighted_by_key,  # type: ignore[attr-defined]
            arrayrecord_key=self.arrayrecord_key,  # type: ignore[attr-defined]
            on_invalid=self.on_invalid,
            destinations=self._stream.destinations if self._stream is not None else None,
        )
        fold.add_all(replies)
        if self._stream is not None:  # after the replies are consumed: the messages the timeout cut off
            fold.lost.extend((str(node), "no reply before the round's timeout") for node in self._stream.unanswered)
        self.last_round = {
            "round": server_round, "dropped": fold.dropped, "lost": fold.lost, "metrics": fold.metrics, "stats": {},
        }
        log(INFO, "aggregate_train (GMA): %d replies used, %d dropped, %d lost",
            fold.count, len(fold.dropped), len(fold.lost))
        if fold.count < self.min_replies or fold.total_weight <= 0:
            log(
                WARNING,
                "round %d: %d valid replies (minimum %d, total weight %s); the global model is left unchanged",
                server_round, fold.count, self.min_replies, fold.total_weight,
            )
            return None, None
        aggregated, stats = fold.result()
        self.last_round["stats"] = stats
        metrics = self.train_metrics_aggr_fn(  # type: ignore[attr-defined]
            [RecordDict({"metrics": m}) for m in fold.metrics], self.weighted_by_key  # type: ignore[attr-defined]
        )
        for name, value in stats.items():
            if isinstance(value, (int, float)) and "/" not in name:
                metrics[f"gma-{name.replace('_', '-')}"] = value
        stepped = self._server_step(server_round, aggregated, fold)
        self._global_arrays = stepped  # the next round's model, unless configure_train says otherwise
        return stepped, metrics

    def _server_step(self, server_round: int, aggregated: dict[str, np.ndarray], fold: ReplyAggregator) -> ArrayRecord:
        """Apply the base strategy's server step (FedAvgM momentum, FedAdam moments, …) to the aggregate."""
        self._in_server_step = True
        try:
            stepped, _ = super().aggregate_train(  # type: ignore[misc]
                server_round, [_aggregate_reply(aggregated, self.weighted_by_key)]  # type: ignore[attr-defined]
            )
        finally:
            self._in_server_step = False
        if stepped is None:
            raise RuntimeError("the base strategy returned no arrays for the aggregated reply")
        for key, kind in fold.kinds.items():
            if kind == "integer":  # integer arrays bypass the server step, with their dtype
                stepped[key] = Array(aggregated[key])
            elif stepped[key].dtype != fold.dtypes[key]:  # Flower's FedAdam/FedYogi/FedAdagrad return float64
                stepped[key] = Array(np.ascontiguousarray(stepped[key].numpy().astype(np.dtype(fold.dtypes[key]))))
        return stepped

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        if is_train and self._in_server_step:  # our stand-in reply, already validated
            return list(replies), []
        return super()._check_and_log_replies(replies, is_train, validate)  # type: ignore[misc]

    def summary(self) -> None:
        log(INFO, "\t├──> GMA: rule %s, %s, on_invalid=%s", self.gma_rule, self.gma_options, self.on_invalid)
        super().summary()  # type: ignore[misc]


WITH_GMA_SUPPORTED = (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad)


def _flower_base(strategy_class: type) -> type | None:
    """The nearest class in the MRO that Flower itself ships (a user's subclass keeps its Flower base)."""
    for klass in strategy_class.__mro__:
        if klass.__module__.startswith("flwr."):
            return klass
    return None


def with_gma(strategy_class: type) -> type:
    """A subclass of a Flower strategy class with GMA (or any fedgma rule) as its aggregation step.

    Flower's own server step (FedAvgM's momentum, FedAdam's moments: Flower's maths, not fedgma's)
    is applied to the aggregate, and every array is cast back to the global model's dtype after it
    (Flower's FedAdam returns float64). Only for classes whose Flower base is FedAvg, FedAvgM,
    FedProx, FedAdam, FedYogi or FedAdagrad: the others (FedMedian, FedTrimmedAvg, Krum, Bulyan,
    QFedAvg, ...) aggregate in their own way, which GMA's weighted mean would silently replace.

    Raises:
        TypeError: any other class, naming the supported ones.
    """
    base = _flower_base(strategy_class) if isinstance(strategy_class, type) else None
    if base not in WITH_GMA_SUPPORTED:
        names = ", ".join(k.__name__ for k in WITH_GMA_SUPPORTED)
        raise TypeError(
            f"with_gma supports Flower's {names} (and subclasses of them), got {strategy_class!r}; "
            "for GMA with a robust rule or fedgma's server optimizers use fedgma.flower.FedgmaStrategy"
        )
    return type(f"GMA{strategy_class.__name__}", (GMAMixin, strategy_class), {"__doc__": GMAMixin.__doc__})
